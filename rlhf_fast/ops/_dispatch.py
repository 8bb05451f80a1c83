"""Backend selection for every op: one registry, resolved per call by device.

Each op family module registers its implementations with :func:`register`; an
implementation takes exactly the public op's arguments. Automatic order:

* CUDA tensors: ``cuda`` (CUDA C++ in rlhf_fast._C), then ``triton``, then ``torch``;
* CPU tensors: ``cpp`` (C++ in rlhf_fast._C), then ``torch`` (the reference).

``RLHF_FAST_BACKEND=torch|cpp|triton|cuda`` or ``with use_backend("torch"):`` forces a
backend for the ops it implements (the others keep the automatic choice); a forced
backend that is not available raises. ``triton`` also runs CPU tensors when
``TRITON_INTERPRET=1`` (Triton's interpreter), which is how the CPU suite tests it.
An automatic backend that fails to load falls back with one warning.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from typing import Callable, Dict, Optional, Tuple, Union

import torch

BACKENDS = ("torch", "cpp", "triton", "cuda")

# op name -> backend -> implementation, or "module:attribute" imported on first use so
# that `import rlhf_fast` never imports Triton.
_REGISTRY: Dict[str, Dict[str, Union[Callable, str]]] = {}
# Stack of backends forced by `use_backend` (innermost last). A plain list rather than a
# ContextVar because torch.compile (dynamo) can trace reads of a list but not ContextVar.get.
_FORCED_STACK: list = []


def register(op: str, backend: str, impl: Union[Callable, str]) -> None:
    """Register ``impl`` (a callable or a lazy ``"module:attr"`` path) for ``op`` on ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = impl


def implemented(op: str) -> Tuple[str, ...]:
    """Backends that have an implementation of ``op`` registered."""
    return tuple(_REGISTRY.get(op, {}))


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Force a backend inside a ``with`` block (``None`` restores the automatic choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _FORCED_STACK.append(name)
    try:
        yield
    finally:
        _FORCED_STACK.pop()


def forced_backend() -> Optional[str]:
    name = _FORCED_STACK[-1] if _FORCED_STACK else None
    if name is None:
        name = os.environ.get("RLHF_FAST_BACKEND") or None
        if name is not None and name not in BACKENDS:
            raise ValueError(f"RLHF_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


# ---------------------------------------------------------------- availability probes


@functools.lru_cache(maxsize=None)
def _probe_cpp() -> Tuple[bool, str]:
    try:
        importlib.import_module("rlhf_fast._C")
    except Exception as e:  # ImportError, or an undefined symbol from a stale build
        return False, f"rlhf_fast._C did not load ({type(e).__name__}: {e}); reinstall with `make setup`"
    return True, "rlhf_fast._C loaded (CPU kernels)"


@functools.lru_cache(maxsize=None)
def _probe_cuda() -> Tuple[bool, str]:
    ok, why = _probe_cpp()
    if not ok:
        return False, why
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("rlhf_fast::gae", "CUDA"):
        return False, "rlhf_fast._C was built without CUDA sources (torch without CUDA or nvcc missing at build)"
    return True, "CUDA kernels in rlhf_fast._C"


@functools.lru_cache(maxsize=None)
def _probe_triton() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as e:
        return False, f"triton not importable ({type(e).__name__}: {e})"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on CUDA"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {triton.__version__} under TRITON_INTERPRET=1 (CPU interpreter, slow)"
    return False, "triton installed but no CUDA device (set TRITON_INTERPRET=1 to run kernels on the CPU)"


_PROBES = {"torch": lambda: (True, "pure-PyTorch reference"), "cpp": _probe_cpp, "cuda": _probe_cuda, "triton": _probe_triton}


# Probe results by backend name. A plain dict filled outside torch.compile (see
# `probe_all`), because dynamo cannot trace the imports a probe performs.
_AVAILABLE: Dict[str, Tuple[bool, str]] = {}


def backend_available(name: str) -> Tuple[bool, str]:
    """``(available, reason)`` for one backend."""
    if name not in _AVAILABLE:
        _AVAILABLE[name] = _PROBES[name]()
    return _AVAILABLE[name]


def probe_all() -> None:
    """Resolve every backend that can matter on this machine once, at import time."""
    backend_available("torch")
    backend_available("cpp")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        backend_available("cuda")
        backend_available("triton")


def _runs_on(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "cpp":
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda"
    # triton: GPU tensors, or CPU tensors in the interpreter
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _auto_order(device: torch.device):
    return ("cuda", "triton", "torch") if device.type == "cuda" else ("cpp", "torch")


@functools.lru_cache(maxsize=None)
def _warn_fallback(backend: str, reason: str) -> None:
    warnings.warn(f"rlhf_fast: {backend} backend unavailable ({reason}); falling back to the PyTorch reference",
                  RuntimeWarning, stacklevel=4)


@functools.lru_cache(maxsize=None)
def _warn_not_on_device(backend: str, device_type: str) -> None:
    # a benchmark forcing `cuda` on CPU tensors would otherwise time `cpp` without a word
    warnings.warn(f"rlhf_fast: backend {backend!r} is forced but does not run on {device_type} tensors; "
                  "those calls take the automatic choice", RuntimeWarning, stacklevel=4)


def _load(op: str, backend: str) -> Callable:
    impl = _REGISTRY[op][backend]
    if isinstance(impl, str):
        mod, _, attr = impl.partition(":")
        impl = getattr(importlib.import_module(mod), attr)
        _REGISTRY[op][backend] = impl
    return impl


def select(op: str, device: torch.device) -> Tuple[str, Callable]:
    """The ``(backend name, implementation)`` that will run ``op`` for tensors on ``device``."""
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    forced = forced_backend()
    if forced is not None and forced in impls:
        if not _runs_on(forced, device):
            _warn_not_on_device(forced, device.type)
        else:
            ok, why = backend_available(forced)
            if not ok:
                raise RuntimeError(f"rlhf_fast: backend {forced!r} was requested for {op} but is unavailable: {why}")
            return forced, _load(op, forced)
    for name in _auto_order(device):
        if name not in impls:
            continue
        ok, why = backend_available(name)
        if ok:
            return name, _load(op, name)
        if name in ("cpp", "cuda"):
            _warn_fallback(name, why)
    return "torch", _load(op, "torch")


def call(op: str, device: torch.device, *args, **kwargs):
    """Run ``op`` with the implementation :func:`select` picks for ``device``."""
    return select(op, device)[1](*args, **kwargs)
