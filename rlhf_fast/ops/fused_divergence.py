"""fused_linear_divergence: the distillation loss of TRL 1.16's DistillationTrainer (generalised
JSD between the student's and the teacher's next-token distributions) from the two models'
last hidden states and LM heads, never holding more than one chunk of logits of each model.

Backends: ``torch`` (reference, materialises both logits), ``cpp``
(csrc/cpu/fused_divergence.cpp), ``triton`` (rlhf_fast/kernels/fused_divergence.py,
registered in ``_triton.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch, _native, _validate, reference
from .reference import DIVERGENCE_REDUCTIONS, out_dtype


def _check(student_hidden, student_weight, teacher_hidden, teacher_weight, beta, temperature, mask, student_bias,
           teacher_bias, reduction, return_entropy, chunk_size):
    """Every argument; returns the normalised scalars ``(beta, temperature, return_entropy, chunk_size)``."""
    for who, (h, w, b) in (("student", (student_hidden, student_weight, student_bias)),
                           ("teacher", (teacher_hidden, teacher_weight, teacher_bias))):
        _validate.linear_head(h, w, b, names=(f"{who}_hidden", f"{who}_weight", f"{who}_bias"))
    N, V = student_hidden.shape[0], student_weight.shape[0]
    if V == 0:  # no distribution to compare: every backend would return a divergence of 0
        raise ValueError(f"student_weight must have a non-empty vocabulary (V > 0 rows), got shape "
                         f"{tuple(student_weight.shape)}")
    if teacher_hidden.shape[0] != N:
        raise ValueError(f"teacher_hidden must have N = student_hidden.shape[0] = {N} rows, "
                         f"got shape {tuple(teacher_hidden.shape)}")
    if teacher_weight.shape[0] != V:
        raise ValueError(f"teacher_weight must have V = student_weight.shape[0] = {V} rows (one vocabulary), "
                         f"got shape {tuple(teacher_weight.shape)}")
    if mask is not None:
        _validate.mask("mask", mask, (N,))
    _validate.same_device(
        ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias", "mask"),
        (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask))
    beta = _validate.real_like(beta)  # a numpy scalar (a config array's entry) is a number
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a number in [0, 1], got {type(beta).__name__}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    beta = float(beta)
    temperature = _validate.temperature(temperature)
    _validate.choice("reduction", reduction, DIVERGENCE_REDUCTIONS)
    return_entropy = _validate.flag("return_entropy", return_entropy)
    chunk_size = _validate.chunk_size(chunk_size, N)
    return beta, temperature, return_entropy, chunk_size


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
    """Distillation divergence of the student's next-token distribution from the teacher's.

    student_hidden ``[N, H]``, student_weight ``[V, H]``, student_bias ``[V]`` or None;
    teacher_hidden ``[N, Ht]``, teacher_weight ``[V, Ht]``, teacher_bias ``[V]`` or None (the two
    models may differ in width and dtype, not in vocabulary; each weight and bias has its
    hidden's dtype). Both logits are divided by ``temperature``; per row TRL's generalised JSD:
    ``beta=0`` the forward KL(teacher ‖ student), ``beta=1`` the reverse KL(student ‖ teacher),
    otherwise ``beta·KL(t ‖ m) + (1 − beta)·KL(s ‖ m)``, ``m = beta·t + (1 − beta)·s``.
    ``mask`` ``[N]`` (bool or 0/1): rows outside give 0 and no gradient (native backends skip
    them). ``reduction``: ``"none"`` → ``[N]``, ``"sum"`` → 0-dim sum. Float32 out (float64 for
    float64 student_hidden). ``return_entropy``: also the student's entropy ``[N]`` (0 outside
    the mask; no gradient). Gradients flow to the student's hidden, weight and bias only.
    Native backends never hold more than ``chunk_size`` rows of logits of each model.
    """
    beta, temperature, return_entropy, chunk_size = _check(
        student_hidden, student_weight, teacher_hidden, teacher_weight, beta, temperature, mask, student_bias,
        teacher_bias, reduction, return_entropy, chunk_size)
    kw = dict(beta=beta, temperature=temperature, mask=mask, student_bias=student_bias, teacher_bias=teacher_bias,
              reduction=reduction, return_entropy=return_entropy, chunk_size=chunk_size)
    with _no_autocast(student_hidden.device):
        if student_hidden.shape[0] == 0 or (mask is not None and _no_kept_row(mask)):
            # nothing to compute: the reference's result on zero rows, still attached to the student
            return _empty(student_hidden, student_weight, teacher_hidden, teacher_weight, **kw)
        return _dispatch.call("fused_linear_divergence", student_hidden.device, student_hidden, student_weight,
                              teacher_hidden, teacher_weight, **kw)


def _no_kept_row(mask: torch.Tensor) -> bool:
    # read on the CPU only: on a GPU it would cost a host sync per call (the kernels handle it there)
    return mask.device.type == "cpu" and not _native._compiling() and not bool(mask.any())


def _empty(sh, sw, th, tw, *, mask, reduction, return_entropy, **kw):
    """The result with no row to compute: zeros of the right shape whose backward gives zero
    gradients (a fully masked micro-batch must not break ``loss.backward()``)."""
    div, ent = reference.fused_linear_divergence(sh[:0], sw, th[:0], tw, return_entropy=True, **kw)
    if reduction == "sum":
        div = div.sum()
    else:
        idx = torch.zeros(0, dtype=torch.long, device=sh.device)
        div = div.new_zeros(sh.shape[0]).index_copy(0, idx, div)
    ent = ent.new_zeros(sh.shape[0])
    return (div, ent) if return_entropy else div


# ------------------------------------------------------------------ C++ CPU backend


def _fused_linear_divergence_cpp(student_hidden, student_weight, teacher_hidden, teacher_weight, *, beta=0.5,
                                 temperature=1.0, mask=None, student_bias=None, teacher_bias=None, reduction="none",
                                 return_entropy=False, chunk_size=None):
    """csrc/cpu/fused_divergence.cpp: one chunk of logits of each model at a time.

    A mask is applied by compacting the kept rows first (index_select; autograd scatters the
    gradient back), so masked rows are never projected; under torch.compile, where the kept
    count would be data-dependent, the kernel skips them instead. Temperatures below
    ``reference.NATIVE_DIVERGENCE_MIN_TEMPERATURE`` run the reference.
    """
    if temperature < reference.NATIVE_DIVERGENCE_MIN_TEMPERATURE:
        return reference.fused_linear_divergence(
            student_hidden, student_weight, teacher_hidden, teacher_weight, beta=beta, temperature=temperature,
            mask=mask, student_bias=student_bias, teacher_bias=teacher_bias, reduction=reduction,
            return_entropy=return_entropy, chunk_size=chunk_size)
    N = student_hidden.shape[0]
    # the teacher is a constant: detached, so that its requires_grad never routes a call
    # through autograd nor gives the output a grad_fn
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    teacher_bias = teacher_bias.detach() if teacher_bias is not None else None
    idx = None
    if mask is not None:
        keep = mask.to(torch.bool)
        mask = keep
        if not _native._compiling():
            idx = keep.nonzero().squeeze(1)
            if idx.numel() == N:
                idx = None
            else:
                student_hidden = student_hidden.index_select(0, idx)
                teacher_hidden = teacher_hidden.index_select(0, idx)
            mask = None
    args = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask,
            float(beta), float(temperature), bool(return_entropy))
    needs = [t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias)]
    if reduction == "sum" and torch.is_grad_enabled() and any(needs):
        # the gradients of the sum come out of the forward's logits; backward only scales them
        div, ent, *_ = _native.call(_SUM_FN, "fused_linear_divergence_sum_fwd", *args, *needs, int(chunk_size or 0))
    else:
        div, ent = _native.call(_FN, "fused_linear_divergence_fwd", *args, int(chunk_size or 0))
        if reduction == "sum":
            div = div.sum()
    if idx is not None:
        if reduction == "none":
            div = div.new_zeros(N).index_copy(0, idx, div)
        if return_entropy:
            ent = ent.new_zeros(N).index_copy(0, idx, ent)
    return (div, ent) if return_entropy else div


def _no_autocast(device: torch.device):
    """The op computes in its inputs' dtypes whatever autocast region encloses it, on every
    backend: the reference's matmuls (and the C++ kernel's at::mm, which then failed with
    "expected scalar type Float but found Half") would otherwise follow the region into bf16 /
    fp16 logits; the inputs' dtypes already say the precision (bf16 / fp16 ones are read as they
    are, accumulated in fp32)."""
    return torch.autocast(device.type, enabled=False)


def _fwd_fake(sh, sw, sb, th, tw, tb, mask, beta, temperature, return_entropy, chunk_size):
    n, dt = sh.shape[0], out_dtype(sh.dtype)
    return sh.new_empty((n,), dtype=dt), sh.new_empty((n if return_entropy else 0,), dtype=dt)


def _grads_fake(sh, sw, sb, need_h, need_w, need_b):
    empty = sh.new_empty((0,))
    return (torch.empty_like(sh) if need_h else empty, torch.empty_like(sw) if need_w else empty,
            torch.empty_like(sb) if need_b and sb is not None else empty)


def _bwd_fake(grad, sh, sw, sb, th, tw, tb, mask, beta, temperature, need_h, need_w, need_b, chunk_size):
    return _grads_fake(sh, sw, sb, need_h, need_w, need_b)


def _sum_fwd_fake(sh, sw, sb, th, tw, tb, mask, beta, temperature, return_entropy, need_h, need_w, need_b,
                  chunk_size):
    div, ent = _fwd_fake(sh, sw, sb, th, tw, tb, mask, beta, temperature, return_entropy, chunk_size)
    return (div.new_empty(()), ent, *_grads_fake(sh, sw, sb, need_h, need_w, need_b))


def _setup(ctx, inputs, output):
    sh, sw, sb, th, tw, tb, mask, beta, temperature, _, chunk_size = inputs
    ctx.save_for_backward(sh, sw, sb, th, tw, tb, mask)
    ctx.beta, ctx.temperature, ctx.chunk_size = beta, temperature, chunk_size


def _backward(ctx, grad_div, _grad_entropy):
    sh, sw, sb, th, tw, tb, mask = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_div is None or not (need_h or need_w or need_b):
        return (None,) * 11
    # the logits are recomputed chunk by chunk, each row's gradient scaled by its grad_div
    with _no_autocast(sh.device):  # (a backward called inside the region)
        gh, gw, gb = torch.ops.rlhf_fast.fused_linear_divergence_bwd(
            grad_div, sh, sw, sb, th, tw, tb, mask, ctx.beta, ctx.temperature, need_h, need_w,
            need_b and sb is not None, ctx.chunk_size)
    return (gh if need_h else None, gw if need_w else None, gb if need_b and sb is not None else None,
            *(None,) * 8)


def _sum_setup(ctx, inputs, output):
    _, gh, gw, gb = output[1:]
    # the inputs only for _sum_reference_backward
    ctx.save_for_backward(gh, gw, gb, *inputs[:7])
    ctx.needs = inputs[10:13]
    ctx.beta, ctx.temperature = inputs[7], inputs[8]


def _reference_grads(ctx, inputs, grad_div, reduction):
    sh, sw, sb, th, tw, tb, mask = inputs

    def f(h, w, b):
        return reference.fused_linear_divergence(h, w, th, tw, beta=ctx.beta, temperature=ctx.temperature, mask=mask,
                                                 student_bias=b, teacher_bias=tb, reduction=reduction)

    with _no_autocast(sh.device):
        return _native.reference_grads(f, (sh, sw, sb), (grad_div,))


def _reference_backward(ctx, grad_div, _grad_entropy):
    return _reference_grads(ctx, ctx.saved_tensors, grad_div, "none") + (None,) * 8


def _sum_reference_backward(ctx, grad_loss, *_):
    return _reference_grads(ctx, ctx.saved_tensors[3:], grad_loss, "sum") + (None,) * 11


def _sum_backward(ctx, grad_loss, *_):
    gh, gw, gb = ctx.saved_tensors[:3]
    if grad_loss is None:
        return (None,) * 14
    if _unit(grad_loss):
        # loss.backward(): the gradients as they are, no [V, H] product (8% of a CPU step)
        return (*(g if need else None for g, need in zip((gh, gw, gb), ctx.needs)), *(None,) * 11)
    # the 0-dim grad_loss keeps each gradient's dtype (type promotion ignores 0-dim tensors)
    return (*(g * grad_loss if need else None for g, need in zip((gh, gw, gb), ctx.needs)), *(None,) * 11)


def _unit(grad_loss: torch.Tensor) -> bool:
    # read on the CPU only (free there; a host sync on a GPU) and never while tracing: not under
    # torch.compile, nor a fake / functional tensor, nor under a dispatch mode (make_fx, opcheck)
    return (type(grad_loss) is torch.Tensor and grad_loss.device.type == "cpu" and not _native._compiling()
            and torch._C._len_torch_dispatch_stack() == 0 and grad_loss.item() == 1.0)


def _built() -> bool:
    # an rlhf_fast._C built before this op: the other ops keep their kernels, this one the reference
    return _native.has_native() and hasattr(torch.ops.rlhf_fast, "fused_linear_divergence_sum_fwd")


_FN = _SUM_FN = None
if _built():
    # the entropy (output 1) has no gradient; nor do the sum op's precomputed gradients (2, 3, 4)
    _FN = _native.register_meta_and_autograd("fused_linear_divergence_fwd", _fwd_fake, _backward, _setup,
                                             non_differentiable=(1,), reference_backward=_reference_backward)
    _native.register_meta_and_autograd("fused_linear_divergence_bwd", _bwd_fake)
    _SUM_FN = _native.register_meta_and_autograd("fused_linear_divergence_sum_fwd", _sum_fwd_fake, _sum_backward,
                                                 _sum_setup, non_differentiable=(1, 2, 3, 4),
                                                 reference_backward=_sum_reference_backward)
    _dispatch.register("fused_linear_divergence", "cpp", _fused_linear_divergence_cpp)

_dispatch.register("fused_linear_divergence", "torch", reference.fused_linear_divergence)
