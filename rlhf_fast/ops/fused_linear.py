"""fused_linear_logprobs and fused_linear_policy_loss: the LM head fused with the
log-softmax (and the PPO loss), never holding more than one chunk of logits.

Backends: ``torch`` (reference, materialises logits), ``cpp`` (csrc/cpu/fused_linear.cpp),
``triton`` (rlhf_fast/kernels/fused_linear.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch, _native, _validate, kl, ppo_loss, reference
from .reference import AGG_MODES, KL_KINDS, out_dtype


def _check_head(hidden, weight, bias, labels, temperature, ignore_index, chunk_size, hidden_ndim):
    _validate.linear_head(hidden, weight, bias, hidden_ndim=hidden_ndim)
    if weight.shape[0] == 0:  # no distribution: the backends failed unclearly (reference, Triton) or gave 0 (C++)
        raise ValueError(f"weight must have a non-empty vocabulary (V > 0 rows), got shape {tuple(weight.shape)}")
    _validate.tensor("labels", labels, integer=True)
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    _validate.same_device(("hidden", "weight", "labels", "bias"), (hidden, weight, labels, bias))
    temperature = _validate.temperature(temperature)
    ignore_index = _validate.integer("ignore_index", ignore_index)
    chunk_size = _validate.chunk_size(chunk_size, labels.numel())
    _validate.labels_in_range("labels", labels, weight.shape[0], ignore_index)
    return temperature, ignore_index, chunk_size


def _dense_bias(bias):
    # an expanded (stride-0) or strided bias: the Triton kernels read it as contiguous
    # (silently wrong log-probs); a contiguous copy of [V] is cheap and keeps the gradient
    return bias if bias is None or bias.is_contiguous() else bias.contiguous()


def _no_autocast(device: torch.device):
    """The ops compute in their inputs' dtypes whatever autocast region encloses them, on every
    backend, as fused_linear_divergence: the reference's matmul (and the C++ kernel's at::mm)
    followed the region into bf16 / fp16 logits while the Triton kernel did not, the C++
    backward recomputed fp32 logits against a bf16 lse (a biased gradient), and a backward run
    inside the region failed on a bf16 chunk of logits ("Expected out tensor to have dtype")."""
    return torch.autocast(device.type, enabled=False)


def _coef_scalar(coef, like: torch.Tensor):
    # a [1] or float64 tensor coefficient would broadcast the loss to [1] or promote its dtype
    # (as a normalizer would): every backend sees a 0-dim tensor in the loss dtype; the
    # coefficient keeps its gradient, if any
    if isinstance(coef, torch.Tensor):
        return coef.reshape(()).to(out_dtype(like.dtype))
    return coef


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
    """Log-probs (and entropy) of ``labels`` under softmax((hidden @ weight.T + bias) / T).

    hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None, labels ``[N]`` int (or
    ``ignore_index``, giving 0). Returns logp ``[N]`` (and entropy ``[N]``) float32 (float64 for
    float64 hidden). Gradients flow to hidden, weight and bias (a frozen weight gets no [V, H]
    buffer). Native backends never hold more than ``chunk_size`` rows of logits at once. The op
    computes in its inputs' dtypes whatever autocast region encloses it, on every backend.

    ``return_top1``: one more output last, ``[N]`` bool, whether the label is the argmax of its
    row's logits (``logits.argmax(-1) == labels``: on a tie only the first maximal index counts,
    as torch.argmax and TRL's ``is_top1``); False at ``ignore_index``. From the same pass as the
    log-probs; no gradient.
    """
    temperature, ignore_index, chunk_size = _check_head(hidden, weight, bias, labels, temperature, ignore_index,
                                                        chunk_size, 2)
    return_entropy = _validate.flag("return_entropy", return_entropy)
    return_top1 = _validate.flag("return_top1", return_top1)
    bias = _dense_bias(bias)
    if hidden.shape[0] == 0:
        # no rows: nothing to launch (the Triton launcher divided by zero here)
        return reference.fused_linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                               return_entropy=return_entropy, ignore_index=ignore_index,
                                               return_top1=return_top1)
    # the default call stays exactly the backends' old one
    top1 = {"return_top1": True} if return_top1 else {}
    with _no_autocast(hidden.device):
        return _dispatch.call(
            "fused_linear_logprobs", hidden.device, hidden, weight, labels, bias=bias, temperature=temperature,
            return_entropy=return_entropy, chunk_size=chunk_size, ignore_index=ignore_index, **top1,
        )


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
    normalizer=None,
    bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    ignore_index: int = -100,
):
    """The policy-loss step from the last hidden state, never holding the ``[B·T, V]`` logits.

    hidden ``[B, T, H]``, weight ``[V, H]``; labels, old_logp, advantages, mask (and ref_logp)
    ``[B, T]``. loss = agg(ppo token loss + kl_coef·KL(logp, ref_logp) − entropy_coef·entropy),
    every term aggregated with the same ``agg`` (and ``normalizer``, a number or device tensor
    replacing the denominator). Returns ``(loss, stats)``: loss 0-dim float32; stats as
    :func:`ppo_policy_loss` plus ``kl``, ``entropy`` (masked means) and ``logp`` ``[B, T]``
    (detached). Gradients to hidden, weight (and bias); tensor coefficients keep theirs. In
    the inputs' dtypes whatever autocast region encloses it.
    """
    temperature, ignore_index, chunk_size = _check_head(hidden, weight, bias, labels, temperature, ignore_index,
                                                        chunk_size, 3)
    # numpy scalars (a config array's entry, a schedule) are numbers: Python ones from here on
    clip_low, clip_high, dual_clip, kl_coef, entropy_coef, normalizer = map(
        _validate.real_like, (clip_low, clip_high, dual_clip, kl_coef, entropy_coef, normalizer))
    shape = tuple(labels.shape)
    for name, t in (("old_logp", old_logp), ("advantages", advantages)):
        _validate.tensor(name, t, floating=True)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape [B, T] = {shape}, got {tuple(t.shape)}")
    if ref_logp is not None:
        _validate.tensor("ref_logp", ref_logp, floating=True)
        if tuple(ref_logp.shape) != shape:
            raise ValueError(f"ref_logp must have shape [B, T] = {shape}, got {tuple(ref_logp.shape)}")
    _validate.mask("mask", mask, shape)
    _validate.same_device(("hidden", "old_logp", "advantages", "mask", "ref_logp"),
                          (hidden, old_logp, advantages, mask, ref_logp))
    _validate.choice("kl_kind", kl_kind, KL_KINDS)
    _validate.choice("agg", agg, AGG_MODES)
    _validate.nonneg("clip_low", clip_low)
    _validate.nonneg("clip_high", clip_high, allow_none=True)
    _validate.dual_clip(dual_clip)
    _validate.coefficient("kl_coef", kl_coef)
    _validate.coefficient("entropy_coef", entropy_coef)
    kl_coef, entropy_coef = _coef_scalar(kl_coef, hidden), _coef_scalar(entropy_coef, hidden)
    ppo_loss.check_normalizer(normalizer, hidden)
    normalizer = ppo_loss._as_scalar(normalizer, hidden)
    bias = _dense_bias(bias)
    if hidden.shape[0] == 0 or hidden.shape[1] == 0:
        # an empty batch: the reference's defined result (loss 0), with no kernel to launch
        return reference.fused_linear_policy_loss(
            hidden, weight, labels, old_logp, advantages, mask, ref_logp=ref_logp, kl_coef=kl_coef, kl_kind=kl_kind,
            entropy_coef=entropy_coef, temperature=temperature, clip_low=clip_low, clip_high=clip_high,
            dual_clip=dual_clip, agg=agg, normalizer=normalizer, bias=bias, chunk_size=chunk_size,
            ignore_index=ignore_index)
    with _no_autocast(hidden.device):
        return _dispatch.call(
            "fused_linear_policy_loss", hidden.device, hidden, weight, labels, old_logp, advantages, mask,
            ref_logp=ref_logp, kl_coef=kl_coef, kl_kind=kl_kind, entropy_coef=entropy_coef, temperature=temperature,
            clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg, normalizer=normalizer, bias=bias,
            chunk_size=chunk_size, ignore_index=ignore_index,
        )


# ------------------------------------------------------------------ PyTorch reference backend


# ------------------------------------------------------------------ C++ CPU backend


def _fused_linear_logprobs_cpp(hidden, weight, labels, *, bias=None, temperature=1.0, return_entropy=False,
                               chunk_size=None, ignore_index=-100, return_top1=False):
    """csrc/cpu/fused_linear.cpp: hidden ``[N, H]``, weight ``[V, H]``; one chunk of logits at a time."""
    args = (hidden, weight, bias, labels.long(), float(temperature), bool(return_entropy), int(ignore_index),
            int(chunk_size or 0))
    # return_argmax is passed only when wanted: the default call is the op's old one
    out = _native.call(_FN, "fused_linear_logprobs_fwd", *args, *((True,) if return_top1 else ()))
    logp, entropy = out[0], out[1]
    res = (logp, entropy) if return_entropy else (logp,)
    if return_top1:
        res += (reference.top1_from_argmax(out[3], labels, ignore_index),)
    return res if len(res) > 1 else logp


def _fused_linear_policy_loss_cpp(hidden, weight, labels, old_logp, advantages, mask, *, ref_logp=None, kl_coef=0.0,
                                  kl_kind="k3", entropy_coef=0.0, temperature=1.0, clip_low=0.2, clip_high=None,
                                  dual_clip=None, agg="token-mean", normalizer=None, bias=None, chunk_size=None,
                                  ignore_index=-100):
    """The native LM head + log-probs, then the reference epilogue through autograd: the
    per-token tensors are [B, T], so memory stays at one chunk of logits."""
    B, T, H = hidden.shape
    logp, entropy = _fused_linear_logprobs_cpp(
        hidden.reshape(B * T, H), weight, labels.reshape(B * T), bias=bias, temperature=temperature,
        return_entropy=True, chunk_size=chunk_size, ignore_index=ignore_index,
    )
    return reference.policy_loss_from_logp(
        logp.reshape(B, T), entropy.reshape(B, T), old_logp, advantages, mask, ref_logp=ref_logp, kl_coef=kl_coef,
        kl_kind=kl_kind, entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        agg=agg, normalizer=normalizer, kl_fn=kl.kl_penalty,
    )


def _fwd_fake(hidden, weight, bias, labels, temperature, return_entropy, ignore_index, chunk_size,
              return_argmax=False):
    n = hidden.shape[0]
    dt = out_dtype(hidden.dtype)
    out = (hidden.new_empty((n,), dtype=dt), hidden.new_empty((n if return_entropy else 0,), dtype=dt),
           hidden.new_empty((n,), dtype=dt))
    if _FWD_RETURNS > 3:
        out += (hidden.new_empty((n if return_argmax else 0,), dtype=torch.long),)
    return out


def _bwd_fake(gl, ge, hidden, weight, bias, labels, lse, entropy, temperature, ignore_index, chunk_size,
              need_weight=True):
    def none():  # a [0] tensor of its own for each output not formed
        return hidden.new_empty((0,), dtype=out_dtype(hidden.dtype))

    return (torch.empty_like(hidden), torch.empty_like(weight) if need_weight else none(),
            torch.empty_like(bias) if bias is not None else none())


def _setup(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, _, ignore_index, chunk_size = inputs[:8]
    _, entropy, lse = output[:3]
    ctx.n_args = len(inputs)  # 9 with return_argmax
    ctx.return_entropy = inputs[5]
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.chunk_size = chunk_size


def _backward(ctx, grad_logp, grad_entropy, _grad_lse, *_grad_argmax):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = lse.new_zeros(lse.shape)
    # a frozen head (LoRA on the backbone) forms no [V, H] weight gradient
    need_w, need_b = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
    with _no_autocast(hidden.device):  # (a backward run inside an autocast region)
        # the logits are recomputed chunk by chunk; lse is internal and gets no gradient
        grad_hidden, grad_weight, grad_bias = torch.ops.rlhf_fast.fused_linear_logprobs_bwd(
            grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy, ctx.temperature,
            ctx.ignore_index, ctx.chunk_size, *(() if need_w else (False,)),  # the default call: the old one
        )
    return ((grad_hidden, grad_weight if need_w else None, grad_bias if need_b else None)
            + (None,) * (ctx.n_args - 3))


def _fwd_returns() -> int:
    """Outputs of the built fused_linear_logprobs_fwd: 4 (with argmax); 3 from a build older than
    the argmax output, which the default call still runs."""
    if not _native.has_native():
        return 4
    return len(torch.ops.rlhf_fast.fused_linear_logprobs_fwd.default._schema.returns)


_FWD_RETURNS = _fwd_returns()
# lse (output 2) is internal; argmax (output 3) is an integer, never differentiable
def _reference_backward(ctx, grad_logp, grad_entropy, _grad_lse, *_grad_argmax):
    hidden, weight, bias, labels, _, _ = ctx.saved_tensors

    def f(h, w, b):
        return reference.fused_linear_logprobs(h, w, labels, bias=b, temperature=ctx.temperature,
                                               return_entropy=ctx.return_entropy, ignore_index=ctx.ignore_index)

    with _no_autocast(hidden.device):
        grads = _native.reference_grads(f, (hidden, weight, bias), (grad_logp, grad_entropy))
    return grads + (None,) * (ctx.n_args - 3)


_FN = _native.register_meta_and_autograd("fused_linear_logprobs_fwd", _fwd_fake, _backward, _setup,
                                         non_differentiable=(2,), reference_backward=_reference_backward)
_native.register_meta_and_autograd("fused_linear_logprobs_bwd", _bwd_fake)

_dispatch.register("fused_linear_logprobs", "torch", reference.fused_linear_logprobs)
_dispatch.register("fused_linear_logprobs", "cpp", _fused_linear_logprobs_cpp)
_dispatch.register("fused_linear_policy_loss", "torch", reference.fused_linear_policy_loss)
_dispatch.register("fused_linear_policy_loss", "cpp", _fused_linear_policy_loss_cpp)
