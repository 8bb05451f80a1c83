"""Options RL-with-verifiable-rewards recipes use, checked against the formulas of the
trainers that introduced them.

- ``ppo.importance_sampling_level: sequence`` — GSPO's sequence ratio (TRL's option of that
  name; verl's ``gspo`` loss).
- ``reward.overlong_buffer`` — DAPO's soft overlong punishment (TRL's
  ``get_soft_overlong_punishment``).
- ``rollout.mask_truncated`` — answers cut at the budget leave the losses (TRL's
  ``mask_truncated_completions``).
"""

import pytest
import torch

from rlhf_fast.algorithms import OverlongPenalty, RewardContext
from rlhf_fast.models.logprobs import policy_loss, sequence_level_old_logp, sequence_logprobs
from rlhf_fast.ops.reference import aggregate
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import PPOConfig, RewardConfig, RLConfig, RolloutConfig
from tests.test_rl_learning import PROMPTS, make_config, make_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def n_chars(prompts, completions):
    return [float(len(c)) for c in completions]


# --------------------------------------------------------------------------- GSPO


def _batch(seed=0, B=4, T=9):
    """A tiny policy, token ids and masks with rows of different response lengths (one row
    without response tokens), and old log-probs off the current policy's by a few percent."""
    pol, tok = make_policy(seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tok), (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.bool)
    am[1, :2] = False  # left padding
    rm = torch.zeros(B, T, dtype=torch.bool)
    rm[0, 3:] = True
    rm[1, 5:] = True
    rm[2, 8:] = True
    # row 3: no response tokens
    with torch.no_grad():
        logp = sequence_logprobs(pol, ids, am, response_mask=rm)
    old = (logp + 0.05 * torch.randn(B, T, generator=g)) * rm
    return pol, ids, am, rm, old, g


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def _trl_sequence_loss(pol, ids, am, rm, old, adv_row, clip_low, clip_high):
    """TRL GRPOTrainer's loss with importance_sampling_level="sequence" (loss_type bnpo: the
    token mean), the sequence log-ratio differentiated through its mean."""
    logp = sequence_logprobs(pol, ids, am, response_mask=rm)
    m = rm.float()
    log_w = ((logp - old) * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    coef1 = torch.exp(log_w)[:, None]
    coef2 = torch.clamp(coef1, 1 - clip_low, 1 + clip_high)
    adv = adv_row[:, None]
    per_token = -torch.min(coef1 * adv, coef2 * adv)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def _verl_gspo_loss(pol, ids, am, rm, old, adv, clip_low, clip_high, agg):
    """verl core_algos.compute_policy_loss_gspo (without its log-ratio clamp at 10)."""
    logp = sequence_logprobs(pol, ids, am, response_mask=rm)
    m = rm.float()
    seq = ((logp - old) * m).sum(-1) / m.sum(-1).clamp(min=1)
    ratio = torch.exp(logp - logp.detach() + seq.detach()[:, None])
    losses = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    return aggregate(losses * m, rm, agg)


def test_sequence_level_old_logp_gives_each_row_its_mean_log_ratio():
    logp = torch.tensor([[0.0, -1.0, -2.0, -3.0], [0.0, -0.5, -0.5, 0.0]])
    old = torch.tensor([[0.0, -1.2, -2.4, -3.0], [0.0, -0.5, -0.5, 0.0]])
    mask = torch.tensor([[False, True, True, False], [False, False, False, False]])
    eff = sequence_level_old_logp(logp, old, mask)
    ratio = torch.exp(logp - eff)
    # row 0: mean of (0.2, 0.4) over its two loss tokens; row 1 has none: ratio 1
    torch.testing.assert_close(ratio[0], torch.full((4,), torch.tensor(0.3).exp().item()))
    torch.testing.assert_close(ratio[1], torch.ones(4))


def test_sequence_level_loss_and_gradient_equal_trl_gspo():
    pol, ids, am, rm, old, g = _batch()
    adv_row = torch.randn(ids.shape[0], generator=g)
    adv = adv_row[:, None].expand_as(old).contiguous() * rm
    lo, hi = 0.01, 0.02  # tight enough that some rows are clipped and some not
    want = _trl_sequence_loss(pol, ids, am, rm, old, adv_row, lo, hi)
    want.backward()
    g_want = _grads(pol)
    pol.zero_grad(set_to_none=True)
    loss, st = policy_loss(pol, ids, am, rm, old, adv, clip_low=lo, clip_high=hi, agg="token-mean",
                           importance_sampling_level="sequence")
    loss.backward()
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    for a, b in zip(_grads(pol), g_want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert 0 < float(st["clip_frac"]) < 1
    # the token ratio is another objective: the check above can tell them apart
    pol.zero_grad(set_to_none=True)
    tok_loss, _ = policy_loss(pol, ids, am, rm, old, adv, clip_low=lo, clip_high=hi, agg="token-mean")
    assert abs(float(tok_loss.detach()) - float(want.detach())) > 1e-5


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_sequence_level_with_token_advantages_equals_verl_gspo_token(agg):
    pol, ids, am, rm, old, g = _batch(1)
    adv = torch.randn(old.shape, generator=g) * rm
    want = _verl_gspo_loss(pol, ids, am, rm, old, adv, 0.01, 0.02, agg)
    want.backward()
    g_want = _grads(pol)
    pol.zero_grad(set_to_none=True)
    loss, _ = policy_loss(pol, ids, am, rm, old, adv, clip_low=0.01, clip_high=0.02, agg=agg,
                          importance_sampling_level="sequence")
    loss.backward()
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    for a, b in zip(_grads(pol), g_want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_importance_sampling_level_is_checked():
    pol, ids, am, rm, old, _ = _batch()
    with pytest.raises(ValueError, match="importance_sampling_level"):
        policy_loss(pol, ids, am, rm, old, torch.zeros_like(old), importance_sampling_level="seq")
    with pytest.raises(ValueError, match="ppo.importance_sampling_level"):
        PPOConfig(importance_sampling_level="sample")


def test_trainer_trains_with_sequence_ratios(tmp_path, monkeypatch):
    import rlhf_fast.models.logprobs as lp

    seen = []
    real = lp.sequence_level_old_logp
    monkeypatch.setattr(lp, "sequence_level_old_logp", lambda *a: seen.append(1) or real(*a))
    pol, tok = make_policy()
    before = [p.detach().clone() for p in pol.parameters()]
    cfg = make_config(tmp_path, "grpo", steps=1, ppo=PPOConfig(epochs=2, mini_batch_size=8, micro_batch_size=4,
                                                               importance_sampling_level="sequence",
                                                               clip_low=3e-4, clip_high=4e-4))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS)
    m = tr.step()
    assert seen  # the loss took the sequence path
    assert torch.isfinite(torch.tensor(m["policy/loss"]))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, pol.parameters()))


