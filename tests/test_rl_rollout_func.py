"""Custom rollout functions (TRL GRPOTrainer's ``rollout_func``) in the RL trainer.

A scripted function returns fixed prompt ids, completions (one ending in eos, one cut, one with
environment tokens masked out by ``env_mask``, one empty where asked), log-probs and extra
fields. Checked: the prompts it receives (as the data gives them, each repeated group_size
times; eval.group_size in evaluation), the RolloutBatch built from its output (left-padded
prompts, holes, behaviour log-probs, texts, finish reasons), what the reward functions receive
(ours, and TRL's ``_calculate_rewards`` called on a stand-in ``self`` with TRL's extra-field merge
and env_mask pop transcribed from ``GRPOTrainer._generate`` / ``_generate_and_score_completions``),
a GRPO step on the given log-probs (``ppo.old_logp: behaviour``: the ratio by hand, and the same
step through an engine that returns the batch built by hand), prefix sharing over groups whose
rows read different prompts, dynamic sampling, environments, and the refusals. Two gloo ranks
under DDP (each calls the function with its share of the prompts) log one process's metrics
and end with its weights; this file is also the worker they run."""

import json
import math
import os
import sys
from types import SimpleNamespace

if __name__ == "__main__":  # run as the worker: tests/ must not shadow packages (tests/triton/ does)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import pytest
import torch

from rlhf_fast.rollout import RolloutBatch, RolloutEngine
from rlhf_fast.rollout import custom_rollout as C
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import (DataConfig, EvalConfig, KLConfig, OptimConfig, PPOConfig, RewardConfig,
                                          RLConfig, RolloutConfig)
from tests.test_rl_tools import CHATS, calculator, ids_of, make_policy, tok  # noqa: F401 - fixture
from tests.torchrun_launch import launch, main

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

G = 4  # answers per prompt
RECORDS = [{"prompt": c, "answer": f"data{i}", "level": i} for i, c in enumerate(CHATS)]


class Scripted:
    """A rollout function: row r answers with pattern r % 4 — 0: text + eos, 1: text without eos
    (cut), 2: model tokens, an environment observation (env_mask 0), model tokens + eos, 3: a
    short answer + eos (empty where ``empty``). Log-probs −0.05·(j+1) − 0.01·(r % 4). Extra fields:
    ``answer`` per row (overrides the records' field), ``source`` one value for every row.
    ``vary``: row k of a group reads k extra tokens at the end of its prompt."""

    def __init__(self, tok, vary=False, empty=False, mutate=None):
        self.tok, self.vary, self.empty, self.mutate, self.calls = tok, vary, empty, mutate, []

    def parts(self, r):
        t, eos = self.tok, [self.tok.eos_token_id]
        k = r % 4
        if k == 0:
            return [(ids_of(t, "the answer is 3") + eos, 1)]
        if k == 1:
            return [(ids_of(t, "the answer"), 1)]
        if k == 2:
            return [(ids_of(t, "the"), 1), (ids_of(t, "\n3\n"), 0),
                    (ids_of(t, " answer is 3") + eos, 1)]
        return [] if self.empty else [(ids_of(t, "3") + eos, 1)]

    def prompt_ids(self, prompt, r):
        text = self.tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return ids_of(self.tok, text) + (ids_of(self.tok, "x") * (r % G) if self.vary else [])

    def __call__(self, prompts, trainer):
        self.calls.append((prompts, trainer))
        rows = [self.parts(r) for r in range(len(prompts))]
        comp = [[t for ids, _ in p for t in ids] for p in rows]
        out = {"prompt_ids": [self.prompt_ids(p, r) for r, p in enumerate(prompts)],
               "completion_ids": comp,
               "logprobs": [[-0.05 * (j + 1) - 0.01 * (r % 4) for j in range(len(c))] for r, c in enumerate(comp)],
               "env_mask": [[m for ids, m in p for _ in ids] for p in rows],
               "answer": [f"rollout{r}" for r in range(len(prompts))], "source": "scripted"}
        return self.mutate(out) if self.mutate else out


def _config(tmp_path, ro=None, ppo=None, **kw):
    return RLConfig(**{"estimator": "grpo", "steps": 1, "output_dir": str(tmp_path / "run"), "progress": False,
                       "sample_every": 0, "data": DataConfig(shuffle=False),
                       "rollout": RolloutConfig(**{"prompts_per_step": 2, "group_size": G, "max_new_tokens": 24,
                                                   **(ro or {})}),
                       "ppo": PPOConfig(**{"epochs": 1, "mini_batch_size": 8, "micro_batch_size": 4,
                                           "old_logp": "behaviour", **(ppo or {})}),
                       "optim": OptimConfig(lr=1e-3), "kl": KLConfig(coef=0.05, placement="loss", kind="k3"), **kw})


