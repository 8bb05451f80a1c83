"""kl_penalty: per-token KL estimators between policy and reference log-probs.

Backends: ``torch`` (reference), ``cpp`` (csrc/cpu/kl.cpp), ``triton`` (rlhf_fast/kernels/kl.py).
"""

from __future__ import annotations

import torch

from . import _dispatch, _native, _validate, reference
from .reference import KL_KINDS, out_dtype


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Elementwise KL estimate between policy log-probs ``logp`` and ``ref_logp`` (same shape).

    kinds: ``k1`` = logp − ref, ``k2``/``mse`` = ½(logp − ref)², ``k3`` = exp(ref − logp) −
    (ref − logp) − 1 (non-negative, low variance), ``abs`` = |logp − ref|. Differentiable in
    ``logp``. Returns float32 (float64 for float64 input), same shape.
    """
    _validate.tensor("logp", logp, floating=True)
    _validate.tensor("ref_logp", ref_logp, floating=True)
    _validate.same_shape(("logp", "ref_logp"), (logp, ref_logp))
    _validate.same_device(("logp", "ref_logp"), (logp, ref_logp))
    _validate.choice("kind", kind, KL_KINDS)
    return _dispatch.call("kl_penalty", logp.device, logp, ref_logp, kind)


# ------------------------------------------------------------------ C++ CPU backend


def _kl_cpp(logp, ref_logp, kind="k1"):
    dt = torch.promote_types(logp.dtype, ref_logp.dtype)
    # the reference is a constant: no gradient flows to it
    return _native.call(_KL_FN, "kl_penalty_fwd", logp.to(dt), ref_logp.detach().to(dt), kind)


def _fake(logp, ref_logp, kind):
    return logp.new_empty(logp.shape, dtype=out_dtype(logp.dtype))


def _setup(ctx, inputs, output):
    logp, ref_logp, kind = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.kind = kind


def _backward(ctx, grad):
    logp, ref_logp = ctx.saved_tensors
    return torch.ops.rlhf_fast.kl_penalty_bwd(grad, logp, ref_logp, ctx.kind), None, None


def _reference_backward(ctx, grad):
    logp, ref_logp = ctx.saved_tensors
    f = lambda lp: reference.kl_penalty(lp, ref_logp, ctx.kind)  # noqa: E731
    return _native.reference_grads(f, (logp,), (grad,)) + (None, None)


_KL_FN = _native.register_meta_and_autograd("kl_penalty_fwd", _fake, _backward, _setup,
                                            reference_backward=_reference_backward)
_native.register_meta_and_autograd("kl_penalty_bwd", lambda g, lp, r, k: torch.empty_like(lp))

_dispatch.register("kl_penalty", "torch", reference.kl_penalty)
_dispatch.register("kl_penalty", "cpp", _kl_cpp)