# --------------------------------------------------------------------------- overlong


def test_overlong_penalty_is_dapos_soft_punishment():
    pen = OverlongPenalty(max_len=10, buffer=4)
    ctx = RewardContext(response_lengths=[0, 6, 7, 8, 10, 12])
    got = pen(["p"] * 6, ["c"] * 6, ctx)
    # TRL: 0 up to L - c, (L - c - n) / c up to L, -1 past it
    assert got == pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    with pytest.raises(ValueError, match="buffer must be at most max_len"):
        OverlongPenalty(4, 5)
    with pytest.raises(ValueError, match="buffer"):
        OverlongPenalty(4, 0)


def test_overlong_buffer_longer_than_the_budget_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reward.overlong_buffer"):
        make_config(tmp_path, "grpo", reward=RewardConfig(overlong_buffer=7),
                    rollout=RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=6))


def test_trainer_adds_the_overlong_penalty_by_response_tokens(tmp_path):
    pol, tok = make_policy()
    cfg = make_config(tmp_path, "grpo", steps=1, reward=RewardConfig(overlong_buffer=3, overlong_penalty=0.5))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS)
    captured = {}
    real = tr.reward

    def spy(prompts, completions, ctx):
        out = real(prompts, completions, ctx)
        captured["ctx"], captured["out"] = ctx, out
        return out

    tr.reward = spy
    tr.rollout()
    out, lengths = captured["out"], captured["ctx"].response_lengths
    want = [0.0 if n <= 3 else max(-1.0, (3 - n) / 3) for n in lengths]
    torch.testing.assert_close(out.per_source["overlong_penalty"], torch.tensor(want))
    assert any(w < 0 for w in want)  # the budget (6) was reached by some answers
    torch.testing.assert_close(out.total, out.per_source["n_chars"] + 0.5 * torch.tensor(want))