class Recorder:
    """A reward function (ours) that keeps what it received; the reward is the text length."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, **fields):
        self.calls.append((list(prompts), list(completions), fields))
        return [float(len(c)) for c in completions]


def _trainer(tmp_path, tok, fn, records=RECORDS, reward_fns=None, **kw):
    return RLTrainer(_config(tmp_path, **kw), make_policy(tok), tok, reward_fns=reward_fns or [Recorder()],
                     prompts=records, rollout_func=fn)


# ----------------------------------------------------------------------------- the batch and the rewards


def test_batch_and_reward_inputs(tmp_path, tok):
    fn, rec = Scripted(tok, vary=True), Recorder()  # (prompts of different lengths: left padding)
    tr = _trainer(tmp_path, tok, fn, reward_fns=[rec])
    batch, fields, extra = tr._generate(0)
    out = tr._score(batch, fields, extra)
    # the prompts as the data gives them (chats), each repeated group_size times, and the trainer
    (prompts, trainer), = fn.calls
    assert trainer is tr and prompts == [CHATS[i] for i in (0, 1) for _ in range(G)]
    raw = fn(prompts, tr)
    P = batch.prompt_length
    assert P == max(map(len, raw["prompt_ids"])) and batch.batch_size == 2 * G
    for r in range(2 * G):
        p, c, env = raw["prompt_ids"][r], raw["completion_ids"][r], raw["env_mask"][r]
        assert batch.input_ids[r, P - len(p):P].tolist() == p  # left-padded prompt
        assert not batch.attention_mask[r, :P - len(p)].any() and batch.attention_mask[r, P - len(p):P].all()
        assert batch.input_ids[r, P:P + len(c)].tolist() == c
        assert batch.attention_mask[r, P:P + len(c)].all() and not batch.attention_mask[r, P + len(c):].any()
        assert batch.response_mask[r, P:P + len(c)].tolist() == env and not batch.response_mask[r, :P].any()
        want = [lp * m for lp, m in zip(raw["logprobs"][r], env)]
        torch.testing.assert_close(batch.behaviour_logp[r, P:P + len(c)], torch.tensor(want), rtol=0, atol=0)
        assert batch.response_texts[r] == tok.decode(c, skip_special_tokens=True)
    assert (batch.response_mask[2, P:] == 0).any()  # the observation is a hole
    assert batch.finish_reasons == ["stop", "length", "stop", "stop"] * 2
    assert batch.group_index.tolist() == [0] * G + [1] * G
    assert batch.num_generated_tokens == sum(map(sum, raw["env_mask"]))
    # the reward function: the completions' texts, the rollout's fields (answer wins over the records')
    (r_prompts, r_comps, r_fields), = rec.calls
    assert r_comps == batch.response_texts and r_prompts == [tr.prompts[i] for i in (0, 1) for _ in range(G)]
    assert r_fields["answer"] == [f"rollout{r}" for r in range(2 * G)]
    assert r_fields["source"] == ["scripted"] * (2 * G) and r_fields["level"] == [0] * G + [1] * G
    assert "env_mask" not in r_fields
    assert out.total.tolist() == [float(len(c)) for c in batch.response_texts]


def trl_kwargs_recorder(store):
    def rew(prompts, completions, completion_ids, **kw):
        store.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kw))
        return [float(len(ids)) for ids in completion_ids]
    return rew


def test_reward_inputs_equal_trl(tmp_path, tok):
    """TRL's convention: the kwargs our reward function gets equal those TRL's
    ``_calculate_rewards`` gives it for the same rollout output."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    ours, theirs = [], []
    fn = Scripted(tok)
    tr = _trainer(tmp_path, tok, fn, reward_fns=[trl_kwargs_recorder(ours)],
                  reward=RewardConfig(calling_convention="trl"))
    batch, fields, extra = tr._generate(0)
    out = tr._score(batch, fields, extra)
    inputs = [dict(r) for r in RECORDS[:2] for _ in range(G)]  # TRL's rows (RepeatSampler)
    prompts = [x["prompt"] for x in inputs]
    output = fn(prompts, tr)
    # --- transcribed from GRPOTrainer._generate (trl 1.16), the rollout_func branch
    required_keys = {"prompt_ids", "completion_ids", "logprobs"}
    extra_fields = {k: v for k, v in output.items() if k not in required_keys}
    completion_ids = output["completion_ids"]
    contents = tok.batch_decode(completion_ids, skip_special_tokens=True)  # (no response_schema)
    completions = [[{"role": "assistant", "content": content}] for content in contents]
    extra_fields.pop("env_mask", None)  # (no tools: it becomes the tool mask)
    # --- transcribed from GRPOTrainer._generate_and_score_completions: the merge into the inputs
    for i, inp in enumerate(inputs):
        for key, values in extra_fields.items():
            if isinstance(values, list) and i < len(values):
                inp[key] = values[i]
            elif not isinstance(values, list):
                inp[key] = values
    # ---
    assert getattr(tok, "response_schema", None) is None
    me = SimpleNamespace(accelerator=SimpleNamespace(device="cpu", is_main_process=True),
                         reward_funcs=[trl_kwargs_recorder(theirs)], reward_processing_classes=[None],
                         reward_func_names=["rew"], environments=None, state=SimpleNamespace(global_step=0),
                         args=SimpleNamespace(report_to=[]), _log_completion_extra=None, _log_metric=None)
    trl = GRPOTrainer._calculate_rewards(me, inputs, prompts, completions, completion_ids)
    (a,), (b,) = ours, theirs
    for k in ("prompts", "completions", "completion_ids", "answer", "source", "level"):
        assert a[k] == b[k], k
    assert "env_mask" not in a and "env_mask" not in b
    assert out.total.tolist() == trl[:, 0].tolist()


