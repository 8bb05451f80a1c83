"""ppo.policy_loss gmpo on a row with no loss token (what ``rollout.mask_truncated`` makes of a
truncated answer) against TRL 1.16's GMPOTrainer._compute_loss: the documented difference.

TRL's ``mask_truncated_completions`` zeroes the row's completion_mask but keeps its advantage:
GMPO's weight is then exp(0 / clamp(0, min=1)) = 1 and the row's loss -1·A, a constant (no
gradient) in the logged loss. Ours reads A as the mean of the advantages over the loss tokens, so
such a row has A = 0 and loss 0: the gradients are TRL's, the logged ``policy/loss`` differs by
Σ A_b / B over those rows (gmpo_sequence_loss's docstring and docs/from_trl.md say so)."""

import torch

from rlhf_fast.algorithms import policy_losses as pl


def _trl_gmpo_loss(logp, old, adv_row, mask, eps_low, eps_high):
    """TRL 1.16 trl/experimental/gmpo/gmpo_trainer.py, GMPOTrainer._compute_loss, its loss lines
    (beta 0, top_entropy_quantile 1, one accumulation step), transcribed."""
    log_ratio = logp - old
    clamped_log_ratio = torch.clamp(log_ratio, min=-eps_low, max=eps_high)
    advantages_col = adv_row.unsqueeze(1)
    clipped_log_ratio = torch.where(advantages_col > 0, torch.minimum(log_ratio, clamped_log_ratio),
                                    torch.maximum(log_ratio, clamped_log_ratio))
    seq_mask = mask
    log_importance_weights = (clipped_log_ratio * seq_mask).sum(-1) / seq_mask.sum(-1).clamp(min=1.0)
    coef = torch.exp(log_importance_weights)
    per_sequence_loss = -coef * adv_row
    return per_sequence_loss.mean()


def test_a_row_without_loss_tokens_changes_the_logged_loss_only():
    g = torch.Generator().manual_seed(0)
    B, T = 3, 4
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    old = logp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv_row = torch.tensor([0.7, -0.5, 1.2], dtype=torch.float64)
    # the trainer's advantages: the answer's one advantage on each of its response tokens; row 1 was
    # truncated, so rollout.mask_truncated took its tokens out of the loss mask (its advantage stays)
    adv = adv_row[:, None].expand(B, T).clone()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1] = False
    loss, _ = pl.policy_loss_from_logp(logp, torch.zeros_like(logp), old, adv, mask, policy_loss="gmpo",
                                       agg="seq-mean-token-mean", clip_low=0.4, normalizer=B)
    want = _trl_gmpo_loss(logp, old, adv_row, mask.to(logp.dtype), 0.4, 0.4)
    # the gradients agree (the masked row's weight is a constant) ...
    g_ours = torch.autograd.grad(loss, logp, retain_graph=True)[0]
    g_trl = torch.autograd.grad(want, logp, retain_graph=True)[0]
    torch.testing.assert_close(g_ours, g_trl, rtol=1e-12, atol=1e-12)
    # ... the logged loss differs by exactly that row's constant: TRL's holds -1·A/B = +0.5/3, ours 0
    torch.testing.assert_close(loss, want - 0.5 / 3, rtol=1e-12, atol=1e-12)
