"""sample: one token per row from the temperature / top-k / top-p / min-p processed
distribution, without sorting the vocabulary in the native backends.

Backends: ``torch`` (reference, sort-based), ``cpp`` (csrc/cpu/sampling.cpp), ``cuda``
(csrc/cuda/sampling.cu), ``triton`` (rlhf_fast/kernels/sampling.py: the same algorithm —
radix-select thresholds, Gumbel-max on the cuda backend's Philox stream — as the GPU path
when the extension has no CUDA kernels; chosen automatically there for plain temperature
sampling, min-p and greedy, while top-k / top-p draws go to the reference, which measured
faster than its radix-select paths). The cuda backend's top-k / top-p draws of at most 8 rows
of a vocabulary of at least 65536 go to the reference too (measured faster there).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch, _native, _validate, reference


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

    Rows whose logits contain NaN or +inf, or are all -inf, have no distribution: on CPU
    tensors every backend raises ValueError; the cuda backend returns logp = NaN for them (and a token in
    [0, V)), since raising would cost a host sync. Greedy (temperature 0) is defined with
    +inf: every backend returns the first maximum (+inf included) with logp 0.
    """
    top_p, min_p = _validate.real_like(top_p), _validate.real_like(min_p)  # numpy scalars are numbers
    temperature = _check_filters(logits, temperature, top_k, top_p, min_p)
    top_k = _effective_top_k(top_k, logits)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if logits.requires_grad:
        # sampling is not differentiated on any backend: logp never carries a graph
        logits = logits.detach()
    name, impl = _dispatch.select("sample", logits.device)
    if name == "triton" and _dispatch.forced_backend() != "triton" and \
            _filtered(logits.shape[1], temperature, top_k, top_p):
        # The Triton kernel's top-k / top-p paths measured 1.6-23x slower than the sort-based
        # reference at every B in {1, 128, 256}, V in {32000, 151936} on an H200
        # (benchmarks/results/nvidia-h200-2026-12-04.md, second run), so the automatic choice
        # (a GPU whose extension has no CUDA kernels) sends them to the reference; plain
        # temperature sampling stays on Triton (faster than the reference in 5 of the 6 cases,
        # up to 3.1x; 0.23 vs 0.20 ms at B=1, V=151936), and so does min-p alone (not measured).
        # use_backend("triton") still runs the kernel.
        impl = reference.sample
    elif name == "cuda" and _dispatch.forced_backend() != "cuda" and \
            _filtered(logits.shape[1], temperature, top_k, top_p) and \
            logits.shape[0] <= _CUDA_SORT_MAX_ROWS and logits.shape[1] >= _CUDA_SORT_MIN_VOCAB:
        # The CUDA kernel gives each row one block, whose radix-select passes over a long row
        # are latency-bound: ~13 ns per entry for top-p whatever B (up to one row per SM),
        # where the reference's sort costs ~0.35 ms plus ~0.2 ns per entry. At B=1, V=151936
        # on an H200 that is 1.94 vs 0.38 ms (top-p 0.9) and 0.92 vs 0.49 ms (top-k 50 +
        # top-p 0.9); at V=32000, and at B=128 for both vocabularies, the kernel wins
        # (benchmarks/results/nvidia-h200-2026-12-04.md). Few rows of a long vocabulary go to
        # the reference; use_backend("cuda") still runs the kernel.
        impl = reference.sample
    elif name == "torch" and logits.device.type == "cpu":
        _refuse_rows_without_distribution(logits, temperature)  # as the C++ kernel: no sync to avoid
    return impl(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator)


def _refuse_rows_without_distribution(logits: torch.Tensor, temperature: float) -> None:
    """ValueError naming the first row of CPU ``logits [B, V]`` that has no distribution to draw
    from, with the C++ kernel's message: a NaN; at ``temperature`` > 0 a +inf; every logit -inf.
    The pure-PyTorch reference would draw a token with a NaN log-prob there (the GPU backends'
    behaviour, where a check would cost a host sync), so on the CPU every backend refuses them."""
    bad = torch.isnan(logits).any(-1)
    inf = torch.isposinf(logits).any(-1) if temperature > 0 else torch.zeros_like(bad)
    none = torch.isneginf(logits).all(-1)
    broken = bad | inf | none
    if not bool(broken.any()):
        return
    row = int(broken.nonzero()[0, 0])
    if bool(bad[row]):
        raise ValueError(f"sample: logits contain NaN (row {row})")
    if bool(inf[row]):
        raise ValueError(f"sample: logits contain +inf (row {row}); the sampling distribution is undefined")
    raise ValueError(f"sample: every logit of row {row} is -inf; the sampling distribution is undefined")


# where the automatic choice sends filtered CUDA draws to the sort-based reference (see sample)
_CUDA_SORT_MAX_ROWS = 8
_CUDA_SORT_MIN_VOCAB = 65536