# --------------------------------------------------------------------------- mask_truncated


def _masking_trainer(tmp_path, mask, max_new_tokens=4):
    pol, tok = make_policy()
    cfg = make_config(tmp_path / str(mask), "grpo", steps=1,
                      rollout=RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=max_new_tokens,
                                            mask_truncated=mask))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS)
    batches = []
    real = tr.engine.generate
    tr.engine.generate = lambda *a, **k: batches.append(real(*a, **k)) or batches[-1]
    return tr, batches


def test_truncated_answers_leave_the_loss_but_keep_their_group_statistics(tmp_path):
    on, seen = _masking_trainer(tmp_path, True)
    off, _ = _masking_trainer(tmp_path, False)
    d_on, m_on = on.rollout()
    d_off, m_off = off.rollout()
    reasons = seen[0].finish_reasons
    cut = torch.tensor([r == "length" for r in reasons])
    assert cut.any() and not cut.all()  # the tiny model both stops and runs out of budget
    assert m_on["rollout/truncated_frac"] == pytest.approx(float(cut.float().mean()))
    assert m_off["rollout/truncated_frac"] == m_on["rollout/truncated_frac"]
    # same samples: advantages from the whole groups either way; only the loss mask differs
    torch.testing.assert_close(d_on.advantages, d_off.advantages)
    assert torch.equal(d_on.response_mask, d_off.response_mask & ~cut[:, None])
    assert not d_on.response_mask[cut].any() and d_on.response_mask[~cut].any(dim=1).all()


def test_a_batch_of_only_truncated_answers_updates_nothing(tmp_path):
    tr, _ = _masking_trainer(tmp_path, True)
    real = tr.engine.generate

    def all_cut(*a, **k):
        b = real(*a, **k)
        b.finish_reasons = ["length"] * len(b.finish_reasons)
        return b

    tr.engine.generate = all_cut
    before = [p.detach().clone() for p in tr.policy.parameters()]
    m = tr.step()
    assert m["rollout/truncated_frac"] == 1.0
    assert m["policy/loss"] == 0.0
    for a, b in zip(before, tr.policy.parameters()):
        torch.testing.assert_close(b.detach(), a, rtol=0, atol=0)


def test_mask_truncated_needs_finish_reasons(tmp_path):
    tr, _ = _masking_trainer(tmp_path, True)
    real = tr.engine.generate

    def no_reasons(*a, **k):
        b = real(*a, **k)
        b.finish_reasons = []
        return b

    tr.engine.generate = no_reasons
    with pytest.raises(ValueError, match="rollout.mask_truncated needs the engine's finish_reasons"):
        tr.rollout()
    with pytest.raises(ValueError, match="rollout.mask_truncated"):
        RLConfig(rollout=RolloutConfig(mask_truncated="yes"))


# --------------------------------------------------------------------------- dynamic sampling


