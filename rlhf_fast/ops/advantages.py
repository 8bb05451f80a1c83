"""Advantage estimators and masked statistics: gae, discounted_returns,
group_advantages, masked_mean, masked_whiten.

Backends: ``torch`` (reference), ``cpp`` (csrc/cpu/advantages.cpp), ``cuda``
(csrc/cuda/advantages.cu); gae and discounted_returns also ``triton``
(rlhf_fast/kernels/advantages.py: the GPU path when the extension has no CUDA kernels).
"""

from __future__ import annotations

import torch

from . import _dispatch, _native, _validate, reference
from .reference import GROUP_KINDS, out_dtype


def _check_rows(names, tensors, mask_name, mask):
    for n, t in zip(names, tensors):
        _validate.tensor(n, t, floating=True, ndim=2)
    _validate.same_shape(names, tensors)
    _validate.mask(mask_name, mask, tensors[0].shape)
    _validate.same_device(tuple(names) + (mask_name,), tuple(tensors) + (mask,))


def _check_discount(name, x):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not (0.0 <= x <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {x!r}")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation. rewards, values, mask ``[B, T]``.

    Masked positions are skipped (each row is the sequence of its unmasked tokens; left/right
    padding and holes all work); the value after a row's last unmasked token is 0. Returns
    ``(advantages, returns)`` ``[B, T]`` float32 (float64 for float64 input), 0 where masked.
    """
    _check_rows(("rewards", "values"), (rewards, values), "mask", mask)
    gamma, lam = _validate.real_like(gamma), _validate.real_like(lam)  # numpy scalars are numbers
    _check_discount("gamma", gamma)
    _check_discount("lam", lam)
    return _dispatch.call("gae", rewards.device, rewards, values, mask, gamma=gamma, lam=lam)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE returns G_t = r_t + γ·G_next over the unmasked tokens of each row.

    rewards, mask ``[B, T]``. Returns ``[B, T]`` float32 (float64 for float64), 0 where masked.
    """
    _check_rows(("rewards",), (rewards,), "mask", mask)
    gamma = _validate.real_like(gamma)  # a numpy scalar is a number
    _check_discount("gamma", gamma)
    return _dispatch.call("discounted_returns", rewards.device, rewards, mask, gamma=gamma)


def group_advantages(
    scores: torch.Tensor, group_size: int, *, kind: str = "grpo", normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Critic-free advantages of scores ``[B]`` in consecutive groups of ``group_size``.

    ``grpo``: (s − mean) / (std + eps), std unbiased as ``torch.std`` (groups of one give 0);
    ``rloo``: s − mean of the other answers; ``dr_grpo``: s − mean. Returns ``[B]`` float32
    (float64 for float64 scores).
    """
    _validate.tensor("scores", scores, floating=True, ndim=1)
    group_size = _validate.group_size(group_size, scores.shape[0])
    _validate.choice("kind", kind, GROUP_KINDS)
    if kind == "rloo" and group_size < 2:
        raise ValueError(f"group_size must be >= 2 for kind='rloo', got {group_size}")
    eps = _validate.real_like(eps)  # a numpy scalar is a number
    _validate.nonneg("eps", eps)
    normalize_std = _validate.flag("normalize_std", normalize_std)
    if scores.shape[0] == 0:
        # no groups (any group_size divides 0): nothing to launch; scores that require grad
        # keep their (empty) graph, as a non-empty batch's do
        return scores.to(out_dtype(scores.dtype)) * 0
    return _dispatch.call("group_advantages", scores.device, scores, group_size, kind=kind,
                          normalize_std=normalize_std, eps=eps)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None, *, group=None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is set (over ``dim`` if given; empty → 0).

    ``group``: a torch.distributed process group whose ranks' sums are all-reduced first.
    float32 result (float64 for float64 x).
    """
    _validate.tensor("x", x, floating=True)
    _validate.mask("mask", mask, x.shape)
    _validate.same_device(("x", "mask"), (x, mask))
    if dim is not None or group is not None:
        _check_dim(dim, x.dim())
        _check_group(group)
        return reference.masked_mean(x, mask, dim, group=group)
    return _dispatch.call("masked_mean", x.device, x, mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8, group=None):
    """(x − mean) / sqrt(var + eps), mean and unbiased variance over the masked entries.

    ``shift_mean=False`` adds the mean back (rescale only). Masked-out positions give 0.
    ``group``: all-reduce the statistics over a torch.distributed process group. Same shape
    as x, float32 (float64 for float64).
    """
    _validate.tensor("x", x, floating=True)
    _validate.mask("mask", mask, x.shape)
    _validate.same_device(("x", "mask"), (x, mask))
    eps = _validate.real_like(eps)  # a numpy scalar is a number
    _validate.nonneg("eps", eps)
    shift_mean = _validate.flag("shift_mean", shift_mean)
    if group is not None:
        _check_group(group)
        return reference.masked_whiten(x, mask, shift_mean=shift_mean, eps=eps, group=group)
    return _dispatch.call("masked_whiten", x.device, x, mask, shift_mean=shift_mean, eps=eps)


def _check_dim(dim, ndim: int) -> None:
    if dim is None:
        return
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    seen = set()
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"dim must be None, an int or a tuple of ints, got {dim!r}")
        if not -max(ndim, 1) <= d < max(ndim, 1):
            raise ValueError(f"dim must be in [{-max(ndim, 1)}, {max(ndim, 1) - 1}] for x of {ndim} dimension(s), "
                             f"got {d}")
        # (1, -1) names one dimension twice: torch.sum would raise a RuntimeError
        if d % max(ndim, 1) in seen:
            raise ValueError(f"dim must name each dimension once, got {dim!r} for x of {ndim} dimension(s)")
        seen.add(d % max(ndim, 1))


def _check_group(group) -> None:
    if group is None:
        return
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")


# ------------------------------------------------------------------ C++ CPU backend
# The advantage ops are not differentiated (advantages and returns are constants of the
# update). When an input does require grad, the glue hands over to the reference so the
# result keeps the reference's autograd graph instead of silently dropping it.


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _gae_cpp(rewards, values, mask, *, gamma=1.0, lam=0.95):
    if _wants_grad(rewards, values):
        return reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
    return torch.ops.rlhf_fast.gae(rewards, values, mask, float(gamma), float(lam))


def _returns_cpp(rewards, mask, *, gamma=1.0):
    if _wants_grad(rewards):
        return reference.discounted_returns(rewards, mask, gamma=gamma)
    return torch.ops.rlhf_fast.discounted_returns(rewards, mask, float(gamma))


def _group_cpp(scores, group_size, *, kind="grpo", normalize_std=True, eps=1e-6):
    if _wants_grad(scores):
        return reference.group_advantages(scores, group_size, kind=kind, normalize_std=normalize_std, eps=eps)
    return torch.ops.rlhf_fast.group_advantages(scores, int(group_size), kind, bool(normalize_std), float(eps))


def _masked_mean_cpp(x, mask, dim=None, *, group=None):
    if dim is not None or group is not None:
        return reference.masked_mean(x, mask, dim, group=group)
    return torch.ops.rlhf_fast.masked_mean(x, mask)


def _whiten_cpp(x, mask, *, shift_mean=True, eps=1e-8, group=None):
    if group is not None or _wants_grad(x):
        return reference.masked_whiten(x, mask, shift_mean=shift_mean, eps=eps, group=group)
    return torch.ops.rlhf_fast.masked_whiten(x, mask, bool(shift_mean), float(eps))


def _gae_fake(rewards, values, mask, gamma, lam):
    dt = out_dtype(torch.promote_types(rewards.dtype, values.dtype))
    return rewards.new_empty(rewards.shape, dtype=dt), rewards.new_empty(rewards.shape, dtype=dt)


def _masked_mean_setup(ctx, inputs, output):
    x, mask = inputs
    ctx.save_for_backward(mask)
    ctx.x_dtype = x.dtype


def _masked_mean_backward(ctx, grad):
    # masked_mean is a plain loss building block (entropy bonus, KL in the loss): d/dx = m / n
    (mask,) = ctx.saved_tensors
    m = (mask != 0).to(grad.dtype)  # a nonzero entry counts as set, as in the forward
    return (grad * m / m.sum().clamp(min=1)).to(ctx.x_dtype), None


_native.register_meta_and_autograd("gae", _gae_fake)
_native.register_meta_and_autograd(
    "discounted_returns", lambda r, m, gamma: r.new_empty(r.shape, dtype=out_dtype(r.dtype)))
_native.register_meta_and_autograd(
    "group_advantages", lambda s, g, kind, norm, eps: s.new_empty(s.shape, dtype=out_dtype(s.dtype)))
_native.register_meta_and_autograd(
    "masked_mean", lambda x, m: x.new_empty((), dtype=out_dtype(x.dtype)), _masked_mean_backward, _masked_mean_setup,
    # its backward is torch ops, differentiable again: a double backward (create_graph, a
    # Hessian-vector product) runs it too instead of being refused
    reference_backward=_masked_mean_backward)
_native.register_meta_and_autograd(
    "masked_whiten", lambda x, m, shift, eps: x.new_empty(x.shape, dtype=out_dtype(x.dtype)))

_dispatch.register("gae", "torch", reference.gae)
_dispatch.register("discounted_returns", "torch", reference.discounted_returns)
_dispatch.register("group_advantages", "torch", reference.group_advantages)
_dispatch.register("masked_mean", "torch", reference.masked_mean)
_dispatch.register("masked_whiten", "torch", reference.masked_whiten)
_dispatch.register("gae", "cpp", _gae_cpp)
_dispatch.register("discounted_returns", "cpp", _returns_cpp)
_dispatch.register("group_advantages", "cpp", _group_cpp)
_dispatch.register("masked_mean", "cpp", _masked_mean_cpp)
_dispatch.register("masked_whiten", "cpp", _whiten_cpp)
