"""Leftovers of the RL trainer / rollout engine reviews, each checked against its peer.

- ``rollout.dynamic_sampling`` with ``reward.missing_eos_penalty``: DAPO's filter (verl's
  ``filter_groups`` on the final sequence scores; TRL's ``frac_reward_zero_std`` on the rewards
  it trains on) judges a group on the reward the estimator sees, the penalty included.
- ``rollout.mask_truncated``: TRL 1.16 GRPO / RLOO log ``kl``, ``entropy`` and the sampling
  log-prob difference / importance ratios over the completion mask after
  ``mask_truncated_completions`` zeroed the truncated rows (the tokens the loss uses),
  ``completions/mean_length`` over every answer: ours ``kl/token``, ``entropy``,
  ``logprob_gap/*``, ``is_weight/*`` the same, in one process and on several ranks.
- MiniMax (transformers' own ``MiniMaxCache``, linear-attention states in ``linear_cache``)
  with ``n`` > 1 samples per prompt and beam search.
"""

import os
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast.trainers.rl import RLTrainer  # noqa: E402
from rlhf_fast.trainers.rl_config import DataConfig, KLConfig, RewardConfig, RolloutConfig  # noqa: E402
from tests.test_review_decode_families import PROMPTS as DECODE_PROMPTS  # noqa: E402
from tests.test_review_decode_families import _model, _responses, tok  # noqa: E402,F401
from tests.test_rl_learning import PROMPTS, make_config, make_policy  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def _cut_first_of_each_group(tr, G):
    """Make the engine report the first answer of each group as cut at max_new_tokens (finish
    reason "length") and the others as stopped."""
    real = tr.engine.generate

    def gen(*a, **k):
        b = real(*a, **k)
        b.finish_reasons = ["length" if i % G == 0 else "stop" for i in range(len(b.finish_reasons))]
        return b

    tr.engine.generate = gen


def test_dynamic_sampling_judges_groups_on_the_penalised_rewards(tmp_path):
    """Every answer scores 1.0 from the reward function, but the first of each group is cut at
    the budget: ``missing_eos_penalty`` 1 makes its reward 0, so every group has a spread
    (its advantages are not 0) and the first round already fills the step. Judged before the
    penalty, every group looked uniform: the filter threw all of them away and sampled the
    maximum rounds."""
    pol, tok_ = make_policy()
    cfg = make_config(tmp_path, "grpo", steps=1, data=DataConfig(prompts=PROMPTS, shuffle=False),
                      rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=4,
                                            dynamic_sampling=True, max_sampling_rounds=3),
                      reward=RewardConfig(missing_eos_penalty=1.0))
    tr = RLTrainer(cfg, pol, tok_, reward_fns=[lambda p, c: [1.0] * len(c)], prompts=PROMPTS)
    _cut_first_of_each_group(tr, 4)
    data, m = tr.rollout()
    assert m["rollout/sampling_rounds"] == 1 and tr.prompt_pos == 2
    assert m["rollout/uniform_group_frac"] == 0.0
    rows = (data.advantages * data.response_mask).sum(1) / data.response_mask.sum(1).clamp(min=1)
    assert (rows.view(-1, 4)[:, 0] < 0).all() and (rows.view(-1, 4)[:, 1:] > 0).all()


def _masked_rollout(tmp_path, **kw):
    """One GRPO rollout under ``rollout.mask_truncated`` with the first answer of each group
    truncated, a policy moved off its reference (the KL is not 0) and a sampler whose
    log-probs drift from the trainer's (logprob_gap and the importance weights are not 0 / 1):
    (trainer, RolloutTensors, metrics, every response token ``[B, L]`` bool, truncated ``[B]``)."""
    pol, tok_ = make_policy()
    cfg = make_config(tmp_path, "grpo", steps=1, kl=KLConfig(coef=0.5),
                      rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=4, mask_truncated=True),
                      **kw)
    tr = RLTrainer(cfg, pol, tok_, reward_fns=[lambda p, c: [float(len(x)) for x in c]], prompts=PROMPTS)
    _cut_first_of_each_group(tr, 4)
    cut_gen, noise = tr.engine.generate, torch.Generator().manual_seed(1)

    def drifted(*a, **k):
        b = cut_gen(*a, **k)
        # (importance ratios exp(old - behaviour) above 1, below 1 on the truncated rows)
        sign = torch.where(torch.arange(b.behaviour_logp.shape[0]) % 4 == 0, 1.0, -1.0)[:, None]
        b.behaviour_logp = b.behaviour_logp + sign * 0.1 * torch.rand(b.behaviour_logp.shape, generator=noise)
        return b

    tr.engine.generate = drifted
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tr.policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    data, m = tr.rollout()
    rm = data.old_logp != 0  # every response token, the truncated rows' too
    cut = torch.arange(rm.shape[0]) % 4 == 0
    loss_rm = data.response_mask
    assert not loss_rm[cut].any() and rm[cut].any(1).all() and loss_rm[~cut].any(1).all()
    return tr, data, m, rm, cut


