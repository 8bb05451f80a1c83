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
* ``luspo`` (Length-Unbiased Sequence Policy Optimization, 2026): PPO's clipped surrogate per
  token, each row's token losses summed (aggregation ``seq-mean-token-sum``, which it requires),
  meant with the sequence-level (GSPO) ratio.
* ``vespo`` (Variational Sequence-Level Soft Policy Optimization, 2026): −sg(φ(w))·A·logp with
  w the row's sequence importance weight exp(Σ_t log r_t) and the Gamma gate
  φ(w) = e^λ·w^k·e^(−λw) (φ(1) = 1), (k, λ) = (k_pos, λ_pos) for A ≥ 0, else (k_neg, λ_neg).
* the bias-corrected KL (DeepSeek-V3.2, TRL's ``use_bias_correction_kl``): the per-token KL
  term times the (differentiable) importance ratio, the unbiased reverse-KL gradient off-policy.
* ``gmpo`` (Geometric-Mean Policy Optimization, 2025; TRL's experimental GMPOTrainer): one
  weight per answer, the geometric mean of its tokens' ratios each clipped in log space
  (one-sidedly by the sign of A, PPO's min in log space), exp(mean_t clip(log r_t)); the
  answer's loss −weight·A, averaged over answers (:func:`gmpo_sequence_loss`).
* the ``sequence_sum`` importance-sampling level (TRL's RLOOTrainer): one ratio per answer,
  exp(Σ_t logp − Σ_t old_logp) — the likelihood ratio π(y|x)/π_old(y|x) itself, where GSPO's
  ``sequence`` level takes the exp of the *mean* log-ratio — clipped as a whole, the clipped
  surrogate of each answer averaged over answers (:func:`sequence_sum_policy_loss`).
* ``clip_cov`` and ``kl_cov`` (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning
  for Reasoning Language Models"; verl's ``compute_policy_loss_clip_cov`` / ``_kl_cov``): a small
  share of the tokens, chosen by the covariance (A − Ā)·(logp − l̄) over the batch's loss tokens,
  loses its gradient (clip-cov: a random ``clip_cov_ratio`` share of the unclipped tokens whose
  covariance lies in (``clip_cov_lb``, ``clip_cov_ub``), on PPO's clipped surrogate) or takes a
  penalty ``ppo_kl_coef``·|logp − old_logp| (kl-cov: the ``kl_cov_ratio`` share with the largest
  covariance, on the unclipped surrogate −r·A) — :func:`clip_cov_mask`, :func:`kl_cov_mask`.
* ``gpg`` (Group Policy Gradient, 2025; verl's ``compute_policy_loss_gpg``): −logp·A, no ratio,
  no clip.

The functions take per-token tensors aligned as :func:`rlhf_fast.models.logprobs.sequence_logprobs`
gives them and return ``(loss, stats)`` like :func:`rlhf_fast.ops.reference.policy_loss_from_logp`,
whose aggregation (:func:`~rlhf_fast.ops.reference.aggregate`, ``agg`` / ``normalizer``), KL
and statistics they reuse. ``policy_loss="clip"`` without masks is that function's loss, bit
for bit.
"""

from __future__ import annotations

from typing import Optional

import math

import torch

from rlhf_fast.ops import reference
from rlhf_fast.ops.reference import LOG_RATIO_CLAMP, out_dtype

POLICY_LOSSES = ("clip", "cispo", "sapo", "luspo", "vespo", "gmpo", "clip_cov", "kl_cov", "gpg")
CLIP_LOSSES = ("clip", "luspo")  # PPO's clipped surrogate per token
SAPO_TEMPERATURE_POS = 1.0  # TRL GRPOConfig.sapo_temperature_pos
SAPO_TEMPERATURE_NEG = 1.05  # TRL GRPOConfig.sapo_temperature_neg
VESPO_K_POS = 2.0  # TRL GRPOConfig.vespo_k_pos
VESPO_LAMBDA_POS = 3.0  # TRL GRPOConfig.vespo_lambda_pos
VESPO_K_NEG = 3.0  # TRL GRPOConfig.vespo_k_neg
VESPO_LAMBDA_NEG = 2.0  # TRL GRPOConfig.vespo_lambda_neg
LUSPO_AGG = "seq-mean-token-sum"
# TRL RLOO's ratio exp(Σ_t log-ratio): each answer's loss counts once, so its mean over
# answers is the seq-mean-token-sum aggregation of a loss held by one token per row
SEQUENCE_SUM = "sequence_sum"
SEQUENCE_SUM_AGG = "seq-mean-token-sum"
# TRL GMPOConfig.epsilon: GMPO's clip bound in log space, ratios kept in (e^-0.4, e^0.4), the paper's
# recommendation (markedly wider than PPO's 0.2 read as a log bound, (0.82, 1.22))
GMPO_CLIP = 0.4
# one loss per answer (the token mean is inside its geometric mean), averaged over the answers
GMPO_AGG = "seq-mean-token-mean"
# verl's PolicyLossConfig defaults (verl/workers/config/actor.py); its loss functions fall back to
# ppo_kl_coef 1.0 only when the key is None
CLIP_COV_RATIO = 0.0002
CLIP_COV_LB = 1.0
CLIP_COV_UB = 5.0
KL_COV_RATIO = 0.0002
PPO_KL_COEF = 0.1
COV_LOSSES = ("clip_cov", "kl_cov")
# the log-space floor of VESPO's weights: log(1e-8), as the paper's code (and TRL) clamp
_VESPO_LOG_FLOOR = math.log(1e-8)


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(x, q)`` (linear interpolation) of a 1-D tensor, without its input-size
    limit (2^24 elements: a large rollout's tokens exceed it). Same arithmetic: sort, then
    ``torch.lerp`` between the neighbours of rank q·(n − 1). ``x`` non-empty; q in [0, 1] (else
    ValueError, as torch.quantile refuses it: a negative rank would wrap around)."""
    if not 0.0 <= float(q) <= 1.0:  # NaN fails too
        raise ValueError(f"q must be in [0, 1], got {q!r}")
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
    ``get_high_entropy_mask`` (which computes it in float32). ``top_quantile`` in [0, 1]."""
    if not 0.0 <= float(top_quantile) <= 1.0:  # NaN fails too
        raise ValueError(f"top_quantile must be in [0, 1] (the share of tokens kept), got {top_quantile!r}")
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


@torch.no_grad()
def vespo_weights(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                  is_weight: Optional[torch.Tensor] = None, k_pos: float = VESPO_K_POS,
                  lambda_pos: float = VESPO_LAMBDA_POS, k_neg: float = VESPO_K_NEG,
                  lambda_neg: float = VESPO_LAMBDA_NEG) -> torch.Tensor:
    """VESPO's Gamma weights φ(w) ``[B, T]`` (detached; TRL's ``get_gamma_weights``).

    w = exp(clamp(Σ_t clamp(logp − old_logp, ±20) + Σ_t clamp(log is_weight, log 1e-8, 20),
    log 1e-8, 20)), the sums over row b's tokens where ``mask`` is set (``is_weight`` ``[B, T]``:
    the rollout's importance weights between the sampler and the recomputed old policy, TRL's
    token-level vLLM correction; None = 1). φ = exp(λ + k·log w − λ·w) with (k, λ) = (k_pos,
    λ_pos) where A ≥ 0, else (k_neg, λ_neg), λ ≥ 1e-4; non-finite φ → 0. All inputs ``[B, T]``
    (advantages per token: with one advantage per row, as GRPO, φ is one value per row).
    Float32 (float64 for float64 logp); masked-out entries are never read."""
    mb = mask != 0
    dt = out_dtype(logp.dtype)
    zero = torch.zeros((), dtype=dt, device=logp.device)
    lr = torch.clamp(logp.detach().to(dt) - old_logp.detach().to(dt), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    seq = torch.where(mb, lr, zero).sum(-1, keepdim=True)
    if is_weight is not None:
        w_is = torch.where(mb, is_weight.detach().to(dt), torch.ones((), dtype=dt, device=logp.device))
        seq = seq + torch.where(mb, torch.clamp(torch.log(w_is), _VESPO_LOG_FLOOR, LOG_RATIO_CLAMP),
                                zero).sum(-1, keepdim=True)
    log_w = torch.clamp(seq, _VESPO_LOG_FLOOR, LOG_RATIO_CLAMP)
    w = torch.exp(log_w)
    nonneg = advantages.detach().to(dt) >= 0
    k = torch.where(nonneg, torch.tensor(float(k_pos), dtype=dt, device=logp.device),
                    torch.tensor(float(k_neg), dtype=dt, device=logp.device))
    lam = torch.where(nonneg, torch.tensor(float(lambda_pos), dtype=dt, device=logp.device),
                      torch.tensor(float(lambda_neg), dtype=dt, device=logp.device)).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * w).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _verl_masked_mean(x: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
    """verl's ``masked_mean`` (verl/utils/torch_functional.py) with a bool mask: the sum of the
    masked-in entries over their count (its + 1e-8 vanishes in float32 for a count ≥ 1; the count
    stays an integer tensor, so float64 divides by it exactly as verl's int mask does)."""
    return torch.where(mb, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum() / (mb.sum() + 1e-8)


@torch.no_grad()
def clip_cov_mask(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                  clip_low: float = 0.2, clip_high: Optional[float] = None, clip_cov_ratio: float = CLIP_COV_RATIO,
                  clip_cov_lb: float = CLIP_COV_LB, clip_cov_ub: float = CLIP_COV_UB,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Clip-Cov's tokens ``[B, T]`` bool, whose policy-loss term (and gradient) is dropped (verl's
    ``compute_policy_loss_clip_cov``).

    cov = (A − Ā)·(logp − l̄), Ā and l̄ the means over the loss tokens (``mask``) of this call. The
    candidates are the loss tokens PPO does not clip (−A·clip(r) ≤ −A·r, r = exp(clamp(logp −
    old_logp, ±20)), bounds ``clip_low`` / ``clip_high``) with ``clip_cov_lb`` < cov <
    ``clip_cov_ub``; of them, max(⌊clip_cov_ratio·N⌋, 1) (N the loss tokens) are drawn uniformly
    at random by one ``torch.randperm`` over the candidates in row-major order, on the CPU with
    ``generator`` (None: the global generator, as verl — its stream is consumed only when there
    is a candidate). Inputs ``[B, T]``; masked-out entries never change the result (NaN there is
    harmless). Syncs with the host (the count, the candidates), as verl does."""
    mb = mask != 0
    dt = out_dtype(logp.dtype)
    lp, adv = logp.detach().to(dt), advantages.detach().to(dt)
    _, _, clipped, _ = reference.ppo_token_loss(lp, old_logp.detach(), adv, clip_low=clip_low, clip_high=clip_high)
    cov = (adv - _verl_masked_mean(adv, mb)) * (lp - _verl_masked_mean(lp, mb))
    cand = mb & ~clipped & (cov > clip_cov_lb) & (cov < clip_cov_ub)
    n_clip = max(int(clip_cov_ratio * int(mb.sum())), 1)
    idx = torch.nonzero(cand.reshape(-1), as_tuple=True)[0]  # row-major, as verl's torch.nonzero of [B, T]
    sel = torch.zeros(mb.numel(), dtype=torch.bool, device=mb.device)
    if idx.numel() > 0:
        perm = torch.randperm(idx.numel(), generator=generator)
        sel[idx[perm[: min(n_clip, idx.numel())].to(idx.device)]] = True
    return sel.reshape(mb.shape)


@torch.no_grad()
def kl_cov_mask(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                kl_cov_ratio: float = KL_COV_RATIO) -> torch.Tensor:
    """KL-Cov's tokens ``[B, T]`` bool, which take the penalty ppo_kl_coef·|logp − old_logp| (verl's
    ``compute_policy_loss_kl_cov``): the max(⌊kl_cov_ratio·N⌋, 1) loss tokens (N of them, none
    when N = 0) with the largest cov = (A − Ā)·(logp − l̄), the means over the loss tokens of
    this call. As verl, the covariances are computed and ranked on the CPU (``Tensor.mean`` of
    the loss tokens in row-major order, ``torch.topk``), so its tie-break holds on any device.
    Inputs ``[B, T]``; masked-out entries are never read."""
    mb = mask != 0
    dt = out_dtype(logp.dtype)
    flat = torch.nonzero(mb.reshape(-1), as_tuple=True)[0]
    sel = torch.zeros(mb.numel(), dtype=torch.bool, device=mb.device)
    if flat.numel() > 0:
        adv = advantages.detach().to(dt)[mb].reshape(-1).cpu()
        lp = logp.detach().to(dt)[mb].reshape(-1).cpu()
        cov = (adv - adv.mean()) * (lp - lp.mean())
        k = max(1, int(cov.numel() * kl_cov_ratio))
        top = torch.topk(cov, k, largest=True).indices
        sel[flat[top.to(flat.device)]] = True
    return sel.reshape(mb.shape)


def token_losses(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *, policy_loss: str = "clip",
                 clip_low: float = 0.2, clip_high: Optional[float] = None, dual_clip: Optional[float] = None,
                 sapo_temperature_pos: float = SAPO_TEMPERATURE_POS,
                 sapo_temperature_neg: float = SAPO_TEMPERATURE_NEG, mask: Optional[torch.Tensor] = None,
                 is_weight: Optional[torch.Tensor] = None, vespo_k_pos: float = VESPO_K_POS,
                 vespo_lambda_pos: float = VESPO_LAMBDA_POS, vespo_k_neg: float = VESPO_K_NEG,
                 vespo_lambda_neg: float = VESPO_LAMBDA_NEG, cov_mask: Optional[torch.Tensor] = None,
                 clip_cov_ratio: float = CLIP_COV_RATIO, clip_cov_lb: float = CLIP_COV_LB,
                 clip_cov_ub: float = CLIP_COV_UB, kl_cov_ratio: float = KL_COV_RATIO,
                 ppo_kl_coef: float = PPO_KL_COEF):
    """Per-token policy loss ``[B, T]`` of ``policy_loss`` with r = exp(clamp(logp − old_logp, ±20)).

    Returns ``(loss, ratio, clipped, dual_clipped)`` as :func:`rlhf_fast.ops.reference.ppo_token_loss`:

    * ``clip`` and ``luspo``: that function (clip_low / clip_high / dual_clip).
    * ``cispo``: −sg(min(r, clip_high))·A·logp; ``clip_high`` is the absolute cap ε_max on
      the weight (TRL's ``epsilon_high`` for cispo; ScaleRL uses 4–5), not an offset from 1,
      and must be given; ``clipped`` marks tokens whose weight is capped (r > ε_max, any sign
      of A — TRL's ``cispo_clip_ratio`` counts only A > 0); clip_low and dual_clip unused.
    * ``sapo``: −σ(τ(r − 1))·(4/τ)·A, τ = sapo_temperature_pos where A > 0, else
      sapo_temperature_neg; nothing is clipped (``clipped`` all False).
    * ``vespo``: −sg(φ)·A·logp, φ = :func:`vespo_weights` (needs ``mask``; ``is_weight`` and
      the ``vespo_*`` parameters go there); nothing is clipped.
    * ``clip_cov``: PPO's clipped surrogate (clip_low / clip_high, no dual clip) times 0 on the
      tokens of ``cov_mask`` (``[B, T]`` bool; None: :func:`clip_cov_mask` of ``mask`` with the
      ``clip_cov_*`` parameters, which then needs ``mask``); ``clipped`` is PPO's.
    * ``kl_cov``: −A·r, plus ppo_kl_coef·|logp − old_logp| on the tokens of ``cov_mask`` (None:
      :func:`kl_cov_mask` of ``mask`` with ``kl_cov_ratio``); no clip.
    * ``gpg``: −logp·A (no ratio; ``ratio`` is still returned for the statistics); no clip.

    logp differentiable; old_logp and advantages taken as constants. Float32 (float64 for
    float64 logp)."""
    if policy_loss in CLIP_LOSSES:
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
    if policy_loss == "vespo":
        if mask is None:
            raise ValueError("mask (the loss tokens, which make up each row's sequence weight) must be given for "
                             "policy_loss 'vespo'")
        phi = vespo_weights(lp, old_logp, adv, mask, is_weight=is_weight, k_pos=vespo_k_pos,
                            lambda_pos=vespo_lambda_pos, k_neg=vespo_k_neg, lambda_neg=vespo_lambda_neg)
        return -phi * adv * lp, ratio, none, none
    if policy_loss == "gpg":
        return -lp * adv, ratio, none, none
    if policy_loss in COV_LOSSES:
        return _cov_token_losses(lp, old_logp.detach().to(dt), adv, ratio, mask, policy_loss=policy_loss,
                                 clip_low=clip_low, clip_high=clip_high, cov_mask=cov_mask,
                                 clip_cov_ratio=clip_cov_ratio, clip_cov_lb=clip_cov_lb, clip_cov_ub=clip_cov_ub,
                                 kl_cov_ratio=kl_cov_ratio, ppo_kl_coef=ppo_kl_coef)
    if policy_loss == "gmpo":
        raise ValueError("policy_loss 'gmpo' has no per-token loss (one geometric-mean weight per answer): "
                         "use gmpo_sequence_loss or policy_loss_from_logp")
    raise ValueError(f"policy_loss must be one of {POLICY_LOSSES}, got {policy_loss!r}")


def _cov_token_losses(lp, old, adv, ratio, mask, *, policy_loss, clip_low, clip_high, cov_mask, clip_cov_ratio,
                      clip_cov_lb, clip_cov_ub, kl_cov_ratio, ppo_kl_coef):
    """:func:`token_losses` of ``clip_cov`` / ``kl_cov`` (lp float, old / adv detached, ratio of lp)."""
    none = torch.zeros_like(ratio, dtype=torch.bool)
    if cov_mask is None:
        if mask is None:
            raise ValueError(f"mask (the loss tokens, over which the covariance is taken) or cov_mask must be given "
                             f"for policy_loss {policy_loss!r}")
        cov_mask = (clip_cov_mask(lp, old, adv, mask, clip_low=clip_low, clip_high=clip_high,
                                  clip_cov_ratio=clip_cov_ratio, clip_cov_lb=clip_cov_lb, clip_cov_ub=clip_cov_ub)
                    if policy_loss == "clip_cov" else kl_cov_mask(lp, adv, mask, kl_cov_ratio=kl_cov_ratio))
    if policy_loss == "clip_cov":
        loss, ratio, clipped, _ = reference.ppo_token_loss(lp, old, adv, clip_low=clip_low, clip_high=clip_high)
        # verl multiplies by its 0/1 `corr`: the dropped tokens keep neither value nor gradient
        return loss * (~cov_mask).to(loss.dtype), ratio, clipped, none
    pg = -adv * ratio
    # verl's unclamped |logp − old_logp| (its ratio has no ±20 clamp; ours does, as every ratio here)
    return torch.where(cov_mask, pg + ppo_kl_coef * (lp - old).abs(), pg), ratio, none, none


def gmpo_sequence_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                       clip_low: float = GMPO_CLIP, clip_high: Optional[float] = None,
                       keep: Optional[torch.Tensor] = None):
    """GMPO's loss per answer (TRL 1.16 ``experimental/gmpo/gmpo_trainer.py``,
    ``GMPOTrainer._compute_loss``).

    logp (differentiable), old_logp, advantages ``[B, T]`` float; mask ``[B, T]`` bool or 0/1,
    the loss tokens; keep ``[B, T]`` bool or None: the tokens of the geometric mean among them
    (the high-entropy mask; None = all). Per token l_t = logp − old_logp, clipped in log space
    one-sidedly by the sign of the row's advantage A_b (the mean of its advantages over its loss
    tokens: its one advantage under a group estimator): min(l, clamp(l, −clip_low, clip_high))
    for A_b > 0, max(...) otherwise (``clip_high`` None = ``clip_low``). Row b's weight is
    w_b = exp(clamp(mean over its kept tokens of the clipped l, ±20)), its loss −w_b·A_b. A row
    with no kept token has weight 1 (TRL's clamp of the count at 1); one with no loss token
    A = 0, loss 0, where TRL (whose truncated rows keep their advantage under a zeroed mask)
    logs −A for it: the same gradients, a logged loss that differs by that constant. That and
    the ±20 clamp (every ratio of the package has it) are the departures from TRL.

    Returns ``(loss, weight, low, high)``: loss ``[B]`` float32 (float64 for float64 logp),
    differentiable; weight ``[B]`` detached; ``low`` (l < −clip_low with A_b < 0) and ``high``
    (l > clip_high with A_b > 0) ``[B, T]`` bool over the loss tokens, TRL's
    ``is_low_clipped`` / ``is_high_clipped``. Masked-out entries are never read."""
    mb = mask != 0
    dt = out_dtype(logp.dtype)
    m = mb.to(dt)
    logp, old_logp, advantages = reference._masked_inputs(mb, logp, old_logp.detach(), advantages.detach())
    adv = (advantages.to(dt) * m).sum(-1) / m.sum(-1).clamp(min=1)  # [B]
    high_bound = clip_low if clip_high is None else clip_high
    log_ratio = logp.to(dt) - old_logp.to(dt)
    clamped = torch.clamp(log_ratio, min=-clip_low, max=high_bound)
    pos = (adv > 0)[:, None]
    # PPO's min(r·A, clip(r)·A) in log space: only the side the advantage pushes towards is bounded
    clipped = torch.where(pos, torch.minimum(log_ratio, clamped), torch.maximum(log_ratio, clamped))
    k = m if keep is None else (mb & (keep != 0)).to(dt)
    log_w = (clipped * k).sum(-1) / k.sum(-1).clamp(min=1)  # [B]
    weight = torch.exp(torch.clamp(log_w, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    lr = log_ratio.detach()
    low = mb & (lr < -clip_low) & (adv < 0)[:, None]
    high = mb & (lr > high_bound) & pos
    return -weight * adv, weight.detach(), low, high


def sequence_sum_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                             mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: Optional[float] = None,
                             dual_clip: Optional[float] = None):
    """TRL RLOOTrainer's policy loss per answer: one clipped ratio per row.

    logp (differentiable), old_logp, advantages ``[B, T]`` float; mask ``[B, T]`` bool or 0/1,
    the loss tokens. Row b's log-ratio is S_b = Σ_t logp − Σ_t old_logp over its loss tokens
    (the sums taken first, as TRL), its ratio r_b = exp(clamp(S_b, ±20)) and its loss
    max(−A_b·r_b, −A_b·clip(r_b, 1 − clip_low, 1 + clip_high)) (with ``dual_clip`` c, rows with
    A_b < 0 take min(that, −A_b·c)), A_b the mean of the row's advantages over its loss tokens
    (its one advantage under a group estimator). A row without loss tokens has S = A = 0: loss
    0, ratio 1. The ±20 clamp (every ratio of the package has it) is the only departure from
    TRL, whose exp(S) overflows on long, drifted answers.

    Returns ``(loss, ratio, low, high, dual)``, each ``[B]``: loss float32 (float64 for float64
    logp), differentiable; ratio detached; ``low`` (r < 1 − clip_low with A < 0), ``high``
    (r > 1 + clip_high with A > 0) and ``dual`` (the dual clip active) bool — TRL's
    ``is_low_clipped`` / ``is_high_clipped``. Masked-out entries are never read."""
    mb = mask != 0
    dt = out_dtype(logp.dtype)
    m = mb.to(dt)
    logp, old_logp, advantages = reference._masked_inputs(mb, logp, old_logp.detach(), advantages.detach())
    seq_logp = (logp.to(dt) * m).sum(-1)  # TRL's logps: (per_token_logps * completion_mask).sum(1)
    seq_old = (old_logp.to(dt) * m).sum(-1)
    adv = (advantages.to(dt) * m).sum(-1) / m.sum(-1).clamp(min=1)
    loss, ratio, _, dual = reference.ppo_token_loss(seq_logp, seq_old, adv, clip_low=clip_low, clip_high=clip_high,
                                                    dual_clip=dual_clip)
    ratio = ratio.detach()
    high_bound = clip_low if clip_high is None else clip_high
    return loss, ratio, (ratio < 1 - clip_low) & (adv < 0), (ratio > 1 + high_bound) & (adv > 0), dual


def _check_sequence_sum(policy_loss, agg, top_entropy_quantile, entropy_mask, off_policy_mask_threshold,
                        use_bias_correction_kl, is_weight):
    what = f"importance_sampling_level {SEQUENCE_SUM!r}"
    if policy_loss != "clip":
        raise ValueError(f"{what} clips one ratio per answer: it needs policy_loss 'clip', got {policy_loss!r}")
    if agg != SEQUENCE_SUM_AGG:
        raise ValueError(f"{what} averages each answer's loss over the answers: it needs agg {SEQUENCE_SUM_AGG!r}, "
                         f"got {agg!r}")
    per_token = [name for name, on in (("top_entropy_quantile", top_entropy_quantile < 1.0 or entropy_mask is not None),
                                       ("off_policy_mask_threshold", off_policy_mask_threshold is not None),
                                       ("use_bias_correction_kl", use_bias_correction_kl),
                                       ("is_weight", is_weight is not None)) if on]
    if per_token:
        raise ValueError(f"{what} is not supported with {', '.join(per_token)} (they weigh or mask single tokens)")


def _sequence_sum_loss_from_logp(logp, entropy, old_logp, advantages, mask, *, clip_low, clip_high, dual_clip,
                                 ref_logp, kl_coef, kl_kind, entropy_coef, agg, normalizer, kl_fn):
    """:func:`policy_loss_from_logp` at the ``sequence_sum`` level: the rows' losses of
    :func:`sequence_sum_policy_loss` summed over the normaliser of ``agg`` (the rows), plus the
    KL and entropy terms per token under the same ``agg``."""
    logp_out = logp
    mb = mask != 0
    rows, ratio, low, high, dual = sequence_sum_policy_loss(logp, old_logp, advantages, mb, clip_low=clip_low,
                                                            clip_high=clip_high, dual_clip=dual_clip)
    logp, entropy, old_logp, ref_logp = reference._masked_inputs(
        mb, logp, entropy, old_logp.detach(), None if ref_logp is None else ref_logp.detach())
    dt = rows.dtype
    tok, kl = reference.add_kl_entropy(torch.zeros(mb.shape, dtype=dt, device=mb.device), logp, entropy, ref_logp,
                                       kl_coef=kl_coef, kl_kind=kl_kind, entropy_coef=entropy_coef, kl_fn=kl_fn)
    den = max(mb.shape[0], 1) if normalizer is None else normalizer
    loss = reference.aggregate(tok, mb, agg, normalizer) + rows.sum() / den
    with torch.no_grad():
        n = max(mb.shape[0], 1)
        zero = torch.zeros((), dtype=dt, device=mb.device)
        d = logp.detach().to(dt) - old_logp.to(dt)
        stats = {
            # TRL's clip_ratio/region_mean, low_mean, high_mean: shares of the answers
            "clip_frac": (low | high).to(dt).sum() / n,
            "clip_low_frac": low.to(dt).sum() / n,
            "clip_high_frac": high.to(dt).sum() / n,
            "dual_clip_frac": dual.to(dt).sum() / n,
            # per token, as at the other levels: ppo.target_kl keeps its scale
            "approx_kl": reference.masked_mean(0.5 * d * d, mb),
            "ratio_mean": ratio.sum() / n,
            "ratio_max": ratio.max() if ratio.numel() else zero,
            "kl": reference.masked_mean(kl, mb) if kl is not None else zero,
            "entropy": reference.masked_mean(entropy.detach(), mb),
            "entropy_mask_frac": torch.ones((), dtype=dt, device=mb.device),
            "off_policy_mask_frac": zero,
            "logp": logp_out.detach(),
        }
        stats["entropy_kept"] = stats["entropy"]
        # TRL RLOO's clip_ratio/low_min / high_max: over the answers' flags (one "token" per answer)
        stats["clip_low_min"], stats["clip_high_max"] = clip_share_extremes(
            low[:, None], high[:, None], torch.ones_like(low)[:, None], dt)
    return loss, stats


def answer_stats(ratio: torch.Tensor, clipped: torch.Tensor, dual: torch.Tensor, mask: torch.Tensor) -> dict:
    """``clip_frac``, ``dual_clip_frac`` and ``ratio_mean`` of the ``sequence`` importance-sampling
    level as means over the answers, as TRL's ``clip_ratio/region_mean`` of its one ratio per answer
    (``global_masked_mean`` of a ``[B, 1]`` flag): each row's share of its flagged loss tokens (its
    0/1 flag under one advantage per answer) and its ratio (the same at each of its tokens), a row
    without loss tokens counting with share 0 and ratio exp(0) = 1, as TRL's.

    ratio ``[B, T]`` float, clipped / dual / mask ``[B, T]`` bool. Returns 0-dim tensors in
    ratio's dtype (0 / 1 for B = 0); masked-out entries are never read."""
    with torch.no_grad():
        mb = mask != 0
        dt = ratio.dtype
        n = mb.sum(-1).to(dt)
        zero = torch.zeros((), dtype=dt, device=ratio.device)
        share = lambda x: (x & mb).sum(-1).to(dt) / n.clamp(min=1)  # noqa: E731
        r = torch.where(n > 0, torch.where(mb, ratio.detach(), zero).sum(-1) / n.clamp(min=1),
                        torch.ones_like(n))
        rows = max(mb.shape[0], 1)
        one = torch.ones((), dtype=dt, device=ratio.device)
        return {"clip_frac": share(clipped).sum() / rows, "dual_clip_frac": share(dual).sum() / rows,
                "ratio_mean": r.sum() / rows if mb.shape[0] else one}


def clip_share_extremes(low: torch.Tensor, high: torch.Tensor, mask: torch.Tensor, dtype=torch.float32,
                        count_empty: bool = False):
    """TRL's ``clip_ratio/low_min`` and ``clip_ratio/high_max`` of one batch (``nanmin`` /
    ``nanmax`` of its ``masked_seq_mean``): over the rows with a loss token, the least share of
    low-clipped loss tokens and the largest share of high-clipped ones. A row without a loss
    token is 0/0 in TRL, left out by nanmin / nanmax; NaN when no row has one. ``count_empty``:
    such a row counts with share 0 instead (TRL's sequence level, one unclipped ratio exp(0) per
    answer); NaN only for B = 0.

    low, high, mask ``[B, T]`` bool. Returns two 0-dim tensors of ``dtype`` (no host sync)."""
    n = mask.sum(-1).to(dtype)  # [B]
    has = torch.ones_like(n, dtype=torch.bool) if count_empty else n > 0
    inf = torch.full((1,), math.inf, dtype=dtype, device=mask.device)
    nan = torch.full((), math.nan, dtype=dtype, device=mask.device)
    share = lambda x: (x & mask).sum(-1).to(dtype) / n.clamp(min=1)
    # +inf / -inf stand for the rows left out, and for none (B = 0) before the NaN
    lo = torch.cat([torch.where(has, share(low), inf), inf]).amin()
    hi = torch.cat([torch.where(has, share(high), -inf), -inf]).amax()
    none = ~has.any()
    return torch.where(none, nan, lo), torch.where(none, nan, hi)


def clip_region_extremes(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                         *, clip_low: float = 0.2, clip_high: Optional[float] = None,
                         dual_clip: Optional[float] = None, importance_sampling_level: str = "token"):
    """TRL GRPOTrainer's ``clip_ratio/low_min`` / ``clip_ratio/high_max`` for its clipped
    surrogates (loss types grpo, bnpo, dr_grpo, dapo, luspo: our ``clip`` and ``luspo``).

    logp (detached), old_logp, advantages ``[B, T]`` float; mask ``[B, T]`` bool or 0/1, the loss
    tokens. The ratio r is exp(clamp(logp − old_logp, ±20)) per token, or at the ``sequence``
    level each row's exp of the mean log-ratio over its loss tokens (exp(0) = 1 for a row
    without one), taken as min(r, ``dual_clip``) (TRL clamps ``coef_1`` at ``delta`` before its
    flags). TRL's is_low_clipped: r < 1 − clip_low with A < 0; is_high_clipped: r > 1 + clip_high
    with A > 0 (``clip_high`` None = ``clip_low``) — not ``clip_frac``'s "the clipped branch is
    the larger loss". Returns :func:`clip_share_extremes` of them: 0-dim float32 (float64 for
    float64 logp); a row without loss tokens is left out at the token level (TRL's 0/0) and
    counts 0 at the sequence level (TRL's one flag per answer). Masked-out entries never read."""
    mb = mask != 0
    dt = out_dtype(logp.dtype)
    zero = torch.zeros((), dtype=dt, device=mb.device)
    with torch.no_grad():
        lr = torch.where(mb, logp.detach().to(dt) - old_logp.detach().to(dt), zero)
        if importance_sampling_level == "sequence":
            lr = lr.sum(-1, keepdim=True) / mb.sum(-1, keepdim=True).clamp(min=1).to(dt)  # [B, 1]
        ratio = torch.exp(torch.clamp(lr, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        if dual_clip is not None:
            ratio = ratio.clamp(max=dual_clip)
        adv = torch.where(mb, advantages.detach().to(dt), zero)
        high_bound = clip_low if clip_high is None else clip_high
        low = (ratio < 1 - clip_low) & (adv < 0)
        high = (ratio > 1 + high_bound) & (adv > 0)
        return clip_share_extremes(low, high, mb, dt, count_empty=importance_sampling_level == "sequence")


def _check_gmpo(agg, importance_sampling_level, dual_clip, off_policy_mask_threshold, use_bias_correction_kl,
                is_weight):
    what = "policy_loss 'gmpo'"
    if agg != GMPO_AGG:
        raise ValueError(f"{what} averages one loss per answer (the token mean is inside its geometric mean): it "
                         f"needs agg {GMPO_AGG!r}, got {agg!r}")
    if importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level {importance_sampling_level!r} is not supported with {what} "
                         f"(its geometric mean of the token ratios is already one weight per answer)")
    # TRL's GMPOTrainer has none of these: each would be a new objective, not GMPO's
    extra = [name for name, on in (("dual_clip", dual_clip is not None),
                                   ("off_policy_mask_threshold", off_policy_mask_threshold is not None),
                                   ("use_bias_correction_kl", use_bias_correction_kl),
                                   ("is_weight", is_weight is not None)) if on]
    if extra:
        raise ValueError(f"{what} is not supported with {', '.join(extra)}")


def _gmpo_loss_from_logp(logp, entropy, old_logp, advantages, mask, *, clip_low, clip_high, top_entropy_quantile,
                         entropy_mask, ref_logp, kl_coef, kl_kind, entropy_coef, agg, normalizer, kl_fn):
    """:func:`policy_loss_from_logp` for ``gmpo``: the rows' losses of :func:`gmpo_sequence_loss`
    summed over the normaliser of ``agg`` (the rows), plus the KL (never masked: with ``agg``
    seq-mean-token-mean TRL's per-answer mean of the k3 KL) and the entropy bonus (on the
    high-entropy tokens) per token under the same ``agg``."""
    logp_out = logp
    mb = mask != 0
    keep_h = entropy_mask
    if keep_h is None and top_entropy_quantile < 1.0:
        keep_h = high_entropy_mask(entropy.detach(), mb, top_entropy_quantile)
    rows, _, low, high = gmpo_sequence_loss(logp, old_logp, advantages, mb, clip_low=clip_low, clip_high=clip_high,
                                            keep=keep_h)
    logp, entropy, old_logp, ref_logp = reference._masked_inputs(
        mb, logp, entropy, old_logp.detach(), None if ref_logp is None else ref_logp.detach())
    dt = rows.dtype
    ent = entropy if keep_h is None else torch.where(keep_h, entropy, torch.zeros_like(entropy))
    tok, kl = reference.add_kl_entropy(torch.zeros(mb.shape, dtype=dt, device=mb.device), logp, ent, ref_logp,
                                       kl_coef=kl_coef, kl_kind=kl_kind, entropy_coef=entropy_coef, kl_fn=kl_fn)
    den = max(mb.shape[0], 1) if normalizer is None else normalizer
    loss = reference.aggregate(tok, mb, agg, normalizer) + rows.sum() / den
    with torch.no_grad():
        zero = torch.zeros((), dtype=dt, device=mb.device)
        ratio = torch.exp(torch.clamp(logp.detach().to(dt) - old_logp.to(dt), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        # TRL's clip_ratio/region_mean, low_mean, high_mean: shares of the loss tokens
        stats = reference.policy_stats(logp.detach(), old_logp, ratio, low | high, torch.zeros_like(mb), mb)
        stats["clip_low_frac"] = reference.masked_mean(low.to(dt), mb)
        stats["clip_high_frac"] = reference.masked_mean(high.to(dt), mb)
        stats["clip_low_min"], stats["clip_high_max"] = clip_share_extremes(low, high, mb, dt)
        stats["kl"] = reference.masked_mean(kl, mb) if kl is not None else zero
        stats["entropy"] = reference.masked_mean(entropy.detach(), mb)
        stats["entropy_mask_frac"] = (reference.masked_mean(keep_h.to(dt), mb) if keep_h is not None
                                      else torch.ones((), dtype=dt, device=mb.device))
        stats["off_policy_mask_frac"] = zero
        stats["entropy_kept"] = (reference.masked_mean(entropy.detach().to(dt), mb & keep_h) if keep_h is not None
                                 else stats["entropy"])
        stats["logp"] = logp_out.detach()
    return loss, stats


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
    use_bias_correction_kl: bool = False,
    entropy_coef: float = 0.0,
    agg: str = "token-mean",
    normalizer=None,
    kl_fn=None,
    is_weight: Optional[torch.Tensor] = None,
    vespo_k_pos: float = VESPO_K_POS,
    vespo_lambda_pos: float = VESPO_LAMBDA_POS,
    vespo_k_neg: float = VESPO_K_NEG,
    vespo_lambda_neg: float = VESPO_LAMBDA_NEG,
    clip_cov_ratio: float = CLIP_COV_RATIO,
    clip_cov_lb: float = CLIP_COV_LB,
    clip_cov_ub: float = CLIP_COV_UB,
    kl_cov_ratio: float = KL_COV_RATIO,
    ppo_kl_coef: float = PPO_KL_COEF,
    generator: Optional[torch.Generator] = None,
    entropy_normalizer=None,
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
    not change the denominator of ``agg`` (as TRL), except the entropy bonus's under ``agg``
    ``token-mean`` with the high-entropy mask: TRL's bonus is the mean entropy over the tokens it
    acts on, so its sum over the kept tokens is divided by their count (``entropy_normalizer``: the
    whole mini-batch's kept tokens, a number or device tensor; None: this call's), not by the
    loss tokens'. ``importance_sampling_level="sequence"``:
    GSPO's sequence ratio through :func:`rlhf_fast.models.logprobs.sequence_level_old_logp`
    (clip, luspo and sapo; the off-policy mask still uses the per-token ``old_logp``); its stats
    ``clip_frac``, ``dual_clip_frac`` and ``ratio_mean`` are over the answers (:func:`answer_stats`,
    TRL's ``clip_ratio/region_mean``).
    ``"sequence_sum"``: TRL RLOO's loss, :func:`sequence_sum_policy_loss` of each row summed
    over ``agg``'s row normaliser (``clip`` and ``agg`` ``seq-mean-token-sum`` only; no token
    masks, weights or bias-corrected KL); its stats ``clip_frac`` (TRL's
    ``clip_ratio/region_mean``), ``clip_low_frac``, ``clip_high_frac``, ``dual_clip_frac``,
    ``ratio_mean`` and ``ratio_max`` are over the rows, ``approx_kl`` still over the tokens.

    ``use_bias_correction_kl``: the KL term is multiplied by the importance ratio exp(logp −
    old_logp), differentiable (TRL's option; with the sequence level the row's ratio, whose
    gradient flows through each token's own log-prob, GSPO-token's form). ``is_weight`` ``[B, T]``
    (None = off): the rollout's importance weights between the sampler and the recomputed old
    policy; they multiply the policy term (after the masks, before the KL, as TRL), except for
    ``vespo``, whose sequence weight takes their logs instead. ``luspo`` needs ``agg``
    ``seq-mean-token-sum``. The ``vespo_*`` parameters: see :func:`vespo_weights`.
    ``gmpo``: :func:`gmpo_sequence_loss` of each row (clip_low / clip_high its log-space bounds,
    the high-entropy mask choosing the tokens of its geometric mean) summed over ``agg``'s row
    normaliser, plus the KL and entropy terms per token; needs ``agg`` ``seq-mean-token-mean``
    and the token level, refuses dual_clip, the off-policy mask, the bias-corrected KL and
    ``is_weight`` (TRL's GMPOTrainer has none of them); ``clip_frac`` (TRL's
    ``clip_ratio/region_mean``), ``clip_low_frac`` and ``clip_high_frac`` are shares of loss tokens;
    ``clip_low_min`` / ``clip_high_max`` (TRL's ``clip_ratio/low_min`` / ``high_max``) the least /
    largest share of one answer's loss tokens (:func:`clip_share_extremes`, NaN with none).
    ``clip_cov`` / ``kl_cov`` (token level only): the covariance selection (:func:`clip_cov_mask`
    with ``clip_cov_*`` and ``generator``, :func:`kl_cov_mask` with ``kl_cov_ratio``) is over this
    call's loss tokens — one micro-batch in the trainer, as verl calls its loss per micro-batch
    on each rank — before the high-entropy and off-policy masks; ``cov_frac`` (verl's
    ``pg_clipfrac`` for clip_cov) is the share of loss tokens selected. ``gpg``: −logp·A, token
    level only.

    Returns ``(loss, stats)``: a 0-dim float32 loss (float64 for float64 logp) and the stats
    of :func:`rlhf_fast.ops.reference.policy_loss_from_logp` (``clip_frac``: see
    :func:`token_losses`; 0 for sapo) plus ``entropy_mask_frac`` (share of loss tokens the
    high-entropy mask keeps, 1 when off), ``off_policy_mask_frac`` (share the off-policy
    mask drops, 0 when off), ``entropy_kept`` (the mean entropy over the loss tokens the
    high-entropy mask keeps: the tokens of the entropy bonus) and, for vespo, ``vespo_phi_mean``
    (the mean of φ over the loss tokens). Masked-out entries are never read."""
    if importance_sampling_level not in ("token", "sequence", SEQUENCE_SUM):
        raise ValueError(f"importance_sampling_level must be 'token', 'sequence' or {SEQUENCE_SUM!r}, "
                         f"got {importance_sampling_level!r}")
    if not 0.0 <= float(top_entropy_quantile) <= 1.0:  # NaN fails too (it was silently off)
        raise ValueError(f"top_entropy_quantile must be in [0, 1] (1 = off), got {top_entropy_quantile!r}")
    if importance_sampling_level == SEQUENCE_SUM:
        _check_sequence_sum(policy_loss, agg, top_entropy_quantile, entropy_mask, off_policy_mask_threshold,
                            use_bias_correction_kl, is_weight)
        return _sequence_sum_loss_from_logp(
            logp, entropy, old_logp, advantages, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
            ref_logp=ref_logp, kl_coef=kl_coef, kl_kind=kl_kind, entropy_coef=entropy_coef, agg=agg,
            normalizer=normalizer, kl_fn=reference.kl_penalty if kl_fn is None else kl_fn)
    if policy_loss == "gmpo":
        _check_gmpo(agg, importance_sampling_level, dual_clip, off_policy_mask_threshold, use_bias_correction_kl,
                    is_weight)
        return _gmpo_loss_from_logp(
            logp, entropy, old_logp, advantages, mask, clip_low=clip_low, clip_high=clip_high,
            top_entropy_quantile=top_entropy_quantile, entropy_mask=entropy_mask, ref_logp=ref_logp, kl_coef=kl_coef,
            kl_kind=kl_kind, entropy_coef=entropy_coef, agg=agg, normalizer=normalizer, kl_fn=kl_fn)
    if importance_sampling_level == "sequence" and policy_loss in ("cispo", "vespo", "gpg") + COV_LOSSES:
        raise ValueError(f"importance_sampling_level 'sequence' is not supported with policy_loss {policy_loss!r}")
    if policy_loss == "luspo" and agg != LUSPO_AGG:
        raise ValueError(f"policy_loss 'luspo' sums each row's token losses: it needs agg {LUSPO_AGG!r}, got {agg!r}")
    kl_fn = reference.kl_penalty if kl_fn is None else kl_fn
    logp_out = logp
    mb = mask != 0
    logp, entropy, old_logp, advantages, ref_logp = reference._masked_inputs(
        mb, logp, entropy, old_logp.detach(), advantages.detach(), None if ref_logp is None else ref_logp.detach())
    if is_weight is not None:
        is_weight = torch.where(mb, is_weight.detach(), torch.ones((), dtype=is_weight.dtype, device=mb.device))
    ratio_old = old_logp
    if importance_sampling_level == "sequence":
        from rlhf_fast.models.logprobs import sequence_level_old_logp

        ratio_old = sequence_level_old_logp(logp.detach(), old_logp, mb)
    vespo_kw = dict(vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                    vespo_lambda_neg=vespo_lambda_neg)
    cov_mask = None
    if policy_loss == "clip_cov":
        cov_mask = clip_cov_mask(logp, old_logp, advantages, mb, clip_low=clip_low, clip_high=clip_high,
                                 clip_cov_ratio=clip_cov_ratio, clip_cov_lb=clip_cov_lb, clip_cov_ub=clip_cov_ub,
                                 generator=generator)
    elif policy_loss == "kl_cov":
        cov_mask = kl_cov_mask(logp, advantages, mb, kl_cov_ratio=kl_cov_ratio)
    loss_tok, ratio, clipped, dual = token_losses(
        logp, ratio_old, advantages, policy_loss=policy_loss, clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
        mask=mb, is_weight=is_weight if policy_loss == "vespo" else None, cov_mask=cov_mask,
        ppo_kl_coef=ppo_kl_coef, **vespo_kw)
    keep_h = entropy_mask
    if keep_h is None and top_entropy_quantile < 1.0:
        keep_h = high_entropy_mask(entropy.detach(), mb, top_entropy_quantile)
    keep = keep_h
    if off_policy_mask_threshold is not None:
        opm = off_policy_mask(advantages, logp, old_logp, mb, off_policy_mask_threshold)
        keep = opm if keep is None else keep & opm
    zero = torch.zeros((), dtype=loss_tok.dtype, device=loss_tok.device)
    total = loss_tok if keep is None else torch.where(keep, loss_tok, zero)
    if is_weight is not None and policy_loss != "vespo":
        total = total * is_weight.to(total.dtype)
    kl = None
    if ref_logp is not None:
        kl = kl_fn(logp, ref_logp, kl_kind)
        if kl_coef != 0.0:
            kl_term = kl
            if use_bias_correction_kl:
                lp = logp.to(loss_tok.dtype)
                kl_term = kl * torch.exp(torch.clamp(lp - ratio_old.to(lp.dtype), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
            total = total + kl_coef * kl_term
    # TRL's bonus is a mean over the tokens it acts on: under token-mean the kept tokens' own count
    ent_apart = entropy_coef != 0.0 and keep_h is not None and agg == "token-mean"
    if entropy_coef != 0.0 and not ent_apart:
        ent = entropy if keep_h is None else torch.where(keep_h, entropy, torch.zeros_like(entropy))
        total = total - entropy_coef * ent
    loss = reference.aggregate(total, mb, agg, normalizer)
    if ent_apart:
        ent_mean = reference.aggregate(entropy.to(loss.dtype), mb & keep_h, agg, entropy_normalizer)
        loss = loss - entropy_coef * ent_mean
    stats = reference.policy_stats(logp, ratio_old, ratio, clipped, dual, mb)
    if importance_sampling_level == "sequence":  # one ratio per answer: its stats over the answers (TRL's)
        stats.update(answer_stats(ratio, clipped, dual, mb))
    with torch.no_grad():
        dt = loss.dtype
        stats["kl"] = reference.masked_mean(kl, mb) if kl is not None else torch.zeros((), dtype=dt, device=loss.device)
        stats["entropy"] = reference.masked_mean(entropy.detach(), mb)
        stats["entropy_mask_frac"] = (reference.masked_mean(keep_h.to(dt), mb) if keep_h is not None
                                      else torch.ones((), dtype=dt, device=loss.device))
        stats["off_policy_mask_frac"] = (reference.masked_mean((~opm).to(dt), mb)
                                         if off_policy_mask_threshold is not None
                                         else torch.zeros((), dtype=dt, device=loss.device))
        stats["entropy_kept"] = (reference.masked_mean(entropy.detach().to(dt), mb & keep_h) if keep_h is not None
                                 else stats["entropy"])
        if policy_loss in CLIP_LOSSES:  # TRL logs them for its clipped surrogates only
            stats["clip_low_min"], stats["clip_high_max"] = clip_region_extremes(
                logp, old_logp, advantages, mb, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                importance_sampling_level=importance_sampling_level)
        if policy_loss == "vespo":
            phi = vespo_weights(logp, ratio_old, advantages, mb, is_weight=is_weight, k_pos=vespo_k_pos,
                                lambda_pos=vespo_lambda_pos, k_neg=vespo_k_neg, lambda_neg=vespo_lambda_neg)
            stats["vespo_phi_mean"] = reference.masked_mean(phi.expand_as(mb).to(dt), mb)
        if cov_mask is not None:
            stats["cov_frac"] = reference.masked_mean(cov_mask.to(dt), mb)
        stats["logp"] = logp_out.detach()
    return loss, stats


__all__ = [
    "POLICY_LOSSES",
    "CLIP_LOSSES",
    "LUSPO_AGG",
    "SEQUENCE_SUM",
    "SEQUENCE_SUM_AGG",
    "sequence_sum_policy_loss",
    "GMPO_CLIP",
    "GMPO_AGG",
    "gmpo_sequence_loss",
    "clip_share_extremes",
    "answer_stats",
    "clip_region_extremes",
    "SAPO_TEMPERATURE_POS",
    "SAPO_TEMPERATURE_NEG",
    "VESPO_K_POS",
    "VESPO_LAMBDA_POS",
    "VESPO_K_NEG",
    "VESPO_LAMBDA_NEG",
    "vespo_weights",
    "CLIP_COV_RATIO",
    "CLIP_COV_LB",
    "CLIP_COV_UB",
    "KL_COV_RATIO",
    "PPO_KL_COEF",
    "COV_LOSSES",
    "clip_cov_mask",
    "kl_cov_mask",
    "quantile",
    "high_entropy_threshold",
    "high_entropy_mask",
    "off_policy_mask",
    "token_losses",
    "policy_loss_from_logp",
]
