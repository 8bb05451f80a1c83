"""Triton kernels for kl_penalty: per-token KL estimators, one elementwise pass forward
and one backward.

Memory traffic per element: forward reads logp and ref_logp and writes one fp32; backward
reads the incoming gradient, logp and ref_logp and writes one gradient in logp's dtype. The
reference (``rlhf_fast.ops.reference.kl_penalty``) materialises d, clamp(−d), exp(·) and
the sum as separate tensors: about 4x the traffic.

float64 inputs run the reference (exact fp64 semantics for gradcheck; KL is never a hot
path in fp64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.ops import _native, reference
from rlhf_fast.ops.reference import KL_KINDS, LOG_RATIO_CLAMP

# kind name -> constexpr code used inside the kernels
KIND_CODE = {"k1": 0, "k2": 1, "mse": 1, "k3": 2, "abs": 3}
BLOCK = 1024


@triton.jit
def kl_value(d, KIND: tl.constexpr, CLAMP: tl.constexpr):
    """KL estimate of the log-ratio d = logp − ref_logp (fp32), by constexpr kind."""
    if KIND == 0:
        out = d
    elif KIND == 1:
        out = 0.5 * d * d
    elif KIND == 2:
        out = tl.exp(tl.minimum(tl.maximum(-d, -CLAMP), CLAMP)) - 1.0 + d
    else:
        out = tl.abs(d)
    return out


@triton.jit
def kl_grad(d, KIND: tl.constexpr, CLAMP: tl.constexpr):
    """d(KL)/d(logp) for the log-ratio d, matching torch's autograd of the reference
    (clamp passes the gradient on the closed interval, sign(0) = 0)."""
    if KIND == 0:
        g = tl.zeros_like(d) + 1.0  # not d·0 + 1: NaN for an infinite log-ratio
    elif KIND == 1:
        g = d
    elif KIND == 2:
        inside = (-d >= -CLAMP) & (-d <= CLAMP)
        g = tl.where(inside, 1.0 - tl.exp(tl.minimum(tl.maximum(-d, -CLAMP), CLAMP)), 1.0)
    else:
        g = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    return g


@triton.jit
def _kl_fwd_kernel(logp_ptr, ref_ptr, out_ptr, n, KIND: tl.constexpr, CLAMP: tl.constexpr,
                   BLOCK: tl.constexpr):
    # 1D flattened grid, int64 offsets: any number of elements
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    lp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    rf = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, kl_value(lp - rf, KIND, CLAMP), mask=valid)


@triton.jit
def _kl_bwd_kernel(grad_ptr, logp_ptr, ref_ptr, dlogp_ptr, n, KIND: tl.constexpr, CLAMP: tl.constexpr,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    g = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    lp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    rf = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    dl = g * kl_grad(lp - rf, KIND, CLAMP)
    tl.store(dlogp_ptr + offs, dl.to(dlogp_ptr.dtype.element_ty), mask=valid)


def kl_penalty_forward(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Launch the forward: logp, ref_logp same shape (any float but fp64) -> fp32, same shape."""
    if kind not in KIND_CODE:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
    lp = logp.contiguous()
    rf = ref_logp.contiguous()
    out = torch.empty(lp.shape, dtype=torch.float32, device=lp.device)
    n = lp.numel()
    if n:
        _kl_fwd_kernel[(triton.cdiv(n, BLOCK),)](lp, rf, out, n, KIND=KIND_CODE[kind], CLAMP=LOG_RATIO_CLAMP,
                                                 BLOCK=BLOCK)
    return out


def kl_penalty_backward(grad: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Gradient of sum(grad · kl) with respect to logp, in logp's dtype and shape."""
    g = grad.contiguous()
    lp = logp.contiguous()
    rf = ref_logp.contiguous()
    dl = torch.empty_like(lp)
    n = lp.numel()
    if n:
        _kl_bwd_kernel[(triton.cdiv(n, BLOCK),)](g, lp, rf, dl, n, KIND=KIND_CODE[kind], CLAMP=LOG_RATIO_CLAMP,
                                                 BLOCK=BLOCK)
    return dl


class KLPenaltyFunction(torch.autograd.Function):
    """Autograd wrapper: gradient to logp only (the reference log-probs are a constant)."""

    @staticmethod
    def forward(ctx, logp, ref_logp, kind):
        ctx.save_for_backward(logp, ref_logp)
        ctx.kind = kind
        return kl_penalty_forward(logp, ref_logp, kind)

    @staticmethod
    def backward(ctx, grad):
        logp, ref_logp = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: see rlhf_fast.ops._native.differentiable_backward
            f = lambda lp: reference.kl_penalty(lp, ref_logp, ctx.kind)  # noqa: E731
            return _native.reference_grads(f, (logp,), (grad,)) + (None, None)
        return kl_penalty_backward(grad, logp, ref_logp, ctx.kind), None, None


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Elementwise KL estimate (Triton): logp, ref_logp same shape, bf16/fp16/fp32 -> fp32.

    kinds ``k1`` d, ``k2``/``mse`` ½d², ``k3`` exp(−d) − 1 + d (−d clamped to ±20), ``abs`` |d|
    with d = logp − ref_logp. Differentiable in logp. float64 inputs run the reference.
    """
    if logp.dtype == torch.float64 or ref_logp.dtype == torch.float64:
        return reference.kl_penalty(logp, ref_logp.detach(), kind)
    return KLPenaltyFunction.apply(logp, ref_logp.detach(), kind)
