"""Registration of the CUDA C++ implementations (csrc/cuda/*.cu in rlhf_fast._C) with the
dispatch, under backend ``cuda``.

The wrappers take exactly the public ops' arguments. Advantages, returns and whitened values
are treated as constants (inputs are detached), as every RL trainer uses them. ``sample`` on
CUDA uses the in-kernel Philox variant (``sample_philox``): its seed and offset are read from
the torch CUDA generator on the host and the offset advanced, so no device sync happens. Rows
whose logits hold NaN, +inf or only -inf give logp = NaN (and a token inside [0, V)) instead of
an error, because raising would need a host sync.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch, _native

_U64 = 1 << 64


def _gae_cuda(rewards, values, mask, *, gamma=1.0, lam=0.95):
    return torch.ops.rlhf_fast.gae(rewards.detach(), values.detach(), mask, float(gamma), float(lam))


def _discounted_returns_cuda(rewards, mask, *, gamma=1.0):
    return torch.ops.rlhf_fast.discounted_returns(rewards.detach(), mask, float(gamma))


def _group_advantages_cuda(scores, group_size, *, kind="grpo", normalize_std=True, eps=1e-6):
    return torch.ops.rlhf_fast.group_advantages(scores.detach(), int(group_size), kind, bool(normalize_std), float(eps))


def _masked_mean_cuda(x, mask, dim=None, *, group=None):
    return torch.ops.rlhf_fast.masked_mean(x.detach(), mask)


def _masked_whiten_cuda(x, mask, *, shift_mean=True, eps=1e-8, group=None):
    return torch.ops.rlhf_fast.masked_whiten(x.detach(), mask, bool(shift_mean), float(eps))


def philox_seed_offset(device: torch.device, generator: Optional[torch.Generator] = None, increment: int = 4):
    """``(seed, offset)`` for one kernel launch from ``generator`` (default: the device's
    default CUDA generator), advancing its Philox offset by ``increment`` — host-side only.

    ``seed`` is returned as a signed int64 (the kernel reinterprets it as uint64)."""
    if generator is None:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        generator = torch.cuda.default_generators[idx]
    seed = int(generator.initial_seed())
    offset = int(generator.get_offset())
    generator.set_offset(offset + increment)  # torch keeps Philox offsets multiples of 4
    if seed >= 1 << 63:
        seed -= _U64
    return seed, offset


def _sample_cuda(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator=None):
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