def test_kl_entropy_and_gap_metrics_average_over_the_loss_tokens_under_mask_truncated(tmp_path):
    """TRL 1.16 (grpo_trainer.py: ``global_masked_mean(per_token_kl)`` / ``(entropies)`` over
    the completion mask that ``mask_truncated_completions`` zeroed; rloo_trainer.py the same
    with ``completion_mask``): ``kl/token``, ``entropy`` and ``logprob_gap/mean`` average over
    the loss tokens; ``response_length/mean`` (TRL's ``completions/mean_length``) over every
    answer. The ranks' path (``_global_rollout_metrics``) says the same."""
    from rlhf_fast.distributed import DistContext
    from rlhf_fast.models.logprobs import sequence_logprobs
    from rlhf_fast.ops import reference

    tr, data, m, rm, cut = _masked_rollout(tmp_path)
    cfg, loss_rm = tr.config, data.response_mask
    kl = (data.old_logp - data.ref_logp) * rm
    want_kl = float(reference.masked_mean(kl, loss_rm))
    assert want_kl != pytest.approx(float(reference.masked_mean(kl, rm)), rel=1e-3)  # the mask matters
    assert m["kl/token"] == pytest.approx(want_kl, rel=1e-5)
    with torch.no_grad():
        _, ent = sequence_logprobs(tr.policy, data.input_ids, data.attention_mask, response_mask=rm,
                                   temperature=cfg.rollout.temperature, return_entropy=True)
    want_ent = float(reference.masked_mean(ent, loss_rm))
    # (a tiny random model: near-uniform entropies, so the two means differ by ~1e-3 only)
    off = abs(want_ent - float(reference.masked_mean(ent, rm)))
    assert off > 1e-4
    assert m["entropy"] == pytest.approx(want_ent, abs=off / 10)
    gap = (data.behaviour_logp - data.old_logp).abs() * rm
    want_gap = float(reference.masked_mean(gap, loss_rm))
    assert want_gap != pytest.approx(float(reference.masked_mean(gap, rm)), rel=1e-3)
    assert m["logprob_gap/mean"] == pytest.approx(want_gap, rel=1e-5)
    assert m["logprob_gap/max"] == pytest.approx(float(gap[loss_rm].max()), rel=1e-5)
    assert m["response_length/mean"] == pytest.approx(float(rm.sum(1).float().mean()))  # every answer
    # the ranks' path, here with one rank's reductions
    stub = types.SimpleNamespace(ctx=DistContext(), device=torch.device("cpu"), critic=None)
    z, B = torch.zeros_like(kl), rm.shape[0]
    out = RLTrainer._global_rollout_metrics(stub, {}, torch.ones(B), torch.ones(B), kl, rm, ent, z, z, z, gap,
                                            None, cut, loss_rm=loss_rm)
    assert out["kl/token"] == pytest.approx(want_kl, rel=1e-5)
    assert out["entropy"] == pytest.approx(want_ent, abs=off / 10)
    assert out["logprob_gap/mean"] == pytest.approx(want_gap, rel=1e-5)
    assert out["logprob_gap/max"] == pytest.approx(m["logprob_gap/max"], rel=1e-5)
    assert out["response_length/mean"] == pytest.approx(m["response_length/mean"])
    assert out["kl/seq"] == pytest.approx(m["kl/seq"], rel=1e-5)


@pytest.mark.parametrize("mode,cap", [("token_mask", 1.05), ("token_truncate", 2.0), ("sequence_truncate", 1.25)])
def test_importance_weight_metrics_cover_the_loss_tokens_under_mask_truncated(tmp_path, mode, cap):
    """TRL 1.16's ``sampling/importance_sampling_ratio/*`` take the token ratios under the
    completion mask ``mask_truncated_completions`` zeroed (grpo_trainer.py, ``[mask]``): the
    ``is_weight/*`` metrics are over the loss tokens (with a sequence mode over the answers in
    the loss: TRL's counts a truncated answer at its masked ratio exp(0) = 1, no weight of it;
    ours leaves it out), one process and the ranks' path alike."""
    from rlhf_fast.distributed import DistContext
    from rlhf_fast.ops import reference
    from rlhf_fast.trainers.rl_config import PPOConfig

    ppo = PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8, is_cap=cap, is_mode=mode)
    tr, data, m, rm, cut = _masked_rollout(tmp_path, ppo=ppo)
    loss_rm = data.response_mask
    w, masked = tr._is_weights(data.old_logp, data.behaviour_logp, rm)
    seq = mode.startswith("sequence")
    if seq:
        per_row = (w * rm).sum(1) / rm.sum(1)
        want_mean, all_mean = float(per_row[~cut].mean()), float(per_row.mean())
    else:
        want_mean, all_mean = float(reference.masked_mean(w, loss_rm)), float(reference.masked_mean(w, rm))
    assert want_mean != pytest.approx(all_mean, rel=1e-4)
    want = {"is_weight/mean": want_mean, "is_weight/min": float(w[loss_rm].min()),
            "is_weight/max": float(w[loss_rm].max())}
    if masked is not None:
        want["is_weight/masked_frac"] = float(reference.masked_mean(masked.float(), loss_rm))
        assert want["is_weight/masked_frac"] != pytest.approx(float(reference.masked_mean(masked.float(), rm)))
    if mode != "token_mask":  # (there: 0 and at most the cap either way)
        assert w[loss_rm].min() > w[rm].min()
    stub = types.SimpleNamespace(ctx=DistContext(), device=torch.device("cpu"), critic=None)
    z, B = torch.zeros_like(w), rm.shape[0]
    out = RLTrainer._global_rollout_metrics(stub, {}, torch.ones(B), torch.ones(B), z, rm, None, z, z, z, None, w,
                                            cut, masked, is_per_answer=seq, loss_rm=loss_rm)
    for k, v in want.items():
        assert m[k] == pytest.approx(v, rel=1e-5), k
        assert out[k] == pytest.approx(v, rel=1e-5), k
    # no loss token on any rank (every answer truncated): 0, as one process and TRL, not NaN / inf
    none = torch.zeros_like(rm)
    out = RLTrainer._global_rollout_metrics(stub, {}, torch.ones(B), torch.ones(B), z, rm, z, z, z, z, z, w,
                                            torch.ones(B, dtype=torch.bool), masked, is_per_answer=seq, loss_rm=none)
    for k in [*want, "kl/token", "entropy", "logprob_gap/mean", "logprob_gap/max"]:
        assert out[k] == 0.0, k


