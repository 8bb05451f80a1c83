"""Triton kernels for fused_linear_logprobs and fused_linear_policy_loss: the LM-head matmul
fused with the log-sum-exp, the target logit and the entropy statistics, so the [N, V]
logits are never written to memory in the forward.

Naive version (``rlhf_fast.ops.reference.fused_linear_logprobs``): logits = hidden @ W.T
(write N·V·2 bytes in bf16), cast to fp32 (N·V·4 more), log_softmax, gather, entropy — for
N = 16k tokens and V = 152k that is ~15 GB of temporaries. Here:

* forward — one kernel, a flattened 1D grid over (row tile, V split). Each program loops
  over its V tiles; per tile it computes the [BLOCK_N, BLOCK_V] logits with tl.dot over H
  (fp32 accumulation; TF32 optional for fp32 inputs) and folds them into per-row running
  statistics (max m, Σe^{z−m}, Σ(z−m)e^{z−m}, target logit). The per-split statistics
  ([N, SPLIT] fp32) are merged by a few torch ops. Splitting V keeps all SMs busy when
  N is small (rollout-sized batches) — a row-tile grid alone would give 64 programs for
  N = 4096. On request (``return_top1``) each row also keeps the first index of its running
  max (``[N, SPLIT]`` int64; the merge takes the first split holding the row max), so
  ``argmax == label`` is torch.argmax's answer, ties included, without another pass.
* backward — recompute, chunked over rows: the logits of ``chunk_size`` rows are rebuilt
  with one cuBLAS matmul, turned into dlogits *in place* by the token_logprobs backward
  kernel (from the saved fp64 lse, fp32 entropy), then dHidden = dlogits @ W and
  dW += dlogitsᵀ @ hidden. Only fp32 per-token statistics are saved by the forward.
  Why recompute rather than Liger's grads-in-forward: the forward is also used without
  grad (old/ref log-probs, the bulk of RLHF log-prob calls), where computing dW would
  double the cost; and recomputation lets the forward stay a single pass that never
  materialises a logits chunk. Why cuBLAS for the two gradient matmuls rather than
  tl.dot with atomics into dHidden/dW: they are plain GEMMs that cuBLAS runs near peak,
  deterministically, while atomics into a [V, H] fp32 buffer are neither; the chunk of
  dlogits (chunk_size·V in the matmul dtype) is the only [·, V] memory held.
  ``backward="triton"`` is the all-Triton alternative: one kernel over (row tile, V tile)
  recomputes the logits tile with tl.dot and adds dz @ W and dzᵀ @ hidden into fp32
  buffers with atomics (no [·, V] buffer at all; 4 GEMM-equivalents instead of 3 plus
  atomic traffic, non-deterministic order). Neither has been timed on a GPU yet:
  benchmarks/bench_triton.py decides the default.

float64 runs the reference (tl.dot has no fp64 path on every target).
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from rlhf_fast.ops import _native, reference

from .ppo_loss import policy_loss_rows
from .token_logprobs import token_logprobs_backward, token_logprobs_forward


@triton.jit
def _fused_linear_fwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, part_ptr, idx_ptr,
    N, V, H, stride_h, stride_w, temperature, ignore_index, n_row_tiles, split, tiles_per_split,
    HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # row tiles vary fastest: programs running together share the same W tiles in L2
    rt = pid % n_row_tiles
    sp = pid // n_row_tiles
    rows = rt * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    m = tl.full([BLOCK_N], -float("inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    w = tl.zeros([BLOCK_N], tl.float32)
    zt = tl.zeros([BLOCK_N], tl.float32)
    v_begin = sp * tiles_per_split * BLOCK_V
    arg = tl.zeros([BLOCK_N], tl.int64) + v_begin
    for t in range(0, tiles_per_split):
        cols = v_begin + t * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + ks
            k_ok = k < H
            a = tl.load(h_ptr + rows[:, None] * stride_h + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            bt = tl.load(w_ptr + cols[None, :] * stride_w + k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                bt = bt.to(tl.float32)
            acc = tl.dot(a, bt, acc, input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = acc / temperature
        z = tl.where(col_ok[None, :], z, -float("inf"))
        zt += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
        z_max = tl.max(z, axis=1)
        if ARGMAX:
            # the tile's first maximal column; it replaces the running one only when strictly
            # greater, so the first index of a tie wins, as in torch.argmax (tiles go left to right)
            first = tl.min(tl.where(z == z_max[:, None], cols[None, :], V), axis=1).to(tl.int64)
            arg = tl.where(z_max > m, first, arg)
        m_new = tl.maximum(m, z_max)
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe[:, None])
        if ENTROPY:
            zl = (tl.where(e > 0, z, m_safe[:, None]) - m_safe[:, None]) * e
            w = alpha * (w + (tl.where(s > 0, m, m_safe) - m_safe) * s) + tl.sum(zl, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    out = part_ptr + (rows * split + sp) * 4
    tl.store(out + 0, m, mask=row_ok)
    tl.store(out + 1, s, mask=row_ok)
    tl.store(out + 2, w, mask=row_ok)
    tl.store(out + 3, zt, mask=row_ok)
    if ARGMAX:
        tl.store(idx_ptr + rows * split + sp, arg, mask=row_ok)


@triton.jit
def _fused_linear_bwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, dh_ptr, dw_ptr, db_ptr,
    N, V, H, stride_h, stride_w, temperature, ignore_index, n_row_tiles,
    HAS_BIAS: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    NEED_H: tl.constexpr = True, NEED_W: tl.constexpr = True, NEED_B: tl.constexpr = True,
):
    # One (row tile, V tile) per program: recompute the logits tile exactly as the forward
    # (same fp32 accumulation, so the saved lse is consistent), turn it into dz, and add
    # dz @ W into dHidden and dzᵀ @ hidden into dW (fp32 buffers, atomics).
    pid = tl.program_id(0).to(tl.int64)
    rt = pid % n_row_tiles
    vt = pid // n_row_tiles
    rows = rt * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = vt * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = row_ok & (labels != ignore_index)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_ok = k < H
        a = tl.load(h_ptr + rows[:, None] * stride_h + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(w_ptr + cols[None, :] * stride_w + k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    # the float64 lse as float32 hi + lo (token_logprobs' backward kernel): exact near the max
    lse_hi = lse.to(tl.float32)
    lse_lo = (lse - lse_hi.to(lse.dtype)).to(tl.float32)
    logp = tl.where(col_ok[None, :], (acc / temperature - lse_hi[:, None]) - lse_lo[:, None], -float("inf"))
    p = tl.exp(logp)
    g_lp = tl.zeros([BLOCK_N], tl.float32)
    if HAS_GLOGP:
        g_lp = tl.load(glogp_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    g_lp = tl.where(valid, g_lp, 0.0)
    dz = tl.where(cols[None, :] == labels[:, None], g_lp[:, None], 0.0) - g_lp[:, None] * p
    if HAS_GENT:
        g_en = tl.where(valid, tl.load(gent_ptr + rows, mask=row_ok, other=0.0).to(tl.float32), 0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        dz -= g_en[:, None] * p * (tl.where(p > 0, logp, 0.0) + ent[:, None])
    dz = dz / temperature
    if HAS_BIAS and NEED_B:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_ok)
    # the gradient GEMMs run on tensor cores in the inputs' dtype, as the reference's do
    if UPCAST:
        dzc = dz  # interpreter: fp32 operands (its bf16 cast truncates, see the forward)
    else:
        dzc = dz.to(h_ptr.dtype.element_ty)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_ok = k < H
        wt = tl.load(w_ptr + cols[:, None] * stride_w + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        ht = tl.load(h_ptr + rows[:, None] * stride_h + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            wt = wt.to(tl.float32)
            ht = ht.to(tl.float32)
        if NEED_H:
            dh = tl.dot(dzc, wt, input_precision=PREC)  # [BLOCK_N, BLOCK_K]
            tl.atomic_add(dh_ptr + rows[:, None] * H + k[None, :], dh, mask=row_ok[:, None] & k_ok[None, :])
        if NEED_W:
            dw = tl.dot(tl.trans(dzc), ht, input_precision=PREC)  # [BLOCK_V, BLOCK_K]
            tl.atomic_add(dw_ptr + cols[:, None] * H + k[None, :], dw, mask=col_ok[:, None] & k_ok[None, :])


def _merge_argmax(part: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``[N]`` int64 row argmax from the per-split maxima ``part[..., 0]`` and their first
    indices ``idx`` ``[N, S]``: the first split holding the row max (torch.argmax's first index)."""
    best = part[..., 0].argmax(dim=1, keepdim=True)  # [N, 1]
    return idx.gather(1, best).squeeze(1)


