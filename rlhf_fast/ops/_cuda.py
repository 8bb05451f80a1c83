"""Registration of the CUDA C++ implementations (csrc/cuda/*.cu in rlhf_fast._C) with the
dispatch, under backend ``cuda``.

The wrappers take exactly the public ops' arguments; the advantage ops' are the cpp glue's
(rlhf_fast.ops.advantages: the same torch.ops calls reach the CUDA kernels for CUDA tensors), so an
input that requires grad hands gae / discounted_returns / group_advantages / masked_whiten over to the reference
(whose autograd graph the result keeps), and masked_mean keeps its registered autograd, so a
result never silently drops a gradient on one device that it keeps on another. ``sample`` on
CUDA uses the in-kernel Philox variant (``sample_philox``): its seed and offset are read from
the torch CUDA generator on the host and the offset advanced by one Philox block (4), so no
device sync happens and consecutive calls never reuse noise. Rows whose logits hold NaN, +inf or
only -inf give logp = NaN (and a token inside [0, V)) instead of an error, because raising would
need a host sync.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch, _native, reference
# the glue is the C++ backend's: torch.ops.rlhf_fast.* dispatches on the tensors' device to the CUDA kernels
from .advantages import _gae_cpp as _gae_cuda
from .advantages import _group_cpp as _group_advantages_cuda
from .advantages import _masked_mean_cpp as _masked_mean_cuda
from .advantages import _returns_cpp as _discounted_returns_cuda
from .advantages import _whiten_cpp as _masked_whiten_cuda

_U64 = 1 << 64
PHILOX_INCREMENT = 4  # one Philox4x32 block per subsequence (a row's 4 consecutive vocabulary entries)


def philox_seed_offset(device: torch.device, generator: Optional[torch.Generator] = None,
                       increment: int = PHILOX_INCREMENT):
    """``(seed, offset)`` for one kernel launch from ``generator`` (default: the device's
    default CUDA generator), advancing its Philox offset by ``increment`` — host-side only.

    The kernel uses the counters torch reserves for ``[offset, offset + increment)``, the same
    layout as ``curand_init(seed, subsequence, offset)``, so the draws never overlap those of
    torch's own random kernels on the same generator. ``seed`` is returned as a signed int64
    (the kernel reinterprets it as uint64). Raises TypeError for a generator that is not a CUDA
    generator on ``device``, and RuntimeError inside CUDA graph capture, where a host-side offset
    would be frozen into the graph and every replay would repeat the same noise."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if generator is None:
        generator = torch.cuda.default_generators[idx]
    else:
        gdev = generator.device
        if gdev.type != "cuda" or (gdev.index is not None and gdev.index != idx):
            raise TypeError(f"generator must be a torch.Generator on {torch.device('cuda', idx)} (the logits' "
                            f"device), got one on {gdev}")
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("sample: the cuda backend reads the Philox offset on the host and cannot be captured in "
                           "a CUDA graph (every replay would draw the same tokens); sample outside the graph")
    seed = int(generator.initial_seed())
    # torch keeps Philox offsets multiples of 4 (one 128-bit block); round up if one is not
    offset = -(-int(generator.get_offset()) // 4) * 4
    generator.set_offset(offset + increment)
    if seed >= 1 << 63:
        seed -= _U64
    return seed, offset


def _sample_cuda(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator=None):
    if 0 < temperature < reference.TINY_TEMPERATURE:
        # z / T overflows float32 in the kernel; the reference reaches the greedy limit
        return reference.sample(logits.detach(), temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                generator=generator)
    if temperature == 0:
        seed, offset = 0, 0  # greedy consumes no randomness
    else:
        seed, offset = philox_seed_offset(logits.device, generator)
    return torch.ops.rlhf_fast.sample_philox(logits.detach(), seed, offset, float(temperature), int(top_k),
                                             float(top_p), float(min_p))


def _sample_philox_fake(logits, seed, offset, temperature, top_k, top_p, min_p):
    B = logits.shape[0]
    return logits.new_empty((B,), dtype=torch.int64), logits.new_empty((B,), dtype=torch.float32)


def _has_op(name: str) -> bool:
    # a stale rlhf_fast._C (built before the schema existed) must not break `import rlhf_fast`
    try:
        return _native.has_native() and hasattr(torch.ops.rlhf_fast, name)
    except (AttributeError, RuntimeError):
        return False


if _has_op("sample_philox"):
    _native.register_meta_and_autograd("sample_philox", _sample_philox_fake)

_dispatch.register("gae", "cuda", _gae_cuda)
_dispatch.register("discounted_returns", "cuda", _discounted_returns_cuda)
_dispatch.register("group_advantages", "cuda", _group_advantages_cuda)
_dispatch.register("masked_mean", "cuda", _masked_mean_cuda)
_dispatch.register("masked_whiten", "cuda", _masked_whiten_cuda)
_dispatch.register("sample", "cuda", _sample_cuda)