def _filtered(V: int, temperature: float, top_k: int, top_p: float) -> bool:
    """Whether a top-k / top-p filter (the radix-select paths) changes a sampled draw."""
    return temperature > 0 and (0 < top_k < V or top_p < 1.0)


def _effective_top_k(top_k: int, logits) -> int:
    """``top_k`` >= V keeps every token, as 0 does: passed on as 0, so a huge value (beyond
    int64) never reaches a kernel's argument."""
    top_k = _validate.int_like(top_k)  # checked by _check_filters; a numpy int becomes an int
    return 0 if top_k >= logits.shape[-1] else top_k


def _check_filters(logits, temperature, top_k, top_p, min_p) -> float:
    """Checks the arguments; returns ``temperature`` as a float."""
    _validate.tensor("logits", logits, floating=True, ndim=2)
    if logits.shape[1] == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    temperature = _validate.temperature(temperature, allow_zero=True)
    top_k = _validate.int_like(top_k)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(min_p, bool) or not isinstance(min_p, (int, float)) or not (0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
    return temperature


def sample_with_uniforms(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
):
    """:func:`sample` with its random numbers given: ``uniforms [B]`` (float, in [0, 1), one
    per row of ``logits [B, V]``); row b's token is the inverse CDF of ``uniforms[b]`` under
    its processed distribution, as the cpp and torch backends draw it from a generator. Row b's
    result depends only on ``logits[b]`` and ``uniforms[b]``, not on the rest of the batch: one
    call serves rows that each have their own generator (per-sample seeds). Returns
    ``(tokens [B] int64, logp [B] float32)``. Runs the C++ kernel where ``sample`` would (CPU
    tensors), else the reference on any device (on CUDA: sort-based, not the Gumbel-max kernel,
    which draws its own noise). The range check reads ``uniforms``: pass them on the CPU (they
    are moved to the logits' device) to keep a GPU step free of host syncs. Not part of the
    ``rlhf_fast.ops`` contract.
    """
    temperature = _check_filters(logits, temperature, top_k, top_p, min_p)
    top_k = _effective_top_k(top_k, logits)
    if not isinstance(uniforms, torch.Tensor) or not uniforms.is_floating_point() or uniforms.dim() != 1 \
            or uniforms.shape[0] != logits.shape[0]:
        raise ValueError(f"uniforms must be a float [B] tensor with B = {logits.shape[0]} (logits' rows), got "
                         f"{getattr(uniforms, 'dtype', type(uniforms))} {tuple(getattr(uniforms, 'shape', ()))}")
    if uniforms.numel() and not bool(((uniforms >= 0) & (uniforms < 1)).all()):
        raise ValueError("uniforms must lie in [0, 1)")
    return sample_with_uniforms_unchecked(logits, uniforms, temperature=temperature, top_k=top_k, top_p=top_p,
                                          min_p=min_p)


def sample_with_uniforms_unchecked(logits, uniforms, *, temperature, top_k, top_p, min_p):
    """:func:`sample_with_uniforms` without its argument checks, for a caller that made them
    once for many calls (the generation loop: a few microseconds per token)."""
    kw = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), min_p=float(min_p))
    if _dispatch.select("sample", logits.device)[0] == "cpp":
        return _cpp_from_uniforms(logits, uniforms.to(torch.float64), **kw)
    if logits.device.type == "cpu":
        _refuse_rows_without_distribution(logits, kw["temperature"])
    return reference.sample(logits, uniforms=uniforms.to(device=logits.device, dtype=torch.float64), **kw)


# ------------------------------------------------------------------ C++ CPU backend


def _sample_cpp(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator=None):
    # The uniforms come from the torch generator here, as reference.sample draws them, so the
    # two backends pick the same tokens for the same generator state.
    B = logits.shape[0]
    if temperature == 0:
        uniforms = torch.zeros(B, dtype=torch.float64)  # greedy consumes no randomness
    else:
        uniforms = torch.rand(B, generator=generator, dtype=torch.float64)
    return _cpp_from_uniforms(logits, uniforms, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)


def _cpp_from_uniforms(logits, uniforms, *, temperature, top_k, top_p, min_p):
    try:
        return torch.ops.rlhf_fast.sample(logits.detach(), uniforms, float(temperature), int(top_k), float(top_p),
                                          float(min_p))
    except RuntimeError as e:
        # TORCH_CHECK_VALUE already maps to ValueError; older torch builds wrap it
        if "sample: logits" in str(e):
            raise ValueError(str(e).splitlines()[0]) from None
        raise


def _fake(logits, uniforms, temperature, top_k, top_p, min_p):
    B = logits.shape[0]
    return logits.new_empty((B,), dtype=torch.int64), logits.new_empty((B,), dtype=torch.float32)


_native.register_meta_and_autograd("sample", _fake)

_dispatch.register("sample", "torch", reference.sample)
_dispatch.register("sample", "cpp", _sample_cpp)