# ----------------------------------------------------------------------------- the update


class Replay(RolloutEngine):
    """An engine that answers with a batch built by hand from the script (no custom_rollout code)."""

    def __init__(self, tok, script):
        self.tok, self.script, self.pad_id = tok, script, tok.pad_token_id

    def generate(self, prompts, params):
        chats = [c for p in prompts for c in CHATS if self.tok.apply_chat_template(
            c, tokenize=False, add_generation_prompt=True) == p]
        rows = [c for c in chats for _ in range(params.n)]
        o = self.script(rows, None)
        B, P = len(rows), max(map(len, o["prompt_ids"]))
        R = max(map(len, o["completion_ids"]))
        ids = torch.full((B, P + R), self.pad_id)
        am, rm, lp = (torch.zeros(B, P + R, dtype=torch.long), torch.zeros(B, P + R, dtype=torch.long),
                      torch.zeros(B, P + R))
        for i, (p, c) in enumerate(zip(o["prompt_ids"], o["completion_ids"])):
            ids[i, P - len(p):P], am[i, P - len(p):P + len(c)] = torch.tensor(p), 1
            ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
            rm[i, P:P + len(c)] = torch.tensor(o["env_mask"][i])
            lp[i, P:P + len(c)] = torch.tensor(o["logprobs"][i]) * rm[i, P:P + len(c)]
        return RolloutBatch(ids, am, rm, lp, [p for p in prompts for _ in range(params.n)],
                            self.tok.batch_decode(o["completion_ids"], skip_special_tokens=True),
                            torch.arange(len(prompts)).repeat_interleave(params.n), int(rm.sum()), 1.0, P,
                            ["stop", "length", "stop", "stop"] * len(prompts))