def test_concatenated_batches_keep_every_row_and_its_groups():
    from rlhf_fast.rollout import HFRolloutEngine, RolloutBatch, SamplingParams

    pol, tok = make_policy()
    eng = HFRolloutEngine(pol, tok)
    a = eng.generate(["q:", "a b"], SamplingParams(max_new_tokens=3, n=2, seed=1))
    b = eng.generate(["x y z w v u"], SamplingParams(max_new_tokens=6, n=2, seed=2))
    assert a.prompt_length != b.prompt_length  # the re-padding is exercised
    rows = torch.tensor([5, 0, 3])
    got = RolloutBatch.concat([a, b], eng.pad_id, rows)
    src = [(a, i) for i in range(a.batch_size)] + [(b, i) for i in range(b.batch_size)]
    for r, k in enumerate(rows.tolist()):
        orig, i = src[k]
        am, gam = orig.attention_mask[i].bool(), got.attention_mask[r].bool()
        assert torch.equal(got.input_ids[r][gam], orig.input_ids[i][am])
        assert torch.equal(got.input_ids[r][got.response_mask[r].bool()], orig.input_ids[i][orig.response_mask[i].bool()])
        assert torch.equal(got.behaviour_logp[r][gam], orig.behaviour_logp[i][am])
        assert got.response_texts[r] == orig.response_texts[i] and got.prompt_texts[r] == orig.prompt_texts[i]
        assert got.finish_reasons[r] == orig.finish_reasons[i]
        # the response starts right after the (common) prompt width
        assert not got.response_mask[r, :got.prompt_length].any()
    assert got.group_index.tolist() == [2, 0, 1]  # b's one prompt numbered after a's two


def _only_some_prompts(prompts, completions):
    """Uniform rewards for "q:" and "x" (no gradient), spread-out ones for the others."""
    return [0.0 if p in ("q:", "x") else float(len(c)) + 0.01 * i for i, (p, c) in enumerate(zip(prompts, completions))]


def _ds_trainer(tmp_path, rounds, reward=_only_some_prompts):
    from rlhf_fast.trainers.rl_config import DataConfig

    pol, tok = make_policy()
    cfg = make_config(tmp_path / str(rounds), "grpo", steps=1, data=DataConfig(prompts=PROMPTS, shuffle=False),
                      rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=4,
                                            dynamic_sampling=True, max_sampling_rounds=rounds))
    return RLTrainer(cfg, pol, tok, reward_fns=[reward], prompts=PROMPTS)


def test_dynamic_sampling_replaces_uniform_groups_with_new_prompts(tmp_path):
    tr = _ds_trainer(tmp_path, 3)
    data, m = tr.rollout()
    # round 1 drew "q:" and "x" (uniform rewards), round 2 "0" and "a b"; enough, so no third
    assert m["rollout/sampling_rounds"] == 2 and m["rollout/uniform_group_frac"] == 0.0
    assert tr.prompt_pos == 4
    assert data.input_ids.shape[0] == 8
    assert sorted({p for p, _, _ in tr._last_texts}) == ["0", "a b"]
    assert data.advantages.abs().sum() > 0


def test_dynamic_sampling_fills_with_uniform_groups_when_the_rounds_run_out(tmp_path):
    tr = _ds_trainer(tmp_path, 3, reward=lambda p, c: [1.0] * len(c))
    data, m = tr.rollout()
    assert m["rollout/sampling_rounds"] == 3 and m["rollout/uniform_group_frac"] == 1.0
    assert data.input_ids.shape[0] == 8 and tr.prompt_pos == 6
    one = _ds_trainer(tmp_path, 1)
    _, m1 = one.rollout()  # one round: no refill
    assert m1["rollout/sampling_rounds"] == 1 and m1["rollout/uniform_group_frac"] == 1.0
    assert one.prompt_pos == 2
    m = tr.step()  # a step on uniform groups only still runs
    assert m["rollout/uniform_group_frac"] == 1.0 and torch.isfinite(torch.tensor(m["policy/loss"]))


