"""token_logprobs: per-token log-probs (and entropy) of labels under softmax(logits / T).

Backends: ``torch`` (reference), ``cpp`` (csrc/cpu/logprobs.cpp), ``triton``
(rlhf_fast/kernels/token_logprobs.py).
"""

from __future__ import annotations

import torch

from . import _dispatch, _native, _validate, reference
from .reference import out_dtype


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
):
    """log softmax(logits / temperature)[labels], and optionally the entropy.

    logits ``[..., V]`` bf16/fp16/fp32/fp64, labels ``[...]`` integer in ``[0, V)`` or
    ``ignore_index`` (which gives 0). Returns logp ``[...]`` — and entropy ``[...]`` when
    ``return_entropy`` — float32 (float64 for float64 logits). Differentiable in logits;
    native backends keep no ``[..., V]`` float32 temporary in forward.
    """
    _validate.tensor("logits", logits, floating=True, min_ndim=1)
    _validate.tensor("labels", labels, integer=True)
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    _validate.same_device(("logits", "labels"), (logits, labels))
    temperature = _validate.temperature(temperature)
    ignore_index = _validate.integer("ignore_index", ignore_index)
    return_entropy = _validate.flag("return_entropy", return_entropy)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    _validate.labels_in_range("labels", labels, logits.shape[-1], ignore_index)
    return _dispatch.call(
        "token_logprobs", logits.device, logits, labels,
        temperature=temperature, return_entropy=return_entropy, ignore_index=ignore_index,
    )



# ------------------------------------------------------------------ C++ CPU backend


def _token_logprobs_cpp(logits, labels, *, temperature=1.0, return_entropy=False, ignore_index=-100):
    """csrc/cpu/logprobs.cpp on ``[..., V]`` logits: flattened to ``[N, V]`` rows and back."""
    shape = labels.shape
    logp, entropy, _ = _native.call(
        _FN, "token_logprobs_fwd", logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
        float(temperature), bool(return_entropy), int(ignore_index),
    )
    if return_entropy:
        return logp.reshape(shape), entropy.reshape(shape)
    return logp.reshape(shape)


def _fwd_fake(logits, labels, temperature, return_entropy, ignore_index):
    n = logits.shape[0]
    dt = out_dtype(logits.dtype)
    return (logits.new_empty((n,), dtype=dt), logits.new_empty((n if return_entropy else 0,), dtype=dt),
            logits.new_empty((n,), dtype=dt))


def _setup(ctx, inputs, output):
    logits, labels, temperature, return_entropy, ignore_index = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.temperature = temperature
    ctx.return_entropy = return_entropy
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = lse.new_zeros(lse.shape)
    # lse is an internal output: its gradient is never used
    grad = torch.ops.rlhf_fast.token_logprobs_bwd(
        grad_logp, grad_entropy, logits, labels, lse, entropy, ctx.temperature, ctx.ignore_index
    )
    return grad, None, None, None, None


def _reference_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, labels, _, _ = ctx.saved_tensors

    def f(x):
        return reference.token_logprobs(x, labels, temperature=ctx.temperature, return_entropy=ctx.return_entropy,
                                        ignore_index=ctx.ignore_index)

    return _native.reference_grads(f, (logits,), (grad_logp, grad_entropy)) + (None,) * 4


# lse (output 2) is internal
_FN = _native.register_meta_and_autograd("token_logprobs_fwd", _fwd_fake, _backward, _setup, non_differentiable=(2,),
                                         reference_backward=_reference_backward)
_native.register_meta_and_autograd(
    "token_logprobs_bwd", lambda gl, ge, logits, labels, lse, ent, t, ii: torch.empty_like(logits)
)

_dispatch.register("token_logprobs", "torch", reference.token_logprobs)
_dispatch.register("token_logprobs", "cpp", _token_logprobs_cpp)