def test_grpo_step_on_the_given_logprobs(tmp_path, tok):
    from rlhf_fast.models.logprobs import sequence_logprobs

    script = Scripted(tok, vary=True)
    tr = _trainer(tmp_path / "a", tok, script)
    data, m = tr.rollout()
    rm = data.response_mask
    raw = script(CHATS[:1] * 2 * G, None)
    given = [lp for r in range(2 * G) for lp, e in zip(raw["logprobs"][r], raw["env_mask"][r]) if e]
    torch.testing.assert_close(data.old_logp[rm], torch.tensor(given), rtol=0, atol=0)  # old_logp: behaviour
    with torch.no_grad():
        logp = sequence_logprobs(tr.policy, data.input_ids, data.attention_mask, response_mask=rm)
    ratio = torch.exp(logp - data.old_logp)[rm]  # by hand: the first micro-batches run the initial policy
    st = tr.update(data)
    assert st["policy/ratio_mean"] == pytest.approx(float(ratio.mean()), rel=1e-5)
    assert st["policy/ratio_max"] == pytest.approx(float(ratio.max()), rel=1e-5)
    # the same step through an engine answering with the batch built by hand: the same numbers
    ref = RLTrainer(_config(tmp_path / "b"), make_policy(tok), tok, reward_fns=[Recorder()], prompts=RECORDS,
                    engine=Replay(tok, Scripted(tok, vary=True)))
    data2, m2 = ref.rollout()
    for k in ("input_ids", "attention_mask", "response_mask", "old_logp", "ref_logp", "behaviour_logp",
              "advantages", "scores"):
        torch.testing.assert_close(getattr(data, k), getattr(data2, k), rtol=0, atol=0, msg=k)
    assert {k: v for k, v in m.items() if "time" not in k and "per_second" not in k} == \
           {k: v for k, v in m2.items() if "time" not in k and "per_second" not in k}
    st2 = ref.update(data2)
    assert st == st2
    for a, b in zip(tr.policy.parameters(), ref.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_empty_completion_trains(tmp_path, tok):
    """An empty completion (TRL fails on it: ``ids[-1]``) is an answer of no tokens: reward of
    "", no loss token, finish reason "stop" (not cut by the budget)."""
    rec = Recorder()
    tr = _trainer(tmp_path, tok, Scripted(tok, empty=True), reward_fns=[rec], ro={"mask_truncated": True})
    hist = tr.train()
    assert rec.calls[0][1][3] == "" and rec.calls[0][1][7] == ""
    assert math.isfinite(hist[0]["policy/loss"]) and hist[0]["rollout/truncated_frac"] == 0.25
    batch, _, _ = tr._generate(0)
    assert not batch.response_mask[3].any() and batch.finish_reasons[3] == "stop"


# ----------------------------------------------------------------------------- evaluation, interactions


def test_evaluation_uses_the_function_with_eval_group_size(tmp_path, tok):
    fn = Scripted(tok)
    tr = RLTrainer(_config(tmp_path, eval=EvalConfig(group_size=2)), make_policy(tok), tok,
                   reward_fns=[Recorder()], prompts=RECORDS[:2], eval_prompts=RECORDS[2:], rollout_func=fn)
    res = tr.evaluate()
    (prompts, _), = fn.calls
    assert prompts == [CHATS[2], CHATS[2], CHATS[3], CHATS[3]]
    texts = [tok.decode(c, skip_special_tokens=True) for c in fn(prompts, tr)["completion_ids"]]
    assert res["eval/reward/total"] == pytest.approx(sum(map(len, texts)) / 4)


def test_prefix_sharing_with_rows_reading_different_prompts(tmp_path, tok):
    """Rows of one group whose prompts differ (an agent's own prompt per row): ``ppo.prefix_sharing``
    shares only what they have in common, so the log-probs are those of the padded forward."""
    out = []
    for share in (False, True):
        fn = Scripted(tok, vary=True)
        tr = _trainer(tmp_path / str(share), tok, fn, ppo={"prefix_sharing": share, "old_logp": "recompute"})
        data, _ = tr.rollout()
        out.append(data)
    assert len({tuple(r) for r in out[0].input_ids[:G].tolist()}) == G
    for k in ("old_logp", "ref_logp", "advantages"):
        torch.testing.assert_close(getattr(out[0], k), getattr(out[1], k), msg=k)


def test_dynamic_sampling_calls_it_each_round(tmp_path, tok):
    fn = Scripted(tok)
    tr = _trainer(tmp_path, tok, fn, reward_fns=[lambda p, c: [1.0] * len(c)],
                  ro={"dynamic_sampling": True, "max_sampling_rounds": 2})
    data, m = tr.rollout()
    assert m["rollout/sampling_rounds"] == 2 and len(fn.calls) == 2
    assert fn.calls[1][0] == [CHATS[i] for i in (2, 3) for _ in range(G)]  # the next prompts
    assert data.input_ids.shape[0] == 2 * G


class Hint:
    """An environment without tools: its reset observation is appended to the prompt."""

    def reset(self, **record):
        return f" (level {record['level']})"


def test_environment_without_tools(tmp_path, tok):
    fn, seen = Scripted(tok), []

    def rew(prompts, completions, environments, **kw):
        seen.append(environments)
        return [0.0] * len(completions)

    tr = RLTrainer(_config(tmp_path), make_policy(tok), tok, reward_fns=[rew], prompts=RECORDS, rollout_func=fn,
                   environment_factory=Hint)
    tr._score(*tr._generate(0))
    (prompts, _), = fn.calls
    assert prompts[G][0]["content"] == CHATS[1][0]["content"] + " (level 1)"
    assert len(seen[0]) == 2 * G and all(isinstance(e, Hint) for e in seen[0])


# ----------------------------------------------------------------------------- refusals


def _out(tok, **change):
    out = Scripted(tok)(CHATS[:1] * 4, None)
    out.update(change)
    return out


def test_missing_keys_raise_trls_message(tok):
    out = _out(tok)
    del out["logprobs"], out["prompt_ids"]
    # transcribed from GRPOTrainer._generate (trl 1.16)
    required_keys = {"prompt_ids", "completion_ids", "logprobs"}
    missing_keys_list = sorted(required_keys - out.keys())
    with pytest.raises(ValueError) as e:
        C.check_output(out, 4)
    assert str(e.value) == f"rollout_func must return keys {missing_keys_list} in its output dict."


def _bad(rows, r, j, v):
    rows = [list(x) for x in rows]
    rows[r][j] = v
    return rows


@pytest.mark.parametrize("change, match", [
    (lambda o: {"completion_ids": o["completion_ids"][:3]}, r"3 rows in 'completion_ids'; expected 4"),
    (lambda o: {"prompt_ids": "abc"}, r"'prompt_ids' as str"),
    (lambda o: {"logprobs": [o["logprobs"][0], o["logprobs"][1][:-1]] + o["logprobs"][2:]},
     r"logprobs\[1\] has 5 values; completion_ids\[1\] has 6 tokens"),
    (lambda o: {"env_mask": o["env_mask"][:2] + [o["env_mask"][2] + [1]] + o["env_mask"][3:]}, r"env_mask\[2\] has"),
    (lambda o: {"env_mask": [[2] + o["env_mask"][0][1:]] + o["env_mask"][1:]}, r"env_mask\[0\] must hold 0 or 1"),
    (lambda o: {"completion_ids": _bad(o["completion_ids"], 1, 0, 1.5)}, r"completion_ids\[1\] must hold int"),
    (lambda o: {"completion_ids": _bad(o["completion_ids"], 1, 0, True)}, r"completion_ids\[1\] must hold int"),
    (lambda o: {"prompt_ids": _bad(o["prompt_ids"], 2, 0, 400)}, r"prompt_ids\[2\] holds token id 400.*\[0, 400\)"),
    (lambda o: {"completion_ids": _bad(o["completion_ids"], 0, 1, -1)}, r"completion_ids\[0\] holds token id -1"),
    (lambda o: {"logprobs": _bad(o["logprobs"], 1, 0, float("nan"))}, r"logprobs\[1\]\[0\] must be a finite"),
    (lambda o: {"logprobs": _bad(o["logprobs"], 1, 2, float("-inf"))}, r"logprobs\[1\]\[2\] must be a finite"),
    (lambda o: {"logprobs": _bad(o["logprobs"], 0, 0, None)}, r"logprobs\[0\]\[0\] must be a finite"),
    (lambda o: {"prompt_ids": [[]] + o["prompt_ids"][1:]}, r"prompt_ids\[0\] is empty"),
    (lambda o: {"completion_ids": [o["completion_ids"][0] * 5] + o["completion_ids"][1:]},
     r"completion_ids\[0\] has 50 tokens, more than rollout.max_new_tokens \(24\)"),
    (lambda o: {"prompt_ids": [o["prompt_ids"][0] * 6] + o["prompt_ids"][1:]},
     r"prompt_ids\[0\] and completion_ids\[0\] are \d+ tokens, more than the policy's 100 positions"),
    (lambda o: {"answer": ["a", "b"]}, r"2 values in 'answer'; a list is one value per row \(4\)"),
    (lambda o: {"completions": "x"}, r"the key 'completions'"),
    (lambda o: {"_private": 1}, r"the key '_private'"),
])
def test_bad_output_names_key_and_row(tok, change, match):
    out = _out(tok)
    out.update(change(out))
    with pytest.raises(ValueError, match=match):
        C.check_output(out, 4, vocab_size=400, max_new_tokens=24, max_length=100)


def test_tensors_accepted_and_non_dict_refused(tok):
    out = _out(tok)
    t = {**out, "prompt_ids": [torch.tensor(p) for p in out["prompt_ids"]],
         "logprobs": [torch.tensor(lp, dtype=torch.float64) for lp in out["logprobs"]]}
    assert C.check_output(t, 4)[:4] == C.check_output(out, 4)[:4]
    with pytest.raises(TypeError, match="must return a dict"):
        C.check_output([out], 4)


def test_errors_surface_from_the_trainer(tmp_path, tok):
    tr = _trainer(tmp_path, tok, Scripted(tok, mutate=lambda o: {k: v for k, v in o.items() if k != "logprobs"}))
    with pytest.raises(ValueError, match=r"rollout_func must return keys \['logprobs'\]"):
        tr.rollout()
    tr = _trainer(tmp_path, tok, Scripted(tok), ro={"max_new_tokens": 5})
    with pytest.raises(ValueError, match=r"completion_ids\[0\] has 10 tokens, more than rollout.max_new_tokens"):
        tr.rollout()


def test_config_path_and_refusals(tmp_path, tok):
    f = tmp_path / "my_rollout.py"
    f.write_text("CALLS = []\n\ndef rollout(prompts, trainer):\n    CALLS.append(len(prompts))\n"
                 "    return {'prompt_ids': [[5, 6]] * len(prompts), 'completion_ids': [[7, 8]] * len(prompts),\n"
                 "            'logprobs': [[-1.0, -2.0]] * len(prompts)}\n")
    tr = RLTrainer(_config(tmp_path, ro={"rollout_func": f"{f}:rollout"}), make_policy(tok), tok,
                   reward_fns=[Recorder()], prompts=RECORDS)
    batch, _, _ = tr._generate(0)
    assert batch.input_ids[:, -4:].tolist() == [[5, 6, 7, 8]] * (2 * G)
    assert batch.behaviour_logp[:, -2:].tolist() == [[-1.0, -2.0]] * (2 * G)

    def build(ro=None, **kw):
        return RLTrainer(_config(tmp_path, ro=ro), make_policy(tok), tok, reward_fns=[Recorder()], prompts=RECORDS,
                         **kw)

    with pytest.raises(ValueError, match="both set"):
        build(ro={"rollout_func": f"{f}:rollout"}, rollout_func=Scripted(tok))
    with pytest.raises(ValueError, match=r"rollout\.rollout_func: expected 'module:function'"):
        build(ro={"rollout_func": "no_such_module_xyz:f"})
    with pytest.raises(ValueError, match=r"rollout\.rollout_func must be an import path"):
        RolloutConfig(rollout_func="no_colon")
    with pytest.raises(TypeError, match="rollout_func must be a callable"):
        build(rollout_func="not callable")
    with pytest.raises(ValueError, match="rollout_func: not with tools"):
        build(rollout_func=Scripted(tok), tools=[calculator])


# ----------------------------------------------------------------------------- two ranks


DDP_KEYS = ["reward/total", "advantages/mean", "response_length/mean", "kl/token", "policy/loss",
            "policy/approx_kl", "policy/clip_frac", "policy/ratio_mean", "policy/grad_norm"]


def worker(specs, root, out):
    from pathlib import Path

    from rlhf_fast.distributed import DistributedConfig, unwrap
    from tests.test_rl_tools import tool_tokenizer

    tk, results = tool_tokenizer(), {}
    for spec in specs:  # the strategy: ddp or none
        fn = Scripted(tk)
        cfg = _config(Path(root) / spec, steps=2, distributed=DistributedConfig(strategy=spec))
        tr = RLTrainer(cfg, make_policy(tk), tk, reward_fns=[Recorder()], prompts=RECORDS, rollout_func=fn)
        tr.train()
        world = tr.ctx.world_size
        # each rank answers its share: prompts_per_step / world prompts, group_size rows each
        assert [len(p) for p, _ in fn.calls] == [2 * G // world] * 2, fn.calls
        if tr.ctx.is_main:
            with open(Path(root) / spec / "run" / "metrics.jsonl") as f:
                log = [json.loads(ln) for ln in f]
            torch.save({k: v.detach().cpu() for k, v in unwrap(tr.policy).state_dict().items()},
                       os.path.join(root, spec + ".pt"))
            results[spec] = {"log": log, "world": world}
    return results


def test_two_ranks_match_one_process(tmp_path):
    root = str(tmp_path)
    two, one = launch(__file__, root, 2, ["ddp"])["ddp"], launch(__file__, root, 1, ["none"])["none"]
    assert two["world"] == 2 and one["world"] == 1
    for k in DDP_KEYS:
        a, b = [m[k] for m in two["log"] if k in m], [m[k] for m in one["log"] if k in m]
        assert len(a) == len(b) == 2 and a == pytest.approx(b, rel=1e-4, abs=1e-5), k
    wa, wb = torch.load(os.path.join(root, "ddp.pt")), torch.load(os.path.join(root, "none.pt"))
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4, msg=k)


if __name__ == "__main__":
    main(worker)
