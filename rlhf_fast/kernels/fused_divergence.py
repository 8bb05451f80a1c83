"""Triton kernels for fused_linear_divergence: the distillation loss (generalised JSD of
TRL's DistillationTrainer) from the student's and the teacher's last hidden states and LM
heads, never holding more than ``chunk_size`` rows of either model's logits.

Naive version (``rlhf_fast.ops.reference.fused_linear_divergence``): both ``[N, V]`` logits,
their fp32 casts, two log_softmaxes, the mixture, and autograd's saved tensors — for N = 4096,
V = 152k about 12 GB. TRL (``trl/kernels/chunked_divergence.py``) tiles rows and vocabulary
but its autograd Function projects both models twice in the forward (JSD) and again in the
backward: six projections for a training step. Here, in the manner of Liger-Kernel's
``LigerFusedLinearJSD``, per chunk of rows:

* two cuBLAS projections into reused buffers (student and teacher logits, each in its
  model's dtype);
* one Triton program per row streams over V in BLOCK_V tiles: pass 1 folds both
  log-sum-exps online (running max, −inf as identity), the student's entropy, and for the
  two KL cases the divergence itself (a running Σ e·(gap), kept relative to the running
  maxima so logits of ~1e4 do not cancel); the JSD needs a second pass for its terms,
  since the mixture needs both final normalisers; the last pass overwrites the student's
  logits with dDiv/dz (so no second [C, V] buffer);
* ``grad_hidden = G @ W_s``, ``grad_W += Gᵀ @ h``, ``grad_b += Σ G`` (two more GEMMs).

``reduction="sum"`` with a student tensor that needs a gradient does all of it in the
forward (4 projections per step, nothing recomputed) and only scales by the scalar
grad_output in backward. ``reduction="none"`` computes the divergence only (plus 5 numbers
per row, the log-sum-exp statistics and KL(s‖m), when a gradient will be asked for); its
backward re-projects each chunk and writes the gradient in a single pass over V, each row
scaled by its grad_output.

Masked-out rows are dropped before anything is projected (index_select) and the results
scattered back. The row kernel computes in fp32 (fp64 for fp64 inputs, so gradcheck runs
the kernels themselves); the projections run in the inputs' dtypes, as the reference's do.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from rlhf_fast.ops import reference

REDUCTIONS = ("none", "sum")


@triton.jit
def _log_probs_tile(s_base, t_base, cols, inb, inv_t, ms, log_ss, mt, log_st, ACC: tl.constexpr):
    """The tile ``cols`` of both rows' log-probs (log p = (z / T − M) − log S, −inf off ``inb``)."""
    log_ps = tl.load(s_base[:, None] + cols[None, :], mask=inb, other=-float("inf")).to(ACC) * inv_t
    log_pt = tl.load(t_base[:, None] + cols[None, :], mask=inb, other=-float("inf")).to(ACC) * inv_t
    return (log_ps - ms[:, None]) - log_ss[:, None], (log_pt - mt[:, None]) - log_st[:, None]


@triton.jit
def _log_mixture(log_ps, log_pt, log_1mb, log_b):
    """log m = log((1 − beta)·p_s + beta·p_t), as a log-add-exp that stays finite where both are 0."""
    a = log_ps + log_1mb
    b = log_pt + log_b
    top = tl.maximum(a, b)
    top_safe = tl.where(top == -float("inf"), 0.0, top)
    return top_safe + tl.log(tl.exp(a - top_safe) + tl.exp(b - top_safe))