def _merge_splits(part: torch.Tensor):
    """Merge per-split statistics ``[N, S, 4]`` (m, s, w, z_target) into lse (float64), entropy
    and the target's log-prob ``[N]`` (float32)."""
    m, s, w, zt = part.unbind(-1)
    M = m.max(dim=1).values
    M_safe = torch.where(torch.isinf(M) & (M < 0), torch.zeros_like(M), M)
    a = torch.exp(m - M_safe[:, None])  # 0 for an all -inf split
    shift = torch.where(s > 0, (m - M_safe[:, None]) * s, torch.zeros_like(s))
    s_tot = (a * s).sum(1)
    w_tot = (a * (w + shift)).sum(1)
    log_s = torch.log(s_tot)
    # float64: rounded to float32, lse is off by ulp(lse)/2, which z - lse carries into log p
    # (see token_logprobs_forward); the log-prob is (z - M) - log s, as log_softmax
    lse = M_safe.double() + log_s.double()
    ent = log_s - w_tot / s_tot
    return lse, ent, (zt.sum(1) - M_safe) - log_s


def _use_tf32(allow_tf32) -> bool:
    """``allow_tf32`` as given, or torch's own switch for fp32 matmuls when None (off by
    default), so the fused head rounds like the ``hidden @ weight.T`` it replaces."""
    if allow_tf32 is not None:
        return bool(allow_tf32)
    with warnings.catch_warnings():  # newer torch steers towards fp32_precision; both still read
        warnings.simplefilter("ignore")
        return bool(torch.backends.cuda.matmul.allow_tf32)


