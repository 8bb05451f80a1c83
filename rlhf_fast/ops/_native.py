"""Helpers for the C++/CUDA ops of rlhf_fast._C: loading, fake (meta) kernels and
autograd registration, done once per process when the library is present."""

from __future__ import annotations

from typing import Callable

import torch

from . import _dispatch


def has_native() -> bool:
    return _dispatch.backend_available("cpp")[0]


def register_meta_and_autograd(name: str, fake: Callable, backward: Callable = None, setup_context: Callable = None,
                               *, non_differentiable=(), reference_backward: Callable = None):
    """Register ``fake`` (shapes only, for torch.compile) and, if given, autograd for
    ``rlhf_fast::name``; with ``backward``, return the eager ``torch.autograd.Function`` built
    from the same ``backward`` / ``setup_context`` (:func:`_eager_function`; pass it to
    :func:`call`), ``non_differentiable`` naming its outputs that get no gradient. No-op (None)
    when rlhf_fast._C is not built.

    ``reference_backward(ctx, *grads)``: the same gradients through the pure-PyTorch reference
    with autograd (:func:`reference_grads`), run instead of ``backward`` when the backward is
    itself differentiated (``create_graph=True``); without it such a backward raises."""
    if not has_native():
        return None
    if name not in _seen:
        _seen.add(name)
        qual = f"rlhf_fast::{name}"
        torch.library.register_fake(qual)(fake)
        if backward is not None:
            backward = differentiable_backward(name, backward, reference_backward)
            torch.library.register_autograd(qual, backward, setup_context=setup_context)
            _functions[name] = _eager_function(name, backward, setup_context, non_differentiable)
    return _functions.get(name)


# ops registered so far in this process (torch.library refuses a second registration), and the
# eager Function of each differentiable one
_seen: set = set()
_functions: dict = {}


def differentiable_backward(name: str, backward: Callable, reference_backward: Callable = None) -> Callable:
    """``backward`` (a native kernel: fast, but its result has no graph) for first-order
    gradients; when the engine runs it with grad mode on (``create_graph=True``: Hessian-vector
    products, gradient penalties), ``reference_backward``, whose gradients are differentiable
    again, or a RuntimeError naming the op. Without this the kernel's gradient would enter the
    graph as a constant and the op's own second-order term would silently be dropped."""

    def run(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        if reference_backward is None:
            raise RuntimeError(f"rlhf_fast::{name} has no second derivative on this backend (its backward "
                               "ran with create_graph=True); use rlhf_fast.ops.use_backend('torch') for it")
        return reference_backward(ctx, *grads)

    return run


def reference_grads(fn: Callable, primals: tuple, grads: tuple) -> tuple:
    """Gradients of ``fn(*primals)`` (a tensor or a tuple of them) with respect to ``primals``,
    for the output gradients ``grads`` (None where an output gets none), through autograd with
    ``create_graph=True`` so that they can be differentiated again. One entry per primal: None
    for one that is not a tensor requiring grad (or that the outputs do not depend on)."""
    wants = [isinstance(p, torch.Tensor) and p.requires_grad for p in primals]
    with torch.enable_grad():
        outs = fn(*primals)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grads)
             if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
    if not pairs or not any(wants):
        return (None,) * len(primals)
    got = iter(torch.autograd.grad([o for o, _ in pairs], [p for p, w in zip(primals, wants) if w],
                                   [g for _, g in pairs], create_graph=True, allow_unused=True))
    return tuple(next(got) if w else None for w in wants)


def as_normalizer(normalizer, like: torch.Tensor):
    """A number or tensor normaliser as a 0-dim tensor on ``like``'s device (no host sync)."""
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        return normalizer.reshape(()).to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(normalizer), device=like.device, dtype=like.dtype)


# The dispatcher's "below autograd" guard (private, present in every torch this package
# supports): inside the eager Function's forward the op then skips its register_autograd
# kernel instead of entering it only to find that grad mode is off.
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def _eager_function(name: str, backward: Callable, setup_context: Callable, non_differentiable=()):
    """A ``torch.autograd.Function`` around ``rlhf_fast::name`` with the ``backward`` and
    ``setup_context`` of its ``register_autograd`` registration.

    Eager calls use it through :func:`call`: ``register_autograd`` costs ~25 µs of Python
    dispatch per forward and again per backward on the CPU (a fifth of a B·T = 65536 PPO loss),
    a Function ~5 µs. ``non_differentiable``: output positions that get no gradient (statistics,
    internal log-sum-exps); gradients of unused outputs reach ``backward`` as None, as with
    ``register_autograd``."""
    op = getattr(torch.ops.rlhf_fast, name)

    def forward(ctx, *inputs):
        ctx.set_materialize_grads(False)
        if _BELOW_AUTOGRAD is None:
            out = op(*inputs)
        else:
            with _BELOW_AUTOGRAD():
                out = op(*inputs)
        setup_context(ctx, inputs, out)
        ctx.n_inputs = len(inputs)
        if non_differentiable:
            outs = out if isinstance(out, tuple) else (out,)
            ctx.mark_non_differentiable(*(outs[i] for i in non_differentiable))
        return out

    def backward_or_none(ctx, *grads):
        # no gradient reached any output (possible with a Function, never with
        # register_autograd, which materialises zeros): none reaches the inputs
        if all(g is None for g in grads):
            return (None,) * ctx.n_inputs
        return backward(ctx, *grads)

    return type(f"{name}_function", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward_or_none)})


def call(function, name: str, *args):
    """``rlhf_fast::name(*args)``, differentiable: through the eager ``function`` when a tensor
    argument requires grad, else the op below the autograd key; under torch.compile, which
    traces the op and its registered autograd, the op itself."""
    op = getattr(torch.ops.rlhf_fast, name)
    if function is None or _compiling():
        return op(*args)
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return function.apply(*args)
    if _BELOW_AUTOGRAD is None:
        return op(*args)
    with _BELOW_AUTOGRAD():  # nothing to differentiate: skip the register_autograd kernel too
        return op(*args)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and compiler.is_compiling()
