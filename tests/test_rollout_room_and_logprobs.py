"""Two rollout defects against TRL 1.16's GRPOTrainer.

1. Multi-turn tool rollouts (``_tool_call_loop``): each continuing answer is bounded by its own
   room — its completion budget left and its own positions left under the model's limit — not
   by the smallest room of the answers continuing in the same round (one answer near
   ``max_position_embeddings`` cut every other answer of the round to its room, "length").
2. ``rollout_func`` returning ``logprobs: None`` (TRL accepts it: no sampler log-probs, the old
   log-probs by a forward) was refused; the trainer now scores the behaviour log-probs with a
   forward, so the step equals one whose function returned the true log-probs of its tokens."""

import dataclasses

import pytest
import torch

from rlhf_fast.rollout import HFRolloutEngine, SamplingParams
from rlhf_fast.rollout import custom_rollout as C
from rlhf_fast.rollout import tools as T
from tests.test_rl_rollout_func import Recorder, Scripted, _trainer
from tests.test_rl_tools import (CHATS, FirstCallScripted, ScriptedEngine, _prompt_ids, calculator, call_text, ids_of,
                                 make_policy, tok)  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

SUFFIX_MSG = [{"role": "tool", "name": "calculator", "content": "3"}]


# ----------------------------------------------------------------------------- 1. each row's own room


def test_room_calls_split_only_on_positions():
    """Rows fitting together share one call of the largest room (each cut to its own after);
    a row near ``max_length`` gets its own call instead of lowering the others' room."""
    assert T._room_calls([3, 5], [10, 80], [50, 5], None) == [([3, 5], 50)]
    assert T._room_calls([3, 5], [10, 20], [50, 5], 100) == [([3, 5], 50)]
    assert T._room_calls([3, 5], [10, 80], [50, 5], 100) == [([3], 50), ([5], 5)]
    assert T._room_calls([3, 5], [10, 10], [7, 7], 100) == [([3, 5], 7)]  # equal rooms: one call, as before
    assert T._room_calls([2], [10], [0], 100) == [([2], 1)]  # nothing left: one token, cut to none


def _resp(b, i):
    P = b.prompt_length
    keep = b.attention_mask[i, P:].bool()
    return b.input_ids[i, P:][keep].tolist(), b.response_mask[i, P:][keep].tolist(), b.behaviour_logp[i, P:][keep]


def test_each_row_continues_in_its_own_room(tok):
    """Two answers continue in one round: the long prompt has 3 positions left under
    ``max_length``, the short one many more. The short answer is not cut at 3 tokens, and each
    row is exactly the row of a rollout of its prompt alone (same per-row seeds)."""
    eng = FirstCallScripted(HFRolloutEngine(make_policy(tok), tok), tok)
    chats = [[{"role": "user", "content": "what is 1+2?"}],
             [{"role": "user", "content": "the answer is a number. " * 2 + "what is 3+4?"}]]
    prompts = [tok.apply_chat_template(c, tools=[calculator], tokenize=False, add_generation_prompt=True)
               for c in chats]
    lens = [len(ids_of(tok, p)) for p in prompts]
    # each row's first turn (scripted) and tool result: the sequence the continuation starts from
    first = [len(ids_of(tok, call_text(args=f'{{"expression": "{e}"}}'))) + 1 +
             len(T.tool_suffix_ids(tok, [{"role": "tool", "name": "calculator", "content": r}]))
             for e, r in (("1+2", "3"), ("3+4", "7"))]
    max_length = lens[1] + first[1] + 3  # the long row: 3 tokens of room
    assert max_length - lens[0] - first[0] > 12  # the short row: many more
    params = SamplingParams(max_new_tokens=200, temperature=1.0, sample_seeds=(5, 6))
    rooms, generate = [], eng.generate
    eng.generate = lambda p, sp: rooms.append((len(p), sp.max_new_tokens)) or generate(p, sp)
    both, st = T.tool_rollout(eng, prompts, params, tools=[calculator], tokenizer=tok, max_length=max_length)
    room0 = max_length - lens[0] - first[0]
    assert st.iterations == 1 and st.calls == 2
    assert rooms == [(2, 200), (1, room0), (1, 3)]  # the round's two calls: each row's own room
    for i in range(2):
        one = dataclasses.replace(params, sample_seeds=(params.sample_seeds[i],))
        alone, _ = T.tool_rollout(eng, [prompts[i]], one, tools=[calculator], tokenizer=tok, max_length=max_length)
        ids, mask, lp = _resp(both, i)
        ids1, mask1, lp1 = _resp(alone, 0)
        assert ids == ids1 and mask == mask1 and both.finish_reasons[i] == alone.finish_reasons[0]
        torch.testing.assert_close(lp, lp1, rtol=0, atol=1e-5)
        assert lens[i] + len(ids) <= max_length  # (never past the positions)
    cont = [len(_resp(both, i)[0]) - first[i] for i in range(2)]  # each row's continuation tokens
    assert cont[1] == 3 and both.finish_reasons[1] == "length"
    # not cut to the long row's room: its own (positions left) unless it stopped first
    assert cont[0] == room0 or (3 < cont[0] < room0 and both.finish_reasons[0] == "stop")
    assert cont[0] > 3