def test_dynamic_sampling_needs_a_group_estimator(tmp_path):
    with pytest.raises(ValueError, match="rollout.dynamic_sampling needs a group estimator"):
        make_config(tmp_path, "gae", rollout=RolloutConfig(dynamic_sampling=True))
    with pytest.raises(ValueError, match="rollout.max_sampling_rounds"):
        RolloutConfig(max_sampling_rounds=0)


# --------------------------------------------------------------------------- prompt fields


def test_answer_match_extracts_and_compares_final_answers():
    from rlhf_fast.algorithms.rule_rewards import answer_match, extract_answer

    completions = ["so \\boxed{\\frac{1}{2}}", "the answer is 1,234.", "#### 42", "x = 3/4", "no number",
                   "\\boxed{B}", "it is 7", "\\boxed{x^{2}} then 5", "\\boxed{unclosed"]
    refs = ["\\frac{1}{2}", 1234, "42", "0.75", "5", "b", "#### 8", "x^{2}", "unclosed"]
    assert answer_match(["p"] * 9, completions, refs) == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert extract_answer("a \\boxed{1} b \\boxed{{2}}") == "{2}"
    with pytest.raises(ValueError, match="no 'answer' field"):
        answer_match(["p"], ["1"], [None])


def _records_file(tmp_path):
    import json

    recs = [{"prompt": "3+4=", "answer": "7", "level": 1},
            {"prompt": [{"role": "user", "content": "2+5="}], "answer": 7},
            {"prompt": "9-1=", "answer": "8", "level": 2},
            {"prompt": "1+1=", "answer": "2"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path, recs


def test_reward_functions_receive_the_prompt_fields_of_their_rows(tmp_path):
    from rlhf_fast.trainers.rl_config import DataConfig

    path, recs = _records_file(tmp_path)
    seen = {}

    def named(prompts, completions, answer):
        seen["named"] = (list(prompts), list(answer))
        return [0.0] * len(completions)

    def every(prompts, completions, **kw):
        seen["every"] = kw
        return [float(len(c)) for c in completions]

    def plain(prompts, completions):  # takes no fields: still called as before
        return [0.0] * len(completions)

    pol, tok = make_policy()
    cfg = make_config(tmp_path, "grpo", steps=1, data=DataConfig(prompts_file=str(path), shuffle=False))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[named, every, plain])
    chat = tok.apply_chat_template(recs[1]["prompt"], tokenize=False, add_generation_prompt=True)
    assert tr.prompts == ["3+4=", chat, "9-1=", "1+1="]
    tr.rollout()
    by_text = dict(zip(tr.prompts, [str(r["answer"]) for r in recs]))
    prompts, answers = seen["named"]
    assert len(prompts) == 16 and [str(a) for a in answers] == [by_text[p] for p in prompts]
    assert sorted(seen["every"]) == ["answer", "level"]
    levels = dict(zip(tr.prompts, [r.get("level") for r in recs]))
    assert seen["every"]["level"] == [levels[p] for p in prompts]  # None where a record lacks it


def test_a_missing_field_is_named_even_when_bad_rewards_are_dropped(tmp_path):
    from rlhf_fast.algorithms import RewardError

    def needs(prompts, completions, solution):
        return [0.0] * len(completions)

    pol, tok = make_policy()
    cfg = make_config(tmp_path, "grpo", steps=1, reward=RewardConfig(on_bad_reward="drop"))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[needs], prompts=[{"prompt": "q:", "answer": 1}, "x"])
    with pytest.raises(RewardError, match=r"needs the prompt field\(s\) \['solution'\]"):
        tr.rollout()


def test_bad_prompt_records_are_refused_with_where(tmp_path):
    from rlhf_fast.trainers.rl import read_prompt_records

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: expected an object with a field 'prompt'"):
        read_prompt_records(str(bad))
    pol, tok = make_policy()
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected text, a chat"):
        RLTrainer(make_config(tmp_path, "grpo", steps=1), pol, tok, reward_fns=[n_chars],
                  prompts=["a", {"question": "b"}])


