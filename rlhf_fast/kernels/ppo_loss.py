"""Triton kernels for ppo_policy_loss and ppo_value_loss (and the policy-loss epilogue of
fused_linear_policy_loss): one fused pass forward, one backward.

Naive version (``rlhf_fast.ops.reference``): ratio, two surrogate branches, max, dual
clip, masks, five statistics — about 20 [B, T] fp32 temporaries and as many kernel
launches. Here the forward reads each [B, T] input once and writes a few fp32 partial sums
per tile of one row (loss, token count, clip / dual-clip counts, ½d², ratio sum and max,
KL, entropy); those [B, n_tiles, K] partials are summed by torch into per-row sums
S_b = Σ_t m_t·loss_t, and the aggregation (``agg``) is a handful of ops on [B] vectors —
so a normaliser given as a device tensor needs no host sync and autograd differentiates the
aggregation for us. The backward kernel gets dL/dS_b per row and writes dL/dlogp (and
dL/dentropy) in one pass.

Gradients follow torch's autograd of the reference exactly, ties included: clamp passes
the gradient on the closed interval (none at NaN), maximum/minimum split it evenly on ties
and send all of it to both operands when one is NaN.

float64 inputs run the reference (exact fp64 for gradcheck).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from rlhf_fast.ops import _native, reference
from rlhf_fast.ops.reference import LOG_RATIO_CLAMP

from .kl import KIND_CODE, kl_grad, kl_value

BLOCK_T = 1024
# policy partials: loss, weight, clip, dual, half_d2, ratio, ratio_max, kl, entropy, count
_NP = 10
# value partials: loss, weight, clip, values, count
_NV = 5


# --------------------------------------------------------------------------- policy loss


@triton.jit
def _policy_token(lp, old, adv, clip_low, clip_high, dual_clip, HAS_DUAL: tl.constexpr, CLAMP: tl.constexpr):
    """Per-token PPO loss, its derivative in logp, ratio, clipped and dual flags (fp32)."""
    lr_raw = lp - old
    # NaN propagates (PropagateNan.ALL) as in torch's clamp / maximum / minimum: by default
    # tl.maximum / tl.minimum return the non-NaN operand, which made a NaN log-ratio a ratio of
    # e^-20 with no gradient and the loss finite where the reference's is NaN
    lr = tl.clamp(lr_raw, -CLAMP, CLAMP, propagate_nan=tl.PropagateNan.ALL)
    lr_in = (lr_raw >= -CLAMP) & (lr_raw <= CLAMP)
    ratio = tl.exp(lr)
    lo = 1.0 - clip_low
    hi = 1.0 + clip_high
    l1 = -adv * ratio
    l2 = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
    d1 = l1
    d2 = tl.where((ratio >= lo) & (ratio <= hi), l1, 0.0)
    loss = tl.maximum(l1, l2, propagate_nan=tl.PropagateNan.ALL)
    dl = tl.where(l1 > l2, d1, tl.where(l2 > l1, d2, 0.5 * (d1 + d2)))
    clipped = l2 > l1
    dual = ratio < 0.0  # all False: exp(·) ≥ 0
    if HAS_DUAL:
        l3 = -adv * dual_clip
        neg = adv < 0
        dual = neg & (l3 < loss)
        dl = tl.where(neg, tl.where(loss < l3, dl, tl.where(loss == l3, 0.5 * dl, 0.0)), dl)
        loss = tl.where(neg, tl.minimum(loss, l3, propagate_nan=tl.PropagateNan.ALL), loss)
    dl = tl.where(lr_in, dl, 0.0)
    return loss, dl, ratio, clipped, dual


@triton.jit
def _policy_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, part_ptr,
    T, n_tiles, clip_low, clip_high, dual_clip, kl_coef, ent_coef,
    HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, KL_KIND: tl.constexpr,
    CLAMP: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_tiles
    cols = (pid % n_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = cols < T
    offs = row * T + cols
    lp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    # a nonzero mask entry is set; masked-out entries are never read into a sum (tl.where,
    # not a product: -inf / NaN padding times 0 would be NaN)
    on = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32) != 0
    b = tl.where(on, 1.0, 0.0)
    loss, dl, ratio, clipped, dual = _policy_token(lp, old, adv, clip_low, clip_high, dual_clip, HAS_DUAL, CLAMP)
    total = loss
    kl_sum = 0.0
    ent_sum = 0.0
    if HAS_REF:
        rf = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        kl = kl_value(lp - rf, KL_KIND, CLAMP)
        total += kl_coef * kl
        kl_sum = tl.sum(tl.where(on, kl, 0.0), axis=0)
    if HAS_ENT:
        ent = tl.load(ent_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        total -= ent_coef * ent
        ent_sum = tl.sum(tl.where(on, ent, 0.0), axis=0)
    d = lp - old
    out = part_ptr + pid * NP
    tl.store(out + 0, tl.sum(tl.where(on, total, 0.0), axis=0))
    tl.store(out + 1, tl.sum(b, axis=0))
    tl.store(out + 2, tl.sum(tl.where(on & clipped, 1.0, 0.0), axis=0))
    tl.store(out + 3, tl.sum(tl.where(on & dual, 1.0, 0.0), axis=0))
    tl.store(out + 4, tl.sum(tl.where(on, 0.5 * d * d, 0.0), axis=0))
    tl.store(out + 5, tl.sum(tl.where(on, ratio, 0.0), axis=0))
    tl.store(out + 6, tl.max(tl.where(on, ratio, -float("inf")), axis=0))
    tl.store(out + 7, kl_sum)
    tl.store(out + 8, ent_sum)
    tl.store(out + 9, tl.sum(b, axis=0))


@triton.jit
def _policy_bwd_kernel(
    grow_ptr, logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, dlogp_ptr, dent_ptr,
    T, n_tiles, clip_low, clip_high, dual_clip, kl_coef, ent_coef,
    HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, KL_KIND: tl.constexpr,
    CLAMP: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_tiles
    cols = (pid % n_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = cols < T
    offs = row * T + cols
    g = tl.load(grow_ptr + row)  # dL/dS_row, fp32
    lp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    on = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32) != 0
    loss, dl, ratio, clipped, dual = _policy_token(lp, old, adv, clip_low, clip_high, dual_clip, HAS_DUAL, CLAMP)
    if HAS_REF:
        rf = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        dl += kl_coef * kl_grad(lp - rf, KL_KIND, CLAMP)
    tl.store(dlogp_ptr + offs, tl.where(on, g * dl, 0.0).to(dlogp_ptr.dtype.element_ty), mask=inb)
    if HAS_ENT:
        tl.store(dent_ptr + offs, tl.where(on, -ent_coef * g, 0.0).to(dent_ptr.dtype.element_ty), mask=inb)


def _as_weights(mask: torch.Tensor) -> torch.Tensor:
    # the kernels read it as "entry != 0" (a bool mask's bytes are not a float's)
    return mask.contiguous() if mask.dtype == torch.float32 else mask.to(torch.float32).contiguous()


class PolicyRowsFunction(torch.autograd.Function):
    """Per-row sums S_b = Σ_t m_t·(ppo_t + kl_coef·kl_t − ent_coef·H_t) ``[B]`` fp32 plus
    the non-differentiable partial statistics ``[B, n_tiles, 10]``. Differentiable in logp
    (and entropy when given)."""

    @staticmethod
    def forward(ctx, logp, entropy, old_logp, advantages, mask, ref_logp, cfg):
        clip_low, clip_high, dual_clip, kl_coef, kl_kind, ent_coef = cfg
        B, T = logp.shape
        lp, old, adv = logp.contiguous(), old_logp.contiguous(), advantages.contiguous()
        w = _as_weights(mask)
        ref = ref_logp.contiguous() if ref_logp is not None else None
        ent = entropy.contiguous() if entropy is not None else None
        n_tiles = max(triton.cdiv(T, BLOCK_T), 1)
        part = torch.empty(B, n_tiles, _NP, dtype=torch.float32, device=lp.device)
        if B * T:
            _policy_fwd_kernel[(B * n_tiles,)](
                lp, old, adv, w, ref if ref is not None else lp, ent if ent is not None else lp, part,
                T, n_tiles, float(clip_low), float(clip_high), float(dual_clip or 0.0), float(kl_coef),
                float(ent_coef), HAS_DUAL=dual_clip is not None, HAS_REF=ref is not None,
                HAS_ENT=ent is not None, KL_KIND=KIND_CODE[kl_kind], CLAMP=LOG_RATIO_CLAMP, NP=_NP, BLOCK_T=BLOCK_T,
            )
        else:
            part.zero_()
            part[..., 6] = float("-inf")
        # the inputs too: lp / ent may be contiguous copies, outside the graph (_reference_backward)
        ctx.save_for_backward(lp, old, adv, w, ref, ent, logp, entropy)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(part)
        return part[..., 0].sum(1), part

    @staticmethod
    def backward(ctx, grad_rows, _grad_part):
        if torch.is_grad_enabled():  # create_graph=True: see rlhf_fast.ops._native.differentiable_backward
            return PolicyRowsFunction._reference_backward(ctx, grad_rows)
        lp, old, adv, w, ref, ent, _, _ = ctx.saved_tensors
        clip_low, clip_high, dual_clip, kl_coef, kl_kind, ent_coef = ctx.cfg
        B, T = lp.shape
        n_tiles = max(triton.cdiv(T, BLOCK_T), 1)
        dlogp = torch.empty_like(lp)
        has_ent = ent is not None and ctx.needs_input_grad[1] and ent_coef != 0.0
        dent = torch.empty_like(ent) if has_ent else None
        if B * T:
            _policy_bwd_kernel[(B * n_tiles,)](
                grad_rows.to(torch.float32).contiguous(), lp, old, adv, w, ref if ref is not None else lp, dlogp,
                dent if has_ent else dlogp, T, n_tiles, float(clip_low), float(clip_high), float(dual_clip or 0.0),
                float(kl_coef), float(ent_coef), HAS_DUAL=dual_clip is not None, HAS_REF=ref is not None,
                HAS_ENT=has_ent, KL_KIND=KIND_CODE[kl_kind], CLAMP=LOG_RATIO_CLAMP, BLOCK_T=BLOCK_T,
            )
        return dlogp, dent, None, None, None, None, None

    @staticmethod
    def _reference_backward(ctx, grad_rows):
        _, old, adv, w, ref, _, logp, entropy = ctx.saved_tensors
        clip_low, clip_high, dual_clip, kl_coef, kl_kind, ent_coef = ctx.cfg

        def rows(lp, ent):
            tok = reference.ppo_token_loss(lp, old, adv, clip_low=clip_low, clip_high=clip_high,
                                           dual_clip=dual_clip)[0]
            tok, _ = reference.add_kl_entropy(tok, lp, ent, ref, kl_coef=kl_coef, kl_kind=kl_kind,
                                              entropy_coef=ent_coef)
            return torch.where(w != 0, tok, torch.zeros_like(tok)).sum(1)

        return _native.reference_grads(rows, (logp, entropy), (grad_rows,)) + (None,) * 5


def aggregate_rows(rows: torch.Tensor, counts: torch.Tensor, T: int, agg: str, normalizer=None) -> torch.Tensor:
    """:func:`rlhf_fast.ops.reference.aggregate` from per-row sums ``rows [B]`` and per-row
    mask sums ``counts [B]`` (fp32). ``normalizer`` (number or device tensor) replaces the
    denominator; no host sync either way."""
    B = rows.shape[0]
    if agg == "token-mean":
        den = counts.sum().clamp(min=1) if normalizer is None else normalizer
        return rows.sum() / den
    if agg == "seq-mean-token-mean":
        den = B if normalizer is None else normalizer
        return (rows / counts.clamp(min=1)).sum() / den
    if agg == "seq-mean-token-sum":
        den = B if normalizer is None else normalizer
        return rows.sum() / den
    if agg == "seq-mean-token-sum-norm":
        den = B * T if normalizer is None else normalizer
        return rows.sum() / den
    raise ValueError(f"agg must be one of {reference.AGG_MODES}, got {agg!r}")


def _safe_div(a: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return a / n.clamp(min=1)


def policy_loss_rows(logp, entropy, old_logp, advantages, mask, *, ref_logp=None, kl_coef=0.0, kl_kind="k3",
                     entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None, agg="token-mean",
                     normalizer=None):
    """The policy-loss epilogue on ``[B, T]`` fp32/bf16 tensors: returns ``(loss, stats)``
    with the keys of the reference (plus ``kl``/``entropy`` when ``entropy`` is given)."""
    clip_high = clip_low if clip_high is None else clip_high
    cfg = (clip_low, clip_high, dual_clip, kl_coef, kl_kind, entropy_coef if entropy is not None else 0.0)
    rows, part = PolicyRowsFunction.apply(logp, entropy, old_logp, advantages, mask, ref_logp, cfg)
    tot = part.sum(1)  # [B, 10]
    loss = aggregate_rows(rows, tot[:, 1], logp.shape[1], agg, normalizer)
    n = tot[:, 9].sum()
    rmax = part[..., 6].max() if part.numel() else torch.tensor(float("-inf"), device=logp.device)
    # NaN when a counted ratio is NaN, as torch.max: tl.max drops NaN, the ratio sum keeps it
    # (each ratio is within e^±20, so the sum is otherwise finite)
    ratio_sum = tot[:, 5].sum()
    rmax = torch.where(ratio_sum.isnan(), ratio_sum, rmax)
    stats = {
        "clip_frac": _safe_div(tot[:, 2].sum(), n),
        "dual_clip_frac": _safe_div(tot[:, 3].sum(), n),
        "approx_kl": _safe_div(tot[:, 4].sum(), n),
        "ratio_mean": _safe_div(tot[:, 5].sum(), n),
        "ratio_max": torch.where(n > 0, rmax, torch.zeros_like(rmax)),
    }
    if entropy is not None:
        stats["kl"] = _safe_div(tot[:, 7].sum(), n)
        stats["entropy"] = _safe_div(tot[:, 8].sum(), n)
    return loss, stats


def ppo_policy_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None,
                    agg="token-mean", normalizer=None):
    """Clipped PPO policy loss (Triton) over ``[B, T]`` logp (bf16/fp16/fp32), old_logp,
    advantages, mask. Returns ``(loss 0-dim fp32, stats)`` with stats clip_frac,
    dual_clip_frac, approx_kl, ratio_mean, ratio_max. Differentiable in logp. float64 logp
    runs the reference."""
    if logp.dtype == torch.float64:
        return reference.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                                         dual_clip=dual_clip, agg=agg, normalizer=normalizer)
    return policy_loss_rows(logp, None, old_logp.detach(), advantages.detach(), mask, clip_low=clip_low,
                            clip_high=clip_high, dual_clip=dual_clip, agg=agg, normalizer=normalizer)


# --------------------------------------------------------------------------- value loss


@triton.jit
def _value_token(v, old, ret, clip, HAS_CLIP: tl.constexpr):
    """Per-token value loss, its derivative in v, and the clipped flag (fp32)."""
    e = v - ret
    err = e * e
    if HAS_CLIP:
        dv = v - old
        vc = old + tl.minimum(tl.maximum(dv, -clip), clip)
        ec = vc - ret
        err_c = ec * ec
        g1 = e
        g2 = tl.where((dv >= -clip) & (dv <= clip), ec, 0.0)
        # NaN propagates, as in torch.maximum (see _policy_token)
        loss = 0.5 * tl.maximum(err, err_c, propagate_nan=tl.PropagateNan.ALL)
        # torch.maximum's backward: half each at a tie, the whole gradient to both when one is NaN
        grad = tl.where(err > err_c, g1, tl.where(err_c > err, g2, tl.where(err == err_c, 0.5 * (g1 + g2), g1 + g2)))
        clipped = err_c > err
    else:
        loss = 0.5 * err
        grad = e
        clipped = err < 0.0
    return loss, grad, clipped


@triton.jit
def _value_fwd_kernel(v_ptr, old_ptr, ret_ptr, mask_ptr, part_ptr, T, n_tiles, clip,
                      HAS_CLIP: tl.constexpr, NV: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_tiles
    cols = (pid % n_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = cols < T
    offs = row * T + cols
    v = tl.load(v_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    ret = tl.load(ret_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    on = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32) != 0
    b = tl.where(on, 1.0, 0.0)
    loss, grad, clipped = _value_token(v, old, ret, clip, HAS_CLIP)
    out = part_ptr + pid * NV
    tl.store(out + 0, tl.sum(tl.where(on, loss, 0.0), axis=0))
    tl.store(out + 1, tl.sum(b, axis=0))
    tl.store(out + 2, tl.sum(tl.where(on & clipped, 1.0, 0.0), axis=0))
    tl.store(out + 3, tl.sum(tl.where(on, v, 0.0), axis=0))
    tl.store(out + 4, tl.sum(b, axis=0))


@triton.jit
def _value_bwd_kernel(grow_ptr, v_ptr, old_ptr, ret_ptr, mask_ptr, dv_ptr, T, n_tiles, clip,
                      HAS_CLIP: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_tiles
    cols = (pid % n_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    inb = cols < T
    offs = row * T + cols
    g = tl.load(grow_ptr + row)
    v = tl.load(v_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    ret = tl.load(ret_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    on = tl.load(mask_ptr + offs, mask=inb, other=0).to(tl.float32) != 0
    loss, grad, clipped = _value_token(v, old, ret, clip, HAS_CLIP)
    tl.store(dv_ptr + offs, tl.where(on, g * grad, 0.0).to(dv_ptr.dtype.element_ty), mask=inb)


def _value_rows_reference(values, old, ret, w, clip):
    """ValueRowsFunction's rows Σ_t m_t·value_loss_t in PyTorch (for a differentiable backward)."""
    dt = reference.out_dtype(values.dtype)
    v, old, ret = values.to(dt), old.to(dt), ret.to(dt)
    tok = (v - ret) ** 2
    if clip is not None:
        tok = torch.maximum(tok, (old + torch.clamp(v - old, -clip, clip) - ret) ** 2)
    return torch.where(w != 0, 0.5 * tok, torch.zeros_like(tok)).sum(1)