def test_minimax_n_samples_and_beams(tok, monkeypatch):  # noqa: F811
    """MiniMax keeps its linear-attention states in ``MiniMaxCache.linear_cache`` (one entry per
    layer up to the last linear one); its ``batch_repeat_interleave`` indexes that list for every
    layer and raised IndexError when the last layer is full attention, and ``reorder_cache``
    (DynamicCache's) leaves the states unreordered. Greedy n = 2 gives generate's greedy
    tokens for each copy; sampled n = 2 gives each live row the full forward's
    logits; each beam-search step's logits are the full forward's of the beams it extends
    (generate's own beam search is no reference here: it reorders MiniMax's cache with
    DynamicCache.reorder_cache, which leaves the linear states in the old beam order)."""
    from rlhf_fast.models.logprobs import default_position_ids
    from rlhf_fast.rollout import HFRolloutEngine, SamplingParams
    from rlhf_fast.rollout import hf_engine

    model = _model(tok, "minimax")
    engine = HFRolloutEngine(model, tok)
    b = engine.generate(DECODE_PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=5, n=2, ignore_eos=True))
    enc = tok(DECODE_PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=5, pad_token_id=0, eos_token_id=None)
    # (generate refuses num_return_sequences > 1 when greedy: each prompt's tokens, twice)
    assert _responses(b) == out[:, enc["input_ids"].shape[1]:].repeat_interleave(2, 0).tolist()
    # the full-forward checks on prompts of one length: with left padding transformers' MiniMax
    # decodes wrongly itself (MiniMaxCache knows no layer types, so create_causal_mask sizes the
    # full-attention mask from layer 0, a linear one with no keys: generate's padded-batch logits
    # differ from the unpadded prompt's by ~0.2 from the second step on)
    ids = tok(DECODE_PROMPTS[1])["input_ids"]
    same = [ids, ids[1:] + ids[:1], ids[2:] + ids[:2]]
    s = engine.generate(same, SamplingParams(temperature=0.9, max_new_tokens=5, n=2, seed=3, ignore_eos=True))
    assert not (s.attention_mask == 0).any()
    P = s.prompt_length
    with torch.no_grad():
        full = model(input_ids=s.input_ids, attention_mask=s.attention_mask,
                     position_ids=default_position_ids(s.attention_mask)).logits.float()
    lp = torch.log_softmax(full[:, P - 1:-1] / 0.9, -1).gather(2, s.input_ids[:, P:, None]).squeeze(2)
    torch.testing.assert_close(s.behaviour_logp[:, P:], lp, rtol=0, atol=1e-4)
    # beam search: follow the rows the engine keeps (_select_rows) and the tokens it feeds
    seqs, checked, inside = {}, [], [False]
    real_select = hf_engine._select_rows

    def select(cache, idx):
        seqs["ids"] = seqs["ids"][idx.cpu()]
        real_select(cache, idx)

    def hook(module, args, kwargs, output):
        if inside[0]:
            return
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        seqs["ids"] = ids if "ids" not in seqs or ids.shape[1] > 1 else torch.cat([seqs["ids"], ids], 1)
        if ids.shape[1] == 1:  # a decode step: its logits are the full forward's of the beams so far
            inside[0] = True
            with torch.no_grad():
                full = model(input_ids=seqs["ids"], attention_mask=mask,
                             position_ids=default_position_ids(mask)).logits[:, -1].float()
            inside[0] = False
            torch.testing.assert_close(output.logits[:, -1].float(), full, rtol=0, atol=1e-4)
            checked.append(ids.shape[0])

    monkeypatch.setattr(hf_engine, "_select_rows", select)
    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        beams = engine.beam_search(same, num_beams=3, max_new_tokens=6)
    finally:
        handle.remove()
    assert len(checked) >= 3 and len(_responses(beams)) == len(same)