def _precision(allow_tf32) -> str:
    """tl.dot's input_precision for fp32 operands (16-bit ones ignore it)."""
    return "tf32" if _use_tf32(allow_tf32) else "ieee"


def _config(N: int, V: int, H: int, device: torch.device):
    if device.type == "cpu":
        # interpreter: big tiles are fewer (slow) Python-level iterations
        return 32, max(16, min(4096, triton.next_power_of_2(V))), max(16, min(256, triton.next_power_of_2(H)))
    return 64, 128, 64


def fused_linear_forward(hidden, weight, labels, bias, temperature, ignore_index, return_entropy,
                         allow_tf32=None, split_v=None, return_argmax=False):
    """Launch the forward: hidden ``[N, H]``, weight ``[V, H]`` (same dtype, unit stride in
    H), bias ``[V]`` or None, labels ``[N]``. Returns ``(logp, entropy, lse)`` ``[N]`` fp32, lse
    fp64 (entropy always computed when ``return_entropy``, else None), and with ``return_argmax``
    a fourth, each row's first argmax ``[N]`` int64 (of the logits divided by the temperature)."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    BN, BV, BK = _config(N, V, H, dev)
    n_row_tiles = triton.cdiv(N, BN)
    n_v_tiles = triton.cdiv(V, BV)
    if split_v is None:
        target = 4 * torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
        split_v = max(1, min(n_v_tiles, triton.cdiv(target, n_row_tiles)))
    split_v = max(1, min(int(split_v), n_v_tiles))
    tiles_per_split = triton.cdiv(n_v_tiles, split_v)
    split_v = triton.cdiv(n_v_tiles, tiles_per_split)
    part = torch.empty(N, split_v, 4, dtype=torch.float32, device=dev)
    idx = torch.empty(N, split_v, dtype=torch.int64, device=dev) if return_argmax else None
    if N:
        _fused_linear_fwd_kernel[(n_row_tiles * split_v,)](
            hidden, weight, bias if bias is not None else weight, labels, part, idx if idx is not None else part,
            N, V, H, hidden.stride(0), weight.stride(0), float(temperature), int(ignore_index),
            n_row_tiles, split_v, tiles_per_split,
            HAS_BIAS=bias is not None, ENTROPY=bool(return_entropy), ARGMAX=idx is not None,
            PREC=_precision(allow_tf32),
            # Triton's CPU interpreter mis-multiplies 16-bit tl.dot operands (garbage for bf16,
            # triton 3.9): exact fp32 products of the same bf16 values instead
            UPCAST=dev.type == "cpu" and hidden.dtype != torch.float32,
            BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=BK, num_warps=4, num_stages=3,
        )
    lse, ent, lp_t = _merge_splits(part)
    valid = labels != ignore_index
    zero = torch.zeros_like(lp_t)
    logp = torch.where(valid, lp_t, zero)
    ent = torch.where(valid, ent, zero) if return_entropy else None
    if idx is not None:
        return logp, ent, lse, _merge_argmax(part, idx)
    return logp, ent, lse


def _default_chunk(N: int, V: int) -> int:
    # about 2^27 logits (256 MiB in bf16) per chunk: big enough for full-speed GEMMs
    return max(1, min(N, (1 << 27) // max(V, 1)))


def fused_linear_backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, temperature,
                          ignore_index, chunk_size=None, needs=(True, True, True)):
    """Gradients ``(d_hidden [N, H], d_weight [V, H], d_bias [V] or None)`` in the inputs'
    dtypes, recomputing the logits one chunk of rows at a time. ``needs``: which of hidden,
    weight, bias want one (None for the others: a frozen head forms no [V, H] buffer)."""
    N, H = hidden.shape
    V = weight.shape[0]
    chunk = chunk_size or _default_chunk(N, V)
    dh = torch.empty_like(hidden) if needs[0] else None
    # fp32 accumulation of dW / db across chunks; a single chunk writes the result directly
    dw = torch.zeros(V, H, dtype=torch.float32, device=hidden.device) if needs[1] else None
    db = torch.zeros(V, dtype=torch.float32, device=hidden.device) if bias is not None and needs[2] else None
    for c0 in range(0, N, chunk):
        c1 = min(N, c0 + chunk)
        h = hidden[c0:c1]
        logits = h @ weight.t()  # [C, V] in the matmul dtype
        if bias is not None:
            logits += bias
        lab = labels[c0:c1]
        lse_c = lse[c0:c1]
        ent_c = entropy[c0:c1] if entropy is not None else None
        if logits.dtype != torch.float32:
            # The chunk is rounded to 16 bits while the forward's lse came from the fp32
            # accumulator: softmax(rounded) with the old lse does not sum to 1 and the gradient
            # picks up that bias (2-3x the reference's bf16 error in tests). Re-deriving lse
            # (and entropy) from the rounded chunk costs one read of the chunk (~3% of the
            # backward's time) and makes the gradient that of softmax(rounded logits), exactly
            # the reference's.
            _, ent_r, lse_c = token_logprobs_forward(logits, lab, temperature, ignore_index, ent_c is not None)
            ent_c = ent_r
        dz = token_logprobs_backward(
            logits, lab, lse_c, ent_c,
            grad_logp[c0:c1] if grad_logp is not None else None,
            grad_entropy[c0:c1] if grad_entropy is not None else None, temperature, ignore_index, out=logits,
        )
        if dh is not None:
            torch.mm(dz, weight, out=dh[c0:c1])
        if dw is not None:
            dw += (dz.t() @ h).float()
        if db is not None:
            db += dz.float().sum(0)
    return dh, (dw.to(weight.dtype) if dw is not None else None), (db.to(bias.dtype) if db is not None else None)


def fused_linear_backward_triton(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, temperature,
                                 ignore_index, allow_tf32=None, needs=(True, True, True)):
    """Same contract as :func:`fused_linear_backward`, in one Triton kernel over (row tile,
    V tile) with fp32 atomics into dHidden / dW: nothing of size [·, V] is allocated, at
    the price of non-deterministic summation order and [N, H] + [V, H] fp32 buffers."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    BN, BV, BK = _config(N, V, H, dev)
    if dev.type != "cpu":
        BN, BV, BK = 64, 64, 64  # three [·, 64] operand tiles + the logits tile fit in registers
    dh = torch.zeros(N, H, dtype=torch.float32, device=dev) if needs[0] else None
    dw = torch.zeros(V, H, dtype=torch.float32, device=dev) if needs[1] else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if bias is not None and needs[2] else None
    dummy = lse
    n_row_tiles = triton.cdiv(N, BN)
    if N and (grad_logp is not None or grad_entropy is not None):
        _fused_linear_bwd_kernel[(n_row_tiles * triton.cdiv(V, BV),)](
            hidden, weight, bias if bias is not None else weight, labels, lse,
            entropy if entropy is not None else lse,
            grad_logp.contiguous() if grad_logp is not None else lse,
            grad_entropy.contiguous() if grad_entropy is not None else lse, dh if dh is not None else dummy,
            dw if dw is not None else dummy, db if db is not None else dummy,
            N, V, H, hidden.stride(0), weight.stride(0), float(temperature), int(ignore_index), n_row_tiles,
            HAS_BIAS=bias is not None, HAS_GLOGP=grad_logp is not None, HAS_GENT=grad_entropy is not None,
            PREC=_precision(allow_tf32), UPCAST=dev.type == "cpu" and hidden.dtype != torch.float32,
            BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=BK, NEED_H=dh is not None, NEED_W=dw is not None, NEED_B=db is not None,
            num_warps=4, num_stages=2,
        )
    return tuple(g.to(t.dtype) if g is not None else None for g, t in ((dh, hidden), (dw, weight), (db, bias)))