def test_min_new_tokens_above_a_continuations_room(tok):
    """``min_new_tokens`` above the room left for a continuation: the continuation (cut to its
    room, as TRL's full-length turn is) asks for at most its room; SamplingParams refused it."""
    def script(p, row):
        return "the answer is 3" if "<tool_response>" in tok.decode(p) else call_text()

    eng = ScriptedEngine(tok, script)
    call = ids_of(tok, call_text()) + [tok.eos_token_id]
    suffix = T.tool_suffix_ids(tok, SUFFIX_MSG)
    params = SamplingParams(max_new_tokens=len(call) + len(suffix) + 3, min_new_tokens=5)
    b, st = T.tool_rollout(eng, [_prompt_ids(tok)], params, tools=[calculator], tokenizer=tok)
    assert eng.calls[1][1].max_new_tokens == 3 and eng.calls[1][1].min_new_tokens == 3
    assert b.finish_reasons == ["length"] and sum(_resp(b, 0)[1]) == len(call) + 3


# ----------------------------------------------------------------------------- 2. rollout_func logprobs None


class Logprobs:
    """``Scripted``'s rows with ``logprobs`` None, or with the true log-probs of its completion
    tokens under the trainer's policy (at the rollout temperature, each row scored alone)."""

    def __init__(self, tok, none):
        self.inner, self.none = Scripted(tok, vary=True), none

    def __call__(self, prompts, trainer):
        from rlhf_fast.models.logprobs import sequence_logprobs

        out = self.inner(prompts, trainer)
        if self.none:
            out["logprobs"] = None
            return out
        lps = []
        for p, c in zip(out["prompt_ids"], out["completion_ids"]):
            ids = torch.tensor([p + c])
            rm = torch.zeros_like(ids)
            rm[0, len(p):] = 1
            with torch.no_grad():
                lp = sequence_logprobs(trainer.policy, ids, torch.ones_like(ids), response_mask=rm,
                                       temperature=trainer.config.rollout.temperature)
            lps.append(lp[0, len(p):].tolist())
        out["logprobs"] = lps
        return out


def test_check_output_accepts_logprobs_none(tok):
    out = Scripted(tok)(CHATS[:1] * 4, None)
    p, c, lp, env, fields = C.check_output({**out, "logprobs": None}, 4)
    assert lp is None and c == out["completion_ids"] and "logprobs" not in fields
    with pytest.raises(ValueError, match=r"logprobs\[1\] must be a list of floats"):  # a row None: TRL fails too
        C.check_output({**out, "logprobs": [out["logprobs"][0], None] + out["logprobs"][2:]}, 4)


@pytest.mark.parametrize("old_logp", ["behaviour", "recompute"])
def test_logprobs_none_step_equals_true_logprobs_step(tmp_path, tok, old_logp):
    """A step whose rollout_func returned ``logprobs: None`` equals one whose function returned
    the true log-probs of its tokens: the behaviour log-probs come from a scoring forward."""
    runs = []
    for none in (True, False):
        tr = _trainer(tmp_path / str(none), tok, Logprobs(tok, none), reward_fns=[Recorder()],
                      ppo={"old_logp": old_logp})
        data, m = tr.rollout()
        st = tr.update(data)
        runs.append((tr, data, m, st))
    (a, da, ma, sa), (b, db, mb, sb) = runs
    assert db.behaviour_logp[db.response_mask].abs().min() > 0  # (the true ones: not zeros)
    for k in ("input_ids", "response_mask", "old_logp", "behaviour_logp", "advantages"):
        torch.testing.assert_close(getattr(da, k), getattr(db, k), rtol=0, atol=1e-5, msg=k)
    for k in ("policy/loss", "policy/ratio_mean", "policy/ratio_max"):
        assert sa[k] == pytest.approx(sb[k], rel=1e-4, abs=1e-6), k
    for x, y in zip(a.policy.parameters(), b.policy.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
