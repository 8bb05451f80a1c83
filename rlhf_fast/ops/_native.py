"""Helpers for the C++/CUDA ops of rlhf_fast._C: loading, fake (meta) kernels and
autograd registration, done once per process when the library is present."""

from __future__ import annotations

from typing import Callable

import torch

from . import _dispatch


def has_native() -> bool:
    return _dispatch.backend_available("cpp")[0]


def register_meta_and_autograd(name: str, fake: Callable, backward: Callable = None, setup_context: Callable = None):
    """Register ``fake`` (shapes only, for torch.compile) and, if given, autograd for
    ``rlhf_fast::name``. No-op when rlhf_fast._C is not built."""
    if not has_native() or name in _seen:
        return
    _seen.add(name)
    qual = f"rlhf_fast::{name}"
    torch.library.register_fake(qual)(fake)
    if backward is not None:
        torch.library.register_autograd(qual, backward, setup_context=setup_context)


# ops registered so far in this process (torch.library refuses a second registration)
_seen: set = set()


def as_normalizer(normalizer, like: torch.Tensor):
    """A number or tensor normaliser as a 0-dim tensor on ``like``'s device (no host sync)."""
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        return normalizer.reshape(()).to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(normalizer), device=like.device, dtype=like.dtype)
