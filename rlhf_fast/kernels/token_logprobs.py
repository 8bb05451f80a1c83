"""Triton kernels for token_logprobs: log softmax(logits / T)[label] and the entropy.

Naive version (``rlhf_fast.ops.reference.token_logprobs``): cast the ``[N, V]`` logits to
fp32 (write 4·N·V bytes), log_softmax (read + write), gather, and for the entropy exp and
a product (two more [N, V] fp32 tensors). Here the forward reads the logits once in their
own dtype and writes three numbers per row (logp, entropy fp32; lse fp64); the backward reads
the logits once more and writes the gradient once — into the logits' own storage when the
caller allows (``inplace_backward``, as flash-attn's cross-entropy), so backward needs no
[N, V] allocation at all.

Online log-sum-exp per row, tiles of BLOCK_V over the vocabulary (any V): running max m
(identity −inf), s = Σ e^{z−m} and w = Σ (z−m)·e^{z−m}; then lse = m + log s and the
entropy H = log s − w / s. Keeping w relative to the running max avoids the cancellation
of lse − Σ p·z when logits are ~1e4.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from rlhf_fast.ops import _native, reference


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, ent_ptr, lse_ptr,
    N, V, T_inner, stride_b, stride_t, temperature, ignore_index,
    ENTROPY: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # ROWS rows per program: 1 on GPUs (one row streams through one SM, as flash-attn's
    # cross-entropy); more under the interpreter, where each program costs Python time
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    # row r of the flattened [N, V] view is (r // T_inner, r % T_inner) of a [B, T, V] tensor,
    # so slices such as logits[:, :-1] are read in place, without a copy
    base = logits_ptr + (rows // T_inner) * stride_b + (rows % T_inner) * stride_t  # [ROWS] pointers
    label = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = label != ignore_index
    cols0 = tl.arange(0, BLOCK_V)
    # running statistics per row, fp32
    m = tl.full([ROWS], -float("inf"), tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    w = tl.zeros([ROWS], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        x = tl.load(base[:, None] + cols[None, :], mask=row_ok[:, None] & (cols < V)[None, :],
                    other=-float("inf")).to(tl.float32)
        z = x / temperature
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # all -inf so far: keep the identity (avoid -inf - -inf = nan)
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe[:, None])
        if ENTROPY:
            # (z - m)·e is 0 where e is 0; select before multiplying so no -inf·0 is formed
            zl = (tl.where(e > 0, z, m_safe[:, None]) - m_safe[:, None]) * e
            w = alpha * (w + (tl.where(s > 0, m, m_safe) - m_safe) * s) + tl.sum(zl, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    s = tl.where(row_ok, s, 1.0)  # padding rows of the last program: no log(0)
    log_s = tl.log(s)
    # lse in float64 (into a float64 buffer): rounded to float32 it is off by ulp(lse)/2, which
    # z - lse then carries into log p (1.6 at |z| ~ 1e7, 5e-4 at logits of 1e4)
    lse = m_safe.to(tl.float64) + log_s.to(tl.float64)
    safe_label = tl.where(valid, label, 0)
    z_t = tl.load(base + safe_label, mask=row_ok, other=0.0).to(tl.float32) / temperature
    # (z - m) - log s, as log_softmax: exact for the likely tokens
    tl.store(logp_ptr + rows, tl.where(valid, (z_t - m_safe) - log_s, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if ENTROPY:
        ent = log_s - w / s
        tl.store(ent_ptr + rows, tl.where(valid, ent, 0.0), mask=row_ok)


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr, labels_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, dlogits_ptr,
    N, V, T_inner, stride_b, stride_t, dstride_b, dstride_t, temperature, ignore_index,
    HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # d logp / dz_j = δ_jy − p_j ;  d H / dz_j = −p_j (log p_j + H) ;  dz/dlogits = 1/T
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    base = logits_ptr + (rows // T_inner) * stride_b + (rows % T_inner) * stride_t
    dbase = dlogits_ptr + (rows // T_inner) * dstride_b + (rows % T_inner) * dstride_t
    label = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = label != ignore_index
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    # a float64 lse (the forward's) as float32 hi + lo: z - hi is exact near the max, so
    # log p = (z - hi) - lo keeps float32 accuracy at large |z| (a float32 lse gives lo = 0)
    lse_hi = lse.to(tl.float32)
    lse_lo = (lse - lse_hi.to(lse.dtype)).to(tl.float32)
    g_lp = tl.zeros([ROWS], tl.float32)
    g_en = tl.zeros([ROWS], tl.float32)
    if HAS_GLOGP:
        g_lp = tl.load(glogp_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_GENT:
        g_en = tl.load(gent_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.where(valid, g_lp, 0.0)
    g_en = tl.where(valid, g_en, 0.0)
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        inb = row_ok[:, None] & (cols < V)[None, :]
        x = tl.load(base[:, None] + cols[None, :], mask=inb, other=-float("inf")).to(tl.float32)
        logp = (x / temperature - lse_hi[:, None]) - lse_lo[:, None]
        p = tl.exp(logp)
        dz = tl.where(cols[None, :] == label[:, None], g_lp[:, None], 0.0) - g_lp[:, None] * p
        if HAS_GENT:
            dz -= g_en[:, None] * p * (tl.where(p > 0, logp, 0.0) + ent[:, None])
        # ignored rows get 0, not 0·p: an all -inf row's p is exp(-inf + inf) = NaN
        dz = tl.where(valid[:, None], dz / temperature, 0.0)
        tl.store(dbase[:, None] + cols[None, :], dz.to(dlogits_ptr.dtype.element_ty), mask=inb)


def _row_layout(x: torch.Tensor):
    """(T_inner, stride_b, stride_t) addressing the rows of ``x`` ([N, V] or [B, T, V], unit
    stride in V) as row r -> (r // T_inner)·stride_b + (r % T_inner)·stride_t."""
    if x.dim() == 2:
        return max(x.shape[0], 1), 0, x.stride(0)
    return max(x.shape[1], 1), x.stride(0), x.stride(1)


def _launch_cfg(N: int, V: int, device: torch.device):
    """(ROWS, BLOCK_V, num_warps): rows per program and vocabulary tile."""
    if device.type == "cpu":
        # the interpreter runs each tile op as one numpy call: few, large tiles are fastest
        bv = min(triton.next_power_of_2(V), 16384)
        return max(1, min(triton.next_power_of_2(N), 65536 // bv)), bv, 4
    return 1, min(triton.next_power_of_2(V), 4096), 8 if V >= 8192 else 4


def token_logprobs_forward(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
                           return_entropy: bool):
    """Launch the forward on logits ``[N, V]`` or ``[B, T, V]`` (any strides but a unit
    stride in V) and labels ``[N]`` (``N = B·T``).

    Returns ``(logp [N], entropy [N] or None, lse [N])``: float32, lse float64 (for the
    backward's accuracy at large |logits / T|; the backward also takes a float32 one).
    """
    N, V = logits.numel() // logits.shape[-1], logits.shape[-1]
    dev = logits.device
    logp = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float64, device=dev)
    ent = torch.empty(N, dtype=torch.float32, device=dev) if return_entropy else lse
    if N:
        rows, bv, nw = _launch_cfg(N, V, dev)
        _token_logprobs_fwd_kernel[(triton.cdiv(N, rows),)](
            logits, labels, logp, ent, lse, N, V, *_row_layout(logits), float(temperature), int(ignore_index),
            ENTROPY=return_entropy, ROWS=rows, BLOCK_V=bv, num_warps=nw,
        )
    return logp, (ent if return_entropy else None), lse


def token_logprobs_backward(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                            entropy: Optional[torch.Tensor], grad_logp: Optional[torch.Tensor],
                            grad_entropy: Optional[torch.Tensor], temperature: float, ignore_index: int,
                            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gradient with respect to logits ``[N, V]``, in the logits' dtype.

    ``out`` is the buffer the gradient is written into (it may be ``logits`` itself: each
    tile is read before it is overwritten by the same program); a new tensor when None.
    """
    N, V = logits.numel() // logits.shape[-1], logits.shape[-1]
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if N == 0 or (grad_logp is None and grad_entropy is None):
        return out.zero_()
    dummy = lse
    # Triton's CPU interpreter truncates fp32 -> bf16 on store (GPUs round to nearest even);
    # the truncation bias adds up in the matmuls downstream, so under the interpreter the
    # gradient goes through an fp32 buffer and torch's rounding.
    dst = out
    if logits.device.type == "cpu" and out.dtype in (torch.bfloat16, torch.float16):
        dst = torch.empty(out.shape, dtype=torch.float32)
    rows, bv, nw = _launch_cfg(N, V, logits.device)
    _token_logprobs_bwd_kernel[(triton.cdiv(N, rows),)](
        logits, labels, lse, entropy if entropy is not None else dummy,
        grad_logp.contiguous() if grad_logp is not None else dummy,
        grad_entropy.contiguous() if grad_entropy is not None else dummy, dst,
        N, V, *_row_layout(logits), *_row_layout(dst)[1:], float(temperature), int(ignore_index),
        HAS_GLOGP=grad_logp is not None, HAS_GENT=grad_entropy is not None, ROWS=rows, BLOCK_V=bv, num_warps=nw,
    )
    if dst is not out:
        out.copy_(dst)
    return out


class TokenLogprobsFunction(torch.autograd.Function):
    """Autograd for token_logprobs. Saves the logits (no copy), fp64 lse and fp32 entropy per row."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, return_entropy, ignore_index, inplace_backward):
        shape = logits.shape
        if logits.dim() == 3 and logits.stride(-1) == 1:
            x = logits  # [B, T, V] read in place, whatever its batch/time strides
        else:
            x = logits.reshape(-1, shape[-1])
            if x.stride(-1) != 1:
                x = x.contiguous()
        lab = labels.reshape(-1).contiguous()
        logp, ent, lse = token_logprobs_forward(x, lab, temperature, ignore_index, return_entropy)
        # the logits themselves (a second derivative needs them, in the graph); a reshaped copy is
        # made again in the backward rather than kept alive beside them
        copied = x.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr()
        ctx.save_for_backward(None if copied else x, lab, lse, ent, logits)
        ctx.cfg = (temperature, ignore_index, inplace_backward, shape)
        ctx.return_entropy = return_entropy
        lead = shape[:-1]
        if return_entropy:
            return logp.reshape(lead), ent.reshape(lead)
        return logp.reshape(lead)

    @staticmethod
    def backward(ctx, grad_logp, *rest):
        if torch.is_grad_enabled():  # create_graph=True: see rlhf_fast.ops._native.differentiable_backward
            return TokenLogprobsFunction._reference_backward(ctx, grad_logp, *rest)
        x, lab, lse, ent, logits = ctx.saved_tensors
        temperature, ignore_index, inplace, shape = ctx.cfg
        if x is None:  # the forward read a copy: the same one again
            x = logits.reshape(-1, shape[-1])
            x = x if x.stride(-1) == 1 else x.contiguous()
        grad_ent = rest[0] if rest else None
        glp = grad_logp.reshape(-1) if grad_logp is not None else None
        gen = grad_ent.reshape(-1) if grad_ent is not None else None
        dx = token_logprobs_backward(x, lab, lse, ent, glp, gen, temperature, ignore_index,
                                     out=x if inplace else None)
        return dx.reshape(shape), None, None, None, None, None

    @staticmethod
    def _reference_backward(ctx, grad_logp, *rest):
        _, lab, _, _, logits = ctx.saved_tensors
        temperature, ignore_index, _, shape = ctx.cfg
        labels = lab.reshape(shape[:-1])

        def f(z):
            return reference.token_logprobs(z, labels, temperature=temperature, return_entropy=ctx.return_entropy,
                                            ignore_index=ignore_index)

        return _native.reference_grads(f, (logits,), (grad_logp, *rest)) + (None,) * 5


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    inplace_backward: bool = False,
):
    """log softmax(logits / temperature)[labels] (Triton), and optionally the entropy.

    logits ``[..., V]`` bf16/fp16/fp32, labels ``[...]`` int (``ignore_index`` gives 0).
    Returns logp ``[...]`` float32 (and entropy ``[...]`` float32). Differentiable in logits.
    ``inplace_backward=True`` writes the logits gradient into the logits' storage (the caller
    must not use the logits after backward). float64 logits run the reference.
    """
    if logits.dtype == torch.float64 or temperature < reference.TINY_TEMPERATURE:
        return reference.token_logprobs(logits, labels, temperature=temperature, return_entropy=return_entropy,
                                        ignore_index=ignore_index)
    return TokenLogprobsFunction.apply(logits, labels, float(temperature), bool(return_entropy), int(ignore_index),
                                       bool(inplace_backward))
