"""Pure-PyTorch definitions of every op in :mod:`rlhf_fast.ops`.

This file is the readable specification of the semantics, the oracle of the
tests and the fallback when no native backend is present. It favours clarity
over speed and memory: it materialises ``[..., V]`` float temporaries freely,
which is exactly what the native kernels avoid.

Conventions shared by all ops (see ``../shared/DESIGN.md``):

* outputs that are log-probs, entropies, advantages and losses are float32 for
  bf16/fp16/fp32 inputs and float64 for float64 inputs;
* ``mask`` is ``[B, T]`` bool or 0/1 and marks the tokens that count;
* log-ratio differences are clamped to ``±LOG_RATIO_CLAMP`` before ``exp``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

LOG_RATIO_CLAMP = 20.0
KL_KINDS = ("k1", "k2", "k3", "abs", "mse")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
GROUP_KINDS = ("grpo", "rloo", "dr_grpo")

Number = Union[float, int, torch.Tensor]


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- log-probs


# Below this temperature z·(1/T) can overflow float32 for ordinary logits (1/T alone does below
# 2.9e-39): the C++ kernels compute such rows from the row max in double, the Triton and CUDA
# launchers hand them to this module, whose scale_logits subtracts the max.
TINY_TEMPERATURE = 1e-20

# Below this temperature the divergence kernels (C++ and Triton), which scale float32 logits by
# a rounded 1/T and reduce with a fast exp, can drift from this module's result: measured on the
# C++ kernel, they agree to float rounding up to |z| / T ~ 2e9 and fail from ~4e9 (at 1e-12 a
# student equal to its teacher gave 2.7e4), so 1e-6 keeps logits up to ~2000 exact. Their
# launchers hand smaller temperatures to this module.
NATIVE_DIVERGENCE_MIN_TEMPERATURE = 1e-6


def scale_logits(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """``z / temperature`` up to a per-row shift, which log_softmax ignores: below
    ``TINY_TEMPERATURE`` the row max is subtracted first, so that ``(z − max) / T <= 0`` can
    only underflow, and a tiny T (1e-40, where z / T overflows to inf and gives NaN) reaches the
    greedy limit. At other temperatures it is ``z / T`` exactly (T = 1: z itself)."""
    if temperature == 1.0:
        return z
    if temperature >= TINY_TEMPERATURE:
        # no shift: the results at ordinary temperatures stay bit-identical to log_softmax(z / T)
        return z / temperature
    # detached: the shift's gradient is zero (log_softmax is shift-invariant), and so is its
    # second derivative. Divided in float64: a T below float32's smallest subnormal (1e-50) is 0
    # there, and the max's 0 / 0 was NaN.
    return ((z - z.amax(-1, keepdim=True).detach()).double() / temperature).to(z.dtype)


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
):
    """log softmax(logits / T)[label] and optionally the entropy of softmax(logits / T).

    logits ``[..., V]`` (bf16/fp16/fp32/fp64), labels ``[...]`` int. Returns logp ``[...]``
    (and entropy ``[...]``), float32 (float64 for float64 logits). Positions whose label
    is ``ignore_index`` give 0 for both.
    """
    z = scale_logits(logits.to(out_dtype(logits.dtype)), temperature)
    valid = labels != ignore_index
    # ignored positions never reach log_softmax: an all -inf row there (masked padding) has a
    # NaN log_softmax whose backward would put NaN into the gradient despite the 0 output
    z = torch.where(valid.unsqueeze(-1), z, torch.zeros((), dtype=z.dtype, device=z.device))
    logp_all = torch.log_softmax(z, dim=-1)
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    p = logp_all.exp()
    # p·log p is 0 where p is 0 (logits of -inf), never NaN; log p is masked before the
    # product so that the backward does not form 0·(-inf) either.
    plogp = p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))
    entropy = -plogp.sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    ignore_index: int = -100,
    return_top1: bool = False,
):
    """token_logprobs(hidden @ weight.T + bias, labels): hidden ``[N, H]``, weight ``[V, H]``.

    With ``return_top1``, also ``[N]`` bool as the last output: whether each label is its row's
    argmax (``torch.argmax``'s first index on a tie; False at ``ignore_index``). The reference
    materialises the ``[N, V]`` logits (in the matmul dtype, then float32); ``chunk_size`` only
    matters to the native kernels.
    """
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    out = token_logprobs(
        logits, labels, temperature=temperature, return_entropy=return_entropy, ignore_index=ignore_index
    )
    if not return_top1:
        return out
    top1 = top1_from_argmax(logits.detach().argmax(-1), labels, ignore_index)
    return (*(out if return_entropy else (out,)), top1)


def top1_from_argmax(argmax: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``[N]`` bool: ``argmax == labels`` (``[N]`` int each), False where labels is ``ignore_index``."""
    return (argmax == labels) & (labels != ignore_index)


DIVERGENCE_REDUCTIONS = ("none", "sum")


def divergence_from_logits(zs: torch.Tensor, zt: torch.Tensor, beta: float):
    """Per-row generalised JSD between softmax(zs) (student) and softmax(zt) (teacher).

    zs, zt ``[N, V]`` float32/float64 (already divided by the temperature). Returns
    ``(divergence [N], student entropy [N])``. TRL's convention (DistillationTrainer,
    trl/kernels/chunked_divergence.py): ``beta == 0`` is the forward KL(teacher ‖ student),
    ``beta == 1`` the reverse KL(student ‖ teacher), otherwise
    ``beta·KL(t ‖ m) + (1 − beta)·KL(s ‖ m)`` with ``m = beta·t + (1 − beta)·s``. Entries of
    zero probability contribute 0 (so −inf logits are allowed; a row whose logits are all −inf
    has no distribution and gives NaN).
    """
    log_ps = torch.log_softmax(zs, dim=-1)
    log_pt = torch.log_softmax(zt, dim=-1)
    ps, pt = log_ps.exp(), log_pt.exp()

    def kl(p, log_p, log_q):  # sum p·(log p − log q), with 0·(anything) = 0
        # the where inside the product: outside it, the backward of a −inf entry would form 0·(−inf)
        return (p * torch.where(p > 0, log_p - log_q, torch.zeros_like(p))).sum(-1)

    if beta == 0.0:
        div = kl(pt, log_pt, log_ps)
    elif beta == 1.0:
        div = kl(ps, log_ps, log_pt)
    else:
        # a token of probability 0 in both has log m = -inf; logaddexp(-inf, -inf)'s backward is
        # NaN (and fills the row's gradient), so such entries are taken out before it
        both0 = (ps == 0) & (pt == 0)
        a = torch.where(both0, torch.zeros_like(log_ps), log_ps + math.log(1.0 - beta))
        b = torch.where(both0, torch.zeros_like(log_pt), log_pt + math.log(beta))
        log_m = torch.where(both0, torch.full_like(a, float("-inf")), torch.logaddexp(a, b))
        div = beta * kl(pt, log_pt, log_m) + (1.0 - beta) * kl(ps, log_ps, log_m)
    entropy = -(ps * torch.where(ps > 0, log_ps, torch.zeros_like(ps))).sum(-1)
    return div, entropy


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    reduction: str = "none",
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
):
    """Distillation divergence of the student's next-token distribution from the teacher's,
    from the two models' last hidden states and LM heads.

    student_hidden ``[N, H]``, student_weight ``[V, H]`` (student_bias ``[V]``); teacher_hidden
    ``[N, Ht]``, teacher_weight ``[V, Ht]`` (teacher_bias ``[V]``): the two models may differ in
    width and dtype, not in vocabulary. Both logits are divided by ``temperature``; the per-row
    divergence is :func:`divergence_from_logits` with ``beta``. ``mask`` ``[N]`` (bool or 0/1):
    rows outside it give 0 and no gradient. ``reduction``: ``"none"`` returns ``[N]``,
    ``"sum"`` the 0-dim sum over the rows. Float32 out (float64 for float64 student_hidden).
    With ``return_entropy``, also the student's entropy ``[N]`` (0 outside the mask; no
    gradient). Gradients flow to the student's hidden states, weight and bias only: the
    teacher is a constant. The reference materialises both ``[N, V]`` logits; ``chunk_size``
    only matters to the native kernels.
    """
    dt = out_dtype(student_hidden.dtype)
    zs = student_hidden @ student_weight.t()
    if student_bias is not None:
        zs = zs + student_bias
    with torch.no_grad():
        zt = teacher_hidden @ teacher_weight.t()
        if teacher_bias is not None:
            zt = zt + teacher_bias
    # scale_logits: below TINY_TEMPERATURE z / T would overflow (inf - inf = NaN)
    zs = scale_logits(zs.to(dt), temperature)
    zt = scale_logits(zt.detach().to(dt), temperature)
    div, entropy = divergence_from_logits(zs, zt, beta)
    entropy = entropy.detach()
    if mask is not None:
        keep = mask.to(torch.bool)
        div = torch.where(keep, div, torch.zeros_like(div))
        entropy = torch.where(keep, entropy, torch.zeros_like(entropy))
    if reduction == "sum":
        div = div.sum()
    return (div, entropy) if return_entropy else div