class ValueRowsFunction(torch.autograd.Function):
    """Per-row sums Σ_t m_t·value_loss_t ``[B]`` fp32 and partial statistics; differentiable
    in values."""

    @staticmethod
    def forward(ctx, values, old_values, returns, mask, clip):
        B, T = values.shape
        v, old, ret = values.contiguous(), old_values.contiguous(), returns.contiguous()
        w = _as_weights(mask)
        n_tiles = max(triton.cdiv(T, BLOCK_T), 1)
        part = torch.zeros(B, n_tiles, _NV, dtype=torch.float32, device=v.device)
        if B * T:
            _value_fwd_kernel[(B * n_tiles,)](v, old, ret, w, part, T, n_tiles, float(clip or 0.0),
                                              HAS_CLIP=clip is not None, NV=_NV, BLOCK_T=BLOCK_T)
        ctx.save_for_backward(v, old, ret, w, values)  # values: see PolicyRowsFunction
        ctx.clip = clip
        ctx.mark_non_differentiable(part)
        return part[..., 0].sum(1), part

    @staticmethod
    def backward(ctx, grad_rows, _grad_part):
        v, old, ret, w, values = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: see rlhf_fast.ops._native.differentiable_backward
            return _native.reference_grads(lambda x: _value_rows_reference(x, old, ret, w, ctx.clip), (values,),
                                           (grad_rows,)) + (None,) * 4
        B, T = v.shape
        n_tiles = max(triton.cdiv(T, BLOCK_T), 1)
        dv = torch.empty_like(v)
        if B * T:
            _value_bwd_kernel[(B * n_tiles,)](grad_rows.to(torch.float32).contiguous(), v, old, ret, w, dv, T, n_tiles,
                                              float(ctx.clip or 0.0), HAS_CLIP=ctx.clip is not None, BLOCK_T=BLOCK_T)
        return dv, None, None, None, None


def ppo_value_loss(values, old_values, returns, mask, *, clip: Optional[float] = 0.2, agg="token-mean",
                   normalizer=None):
    """Clipped value loss (Triton) over ``[B, T]`` values (bf16/fp16/fp32), old_values,
    returns, mask. Returns ``(loss 0-dim fp32, stats)`` with clip_frac and values_mean;
    differentiable in values. float64 values run the reference."""
    if values.dtype == torch.float64:
        return reference.ppo_value_loss(values, old_values, returns, mask, clip=clip, agg=agg, normalizer=normalizer)
    rows, part = ValueRowsFunction.apply(values, old_values.detach(), returns.detach(), mask, clip)
    tot = part.sum(1)
    loss = aggregate_rows(rows, tot[:, 1], values.shape[1], agg, normalizer)
    n = tot[:, 4].sum()
    stats = {"clip_frac": _safe_div(tot[:, 2].sum(), n), "values_mean": _safe_div(tot[:, 3].sum(), n)}
    return loss, stats
