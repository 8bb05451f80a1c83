"""sample: one token per row from the temperature / top-k / top-p / min-p processed
distribution, without sorting the vocabulary in the native backends.

Backends: ``torch`` (reference, sort-based), ``cpp`` (csrc/cpu/sampling.cpp), ``cuda``
(csrc/cuda/sampling.cu).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch, _validate, reference


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
):
    """Sample one token per row of logits ``[B, V]`` (any float dtype).

    Filters apply in order, each on the renormalised result of the one before: temperature
    (0 = greedy), top-k (0 = off), top-p (smallest set of most likely tokens whose mass
    reaches p; 1 = off), min-p (keep p ≥ min_p·p_max; 0 = off). Returns
    ``(tokens [B] int64, logp [B] float32)``: logp of each chosen token under the processed
    distribution (0 for greedy). ``generator`` seeds the draw (reproducible).
    """
    _validate.tensor("logits", logits, floating=True, ndim=2)
    if logits.shape[1] == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    _validate.temperature(temperature, allow_zero=True)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(min_p, bool) or not isinstance(min_p, (int, float)) or not (0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return _dispatch.call("sample", logits.device, logits, temperature=temperature, top_k=top_k, top_p=top_p,
                          min_p=min_p, generator=generator)


_dispatch.register("sample", "torch", reference.sample)
