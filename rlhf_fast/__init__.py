"""rlhf_fast: RLHF / RLAIF / RLVR training for causal LMs on fused kernels."""

from __future__ import annotations

__version__ = "0.1.0"


def backends() -> dict:
    """What this machine can run: versions of torch / Triton / CUDA, and for each backend
    (``torch``, ``cpp``, ``triton``, ``cuda``) whether it is live and why (not)."""
    import platform

    import torch

    from .ops import _dispatch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    info = {
        "rlhf_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "backends": {},
    }
    for name in _dispatch.BACKENDS:
        ok, why = _dispatch.backend_available(name)
        info["backends"][name] = {"available": ok, "reason": why}
    return info


__all__ = ["backends", "__version__"]