def test_fields_follow_their_rows_through_dynamic_sampling_rounds(tmp_path):
    from rlhf_fast.trainers.rl_config import DataConfig

    recs = [{"prompt": p, "answer": f"ans-{p}"} for p in PROMPTS]

    def checked(prompts, completions, answer):
        assert answer == [f"ans-{p}" for p in prompts]  # each row got its own prompt's field
        return _only_some_prompts(prompts, completions)

    pol, tok = make_policy()
    cfg = make_config(tmp_path, "grpo", steps=1, data=DataConfig(shuffle=False),
                      rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=4,
                                            dynamic_sampling=True))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[checked], prompts=recs)
    _, m = tr.rollout()
    assert m["rollout/sampling_rounds"] == 2


def test_parquet_prompts_are_records_like_jsonl_lines(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from rlhf_fast.trainers.rl import read_prompt_records

    rows = [{"prompt": [{"role": "user", "content": "2+2="}], "reward_model": {"ground_truth": "4"}},
            {"prompt": [{"role": "user", "content": "3+3="}], "reward_model": {"ground_truth": "6"}}]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), str(path))  # verl's layout
    got = read_prompt_records(str(path))
    assert got == [(r["prompt"], {"reward_model": r["reward_model"]}) for r in rows]
    pq.write_table(pa.Table.from_pylist([{"question": "x"}]), str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match=r"bad.parquet, row 0: expected an object with a field 'prompt'"):
        read_prompt_records(str(tmp_path / "bad.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="junk.parquet: not a readable parquet file"):
        read_prompt_records(str(tmp_path / "junk.parquet"))


def test_a_run_with_every_rlvr_option_resumes_exactly(tmp_path):
    """Dynamic sampling consumes extra prompts and seeds per round; the resumed run must draw
    the same ones (prompt position and seeds come from the checkpoint and the step)."""
    import json
    import os

    from rlhf_fast.trainers.rl_config import KLConfig

    recs = [{"prompt": p, "answer": p[-1]} for p in PROMPTS]

    def reward(prompts, completions, answer):  # often uniform in a group: extra rounds happen
        return [float(a in c) for c, a in zip(completions, answer)]

    def make(out, steps):
        pol, tok = make_policy()
        cfg = make_config(out, "grpo", steps=steps, save_every=2, kl=KLConfig(coef=0.02),
                          rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5,
                                                dynamic_sampling=True, mask_truncated=True),
                          reward=RewardConfig(overlong_buffer=2, overlong_penalty=0.1),
                          ppo=PPOConfig(epochs=2, mini_batch_size=8, micro_batch_size=4,
                                        importance_sampling_level="sequence", clip_low=0.05, clip_high=0.06))
        return RLTrainer(cfg, pol, tok, reward_fns=[reward], prompts=recs)

    a = make(tmp_path / "a", 4)
    a.train()
    b = make(tmp_path / "b", 4)
    b.train(steps=2)
    cfg = b.config
    cfg.resume = cfg.output_dir
    c = RLTrainer(cfg, *make_policy(), reward_fns=[reward], prompts=recs)  # as a fresh process would
    c.train()

    def rows(run):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            return [{k: v for k, v in json.loads(ln).items() if not k.startswith(("time/", "tokens_per"))} for ln in f]

    ra, rc = rows(a.config.output_dir), rows(c.config.output_dir)
    assert [r["step"] for r in rc] == [1, 2, 3, 4]
    assert ra == rc
    assert any(r["rollout/sampling_rounds"] > 1 for r in ra)  # the refill path ran
    for p, q in zip(a.policy.parameters(), c.policy.parameters()):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------- reference sync


def _sync_trainer(out, steps=3, every=2, alpha=0.5, **kw):
    from rlhf_fast.trainers.rl_config import KLConfig

    pol, tok = make_policy()
    cfg = make_config(out, "grpo", steps=steps, kl=KLConfig(coef=0.05, ref_sync_steps=every, ref_sync_alpha=alpha),
                      **kw)
    return RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS)


