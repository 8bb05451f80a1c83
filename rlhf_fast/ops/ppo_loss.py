"""ppo_policy_loss and ppo_value_loss: clipped PPO losses, one fused pass forward and
backward, with their statistics.

Backends: ``torch`` (reference), ``cpp`` (csrc/cpu/ppo_loss.cpp), ``triton``
(rlhf_fast/kernels/ppo_loss.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch, _native, _validate, reference
from .reference import AGG_MODES, out_dtype


def check_normalizer(normalizer, like: Optional[torch.Tensor] = None) -> None:
    if normalizer is None or isinstance(normalizer, torch.Tensor):
        if isinstance(normalizer, torch.Tensor):
            if normalizer.numel() != 1:
                raise ValueError(
                    f"normalizer must be a number or a 1-element tensor, got shape {tuple(normalizer.shape)}")
            if normalizer.dtype.is_complex or normalizer.dtype == torch.bool:
                raise TypeError(f"normalizer must be a real (floating or integer) tensor, got {normalizer.dtype}")
            # the device's own tensor, or a CPU one (moved without a sync); never a meta tensor
            # for real data
            if like is not None and normalizer.device != like.device and normalizer.device.type != "cpu":
                raise ValueError(f"normalizer is on {normalizer.device} but the inputs are on {like.device}; "
                                 "pass it on their device or the CPU")
        return
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) or not normalizer > 0 or \
            normalizer == float("inf"):
        raise ValueError(f"normalizer must be a positive finite number, a 1-element tensor or None, got {normalizer!r}")
    _validate.as_float("normalizer", normalizer)


def _as_scalar(normalizer, like: torch.Tensor):
    # a [1] or float64 tensor would broadcast the loss to [1] or promote its dtype: every
    # backend sees a 0-dim tensor in the loss dtype. The count is a constant on every
    # backend (never differentiated), so a normaliser that requires grad is detached here.
    if isinstance(normalizer, torch.Tensor):
        return normalizer.detach().reshape(()).to(out_dtype(like.dtype))
    return normalizer


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
    normalizer=None,
):
    """Clipped PPO policy loss over ``[B, T]`` logp, old_logp, advantages and mask.

    Per token r = exp(logp − old_logp) (log-ratio clamped to ±20),
    loss = max(−A·r, −A·clip(r, 1−clip_low, 1+clip_high)) (clip_high defaults to clip_low);
    with ``dual_clip=c`` tokens with A < 0 take min(that, −A·c). ``agg`` is one of
    token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm;
    ``normalizer`` (number or device tensor) replaces its denominator. Returns
    ``(loss, stats)``: loss 0-dim float32 (float64 for float64 logp), differentiable in logp;
    stats: clip_frac, dual_clip_frac, approx_kl, ratio_mean, ratio_max (0-dim, detached).
    """
    # numpy scalars (a config array's entry) are numbers: Python ones from here on
    clip_low, clip_high, dual_clip, normalizer = map(_validate.real_like,
                                                     (clip_low, clip_high, dual_clip, normalizer))
    names = ("logp", "old_logp", "advantages")
    for n, t in zip(names, (logp, old_logp, advantages)):
        _validate.tensor(n, t, floating=True, ndim=2)
    _validate.same_shape(names, (logp, old_logp, advantages))
    _validate.mask("mask", mask, logp.shape)
    _validate.same_device(names + ("mask",), (logp, old_logp, advantages, mask))
    _validate.nonneg("clip_low", clip_low)
    _validate.nonneg("clip_high", clip_high, allow_none=True)
    _validate.dual_clip(dual_clip)
    _validate.choice("agg", agg, AGG_MODES)
    check_normalizer(normalizer, logp)
    normalizer = _as_scalar(normalizer, logp)
    if logp.numel() == 0:
        # an empty batch (B = 0 or T = 0): the reference's defined result, loss 0
        return reference.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                                         dual_clip=dual_clip, agg=agg, normalizer=normalizer)
    return _dispatch.call("ppo_policy_loss", logp.device, logp, old_logp, advantages, mask, clip_low=clip_low,
                          clip_high=clip_high, dual_clip=dual_clip, agg=agg, normalizer=normalizer)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: Optional[float] = 0.2,
    agg: str = "token-mean",
    normalizer=None,
):
    """Clipped value loss over ``[B, T]`` values, old_values, returns and mask.

    Per token 0.5·max((v − R)², (old + clip(v − old, −c, c) − R)²); ``clip=None`` gives
    0.5·(v − R)². Aggregated as :func:`ppo_policy_loss`. Returns ``(loss, stats)`` with stats
    clip_frac and values_mean; differentiable in values.
    """
    clip, normalizer = _validate.real_like(clip), _validate.real_like(normalizer)  # numpy scalars: numbers
    names = ("values", "old_values", "returns")
    for n, t in zip(names, (values, old_values, returns)):
        _validate.tensor(n, t, floating=True, ndim=2)
    _validate.same_shape(names, (values, old_values, returns))
    _validate.mask("mask", mask, values.shape)
    _validate.same_device(names + ("mask",), (values, old_values, returns, mask))
    _validate.nonneg("clip", clip, allow_none=True)
    _validate.choice("agg", agg, AGG_MODES)
    check_normalizer(normalizer, values)
    normalizer = _as_scalar(normalizer, values)
    if values.numel() == 0:
        return reference.ppo_value_loss(values, old_values, returns, mask, clip=clip, agg=agg, normalizer=normalizer)
    return _dispatch.call("ppo_value_loss", values.device, values, old_values, returns, mask, clip=clip, agg=agg,
                          normalizer=normalizer)


# ------------------------------------------------------------------ C++ CPU backend

# entries of the stats tensors of the native ops (csrc/ops.cpp), in order
POLICY_STATS = ("clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean", "ratio_max")
VALUE_STATS = ("clip_frac", "values_mean")


def _stats_dict(names, stats: torch.Tensor) -> dict:
    return dict(zip(names, stats.detach().unbind(0)))


def _normalizer(normalizer, like: torch.Tensor):
    # a 0-dim tensor in the loss dtype; the count is a constant, never differentiated
    norm = _native.as_normalizer(normalizer, like.new_empty((), dtype=out_dtype(like.dtype)))
    return None if norm is None else norm.detach()


def _policy_cpp(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None,
                agg="token-mean", normalizer=None):
    loss, stats = _native.call(
        _POLICY_FN, "ppo_policy_loss_fwd", logp, old_logp.detach(), advantages.detach(), mask, float(clip_low),
        float(clip_low if clip_high is None else clip_high), None if dual_clip is None else float(dual_clip), agg,
        _normalizer(normalizer, logp))
    return loss, _stats_dict(POLICY_STATS, stats)


def _value_cpp(values, old_values, returns, mask, *, clip=0.2, agg="token-mean", normalizer=None):
    loss, stats = _native.call(
        _VALUE_FN, "ppo_value_loss_fwd", values, old_values.detach(), returns.detach(), mask,
        None if clip is None else float(clip), agg, _normalizer(normalizer, values))
    return loss, _stats_dict(VALUE_STATS, stats)


def _loss_fake(n_stats):
    def fake(x, *args):
        dt = out_dtype(x.dtype)
        return x.new_empty((), dtype=dt), x.new_empty((n_stats,), dtype=dt)

    return fake


def _setup(ctx, inputs, output):
    # inputs: the three [B, T] tensors and the mask, the float/str arguments, the normalizer
    ctx.save_for_backward(*inputs[:4], inputs[-1])
    ctx.args = inputs[4:-1]


def _policy_backward(ctx, grad_loss, grad_stats):
    logp, old_logp, advantages, mask, normalizer = ctx.saved_tensors
    g = torch.ops.rlhf_fast.ppo_policy_loss_bwd(grad_loss, logp, old_logp, advantages, mask, *ctx.args, normalizer)
    return (g,) + (None,) * 8


def _value_backward(ctx, grad_loss, grad_stats):
    values, old_values, returns, mask, normalizer = ctx.saved_tensors
    g = torch.ops.rlhf_fast.ppo_value_loss_bwd(grad_loss, values, old_values, returns, mask, *ctx.args, normalizer)
    return (g,) + (None,) * 6


def _policy_reference_backward(ctx, grad_loss, grad_stats):
    logp, old_logp, advantages, mask, normalizer = ctx.saved_tensors
    clip_low, clip_high, dual_clip, agg = ctx.args

    def f(lp):
        return reference.ppo_policy_loss(lp, old_logp, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                                         dual_clip=dual_clip, agg=agg, normalizer=normalizer)[0]

    return _native.reference_grads(f, (logp,), (grad_loss,)) + (None,) * 8


def _value_reference_backward(ctx, grad_loss, grad_stats):
    values, old_values, returns, mask, normalizer = ctx.saved_tensors
    clip, agg = ctx.args

    def f(v):
        return reference.ppo_value_loss(v, old_values, returns, mask, clip=clip, agg=agg, normalizer=normalizer)[0]

    return _native.reference_grads(f, (values,), (grad_loss,)) + (None,) * 6


# the stats (output 1) are detached statistics
_POLICY_FN = _native.register_meta_and_autograd("ppo_policy_loss_fwd", _loss_fake(len(POLICY_STATS)), _policy_backward,
                                                _setup, non_differentiable=(1,),
                                                reference_backward=_policy_reference_backward)
_native.register_meta_and_autograd("ppo_policy_loss_bwd", lambda g, lp, *args: torch.empty_like(lp))
_VALUE_FN = _native.register_meta_and_autograd("ppo_value_loss_fwd", _loss_fake(len(VALUE_STATS)), _value_backward,
                                               _setup, non_differentiable=(1,),
                                               reference_backward=_value_reference_backward)
_native.register_meta_and_autograd("ppo_value_loss_bwd", lambda g, v, *args: torch.empty_like(v))

_dispatch.register("ppo_policy_loss", "torch", reference.ppo_policy_loss)
_dispatch.register("ppo_value_loss", "torch", reference.ppo_value_loss)
_dispatch.register("ppo_policy_loss", "cpp", _policy_cpp)
_dispatch.register("ppo_value_loss", "cpp", _value_cpp)
