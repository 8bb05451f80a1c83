"""Second review of the RL policy-loss path against TRL 1.16's GRPOTrainer (``_compute_loss`` called
on a stub ``self``, one process, the per-token log-probs and entropies given): the bad-input checks
of the high-entropy quantile, GSPO's gradient under per-token importance weights (``ppo.is_cap``),
and the clip metric of GSPO's sequence level (TRL's ``clip_ratio/region_mean``, one flag per
answer)."""

import pytest
import torch

from rlhf_fast.algorithms import policy_losses as pl
from tests.test_review_grpo_parity import _case, _row, trl_loss

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- 1. the quantile's bad input


def test_quantile_refuses_q_outside_0_1():
    """``quantile`` claims torch.quantile's arithmetic; torch refuses q outside [0, 1]. Ours
    returned the maximum for q = −0.5 (a negative rank wraps around) and an IndexError for 1.5."""
    x = torch.tensor([3.0, 1.0, 2.0, 5.0])
    for q in (-0.5, 1.5, float("nan")):
        with pytest.raises(RuntimeError):
            torch.quantile(x, q)
        with pytest.raises(ValueError, match=r"q must be in \[0, 1\]"):
            pl.quantile(x, q)
    # a top share of 1.5 asked the (1 − 1.5) = −0.5 quantile: the maximum, silently
    ent, mask = torch.rand(2, 4), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="top_quantile"):
        pl.high_entropy_mask(ent, mask, 1.5)


@pytest.mark.parametrize("q", [-0.2, float("nan")])
def test_policy_loss_refuses_a_bad_top_entropy_quantile(q):
    logp, old, ent, adv, _, mask = _case()
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        pl.policy_loss_from_logp(logp, ent, old, adv, mask, top_entropy_quantile=q)


# --------------------------------------------------------------------------- 2. GSPO with token weights


def test_sequence_level_row_names_is_cap_where_the_gradient_is_gspo_tokens():
    """``ppo.is_cap`` (token modes) multiplies each token's advantage by its own weight (the
    trainer's ``adv * w``), TRL the token's loss by it: the same loss, but TRL differentiates the
    answer's ratio through every token's log-prob, ours (GSPO-token) through each token's own —
    the gradients differ once the weights differ within an answer, so the table's row, which
    names the cases where the gradient is GSPO-token's, must name is_cap too."""
    logp, old, ent, adv, adv_row, mask = _case()
    g = torch.Generator().manual_seed(3)
    w = torch.where(mask, 0.5 + torch.rand(mask.shape, generator=g, dtype=torch.float64), torch.ones(()).double())
    lo, lt = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    ours, _ = pl.policy_loss_from_logp(lo, ent, old, adv * w, mask, clip_high=0.28, agg="seq-mean-token-mean",
                                       importance_sampling_level="sequence")
    want, _ = trl_loss("grpo", lt, ent, old, adv_row, mask, level="sequence", is_ratio=w, metrics=True)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(torch.autograd.grad(ours, lo)[0], torch.autograd.grad(want, lt)[0])
    # with one weight per answer (the sequence modes) it is TRL's gradient
    w_row = w[:, 1:2].expand_as(w).clone()
    lo2, lt2 = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    ours2, _ = pl.policy_loss_from_logp(lo2, ent, old, adv * w_row, mask, clip_high=0.28, agg="seq-mean-token-mean",
                                        importance_sampling_level="sequence")
    want2, _ = trl_loss("grpo", lt2, ent, old, adv_row, mask, level="sequence", is_ratio=w_row,
                        metrics=True)
    torch.testing.assert_close(torch.autograd.grad(ours2, lo2)[0], torch.autograd.grad(want2, lt2)[0],
                               rtol=1e-12, atol=1e-12)
    row = _row("`importance_sampling_level`")
    assert "is_cap" in row, row


# --------------------------------------------------------------------------- 3. GSPO's clip metric


@pytest.mark.parametrize("ours,trl_type,agg", [("clip", "grpo", "seq-mean-token-mean"),
                                               ("clip", "dapo", "token-mean"),
                                               ("luspo", "luspo", "seq-mean-token-sum")])