def _converted(t: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``t`` in the promoted dtype of ``t`` and ``other``, unit stride in its last dim (the
    forward's operand)."""
    t = t.to(torch.promote_types(t.dtype, other.dtype))
    return t if t.stride(-1) == 1 else t.contiguous()


def _same_or_none(converted: torch.Tensor, original: torch.Tensor):
    """``converted`` when it is ``original``'s memory (saving it costs nothing), else None."""
    same = converted.untyped_storage().data_ptr() == original.untyped_storage().data_ptr()
    return converted if same else None


class FusedLinearLogprobsFunction(torch.autograd.Function):
    """Autograd for fused_linear_logprobs: outputs (logp, entropy) ``[N]`` fp32 (entropy is
    a dummy zero tensor when not requested), and with ``return_argmax`` a third, the rows'
    argmax ``[N]`` int64 (no gradient); saves hidden, weight, bias, fp64 lse and fp32 entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, return_entropy, ignore_index, chunk_size,
                allow_tf32, split_v, backward, return_argmax=False):
        dt = torch.promote_types(hidden.dtype, weight.dtype)
        h = hidden.to(dt)
        w = weight.to(dt)
        h = h if h.stride(-1) == 1 else h.contiguous()
        w = w if w.stride(-1) == 1 else w.contiguous()
        lab = labels.contiguous()
        logp, ent, lse, *amax = fused_linear_forward(h, w, lab, bias, temperature, ignore_index, return_entropy,
                                                     allow_tf32=allow_tf32, split_v=split_v,
                                                     return_argmax=return_argmax)
        # hidden and weight themselves (a second derivative needs them, in the graph); a converted
        # copy is made again in the backward rather than kept alive beside them
        ctx.save_for_backward(_same_or_none(h, hidden), _same_or_none(w, weight), bias, lab, lse, ent, hidden,
                              weight)
        ctx.cfg = (temperature, ignore_index, chunk_size, hidden.dtype, weight.dtype, allow_tf32, backward)
        ctx.device_type = hidden.device.type
        # a loss that ignores the entropy sends None, not a zero tensor to push through V
        ctx.set_materialize_grads(False)
        if ent is None:
            ent = torch.zeros_like(logp)
            ctx.mark_non_differentiable(ent)
        if amax:
            ctx.mark_non_differentiable(amax[0])
            return logp, ent, amax[0]
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent, *_grad_argmax):
        # the forward computes in the inputs' dtypes whatever autocast region encloses it, and so
        # does the backward, which may run inside one (its h @ W.T turned bf16, then failed)
        with torch.autocast(ctx.device_type, enabled=False):
            return FusedLinearLogprobsFunction._backward(ctx, grad_logp, grad_ent)

    @staticmethod
    def _backward(ctx, grad_logp, grad_ent):
        h, w, bias, lab, lse, ent, hidden, weight = ctx.saved_tensors
        temperature, ignore_index, chunk_size, h_dtype, w_dtype, allow_tf32, how = ctx.cfg
        if ent is None:
            grad_ent = None
        if grad_logp is None and grad_ent is None:
            return (None,) * 12
        if torch.is_grad_enabled():  # create_graph=True: see rlhf_fast.ops._native.differentiable_backward
            def f(hd, wt, b):
                return reference.fused_linear_logprobs(hd, wt, lab, bias=b, temperature=temperature,
                                                       return_entropy=ent is not None, ignore_index=ignore_index)

            return _native.reference_grads(f, (hidden, weight, bias), (grad_logp, grad_ent)) + (None,) * 9
        h = _converted(hidden, weight) if h is None else h
        w = _converted(weight, hidden) if w is None else w
        needs = tuple(ctx.needs_input_grad[:3])  # a frozen head (LoRA) gets no [V, H] gradient buffer
        if how == "triton":
            dh, dw, db = fused_linear_backward_triton(h, w, bias, lab, lse, ent, grad_logp, grad_ent, temperature,
                                                      ignore_index, allow_tf32, needs=needs)
        else:
            dh, dw, db = fused_linear_backward(h, w, bias, lab, lse, ent, grad_logp, grad_ent, temperature,
                                               ignore_index, chunk_size, needs=needs)
        dh, dw = (g.to(dt) if g is not None else None for g, dt in ((dh, h_dtype), (dw, w_dtype)))
        return dh, dw, db, None, None, None, None, None, None, None, None, None


def fused_linear_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, return_entropy=False,
                          chunk_size=None, ignore_index=-100, allow_tf32=None, split_v=None, backward="chunked",
                          return_top1=False):
    """log softmax((hidden @ weight.T + bias) / T)[labels] (Triton), never writing the logits.

    hidden ``[N, H]`` bf16/fp16/fp32, weight ``[V, H]``, bias ``[V]`` or None, labels ``[N]``
    int (``ignore_index`` gives 0). Returns logp ``[N]`` fp32 (and entropy ``[N]`` fp32).
    Gradients to hidden, weight, bias; the backward holds ``chunk_size`` rows of logits at a
    time. ``allow_tf32`` picks TF32 (else IEEE fp32) for fp32 inputs in the Triton matmuls; None
    follows ``torch.backends.cuda.matmul.allow_tf32``, as torch's own fp32 matmuls do;
    ``split_v`` overrides the number of vocabulary splits. ``backward``: ``"chunked"``
    (recompute a chunk of logits with cuBLAS, deterministic) or ``"triton"`` (one tl.dot kernel
    with fp32 atomics, no [·, V] buffer). ``return_top1``: a last output ``[N]`` bool, whether
    the label is the first argmax of its row (torch.argmax's), False at ``ignore_index``, from
    the same kernel (each tile's first maximal column). float64 runs the reference.
    """
    if backward not in ("chunked", "triton"):
        raise ValueError(f"backward must be 'chunked' or 'triton', got {backward!r}")
    if torch.float64 in (hidden.dtype, weight.dtype) or temperature < reference.TINY_TEMPERATURE:
        return reference.fused_linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                               return_entropy=return_entropy, ignore_index=ignore_index,
                                               return_top1=return_top1)
    logp, ent, *amax = FusedLinearLogprobsFunction.apply(hidden, weight, bias, labels, float(temperature),
                                                         bool(return_entropy), int(ignore_index), chunk_size,
                                                         _use_tf32(allow_tf32), split_v, backward,
                                                         bool(return_top1))
    out = (logp, ent) if return_entropy else (logp,)
    if return_top1:
        out += ((amax[0] == labels) & (labels != ignore_index),)
    return out if len(out) > 1 else logp


def _coefficient_terms(logp, ent, ref_logp, mask, kl_coef, kl_kind, entropy_coef, agg, normalizer):
    """``kl_coef·agg(KL) − entropy_coef·agg(entropy)`` over ``[B, T]`` tensors, through autograd
    (the coefficients' gradients kept, their values never read): agg is linear, so adding it to
    agg(ppo loss) gives agg(ppo + kl_coef·KL − entropy_coef·entropy) as the reference."""
    lp, ent, ref = reference._masked_inputs(mask, logp, ent, ref_logp)  # masked entries never read
    terms = -entropy_coef * reference.aggregate(ent, mask, agg, normalizer)
    if ref is not None:
        terms = terms + kl_coef * reference.aggregate(reference.kl_penalty(lp, ref, kl_kind), mask, agg, normalizer)
    return terms


def fused_linear_policy_loss(hidden, weight, labels, old_logp, advantages, mask, *, ref_logp=None, kl_coef=0.0,
                             kl_kind="k3", entropy_coef=0.0, temperature=1.0, clip_low=0.2, clip_high=None,
                             dual_clip=None, agg="token-mean", normalizer=None, bias=None, chunk_size=None,
                             ignore_index=-100, allow_tf32=None, split_v=None, backward="chunked"):
    """The policy-loss step from hidden ``[B, T, H]`` and the LM head ``[V, H]`` (Triton):
    agg(ppo token loss + kl_coef·KL(logp, ref_logp) − entropy_coef·entropy).

    Per-token tensors ``[B, T]``. Returns ``(loss 0-dim fp32, stats)`` with the reference's
    keys (clip_frac, dual_clip_frac, approx_kl, ratio_mean, ratio_max, kl, entropy, logp).
    Gradients to hidden, weight (and bias). float64 runs the reference.
    """
    if backward not in ("chunked", "triton"):
        raise ValueError(f"backward must be 'chunked' or 'triton', got {backward!r}")
    if torch.float64 in (hidden.dtype, weight.dtype) or temperature < reference.TINY_TEMPERATURE:
        return reference.fused_linear_policy_loss(
            hidden, weight, labels, old_logp, advantages, mask, ref_logp=ref_logp, kl_coef=kl_coef,
            kl_kind=kl_kind, entropy_coef=entropy_coef, temperature=temperature, clip_low=clip_low,
            clip_high=clip_high, dual_clip=dual_clip, agg=agg, normalizer=normalizer, bias=bias,
            ignore_index=ignore_index)
    B, T, H = hidden.shape
    logp, ent = FusedLinearLogprobsFunction.apply(
        hidden.reshape(B * T, H), weight, bias, labels.reshape(B * T), float(temperature), True,
        int(ignore_index), chunk_size, _use_tf32(allow_tf32), split_v, backward)
    logp = logp.reshape(B, T)
    ent = ent.reshape(B, T)
    ref_logp = ref_logp.detach() if ref_logp is not None else None
    # the kernel takes the coefficients as Python floats: a tensor one (adaptive, on the device)
    # would be read (a host sync) and lose its gradient, so its term is added apart
    tensor_coefs = isinstance(kl_coef, torch.Tensor) or isinstance(entropy_coef, torch.Tensor)
    loss, stats = policy_loss_rows(
        logp, ent, old_logp.detach(), advantages.detach(), mask, ref_logp=ref_logp,
        kl_coef=0.0 if tensor_coefs else kl_coef, kl_kind=kl_kind, entropy_coef=0.0 if tensor_coefs else entropy_coef,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg, normalizer=normalizer)
    if tensor_coefs:
        loss = loss + _coefficient_terms(logp, ent, ref_logp, mask, kl_coef, kl_kind, entropy_coef, agg, normalizer)
    if ref_logp is None:
        stats["kl"] = torch.zeros((), dtype=loss.dtype, device=loss.device)
    stats["logp"] = logp.detach()
    return loss, stats
