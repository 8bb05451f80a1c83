"""Policy-loss variants beyond PPO's clipped surrogate, as TRL 1.16's GRPOTrainer has them.

* ``cispo`` (MiniMax-M1, 2025; ScaleRL's ε_max): −sg(min(r, ε_max))·A·logp — the importance
  weight is capped and detached, so every token keeps a REINFORCE gradient (none is zeroed
  by a clip), scaled by its truncated weight.
* ``sapo`` (Soft Adaptive Policy Optimization, 2025): −σ(τ(r − 1))·(4/τ)·A with τ = τ_pos
  for A > 0 and τ_neg otherwise: a smooth gate in place of the hard clip; on policy (r = 1)
  its gradient is PPO's, −A·∇logp.
* the high-entropy token mask (Wang et al. 2025, "Beyond the 80/20 rule"): only tokens whose
  entropy is at or above the (1 − ρ) quantile keep their policy-loss (and entropy-bonus) term.
* the off-policy sequence mask (DeepSeek-V3.2, TRL's ``off_policy_mask_threshold``): rows
  with A < 0 whose mean log-ratio old − new exceeds δ lose their policy-loss term.

The functions take per-token tensors aligned as :func:`rlhf_fast.models.logprobs.sequence_logprobs`
gives them and return ``(loss, stats)`` like :func:`rlhf_fast.ops.reference.policy_loss_from_logp`,
whose aggregation (:func:`~rlhf_fast.ops.reference.aggregate`, ``agg`` / ``normalizer``), KL
and statistics they reuse. ``policy_loss="clip"`` without masks is that function's loss, bit
for bit.
"""

from __future__ import annotations

from typing import Optional

import torch

from rlhf_fast.ops import reference
from rlhf_fast.ops.reference import LOG_RATIO_CLAMP, out_dtype