# --------------------------------------------------------------------------- KL


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference, elementwise.

    With ``d = logp - ref_logp``: ``k1 = d``, ``abs = |d|``, ``k2 = mse = d²/2``,
    ``k3 = exp(-d) - 1 + d`` (Schulman's low-variance, non-negative estimator) with
    ``-d`` clamped to ±20 inside the exp. Output float32 (float64 for float64 input).
    """
    dt = out_dtype(torch.promote_types(logp.dtype, ref_logp.dtype))
    # differentiable in logp only: the reference policy is a constant (as on every native backend)
    d = logp.to(dt) - ref_logp.detach().to(dt)
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind in ("k2", "mse"):
        return 0.5 * d * d
    if kind == "k3":
        return torch.exp(torch.clamp(-d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) - 1.0 + d
    raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")


# --------------------------------------------------------------------------- masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    xm = torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return xm.sum() if dim is None else xm.sum(dim)


def _select(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x`` where the bool mask ``m`` is set, 0 elsewhere: masked-out entries (padding that may
    hold -inf or NaN) never reach a sum, and get a zero gradient."""
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None, *, group=None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is set (over ``dim`` if given).

    An empty mask gives 0. A nonzero mask entry counts as set (``mask.bool()``); the values
    of masked-out entries are never read (NaN or inf there do not leak). With ``group`` (a
    ``torch.distributed`` process group) the sums are all-reduced first, so every rank gets
    the global mean.
    """
    xf = x.to(out_dtype(x.dtype))
    mb = mask != 0
    m = mb.to(xf.dtype)
    xm = _select(xf, mb)
    s = xm.sum() if dim is None else xm.sum(dim)
    n = m.sum() if dim is None else m.sum(dim)
    if group is not None:
        import torch.distributed as dist

        both = torch.stack([s, n])
        dist.all_reduce(both, group=group)
        s, n = both[0], both[1]
    return s / n.clamp(min=1)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    group=None,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and unbiased variance over masked entries.

    With ``shift_mean=False`` the mean is added back (only the scale changes). Masked-out
    positions give 0. ``group`` all-reduces the statistics across ranks.
    """
    xf = x.to(out_dtype(x.dtype))
    mb = mask != 0
    m = mb.to(xf.dtype)
    xf = _select(xf, mb)  # masked-out entries (NaN/inf padding included) are never read
    # The statistics in float64 (the mean, then the squared deviations about it), as the C++ and
    # CUDA kernels: in float32 the mean of a constant is an ulp off it, which the division by a
    # std of ~0 (+ eps) made ±0.8 for a whitened constant 1000.1, where the answer is 0.
    x64 = xf.to(torch.float64)
    stats = torch.stack([x64.sum(), m.sum(dtype=torch.float64)])
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(stats, group=group)
    n = stats[1]
    mean = stats[0] / n.clamp(min=1)
    sq = ((x64 - mean) ** 2 * m).sum()
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(sq, group=group)
    # Bessel's correction, as TRL/verl's masked_var; a single entry has variance 0.
    var = sq / (n - 1).clamp(min=1)
    mean_x = mean.to(xf.dtype)  # applied in x's math dtype, as the kernels do
    out = (xf - mean_x) * torch.rsqrt(var + eps).to(xf.dtype)
    if not shift_mean:
        out = out + mean_x
    return _select(out, mb)


# --------------------------------------------------------------------------- advantages


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
):
    """Generalised advantage estimation over the unmasked tokens of each row.

    rewards, values, mask ``[B, T]``. Masked positions are skipped: each row is the sequence
    of its unmasked tokens as if the masked ones were absent; the value after the row's last
    unmasked token is 0. Returns ``(advantages, returns)`` ``[B, T]`` float32 (float64 for
    float64 input), 0 at masked positions; ``returns = advantages + values``.
    """
    dt = out_dtype(torch.promote_types(rewards.dtype, values.dtype))
    r = rewards.to(dt)
    v = values.to(dt)
    m = mask.bool()
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=dt, device=r.device)
    next_value = torch.zeros(B, dtype=dt, device=r.device)
    last = torch.zeros(B, dtype=dt, device=r.device)
    for t in range(T - 1, -1, -1):
        mt = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        new_last = delta + gamma * lam * last
        last = torch.where(mt, new_last, last)
        next_value = torch.where(mt, v[:, t], next_value)
        adv[:, t] = torch.where(mt, new_last, torch.zeros_like(new_last))
    ret = torch.where(m, adv + v, torch.zeros_like(adv))
    return adv, ret


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE returns ``G_t = r_t + γ G_next`` over the unmasked tokens of each row.

    rewards, mask ``[B, T]``; masked positions are skipped and give 0. Float32 output
    (float64 for float64 input).
    """
    dt = out_dtype(rewards.dtype)
    r = rewards.to(dt)
    m = mask.bool()
    B, T = r.shape
    out = torch.zeros(B, T, dtype=dt, device=r.device)
    running = torch.zeros(B, dtype=dt, device=r.device)
    for t in range(T - 1, -1, -1):
        mt = m[:, t]
        running = torch.where(mt, r[:, t] + gamma * running, running)
        out[:, t] = torch.where(mt, running, torch.zeros_like(running))
    return out


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    *,
    kind: str = "grpo",
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Critic-free advantages from consecutive groups of ``group_size`` scores ``[B]``.

    ``grpo``: (s − group mean) / (group std + eps) with the unbiased std (or s − mean when
    ``normalize_std=False``); a group of one answer gives 0. ``rloo``: s − mean of the other
    answers of its group (needs group_size ≥ 2). ``dr_grpo``: s − group mean.
    Returns ``[B]`` float32 (float64 for float64 input).
    """
    # The statistics in float64, as the C++ and CUDA kernels: in float32 the mean of a group of
    # equal scores is an ulp off them, and (s − mean) / (std + eps) made that ulp advantages of
    # ±0.2 (a group of 7 scores of 3.3) where the answer is 0.
    s = scores.to(torch.float64).reshape(-1, group_size)
    adv = _group_advantages64(s, group_size, kind, normalize_std, eps)
    return adv.reshape(-1).to(out_dtype(scores.dtype))