@triton.jit
def _divergence_rows_kernel(
    zs_ptr, zt_ptr, g_ptr, gscale_ptr, params_ptr, div_ptr, ent_ptr, stats_ptr,
    N, V, stride_s, stride_t, stride_g,
    MODE: tl.constexpr, ENTROPY: tl.constexpr, GRAD: tl.constexpr, HAS_GSCALE: tl.constexpr,
    STATS_IN: tl.constexpr, STATS_OUT: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # MODE 0: KL(t‖s), 1: KL(s‖t), 2: beta·KL(t‖m) + (1 − beta)·KL(s‖m).
    # ROWS rows per program: 1 on GPUs; more under the interpreter, where each program costs Python time
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    s_base = zs_ptr + rows * stride_s
    t_base = zt_ptr + rows * stride_t
    # scalars from a tensor, not kernel arguments: Python floats would reach the kernel as fp32
    inv_t = tl.load(params_ptr + 0)
    beta = tl.load(params_ptr + 1)
    log_1mb = tl.load(params_ptr + 2)
    log_b = tl.load(params_ptr + 3)
    cols0 = tl.arange(0, BLOCK_V)
    # log p = (z − M) − log S with the max M and log S kept apart: their sum, the lse, would
    # round log S away on logits of ~1e4 (fp32 spacing 1e-3 there)
    if STATS_IN:
        ms = tl.load(stats_ptr + rows * 5 + 0, mask=row_ok, other=0.0)
        log_ss = tl.load(stats_ptr + rows * 5 + 1, mask=row_ok, other=0.0)
        mt = tl.load(stats_ptr + rows * 5 + 2, mask=row_ok, other=0.0)
        log_st = tl.load(stats_ptr + rows * 5 + 3, mask=row_ok, other=0.0)
        k_aux = tl.load(stats_ptr + rows * 5 + 4, mask=row_ok, other=0.0)
    else:
        # pass 1: online log-sum-exp of both models; entropy; the KL of the two KL modes
        ms = tl.full([ROWS], -float("inf"), ACC)
        mt = tl.full([ROWS], -float("inf"), ACC)
        ss = tl.zeros([ROWS], ACC)
        st = tl.zeros([ROWS], ACC)
        w = tl.zeros([ROWS], ACC)
        gap = tl.zeros([ROWS], ACC)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            inb = row_ok[:, None] & (cols < V)[None, :]
            zs = tl.load(s_base[:, None] + cols[None, :], mask=inb, other=-float("inf")).to(ACC) * inv_t
            zt = tl.load(t_base[:, None] + cols[None, :], mask=inb, other=-float("inf")).to(ACC) * inv_t
            ms_new = tl.maximum(ms, tl.max(zs, axis=1))
            mt_new = tl.maximum(mt, tl.max(zt, axis=1))
            # all -inf so far: reference point 0 (avoids -inf - -inf)
            ms_old_safe = tl.where(ms == -float("inf"), 0.0, ms)
            mt_old_safe = tl.where(mt == -float("inf"), 0.0, mt)
            ms_safe = tl.where(ms_new == -float("inf"), 0.0, ms_new)
            mt_safe = tl.where(mt_new == -float("inf"), 0.0, mt_new)
            alpha_s = tl.exp(ms - ms_safe)
            alpha_t = tl.exp(mt - mt_safe)
            es = tl.exp(zs - ms_safe[:, None])
            et = tl.exp(zt - mt_safe[:, None])
            if ENTROPY:
                # (z - m)·e is 0 where e is 0; select before multiplying so no -inf·0 is formed
                zl = (tl.where(es > 0, zs, ms_safe[:, None]) - ms_safe[:, None]) * es
                w = alpha_s * (w + (ms_old_safe - ms_safe) * ss) + tl.sum(zl, axis=1)
            if MODE == 0:
                # Σ e_t·((z_t − M_t) − (z_s − M_s)) for the current maxima; a move of the maxima
                # shifts every earlier term by the same amount, hence the ``st·shift`` fix-up
                d = tl.where(et > 0, (zt - mt_safe[:, None]) - (zs - ms_safe[:, None]), 0.0) * et
                shift = (ms_safe - ms_old_safe) - (mt_safe - mt_old_safe)
                gap = alpha_t * (gap + shift * st) + tl.sum(d, axis=1)
            if MODE == 1:
                d = tl.where(es > 0, (zs - ms_safe[:, None]) - (zt - mt_safe[:, None]), 0.0) * es
                shift = (mt_safe - mt_old_safe) - (ms_safe - ms_old_safe)
                gap = alpha_s * (gap + shift * ss) + tl.sum(d, axis=1)
            ss = alpha_s * ss + tl.sum(es, axis=1)
            st = alpha_t * st + tl.sum(et, axis=1)
            ms = ms_new
            mt = mt_new
        # padding rows of the last program: no log(0)
        ss = tl.where(row_ok, ss, 1.0)
        st = tl.where(row_ok, st, 1.0)
        ms = tl.where(ms == -float("inf"), 0.0, ms)
        mt = tl.where(mt == -float("inf"), 0.0, mt)
        log_ss = tl.log(ss)
        log_st = tl.log(st)
        k_aux = tl.zeros([ROWS], ACC)
        if MODE == 0:
            div = gap / st - log_st + log_ss
        elif MODE == 1:
            div = gap / ss - log_ss + log_st
            k_aux = div
        else:
            # pass 2 (JSD): the terms, and KL(s‖m), which the gradient of every entry needs
            div = tl.zeros([ROWS], ACC)
            for start in range(0, V, BLOCK_V):
                cols = start + cols0
                inb = row_ok[:, None] & (cols < V)[None, :]
                log_ps, log_pt = _log_probs_tile(s_base, t_base, cols, inb, inv_t, ms, log_ss, mt, log_st, ACC)
                log_m = _log_mixture(log_ps, log_pt, log_1mb, log_b)
                ps = tl.exp(log_ps)
                pt = tl.exp(log_pt)
                kl_s = tl.where(ps > 0, ps * (log_ps - log_m), 0.0)
                kl_t = tl.where(pt > 0, pt * (log_pt - log_m), 0.0)
                div += tl.sum(beta * kl_t + (1.0 - beta) * kl_s, axis=1)
                k_aux += tl.sum(kl_s, axis=1)
        tl.store(div_ptr + rows, div, mask=row_ok)
        if ENTROPY:
            tl.store(ent_ptr + rows, log_ss - w / ss, mask=row_ok)
        if STATS_OUT:
            tl.store(stats_ptr + rows * 5 + 0, ms, mask=row_ok)
            tl.store(stats_ptr + rows * 5 + 1, log_ss, mask=row_ok)
            tl.store(stats_ptr + rows * 5 + 2, mt, mask=row_ok)
            tl.store(stats_ptr + rows * 5 + 3, log_st, mask=row_ok)
            tl.store(stats_ptr + rows * 5 + 4, k_aux, mask=row_ok)
    if GRAD:
        # last pass: dDiv/dz_s (TRL's _backward_tile), written over the student's logits — each
        # tile is read by this program before it overwrites it
        coef = tl.zeros([ROWS], ACC) + inv_t
        if HAS_GSCALE:
            coef = coef * tl.load(gscale_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        if MODE == 2:
            coef = coef * (1.0 - beta)
        g_base = g_ptr + rows * stride_g
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            inb = row_ok[:, None] & (cols < V)[None, :]
            log_ps, log_pt = _log_probs_tile(s_base, t_base, cols, inb, inv_t, ms, log_ss, mt, log_st, ACC)
            ps = tl.exp(log_ps)
            if MODE == 0:
                grad = ps - tl.exp(log_pt)
            elif MODE == 1:
                grad = tl.where(ps > 0, ps * (log_ps - log_pt - k_aux[:, None]), 0.0)
            else:
                log_m = _log_mixture(log_ps, log_pt, log_1mb, log_b)
                grad = tl.where(ps > 0, ps * (log_ps - log_m - k_aux[:, None]), 0.0)
            grad = grad * coef[:, None]
            tl.store(g_base[:, None] + cols[None, :], grad.to(g_ptr.dtype.element_ty), mask=inb)


def _mode(beta: float) -> int:
    return 0 if beta == 0.0 else 1 if beta == 1.0 else 2


def _launch_cfg(C: int, V: int, device: torch.device, acc: torch.dtype):
    """(ROWS, BLOCK_V, num_warps): rows per program and vocabulary tile."""
    if device.type == "cpu":
        # the interpreter runs each tile op as one numpy call: few, large tiles are fastest
        bv = min(triton.next_power_of_2(V), 16384)
        return max(1, min(triton.next_power_of_2(C), 65536 // bv)), bv, 4
    # two models' tiles and their exps live at once: half token_logprobs' tile. ptxas (sm_90a,
    # JSD with gradient, 8 warps): 54 registers at 2048 (93 at 4096; fp64 at 1024: 92), no
    # spills; not yet timed on a GPU
    bv = min(triton.next_power_of_2(V), 2048 if acc == torch.float32 else 1024)
    return 1, bv, 8 if V >= 8192 else 4


def _params(beta: float, temperature: float, acc: torch.dtype, device) -> torch.Tensor:
    mode = _mode(beta)
    log_1mb = math.log(1.0 - beta) if mode == 2 else 0.0
    log_b = math.log(beta) if mode == 2 else 0.0
    return torch.tensor([1.0 / temperature, beta, log_1mb, log_b], dtype=acc, device=device)


def divergence_rows(zs: torch.Tensor, zt: torch.Tensor, params: torch.Tensor, mode: int, *, div=None, ent=None,
                    stats=None, stats_in: bool = False, grad: bool = False, gscale=None, block_v=None):
    """Run the row kernel on one chunk of logits.

    zs ``[C, V]`` (student), zt ``[C, V]`` (teacher), any float dtypes, unit stride in V;
    params ``[4]`` (1/T, beta, log(1 − beta), log beta) in the compute dtype. Writes into
    the ``[C]`` tensors ``div`` and ``ent`` (compute dtype; ``ent`` may be None) and, when
    given, ``stats`` ``[C, 5]`` (max and log Σexp of each model, then KL(s‖m) or KL(s‖t)):
    an output, or with ``stats_in`` an input that replaces the statistics passes (then
    div/ent are not written).
    ``grad``: overwrite ``zs`` with dDiv/dz_s, row i scaled by ``gscale[i]`` when given.
    ``block_v`` overrides the vocabulary tile (a power of two).
    """
    C, V = zs.shape
    if C == 0:
        return
    acc = params.dtype
    dev = zs.device
    rows, bv, nw = _launch_cfg(C, V, dev, acc)
    if block_v is not None:
        bv = int(block_v)
        rows = max(1, min(rows, 65536 // bv))
    dst = zs
    # Triton's CPU interpreter truncates on a store to 16 bits (GPUs round to nearest even):
    # there the gradient goes through an fp32 buffer and torch's rounding
    if grad and dev.type == "cpu" and zs.dtype in (torch.bfloat16, torch.float16):
        dst = torch.empty(zs.shape, dtype=torch.float32)
    dummy = params
    _divergence_rows_kernel[(triton.cdiv(C, rows),)](
        zs, zt, dst, gscale if gscale is not None else dummy, params,
        div if div is not None else dummy, ent if ent is not None else dummy, stats if stats is not None else dummy,
        C, V, zs.stride(0), zt.stride(0), dst.stride(0),
        MODE=mode, ENTROPY=ent is not None and not stats_in, GRAD=grad, HAS_GSCALE=gscale is not None,
        STATS_IN=stats_in, STATS_OUT=stats is not None and not stats_in,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, ROWS=rows, BLOCK_V=bv, num_warps=nw,
    )
    if dst is not zs:
        zs.copy_(dst)


def _default_chunk(V: int, bytes_per_logit: int) -> int:
    # a chunk of both models' logits within 256 MiB (e.g. 384 rows for V = 151936 in bf16):
    # large enough for full-speed GEMMs; a multiple of 64 rows, the GEMMs' row tile
    rows = (256 << 20) // max(1, V * bytes_per_logit)
    return max(1, rows // 64 * 64 if rows >= 64 else rows)


def _project(buf: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """logits = h @ wᵀ (+ b) into ``buf`` ``[C, V]``, in the model's own dtype."""
    if b is None:
        return torch.mm(h, w.t(), out=buf)
    return torch.addmm(b, h, w.t(), out=buf)


def _addmm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for a wider ``acc``, without rounding each chunk's product to the inputs'
    dtype (TRL's ``_addmm_fp32``: per-chunk bf16 rounding biases training)."""
    if acc.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16) and acc.dtype == torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _student_grads(needs, hidden, weight, bias):
    """Zero-initialised gradient buffers (dh in the matmul dtype; dW, db accumulated wider)."""
    need_h, need_w, need_b = needs
    wide = torch.promote_types(weight.dtype, torch.float32)
    dh = torch.empty_like(hidden) if need_h else None
    dw = torch.zeros(weight.shape, dtype=wide, device=weight.device) if need_w else None
    db = torch.zeros(weight.shape[0], dtype=wide, device=weight.device) if (need_b and bias is not None) else None
    return dh, dw, db


def _run_chunks(sh, sw, sb, th, tw, tb, params, mode, chunk, *, div=None, ent=None, stats=None, stats_in=False,
                needs=None, gscale=None, block_v=None):
    """Project chunk after chunk and run the row kernel on each; with ``needs`` (which of
    hidden / weight / bias want a gradient), also the gradient GEMMs. Returns ``(dh, dw, db)``."""
    n = sh.shape[0]
    V = sw.shape[0]
    grad = needs is not None and any(needs)
    dh, dw, db = _student_grads(needs, sh, sw, sb) if grad else (None, None, None)
    rows = min(chunk, n)
    s_buf = torch.empty(rows, V, dtype=sh.dtype, device=sh.device)
    t_buf = torch.empty(rows, V, dtype=th.dtype, device=th.device)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        h = sh[c0:c1]
        zs = _project(s_buf[: c1 - c0], h, sw, sb)  # [C, V]
        zt = _project(t_buf[: c1 - c0], th[c0:c1], tw, tb)  # [C, V]
        sl = slice(c0, c1)
        divergence_rows(zs, zt, params, mode, div=div[sl] if div is not None else None,
                        ent=ent[sl] if ent is not None else None, stats=stats[sl] if stats is not None else None,
                        stats_in=stats_in, grad=grad, gscale=gscale[sl] if gscale is not None else None,
                        block_v=block_v)
        if not grad:
            continue
        # zs now holds G = dDiv/dz_s
        if dh is not None:
            torch.mm(zs, sw, out=dh[sl])
        if dw is not None:
            _addmm_acc(dw, zs.t(), h)
        if db is not None:
            db += zs.sum(0, dtype=db.dtype)
    return dh, dw, db


class FusedLinearDivergenceFunction(torch.autograd.Function):
    """Autograd for fused_linear_divergence on already compacted rows: outputs (div, entropy),
    div ``[n]`` (or 0-dim for ``"sum"``) and entropy ``[n]`` (non-differentiable; zeros when
    not requested). The teacher arrives detached."""

    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, beta, temperature, reduction, return_entropy, chunk, needs, block_v):
        n = sh.shape[0]
        acc = torch.float64 if torch.float64 in (sh.dtype, th.dtype) else torch.float32
        out_dt = reference.out_dtype(sh.dtype)
        mode = _mode(beta)
        params = _params(beta, temperature, acc, sh.device)
        div = torch.empty(n, dtype=acc, device=sh.device)
        ent = torch.empty(n, dtype=acc, device=sh.device) if return_entropy else None
        grad = any(needs)
        ctx.set_materialize_grads(False)
        ctx.cfg = (reduction, mode, chunk, needs, grad, block_v)
        if grad and reduction == "sum":
            dh, dw, db = _run_chunks(sh, sw, sb, th, tw, tb, params, mode, chunk, div=div, ent=ent, needs=needs,
                                     block_v=block_v)
            # held until backward: in the inputs' dtypes, as the gradients they become (half the fp32 dW)
            ctx.save_for_backward(dh, dw.to(sw.dtype) if dw is not None else None,
                                  db.to(sb.dtype) if db is not None else None)
        elif grad:
            stats = torch.empty(n, 5, dtype=acc, device=sh.device)
            _run_chunks(sh, sw, sb, th, tw, tb, params, mode, chunk, div=div, ent=ent, stats=stats, block_v=block_v)
            ctx.save_for_backward(sh, sw, sb, th, tw, tb, stats, params)
        else:
            _run_chunks(sh, sw, sb, th, tw, tb, params, mode, chunk, div=div, ent=ent, block_v=block_v)
        div = div.sum() if reduction == "sum" else div
        ent = ent.to(out_dt) if ent is not None else torch.zeros(n, dtype=out_dt, device=sh.device)
        ctx.mark_non_differentiable(ent)
        return div.to(out_dt), ent

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_div, grad_ent):
        reduction, mode, chunk, needs, grad, block_v = ctx.cfg
        none = (None,) * 10
        if grad_div is None or not grad:
            return (None, None, None) + none
        if reduction == "sum":
            # a 0-dim grad_div keeps each gradient's dtype (type promotion ignores 0-dim tensors)
            return tuple(t * grad_div if t is not None else None for t in ctx.saved_tensors) + none
        sh, sw, sb, th, tw, tb, stats, params = ctx.saved_tensors
        gscale = grad_div.to(params.dtype).contiguous()
        dh, dw, db = _run_chunks(sh, sw, sb, th, tw, tb, params, mode, chunk, stats=stats, stats_in=True, needs=needs,
                                 gscale=gscale, block_v=block_v)
        return (dh, dw.to(sw.dtype) if dw is not None else None,
                db.to(sb.dtype) if db is not None else None) + none


def _check(beta, temperature, reduction, chunk_size, block_v):
    # the front end validates; these guard direct calls of the kernel entry
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if block_v is not None and (not isinstance(block_v, int) or block_v < 16 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two >= 16 or None, got {block_v!r}")


def _scatter(values: torch.Tensor, idx: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """Rows of the compacted batch back to their places in ``[n]`` (0 elsewhere), differentiably."""
    if idx is None:
        return values
    return values.new_zeros(n).index_copy(0, idx, values)


def fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *, beta=0.5,
                            temperature=1.0, mask=None, student_bias=None, teacher_bias=None, reduction="none",
                            return_entropy=False, chunk_size=None, block_v=None):
    """Distillation divergence from both models' hidden states and LM heads (Triton row kernel,
    cuBLAS projections), never holding more than ``chunk_size`` rows of either model's logits.

    student_hidden ``[N, H]``, student_weight ``[V, H]``, student_bias ``[V]`` or None;
    teacher_hidden ``[N, Ht]``, teacher_weight ``[V, Ht]``, teacher_bias ``[V]`` or None
    (bf16 / fp16 / fp32 / fp64; each model's tensors in one dtype, the two models' may
    differ). Per row, of softmax(logits / temperature): ``beta == 0`` KL(teacher ‖ student),
    ``beta == 1`` KL(student ‖ teacher), otherwise the generalised JSD of TRL's
    DistillationTrainer. ``mask`` ``[N]`` bool or 0/1: rows outside are not projected and give
    0. ``reduction``: ``"none"`` → ``[N]``, ``"sum"`` → 0-dim. float32 out (float64 for float64
    student_hidden); with ``return_entropy`` also the student's entropy ``[N]`` (no gradient).
    Gradients to the student's hidden, weight and bias only. The default ``chunk_size`` keeps
    a chunk of both models' logits within 256 MiB; ``block_v`` (a power of two) overrides the
    row kernel's vocabulary tile (tests reach the multi-tile path with it on small V).
    """
    _check(beta, temperature, reduction, chunk_size, block_v)
    if temperature < reference.NATIVE_DIVERGENCE_MIN_TEMPERATURE:
        # float32 logits times a rounded 1/T drift from the reference there (and overflow below 1e-20)
        return reference.fused_linear_divergence(
            student_hidden, student_weight, teacher_hidden, teacher_weight, beta=beta, temperature=temperature,
            mask=mask, student_bias=student_bias, teacher_bias=teacher_bias, reduction=reduction,
            return_entropy=return_entropy, chunk_size=chunk_size)
    N = student_hidden.shape[0]
    sdt = torch.promote_types(student_hidden.dtype, student_weight.dtype)
    tdt = torch.promote_types(teacher_hidden.dtype, teacher_weight.dtype)
    idx = None
    if mask is not None:
        keep = mask.reshape(-1).to(device=student_hidden.device, dtype=torch.bool)
        kept = keep.nonzero().squeeze(1)  # host sync: the chunk loop needs the count anyway
        if kept.numel() < N:
            idx = kept
    sh = student_hidden if idx is None else student_hidden.index_select(0, idx)
    with torch.no_grad():
        th = teacher_hidden.detach() if idx is None else teacher_hidden.detach().index_select(0, idx)
        th, tw = th.to(tdt), teacher_weight.detach().to(tdt)
        tb = teacher_bias.detach().to(tdt) if teacher_bias is not None else None
    sw = student_weight
    sb = student_bias
    needs = (torch.is_grad_enabled() and sh.requires_grad, torch.is_grad_enabled() and sw.requires_grad,
             torch.is_grad_enabled() and sb is not None and sb.requires_grad)
    # one dtype per model for the GEMMs (casts are differentiable, so gradients keep each input's dtype)
    sh, sw = sh.to(sdt), sw.to(sdt)
    sb = sb.to(sdt) if sb is not None else None
    n = sh.shape[0]
    chunk = min(chunk_size or _default_chunk(sw.shape[0], sdt.itemsize + tdt.itemsize), max(n, 1))
    div, ent = FusedLinearDivergenceFunction.apply(sh, sw, sb, th, tw, tb, float(beta), float(temperature),
                                                   reduction, bool(return_entropy), chunk, needs, block_v)
    if reduction == "none":
        div = _scatter(div, idx, N)
    if not return_entropy:
        return div
    return div, _scatter(ent, idx, N)