POLICY_LOSSES = ("clip", "cispo", "sapo")
SAPO_TEMPERATURE_POS = 1.0  # TRL GRPOConfig.sapo_temperature_pos
SAPO_TEMPERATURE_NEG = 1.05  # TRL GRPOConfig.sapo_temperature_neg


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(x, q)`` (linear interpolation) of a 1-D tensor, without its input-size
    limit (2^24 elements: a large rollout's tokens exceed it). Same arithmetic: sort, then
    ``torch.lerp`` between the neighbours of rank q·(n − 1). ``x`` non-empty."""
    s = torch.sort(x).values
    n = s.numel()
    rank = torch.tensor(q, dtype=s.dtype, device=s.device) * (n - 1)
    lo = rank.floor()
    hi = rank.ceil()
    return torch.lerp(s[lo.long()], s[hi.long()], rank - lo)


def high_entropy_threshold(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> Optional[torch.Tensor]:
    """The entropy at the (1 − ``top_quantile``) quantile over the tokens where ``mask`` is set.

    entropy ``[...]`` float, mask ``[...]`` bool or 0/1. Returns a 0-dim tensor in float32
    (float64 for float64 entropy), or None when no token is masked in. As TRL's
    ``get_high_entropy_mask`` (which computes it in float32)."""
    vals = entropy[mask != 0].to(out_dtype(entropy.dtype))
    if vals.numel() == 0:
        return None
    return quantile(vals, 1.0 - float(top_quantile))


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float,
                      threshold: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, T]`` bool: the masked-in tokens whose entropy is ≥ the (1 − ρ) quantile (ρ =
    ``top_quantile``) of the masked-in tokens' entropies — the top-ρ "forking" tokens (ties at
    the threshold are all kept; ρ = 0 keeps the highest-entropy tokens only). ``threshold``
    (0-dim) replaces the quantile of this batch: the trainer passes one over the whole rollout
    batch. TRL's ``get_high_entropy_mask(entropies, mask, 1 - ρ)`` on one process. Masked-out
    entries are never read. No masked-in token: all False."""
    mb = mask != 0
    if threshold is None:
        threshold = high_entropy_threshold(entropy, mb, top_quantile)
        if threshold is None:
            return torch.zeros_like(mb)
    return mb & (torch.where(mb, entropy, torch.zeros((), dtype=entropy.dtype, device=entropy.device))
                 >= threshold.to(entropy.device))


def off_policy_mask(advantages: torch.Tensor, logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                    threshold: float) -> torch.Tensor:
    """Off-policy sequence mask (DeepSeek-V3.2 eq. 9; TRL's ``get_off_policy_mask``) ``[B, T]``
    bool: keep a token unless its advantage is < 0 and its row's mean over masked-in tokens of
    old_logp − logp (a KL(old ‖ current) estimate, ``logp`` detached) exceeds ``threshold``.
    All inputs ``[B, T]``; a row without masked-in tokens has KL 0. Masked-out entries are
    never read (NaN there is harmless)."""
    mb = mask != 0
    dt = out_dtype(logp.dtype)
    d = torch.where(mb, old_logp.detach().to(dt) - logp.detach().to(dt), torch.zeros((), dtype=dt, device=logp.device))
    seq_kl = d.sum(-1, keepdim=True) / mb.sum(-1, keepdim=True).clamp(min=1).to(dt)
    return (advantages.detach() >= 0) | (seq_kl <= threshold)


def token_losses(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *, policy_loss: str = "clip",
                 clip_low: float = 0.2, clip_high: Optional[float] = None, dual_clip: Optional[float] = None,
                 sapo_temperature_pos: float = SAPO_TEMPERATURE_POS,
                 sapo_temperature_neg: float = SAPO_TEMPERATURE_NEG):
    """Per-token policy loss ``[B, T]`` of ``policy_loss`` with r = exp(clamp(logp − old_logp, ±20)).

    Returns ``(loss, ratio, clipped, dual_clipped)`` as :func:`rlhf_fast.ops.reference.ppo_token_loss`:

    * ``clip``: that function (clip_low / clip_high / dual_clip).
    * ``cispo``: −sg(min(r, clip_high))·A·logp; ``clip_high`` is the absolute cap ε_max on
      the weight (TRL's ``epsilon_high`` for cispo; ScaleRL uses 4–5), not an offset from 1,
      and must be given; ``clipped`` marks tokens whose weight is capped (r > ε_max, any sign
      of A — TRL's ``cispo_clip_ratio`` counts only A > 0); clip_low and dual_clip unused.
    * ``sapo``: −σ(τ(r − 1))·(4/τ)·A, τ = sapo_temperature_pos where A > 0, else
      sapo_temperature_neg; nothing is clipped (``clipped`` all False).

    logp differentiable; old_logp and advantages taken as constants. Float32 (float64 for
    float64 logp)."""
    if policy_loss == "clip":
        return reference.ppo_token_loss(logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high,
                                        dual_clip=dual_clip)
    dt = out_dtype(logp.dtype)
    lp = logp.to(dt)
    adv = advantages.detach().to(dt)
    ratio = torch.exp(torch.clamp(lp - old_logp.detach().to(dt), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    none = torch.zeros_like(ratio, dtype=torch.bool)
    if policy_loss == "cispo":
        if clip_high is None:
            raise ValueError("clip_high (the cap ε_max on cispo's importance weight) must be given for "
                             "policy_loss 'cispo'")
        weight = torch.clamp(ratio, max=clip_high).detach()
        return -weight * adv * lp, ratio, ratio.detach() > clip_high, none
    if policy_loss == "sapo":
        tau = torch.where(adv > 0, torch.tensor(float(sapo_temperature_pos), dtype=dt, device=lp.device),
                          torch.tensor(float(sapo_temperature_neg), dtype=dt, device=lp.device))
        gate = torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
        return -gate * adv, ratio, none, none
    raise ValueError(f"policy_loss must be one of {POLICY_LOSSES}, got {policy_loss!r}")


def policy_loss_from_logp(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    policy_loss: str = "clip",
    clip_low: float = 0.2,
    clip_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    sapo_temperature_pos: float = SAPO_TEMPERATURE_POS,
    sapo_temperature_neg: float = SAPO_TEMPERATURE_NEG,
    top_entropy_quantile: float = 1.0,
    entropy_mask: Optional[torch.Tensor] = None,
    off_policy_mask_threshold: Optional[float] = None,
    importance_sampling_level: str = "token",
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    entropy_coef: float = 0.0,
    agg: str = "token-mean",
    normalizer=None,
    kl_fn=None,
):
    """agg(keep·policy term + kl_coef·KL(logp, ref_logp) − entropy_coef·keep_H·entropy).

    logp (differentiable), entropy (differentiable or not), old_logp, advantages, ref_logp
    ``[B, T]`` float; mask ``[B, T]`` bool or 0/1, the loss tokens. The policy term is
    :func:`token_losses`' ``policy_loss``. ``keep`` = the high-entropy mask (``entropy_mask``
    ``[B, T]`` bool if given — the trainer's, from the rollout — else
    :func:`high_entropy_mask` of ``entropy`` over this batch when ``top_entropy_quantile`` < 1,
    as TRL) and the off-policy mask (:func:`off_policy_mask` against ``old_logp`` when
    ``off_policy_mask_threshold`` is set); keep_H is the high-entropy mask alone (TRL applies
    it to the entropy bonus too); the KL term is never masked. Masking zeroes terms, it does
    not change the denominator of ``agg`` (as TRL). ``importance_sampling_level="sequence"``:
    GSPO's sequence ratio through :func:`rlhf_fast.models.logprobs.sequence_level_old_logp`
    (clip and sapo; the off-policy mask still uses the per-token ``old_logp``).

    Returns ``(loss, stats)``: a 0-dim float32 loss (float64 for float64 logp) and the stats
    of :func:`rlhf_fast.ops.reference.policy_loss_from_logp` (``clip_frac``: see
    :func:`token_losses`; 0 for sapo) plus ``entropy_mask_frac`` (share of loss tokens the
    high-entropy mask keeps, 1 when off) and ``off_policy_mask_frac`` (share the off-policy
    mask drops, 0 when off). Masked-out entries are never read."""
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if importance_sampling_level == "sequence" and policy_loss == "cispo":
        raise ValueError("importance_sampling_level 'sequence' is not supported with policy_loss 'cispo'")
    kl_fn = reference.kl_penalty if kl_fn is None else kl_fn
    logp_out = logp
    mb = mask != 0
    logp, entropy, old_logp, advantages, ref_logp = reference._masked_inputs(
        mb, logp, entropy, old_logp.detach(), advantages.detach(), None if ref_logp is None else ref_logp.detach())
    ratio_old = old_logp
    if importance_sampling_level == "sequence":
        from rlhf_fast.models.logprobs import sequence_level_old_logp

        ratio_old = sequence_level_old_logp(logp.detach(), old_logp, mb)
    loss_tok, ratio, clipped, dual = token_losses(
        logp, ratio_old, advantages, policy_loss=policy_loss, clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg)
    keep_h = entropy_mask
    if keep_h is None and top_entropy_quantile < 1.0:
        keep_h = high_entropy_mask(entropy.detach(), mb, top_entropy_quantile)
    keep = keep_h
    if off_policy_mask_threshold is not None:
        opm = off_policy_mask(advantages, logp, old_logp, mb, off_policy_mask_threshold)
        keep = opm if keep is None else keep & opm
    zero = torch.zeros((), dtype=loss_tok.dtype, device=loss_tok.device)
    total = loss_tok if keep is None else torch.where(keep, loss_tok, zero)
    kl = None
    if ref_logp is not None:
        kl = kl_fn(logp, ref_logp, kl_kind)
        if kl_coef != 0.0:
            total = total + kl_coef * kl
    if entropy_coef != 0.0:
        ent = entropy if keep_h is None else torch.where(keep_h, entropy, torch.zeros_like(entropy))
        total = total - entropy_coef * ent
    loss = reference.aggregate(total, mb, agg, normalizer)
    stats = reference.policy_stats(logp, ratio_old, ratio, clipped, dual, mb)
    with torch.no_grad():
        dt = loss.dtype
        stats["kl"] = reference.masked_mean(kl, mb) if kl is not None else torch.zeros((), dtype=dt, device=loss.device)
        stats["entropy"] = reference.masked_mean(entropy.detach(), mb)
        stats["entropy_mask_frac"] = (reference.masked_mean(keep_h.to(dt), mb) if keep_h is not None
                                      else torch.ones((), dtype=dt, device=loss.device))
        stats["off_policy_mask_frac"] = (reference.masked_mean((~opm).to(dt), mb)
                                         if off_policy_mask_threshold is not None
                                         else torch.zeros((), dtype=dt, device=loss.device))
        stats["logp"] = logp_out.detach()
    return loss, stats


__all__ = [
    "POLICY_LOSSES",
    "SAPO_TEMPERATURE_POS",
    "SAPO_TEMPERATURE_NEG",
    "quantile",
    "high_entropy_threshold",
    "high_entropy_mask",
    "off_policy_mask",
    "token_losses",
    "policy_loss_from_logp",
]
