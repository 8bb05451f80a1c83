"""Triton sampler for ``sample``: greedy, temperature and min-p in one or two passes over each
row, with in-kernel Philox noise (Gumbel-max); top-k / top-p go to the reference.

One program per row, tiles of BLOCK_V logits:

* pass 1: the online max and Σ exp(x − max) of the scaled logits x = z / T (the chosen
  token's log-prob), NaN / +inf detection, and the argmax of x + g — Gumbel-max, an exact
  draw from softmax(x) — or of x alone for greedy;
* min-p (a second pass, the max being known): the kept set exp(x − max) ≥ min_p, its mass,
  and the Gumbel-max over it.

The noise is the CUDA kernel's (csrc/cuda/sampling.cu): Philox4x32-10 with key = seed and
counter = (offset / 4, row·⌈V/4⌉ + i/4), word i mod 4 for entry i, the seed and offset
reserved on the torch generator exactly as the cuda backend does — so a draw advances the
generator the same way on either backend. Rows whose logits hold NaN or +inf, or only −inf,
give logp = NaN and a token in [0, V) (the first +inf if any), as on the cuda backend: raising
would need a host sync. Greedy returns the first maximum, logp 0.

This is the GPU path where ``rlhf_fast._C`` was built without CUDA kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from rlhf_fast.ops import reference

BLOCK_V = 2048


@triton.jit
def _gumbel(bits):
    """Gumbel noise −log(E), E = −log(1 − v) ~ Exp(1), v uniform with 2^-32 resolution near 0
    (as the CUDA kernel: the large noise values stay resolved up to ~22.9)."""
    v = (bits.to(tl.float32) + 0.5) * 2.3283064365386963e-10
    v = tl.minimum(v, 0.99999994)
    # −log1p(−v) without libdevice: the series where 1 − v would round away v's low bits
    e = tl.where(v < 0.0009765625, v + v * v * (0.5 + v * 0.3333333333333333), -tl.log(1.0 - v))
    return -tl.log(e)


@triton.jit
def _noise(seed, ctr_lo, ctr_hi, sub0, start, BLOCK_V: tl.constexpr):
    """Gumbel noise of entries start .. start + BLOCK_V − 1 (start a multiple of 4): one Philox
    block per 4 consecutive entries."""
    lanes = tl.arange(0, BLOCK_V // 4)
    g = (sub0 + start // 4 + lanes).to(tl.int64)
    # 32-bit counter words (tl.philox picks its 64-bit variant for 64-bit words)
    c0 = (lanes * 0 + ctr_lo).to(tl.uint32)
    c1 = (lanes * 0 + ctr_hi).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, g.to(tl.uint32), (g >> 32).to(tl.uint32))
    # [G, 2, 2] with [g, j, k] = word 2j + k, flattened: words 0, 1, 2, 3 of each block in order
    return _gumbel(tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_V,)))


@triton.jit
def _sample_kernel(z_ptr, tok_ptr, logp_ptr, V, stride, temperature, min_p, seed, ctr_lo, ctr_hi,
                   GREEDY: tl.constexpr, MIN_P: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride
    sub0 = row * ((V + 3) // 4)
    lanes = tl.arange(0, BLOCK_V)
    NEG: tl.constexpr = float("-inf")
    m = tl.full((), NEG, tl.float32)
    s = tl.zeros((), tl.float32)
    best = tl.full((), NEG, tl.float32)
    arg = tl.zeros((), tl.int64) + V
    pinf = tl.zeros((), tl.int64) + V
    nan = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + lanes
        inb = offs < V
        x = tl.load(z_row + offs, mask=inb, other=NEG).to(tl.float32) / temperature
        bad = x != x
        nan = tl.maximum(nan, tl.max(bad.to(tl.int32), axis=0))
        pinf = tl.minimum(pinf, tl.min(tl.where(x == float("inf"), offs, V), axis=0))
        x = tl.where(bad, NEG, x)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == NEG, 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
        if GREEDY or MIN_P:
            score = x
        else:
            score = x + _noise(seed, ctr_lo, ctr_hi, sub0, start, BLOCK_V)
        t_best = tl.max(score, axis=0)
        t_arg = tl.min(tl.where(score == t_best, offs, V), axis=0)
        arg = tl.where(t_best > best, t_arg, arg)  # earlier tiles win ties: the first maximum
        best = tl.maximum(best, t_best)
    total = s
    if MIN_P:
        # p >= min_p·p_max  <=>  exp(x − max) >= min_p (the max is always kept)
        total = tl.zeros((), tl.float32)
        best = tl.full((), NEG, tl.float32)
        arg = tl.zeros((), tl.int64) + V
        for start in range(0, V, BLOCK_V):
            offs = start + lanes
            inb = offs < V
            x = tl.load(z_row + offs, mask=inb, other=NEG).to(tl.float32) / temperature
            w = tl.exp(x - m)
            keep = inb & (w >= min_p)
            total += tl.sum(tl.where(keep, w, 0.0), axis=0)
            score = tl.where(keep, x + _noise(seed, ctr_lo, ctr_hi, sub0, start, BLOCK_V), NEG)
            t_best = tl.max(score, axis=0)
            t_arg = tl.min(tl.where(score == t_best, offs, V), axis=0)
            arg = tl.where(t_best > best, t_arg, arg)
            best = tl.maximum(best, t_best)
    # no distribution: NaN, +inf (greedy excepted: its answer is the first +inf) or only −inf
    if GREEDY:
        broken = (nan > 0) | (m == NEG)
    else:
        broken = (nan > 0) | (pinf < V) | (m == NEG)
    tok = tl.where(broken, tl.where(pinf < V, pinf, 0), tl.where(arg < V, arg, 0))
    x_tok = tl.load(z_row + tok).to(tl.float32) / temperature
    if GREEDY:
        lp = tl.where(broken, float("nan"), 0.0)
    else:  # total: Σ exp(x − max) over the kept tokens
        lp = tl.where(broken, float("nan"), x_tok - m - tl.log(total))
    tl.store(tok_ptr + row, tok)
    tl.store(logp_ptr + row, lp)


def _seed_offset(device: torch.device, generator: Optional[torch.Generator]):
    """(seed, Philox offset) for one launch: on CUDA reserved on the CUDA generator as the cuda
    backend does (host-side, no sync); on the CPU (Triton's interpreter) drawn from the CPU
    generator."""
    if device.type == "cuda":
        from rlhf_fast.ops._cuda import philox_seed_offset

        return philox_seed_offset(device, generator)
    if generator is not None and generator.device.type != "cpu":
        raise TypeError(f"generator must be a torch.Generator on {device} (the logits' device), "
                        f"got one on {generator.device}")
    seed, offset = torch.randint(0, 2**62, (2,), generator=generator).tolist()
    return seed, offset * 4


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           min_p: float = 0.0, generator: Optional[torch.Generator] = None):
    """:func:`rlhf_fast.ops.sample` on Triton: logits ``[B, V]`` (validated by the op) →
    ``(tokens [B] int64, logp [B] float32)``. Greedy, temperature and min-p run the kernel;
    top-k / top-p run the reference (sort-based)."""
    V = logits.shape[1]
    if (0 < top_k < V) or top_p < 1.0:
        return reference.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                generator=generator)
    z = logits.detach()
    if z.stride(1) != 1:
        z = z.contiguous()
    B = z.shape[0]
    tok = torch.empty(B, dtype=torch.int64, device=z.device)
    logp = torch.empty(B, dtype=torch.float32, device=z.device)
    if B == 0:
        return tok, logp
    greedy = temperature == 0
    seed, offset = (0, 0) if greedy else _seed_offset(z.device, generator)
    ctr = (offset // 4) % 2**64
    # fp32 temperature as the other backends; one that rounds to 0 is greedy, the limit
    t32 = float(torch.tensor(temperature, dtype=torch.float32))
    greedy = greedy or t32 == 0.0
    _sample_kernel[(B,)](z, tok, logp, V, z.stride(0), 1.0 if greedy else t32, float(min_p), seed,
                         ctr & 0xFFFFFFFF, ctr >> 32, GREEDY=greedy, MIN_P=(not greedy and min_p > 0.0),
                         BLOCK_V=min(BLOCK_V, max(16, triton.next_power_of_2(V))))
    return tok, logp