def test_the_reference_moves_towards_the_policy_every_n_steps(tmp_path):
    tr = _sync_trainer(tmp_path)
    ref0 = [p.detach().clone() for p in tr.reference.parameters()]
    tr.step()  # step 1: no sync
    assert all(torch.equal(a, b) for a, b in zip(ref0, tr.reference.parameters()))
    tr.step()  # step 2: reference <- 0.5 policy + 0.5 reference
    for r0, r, p in zip(ref0, tr.reference.parameters(), tr.policy.parameters()):
        torch.testing.assert_close(r, 0.5 * p.detach() + 0.5 * r0, rtol=0, atol=1e-7)
    assert any(not torch.equal(r0, r) for r0, r in zip(ref0, tr.reference.parameters()))
    assert not any(p.requires_grad for p in tr.reference.parameters())


def test_a_run_with_reference_sync_resumes_exactly(tmp_path):
    import json
    import os

    # synced at steps 2 and 4: the checkpoint of step 2 must carry the moved reference
    a = _sync_trainer(tmp_path / "a", steps=4, every=2, save_every=2)
    a.train()
    b = _sync_trainer(tmp_path / "b", steps=4, every=2, save_every=2)
    b.train(steps=2)
    cfg = b.config
    cfg.resume = cfg.output_dir
    c = RLTrainer(cfg, *make_policy(), reward_fns=[n_chars], prompts=PROMPTS)
    c.train()
    rows = lambda run: [{k: v for k, v in json.loads(ln).items() if not k.startswith(("time/", "tokens_per"))}  # noqa: E731
                        for ln in open(os.path.join(run, "metrics.jsonl"))]
    assert rows(a.config.output_dir) == rows(cfg.output_dir)
    for name, m in (("policy", (a.policy, c.policy)), ("reference", (a.reference, c.reference))):
        for p, q in zip(m[0].parameters(), m[1].parameters()):
            assert torch.equal(p, q), name
    ck = os.path.join(cfg.output_dir, "checkpoints", "step_00000002", "models", "reference")
    assert os.path.isfile(os.path.join(ck, "model.safetensors"))


def test_reference_sync_needs_a_separate_reference_of_the_policy_shape(tmp_path):
    from rlhf_fast.trainers.rl_config import KLConfig

    pol, tok = make_policy()
    other, _ = make_policy()
    other.lm_head = torch.nn.Linear(32, 7, bias=False)
    cfg = make_config(tmp_path, "grpo", steps=1, kl=KLConfig(ref_sync_steps=2))
    with pytest.raises(ValueError, match="kl.ref_sync_steps needs a reference with the policy's parameters"):
        RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS, reference=other)
    with pytest.raises(ValueError, match=r"kl.ref_sync_alpha must be in \(0, 1\]"):
        KLConfig(ref_sync_alpha=0.0)


def test_turning_reference_sync_on_at_a_resume_is_refused_with_what_to_do(tmp_path):
    a = _sync_trainer(tmp_path / "a", steps=2, every=0, save_every=2)
    a.train()
    cfg = a.config
    cfg.kl.ref_sync_steps, cfg.resume, cfg.steps = 2, cfg.output_dir, 4
    with pytest.raises(ValueError, match="has no reference weights .* resume with kl.ref_sync_steps 0"):
        RLTrainer(cfg, *make_policy(), reward_fns=[n_chars], prompts=PROMPTS).train()


def test_the_fraction_of_groups_without_reward_spread_is_logged_without_dynamic_sampling(tmp_path):
    from rlhf_fast.trainers.rl_config import DataConfig

    pol, tok = make_policy()
    cfg = make_config(tmp_path, "grpo", steps=1, data=DataConfig(shuffle=False),
                      rollout=RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=4))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[_only_some_prompts], prompts=PROMPTS)
    _, m = tr.rollout()
    assert m["rollout/uniform_group_frac"] == 0.5  # "q:" and "x" of the four prompts
    assert "rollout/sampling_rounds" not in m