def _group_advantages64(s: torch.Tensor, group_size: int, kind: str, normalize_std: bool, eps: float):
    """:func:`group_advantages` of the float64 groups ``s [n_groups, group_size]``."""
    mean = s.mean(dim=1, keepdim=True)
    if kind == "dr_grpo":
        return s - mean
    if kind == "rloo":
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 for kind='rloo', got {group_size}")
        others = (s.sum(dim=1, keepdim=True) - s) / (group_size - 1)
        return s - others
    if kind == "grpo":
        if not normalize_std:
            return s - mean
        if group_size == 1:
            # 0, with the graph kept (a zero gradient): scores that require grad can backward()
            return _select(s, torch.zeros_like(s, dtype=torch.bool))
        std = s.std(dim=1, keepdim=True)
        return (s - mean) / (std + eps)
    raise ValueError(f"kind must be one of {GROUP_KINDS}, got {kind!r}")


# --------------------------------------------------------------------------- PPO losses


def aggregate(
    x: torch.Tensor, mask: torch.Tensor, agg: str, normalizer: Optional[Number] = None
) -> torch.Tensor:
    """Reduce a per-token ``[B, T]`` quantity to a scalar over the masked tokens.

    ``token-mean``: Σ / number of masked tokens; ``seq-mean-token-mean``: mean over rows of
    each row's token mean; ``seq-mean-token-sum``: mean over rows of each row's token sum;
    ``seq-mean-token-sum-norm``: Σ / (B·T). ``normalizer`` (a number or a device tensor)
    replaces the denominator (token count, row count, or B·T), so a global count computed
    once keeps the loss independent of micro-batching. A nonzero mask entry counts as set;
    masked-out entries are never read. An empty batch (B = 0 or T = 0) gives 0.
    """
    mb = mask != 0
    m = mb.to(x.dtype)
    xm = _select(x, mb)
    if agg == "token-mean":
        den = m.sum().clamp(min=1) if normalizer is None else normalizer
        return xm.sum() / den
    if agg == "seq-mean-token-mean":
        row = xm.sum(-1) / m.sum(-1).clamp(min=1)
        den = max(x.shape[0], 1) if normalizer is None else normalizer
        return row.sum() / den
    if agg == "seq-mean-token-sum":
        den = max(x.shape[0], 1) if normalizer is None else normalizer
        return xm.sum(-1).sum() / den
    if agg == "seq-mean-token-sum-norm":
        den = max(x.numel(), 1) if normalizer is None else normalizer
        return xm.sum() / den
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def ppo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
):
    """Per-token clipped surrogate. Returns ``(loss, ratio, clipped, dual_clipped)``, all
    ``[B, T]``; ``clipped`` marks tokens where the clipped branch is the larger loss,
    ``dual_clipped`` tokens where the dual clip bound is active."""
    clip_high = clip_low if clip_high is None else clip_high
    dt = out_dtype(logp.dtype)
    lp = logp.to(dt)
    adv = advantages.to(dt)
    log_ratio = torch.clamp(lp - old_logp.to(dt), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(loss1, loss2)
    clipped = loss2 > loss1
    dual = torch.zeros_like(clipped)
    if dual_clip is not None:
        loss3 = -adv * dual_clip
        dual = (adv < 0) & (loss3 < loss)
        loss = torch.where(adv < 0, torch.minimum(loss, loss3), loss)
    return loss, ratio, clipped, dual


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    agg: str = "token-mean",
    normalizer: Optional[Number] = None,
):
    """Clipped PPO policy loss. logp, old_logp, advantages, mask ``[B, T]``.

    Per token, r = exp(clamp(logp − old_logp, ±20)):
    loss = max(−A·r, −A·clip(r, 1−clip_low, 1+clip_high)); with ``dual_clip=c`` tokens with
    A < 0 take min(that, −A·c). Aggregated with :func:`aggregate`. Returns ``(loss, stats)``:
    a 0-dim float32 loss (float64 for float64 logp) and a dict of 0-dim detached tensors
    ``clip_frac``, ``dual_clip_frac``, ``approx_kl`` (masked mean of ½(logp − old_logp)²),
    ``ratio_mean``, ``ratio_max`` over the masked tokens. Differentiable in ``logp`` only:
    old_logp and advantages are constants (as on every native backend); masked-out tokens
    are never read, so NaN/inf padding neither reaches the loss nor its gradient. A NaN at a
    counted token makes the loss NaN (and ratio_mean / ratio_max where the log-ratio is NaN);
    its gradient is torch's autograd of this function, 0 at a NaN log-ratio (the clamp's).
    """
    logp, old_logp, advantages = _masked_inputs(mask, logp, old_logp.detach(), advantages.detach())
    loss_tok, ratio, clipped, dual = ppo_token_loss(
        logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
    loss = aggregate(loss_tok, mask, agg, normalizer)
    stats = policy_stats(logp, old_logp, ratio, clipped, dual, mask)
    return loss, stats


def _masked_inputs(mask: torch.Tensor, *tensors):
    """Each tensor with its masked-out entries replaced by 0 (None stays None)."""
    mb = mask != 0
    return tuple(None if t is None else _select(t, mb) for t in tensors)


def policy_stats(logp, old_logp, ratio, clipped, dual, mask) -> dict:
    """Diagnostics of a PPO update over the masked tokens (all detached, 0-dim)."""
    with torch.no_grad():
        m = mask.bool()
        dt = ratio.dtype
        d = logp.to(dt) - old_logp.to(dt)
        neg_inf = torch.tensor(float("-inf"), dtype=dt, device=ratio.device)
        ratio_max = torch.where(m, ratio, neg_inf).max() if ratio.numel() else neg_inf
        return {
            "clip_frac": masked_mean(clipped.to(dt), m),
            "dual_clip_frac": masked_mean(dual.to(dt), m),
            "approx_kl": masked_mean(0.5 * d * d, m),
            "ratio_mean": masked_mean(ratio, m),
            "ratio_max": torch.where(m.any(), ratio_max, torch.zeros_like(ratio_max)),
        }


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: Optional[float] = 0.2,
    agg: str = "token-mean",
    normalizer: Optional[Number] = None,
):
    """Clipped value loss: per token 0.5·max((v − R)², (old + clip(v − old, −c, c) − R)²);
    ``clip=None`` gives 0.5·(v − R)². All inputs ``[B, T]``. Returns ``(loss, stats)`` with
    stats ``clip_frac`` (tokens where the clipped branch is larger) and ``values_mean``.
    Differentiable in ``values`` only; masked-out tokens are never read."""
    values, old_values, returns = _masked_inputs(mask, values, old_values.detach(), returns.detach())
    dt = out_dtype(values.dtype)
    v = values.to(dt)
    R = returns.to(dt)
    err = (v - R) ** 2
    if clip is None:
        tok = 0.5 * err
        clipped = torch.zeros_like(err, dtype=torch.bool)
    else:
        old = old_values.to(dt)
        v_clip = old + torch.clamp(v - old, -clip, clip)
        err_clip = (v_clip - R) ** 2
        tok = 0.5 * torch.maximum(err, err_clip)
        clipped = err_clip > err
    loss = aggregate(tok, mask, agg, normalizer)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean(clipped.to(dt), mask), "values_mean": masked_mean(v, mask)}
    return loss, stats


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    agg: str = "token-mean",
    normalizer: Optional[Number] = None,
    bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    ignore_index: int = -100,
):
    """The whole policy-loss step from the last hidden state ``[B, T, H]`` and the LM head
    ``[V, H]``: agg(ppo token loss + kl_coef·KL(logp, ref_logp) − entropy_coef·entropy).

    Returns ``(loss, stats)``; stats are those of :func:`ppo_policy_loss` plus ``kl``
    (masked mean of the KL estimate, 0 without ``ref_logp``), ``entropy`` (masked mean)
    and ``logp`` ``[B, T]`` detached (the recomputed log-probs, for rollout/training gap
    metrics).
    """
    B, T, H = hidden.shape
    logp, entropy = fused_linear_logprobs(
        hidden.reshape(B * T, H), weight, labels.reshape(B * T), bias=bias, temperature=temperature,
        return_entropy=True, ignore_index=ignore_index,
    )
    logp = logp.reshape(B, T)
    entropy = entropy.reshape(B, T)
    return policy_loss_from_logp(
        logp, entropy, old_logp, advantages, mask, ref_logp=ref_logp, kl_coef=kl_coef, kl_kind=kl_kind,
        entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg,
        normalizer=normalizer,
    )


