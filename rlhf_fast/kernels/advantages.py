"""Triton kernels for gae and discounted_returns: one program per row, the reverse recurrence
over T as an associative scan of affine maps, tile by tile from the row's end.

The backward recurrences are affine in their state, with masked tokens as the identity, so a
tile's maps compose in a parallel scan and only the state between tiles is sequential:

* discounted returns, state G: ``G <- γ·G + r`` on an unmasked token, ``G <- G`` on a masked
  one — the map (a, e) = (γ, r) or (1, 0);
* GAE, state (A, N), N the value of the next unmasked token: on an unmasked token
  ``A <- c·A + γ·N + (r − v)`` and ``N <- v`` (c = γλ) — the map (a, b, e, f, g) =
  (c, γ, r − v, 0, v), or the identity (1, 0, 0, 1, 0).

A tile is loaded latest token first, so a forward scan (combine(earlier in scan order,
later)) composes the maps in the order the recurrence applies them; no reverse scan is
needed. The row's state after its last token is 0 (DESIGN.md: holes and padding are skipped,
the value after the last unmasked token is 0). fp32 arithmetic (fp64 for fp64 input, as the
reference); outputs are 0 at masked positions.

This is the GPU path where ``rlhf_fast._C`` was built without CUDA (the dispatch tries the
CUDA kernel first): no Python loop over T.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.ops import reference
from rlhf_fast.ops.advantages import _wants_grad
from rlhf_fast.ops.reference import out_dtype

BLOCK = 1024


@triton.jit
def _compose_returns(a1, e1, a2, e2):
    # scan order is latest token first: (a1, e1) is applied first, then (a2, e2)
    return a2 * a1, a2 * e1 + e2


@triton.jit
def _compose_gae(a1, b1, e1, f1, g1, a2, b2, e2, f2, g2):
    # scan order is latest token first: (·1) is applied first, then (·2)
    return a2 * a1, a2 * b1 + b2 * f1, a2 * e1 + b2 * g1 + e2, f2 * f1, f2 * g1 + g2


@triton.jit
def _last(x, i, BLOCK: tl.constexpr):
    """Element BLOCK - 1 of the tile (the composition of the whole tile)."""
    return tl.sum(tl.where(i == BLOCK - 1, x, 0.0), axis=0)


@triton.jit
def _returns_kernel(r_ptr, m_ptr, out_ptr, T, gamma_hi, gamma_lo, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    base = row * T
    acc_t = out_ptr.dtype.element_ty
    gamma = tl.cast(gamma_hi, acc_t) + tl.cast(gamma_lo, acc_t)
    G = tl.zeros((), dtype=acc_t)  # the state after the row's last token
    for start in range(0, T, BLOCK):
        t = T - 1 - start - i  # latest token first
        inb = t >= 0
        m = tl.load(m_ptr + base + t, mask=inb, other=0) != 0
        r = tl.load(r_ptr + base + t, mask=inb, other=0.0).to(acc_t)
        one = tl.full((BLOCK,), 1.0, acc_t)
        a = tl.where(m, one * gamma, one)
        e = tl.where(m, r, 0.0 * one)
        a, e = tl.associative_scan((a, e), 0, _compose_returns)
        tl.store(out_ptr + base + t, tl.where(m, a * G + e, 0.0 * one), mask=inb)
        G = _last(a, i, BLOCK) * G + _last(e, i, BLOCK)


@triton.jit
def _gae_kernel(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, T, gamma_hi, gamma_lo, c_hi, c_lo, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    base = row * T
    acc_t = adv_ptr.dtype.element_ty
    gamma = tl.cast(gamma_hi, acc_t) + tl.cast(gamma_lo, acc_t)
    c = tl.cast(c_hi, acc_t) + tl.cast(c_lo, acc_t)
    A = tl.zeros((), dtype=acc_t)  # advantage and next value after the row's last token
    N = tl.zeros((), dtype=acc_t)
    for start in range(0, T, BLOCK):
        t = T - 1 - start - i  # latest token first
        inb = t >= 0
        m = tl.load(m_ptr + base + t, mask=inb, other=0) != 0
        r = tl.load(r_ptr + base + t, mask=inb, other=0.0).to(acc_t)
        v = tl.load(v_ptr + base + t, mask=inb, other=0.0).to(acc_t)
        one = tl.full((BLOCK,), 1.0, acc_t)
        zero = 0.0 * one
        a = tl.where(m, one * c, one)
        b = tl.where(m, one * gamma, zero)
        e = tl.where(m, r - v, zero)
        f = tl.where(m, zero, one)
        g = tl.where(m, v, zero)
        a, b, e, f, g = tl.associative_scan((a, b, e, f, g), 0, _compose_gae)
        adv = a * A + b * N + e
        tl.store(adv_ptr + base + t, tl.where(m, adv, zero), mask=inb)
        tl.store(ret_ptr + base + t, tl.where(m, adv + v, zero), mask=inb)
        A, N = (_last(a, i, BLOCK) * A + _last(b, i, BLOCK) * N + _last(e, i, BLOCK),
                _last(f, i, BLOCK) * N + _last(g, i, BLOCK))


def _split(x: float):
    """x as two fp32 kernel arguments whose fp64 sum is x to ~48 bits: Triton passes Python
    floats as fp32, and the fp64 path must not round γ / γλ to 24 bits."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, x - hi


def _block(T: int) -> int:
    return max(16, min(BLOCK, triton.next_power_of_2(T)))  # the module's BLOCK at call time (tests shrink it)


def _mask_u8(mask: torch.Tensor) -> torch.Tensor:
    return mask.contiguous().view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).contiguous().view(
        torch.uint8)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95):
    """:func:`rlhf_fast.ops.gae` on Triton: rewards, values, mask ``[B, T]`` (validated by the
    op) → ``(advantages, returns)`` ``[B, T]`` float32 (float64 for float64 input). Inputs
    that require grad go to the reference, whose result keeps the autograd graph (as the
    native backends do)."""
    if _wants_grad(rewards, values):
        return reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
    dt = out_dtype(torch.promote_types(rewards.dtype, values.dtype))
    B, T = rewards.shape
    adv = torch.empty(B, T, dtype=dt, device=rewards.device)
    ret = torch.empty_like(adv)
    if B and T:
        _gae_kernel[(B,)](rewards.contiguous(), values.contiguous(), _mask_u8(mask), adv, ret, T, *_split(float(gamma)),
                          *_split(float(gamma) * float(lam)), BLOCK=_block(T))
    return adv, ret


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """:func:`rlhf_fast.ops.discounted_returns` on Triton: rewards, mask ``[B, T]`` →
    ``[B, T]`` float32 (float64 for float64 input); inputs that require grad go to the reference."""
    if _wants_grad(rewards):
        return reference.discounted_returns(rewards, mask, gamma=gamma)
    B, T = rewards.shape
    out = torch.empty(B, T, dtype=out_dtype(rewards.dtype), device=rewards.device)
    if B and T:
        _returns_kernel[(B,)](rewards.contiguous(), _mask_u8(mask), out, T, *_split(float(gamma)), BLOCK=_block(T))
    return out