def test_sequence_level_clip_frac_is_trls_region_mean(ours, trl_type, agg):
    """At the sequence level TRL's ratio is one per answer, ``coef_1`` ``[B, 1]``, and its
    ``global_masked_mean`` then averages the answers' flags (a row without loss tokens counts, its
    ratio exp(0) unclipped) — as our ``clip_low_min`` / ``clip_high_max`` already read it. On these
    inputs 2 of the 5 answers are clipped (0.4); the token share was 10 of 19 (0.526)."""
    logp, old, ent, adv, adv_row, mask = _case()
    _, st = pl.policy_loss_from_logp(logp, ent, old, adv, mask, policy_loss=ours, clip_high=0.28, agg=agg,
                                     importance_sampling_level="sequence")
    _, met = trl_loss(trl_type, logp, ent, old, adv_row, mask, level="sequence", metrics=True)
    assert met["clip_ratio/region_mean"] == pytest.approx(0.4)
    assert float(st["clip_frac"]) == pytest.approx(met["clip_ratio/region_mean"], abs=1e-7)  # TRL's in float32
    # the ratio is one per answer too: its mean over the answers (a row without loss tokens: exp(0))
    m = mask.double()
    s = torch.exp(torch.where(mask, logp - old, torch.zeros(()).double()).sum(1) / m.sum(1).clamp(min=1))
    assert float(st["ratio_mean"]) == pytest.approx(float(s.mean()), rel=1e-12)
    # the token level stays TRL's token share
    _, st_t = pl.policy_loss_from_logp(logp, ent, old, adv, mask, policy_loss=ours, clip_high=0.28, agg=agg)
    _, met_t = trl_loss(trl_type, logp, ent, old, adv_row, mask, metrics=True)
    assert float(st_t["clip_frac"]) == pytest.approx(met_t["clip_ratio/region_mean"], abs=1e-7)


def _gspo_trainer(tmp_path, **ppo):
    from rlhf_fast.trainers.rl_config import KLConfig, PPOConfig, RolloutConfig
    from tests.test_rl_loss_variants import _trainer, n_chars

    return _trainer(tmp_path, "grpo", n_chars, kl=KLConfig(coef=0.0),
                    rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=6),
                    ppo=PPOConfig(mini_batch_size=8, micro_batch_size=8, importance_sampling_level="sequence", **ppo))


@pytest.mark.parametrize("ppo", [{}, dict(off_policy_mask_threshold=1e9)], ids=["fused", "composed"])
def test_trainer_sequence_level_clip_frac_is_trls(tmp_path, ppo):
    """The trainer's ``policy/clip_frac`` under ``ppo.importance_sampling_level: sequence`` (the
    fused path's reference loss, and the composed one) is TRL's ``clip_ratio/region_mean`` of the
    same answers, whatever the micro-batching: answers of 2, 2, 0 (a truncated one, under
    ``rollout.mask_truncated``) and 6 loss tokens, 5 of 8 clipped (TRL 0.625, the token share 0.647)."""
    import dataclasses

    from rlhf_fast.models.logprobs import _target_mask, sequence_logprobs

    tr = _gspo_trainer(tmp_path, clip_low=0.002, **ppo)
    data, _ = tr.rollout()
    rm = data.response_mask.clone()
    first = int(rm[0].nonzero()[0])
    rm[0:2, first + 2:] = False  # two short answers
    rm[2] = False  # one without loss tokens
    data = dataclasses.replace(data, response_mask=rm)
    tr.optimizer.zero_grad()  # one step: ratios ≠ 1
    tr.policy_backward(data)
    tr.optimizer.step()
    s8, s2 = tr.policy_backward(data, 8), tr.policy_backward(data, 2)
    mask = _target_mask(data.attention_mask, data.response_mask)
    with torch.no_grad():
        logp = sequence_logprobs(tr.policy, data.input_ids, data.attention_mask, response_mask=mask,
                                 temperature=tr.config.rollout.temperature).double()
    adv_row = (torch.where(mask, data.advantages, torch.zeros(())).sum(1) / mask.sum(1).clamp(min=1)).double()
    _, met = trl_loss("grpo", logp, torch.zeros_like(logp), data.old_logp.double(), adv_row, mask, eps_low=0.002,
                      eps_high=0.002, level="sequence", metrics=True)
    assert sorted(mask.sum(1).tolist())[:4] == [0, 2, 2, 6]
    assert 0 < met["clip_ratio/region_mean"] < 1
    for st in (s8, s2):
        assert st["clip_frac"] == pytest.approx(met["clip_ratio/region_mean"], abs=1e-6)