def add_kl_entropy(total: torch.Tensor, logp: torch.Tensor, entropy: Optional[torch.Tensor],
                   ref_logp: Optional[torch.Tensor], *, kl_coef: float, kl_kind: str, entropy_coef: float,
                   kl_fn=None):
    """(``total`` + kl_coef · KL − entropy_coef · entropy per token, the per-token KL of
    ``logp`` to ``ref_logp`` by ``kl_kind`` — None without a reference); every tensor ``[B, T]``.
    ``kl_fn``: the KL function (default :func:`kl_penalty`)."""
    kl_fn = kl_penalty if kl_fn is None else kl_fn
    kl = None
    if ref_logp is not None:
        kl = kl_fn(logp, ref_logp, kl_kind)
        if kl_coef != 0.0:
            total = total + kl_coef * kl
    if entropy_coef != 0.0:
        total = total - entropy_coef * entropy
    return total, kl

def policy_loss_from_logp(
    logp, entropy, old_logp, advantages, mask, *, ref_logp=None, kl_coef=0.0, kl_kind="k3",
    entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None, agg="token-mean", normalizer=None,
    kl_fn=None,
):
    """The epilogue of :func:`fused_linear_policy_loss` once per-token logp/entropy exist.

    ``kl_fn`` lets the dispatching front end use a native KL; by default the reference one."""
    kl_fn = kl_penalty if kl_fn is None else kl_fn
    logp_out = logp
    # the constants are detached and masked-out tokens never read, as in ppo_policy_loss
    logp, entropy, old_logp, advantages, ref_logp = _masked_inputs(
        mask, logp, entropy, old_logp.detach(), advantages.detach(), None if ref_logp is None else ref_logp.detach())
    loss_tok, ratio, clipped, dual = ppo_token_loss(
        logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
    total, kl = add_kl_entropy(loss_tok, logp, entropy, ref_logp, kl_coef=kl_coef, kl_kind=kl_kind,
                               entropy_coef=entropy_coef, kl_fn=kl_fn)
    loss = aggregate(total, mask, agg, normalizer)
    stats = policy_stats(logp, old_logp, ratio, clipped, dual, mask)
    with torch.no_grad():
        stats["kl"] = masked_mean(kl, mask) if kl is not None else torch.zeros((), dtype=loss.dtype, device=loss.device)
        stats["entropy"] = masked_mean(entropy.detach(), mask)
        stats["logp"] = logp_out.detach()
    return loss, stats


# --------------------------------------------------------------------------- sampling


def process_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> torch.Tensor:
    """Log-probabilities ``[B, V]`` float32 of the processed sampling distribution.

    Filters in order, each on the renormalised result of the one before: temperature,
    top-k (keep the k most likely), top-p (the smallest set of most likely tokens whose mass
    reaches p), min-p (keep p ≥ min_p · p_max). Removed tokens get −inf. Temperature 0 is
    the one-hot distribution on the argmax (first index on ties).
    """
    z = logits.to(out_dtype(logits.dtype))
    if temperature == 0:
        out = torch.full_like(z, float("-inf"))
        out.scatter_(-1, z.argmax(-1, keepdim=True), 0.0)
        return out
    logp = torch.log_softmax(scale_logits(z, temperature), dim=-1)
    V = logp.shape[-1]
    if 0 < top_k < V:
        # a stable order keeps the first indices on ties, so exactly k survive
        order = torch.argsort(logp, dim=-1, descending=True, stable=True)
        keep = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, order[..., :top_k], True)
        logp = torch.log_softmax(logp.masked_fill(~keep, float("-inf")), dim=-1)
    if top_p < 1.0:
        order = torch.argsort(logp, dim=-1, descending=True, stable=True)
        sorted_p = logp.gather(-1, order).exp()
        mass_before = sorted_p.cumsum(-1) - sorted_p
        keep_sorted = mass_before < top_p  # the token that reaches p is kept
        # the most likely token always is (a top_p below float32's range, 1e-300, rounds to 0
        # in the comparison above and would keep nothing)
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        logp = torch.log_softmax(logp.masked_fill(~keep, float("-inf")), dim=-1)
    if min_p > 0.0:
        p = logp.exp()
        keep = p >= min_p * p.max(dim=-1, keepdim=True).values
        logp = torch.log_softmax(logp.masked_fill(~keep, float("-inf")), dim=-1)
    return logp


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    uniforms: Optional[torch.Tensor] = None,
):
    """Draw one token per row of logits ``[B, V]`` from the processed distribution.

    Returns ``(tokens [B] int64, logp [B] float32)``, logp of the chosen token under the
    processed distribution (0 for greedy). The draw is the inverse CDF, in vocabulary order,
    of one uniform per row (``uniforms [B]``, else drawn from ``generator``), so native
    backends that take the same uniforms pick the same tokens.
    """
    logp = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    B = logp.shape[0]
    if temperature == 0:
        tok = logp.argmax(-1)
    else:
        if uniforms is None:
            uniforms = torch.rand(B, generator=generator, device=logits.device, dtype=torch.float64)
        cdf = logp.double().exp().cumsum(-1)
        u = uniforms.to(torch.float64).reshape(B, 1) * cdf[:, -1:]
        tok = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=logp.shape[-1] - 1)
        # never land on a removed token (possible only through rounding at the very end);
        # unconditional, so a GPU decode step waits on no host sync
        bad = torch.isinf(logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1))
        tok = torch.where(bad, logp.argmax(-1), tok)
    chosen = logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1).float()
    return tok, chosen


__all__ = [
    "token_logprobs",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "kl_penalty",
    "gae",
    "discounted_returns",
    "group_advantages",
    "masked_mean",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sample",
    "process_logits",
    "aggregate",
    "policy_loss_from_logp",
]
