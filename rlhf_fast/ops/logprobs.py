"""token_logprobs: per-token log-probs (and entropy) of labels under softmax(logits / T).

Backends: ``torch`` (reference), ``cpp`` (csrc/cpu/logprobs.cpp), ``triton``
(kernels/token_logprobs.py).
"""

from __future__ import annotations

import torch

from . import _dispatch, _validate, reference


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
):
    """log softmax(logits / temperature)[labels], and optionally the entropy.

    logits ``[..., V]`` bf16/fp16/fp32/fp64, labels ``[...]`` integer in ``[0, V)`` or
    ``ignore_index`` (which gives 0). Returns logp ``[...]`` — and entropy ``[...]`` when
    ``return_entropy`` — float32 (float64 for float64 logits). Differentiable in logits;
    native backends keep no ``[..., V]`` float32 temporary in forward.
    """
    _validate.tensor("logits", logits, floating=True, min_ndim=1)
    _validate.tensor("labels", labels, integer=True)
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    _validate.same_device(("logits", "labels"), (logits, labels))
    _validate.temperature(temperature)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    _validate.labels_in_range("labels", labels, logits.shape[-1], ignore_index)
    return _dispatch.call(
        "token_logprobs", logits.device, logits, labels,
        temperature=temperature, return_entropy=return_entropy, ignore_index=ignore_index,
    )


_dispatch.register("token_logprobs", "torch", reference.token_logprobs)
