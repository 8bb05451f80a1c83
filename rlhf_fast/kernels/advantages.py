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

from rlhf_fast.kernels._grid import few_long_rows
from rlhf_fast.ops import reference
from rlhf_fast.ops.advantages import _wants_grad
from rlhf_fast.ops.reference import out_dtype

BLOCK = 1024


@triton.jit
def _compose(a1, b1, e1, f1, g1, a2, b2, e2, f2, g2):
    # scan order is latest token first: (·1) is applied first, then (·2)
    return a2 * a1, a2 * b1 + b2 * f1, a2 * e1 + b2 * g1 + e2, f2 * f1, f2 * g1 + g2


@triton.jit
def _last(x, i, BLOCK: tl.constexpr):
    """Element BLOCK - 1 of the tile (the composition of the whole tile)."""
    return tl.sum(tl.where(i == BLOCK - 1, x, 0.0), axis=0)


@triton.jit
def _coefs(gamma_hi, gamma_lo, c_hi, c_lo, acc_t: tl.constexpr):
    """γ and c = γλ in the state's dtype from their fp32 hi / lo halves (see _split)."""
    return tl.cast(gamma_hi, acc_t) + tl.cast(gamma_lo, acc_t), tl.cast(c_hi, acc_t) + tl.cast(c_lo, acc_t)


@triton.jit
def _tile_scan(r_ptr, v_ptr, m_ptr, base, start, T, gamma, c, acc_t: tl.constexpr, HAS_VALUES: tl.constexpr,
               BLOCK: tl.constexpr):
    """The maps of tokens T-1-start, T-2-start, ... (BLOCK of them, latest first), composed
    from the first: (a, b, e, f, g) [BLOCK], with the tile's positions, bounds, values and mask.
    Without values (discounted returns) v = 0: A <- c·A + γ·0 + r, the returns recurrence."""
    i = tl.arange(0, BLOCK)
    t = T - 1 - start - i
    inb = t >= 0
    m = tl.load(m_ptr + base + t, mask=inb, other=0) != 0
    r = tl.load(r_ptr + base + t, mask=inb, other=0.0).to(acc_t)
    one = tl.full((BLOCK,), 1.0, acc_t)
    zero = 0.0 * one
    if HAS_VALUES:
        v = tl.load(v_ptr + base + t, mask=inb, other=0.0).to(acc_t)
    else:
        v = zero
    a = tl.where(m, one * c, one)
    b = tl.where(m, one * gamma, zero)
    e = tl.where(m, r - v, zero)
    f = tl.where(m, zero, one)
    g = tl.where(m, v, zero)
    a, b, e, f, g = tl.associative_scan((a, b, e, f, g), 0, _compose)
    return a, b, e, f, g, t, inb, v, m


@triton.jit
def _store_tile(adv_ptr, ret_ptr, base, t, inb, v, m, adv, HAS_VALUES: tl.constexpr):
    tl.store(adv_ptr + base + t, tl.where(m, adv, 0.0), mask=inb)
    if HAS_VALUES:
        tl.store(ret_ptr + base + t, tl.where(m, adv + v, 0.0), mask=inb)


@triton.jit
def _rows_kernel(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, T, gamma_hi, gamma_lo, c_hi, c_lo,
                 HAS_VALUES: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row, its tiles one after the other (latest first), the state between them."""
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    base = row * T
    acc_t: tl.constexpr = adv_ptr.dtype.element_ty
    gamma, c = _coefs(gamma_hi, gamma_lo, c_hi, c_lo, acc_t)
    A = tl.zeros((), dtype=acc_t)  # advantage and next value after the row's last token
    N = tl.zeros((), dtype=acc_t)
    for start in range(0, T, BLOCK):
        a, b, e, f, g, t, inb, v, m = _tile_scan(r_ptr, v_ptr, m_ptr, base, start, T, gamma, c, acc_t, HAS_VALUES,
                                                 BLOCK)
        _store_tile(adv_ptr, ret_ptr, base, t, inb, v, m, a * A + b * N + e, HAS_VALUES)
        A, N = (_last(a, i, BLOCK) * A + _last(b, i, BLOCK) * N + _last(e, i, BLOCK),
                _last(f, i, BLOCK) * N + _last(g, i, BLOCK))


@triton.jit
def _tile_maps_kernel(r_ptr, v_ptr, m_ptr, maps_ptr, T, n_tiles, gamma_hi, gamma_lo, c_hi, c_lo,
                      HAS_VALUES: tl.constexpr, BLOCK: tl.constexpr):
    """Split rows, step 1 — grid (tiles, B): each tile's composed map, maps[row, tile, 0:5].
    The tiles go on grid axis 0 (up to 2^31 − 1 programs; axis 1 takes at most 65535): a
    packed row of 67M tokens has more tiles than that."""
    k = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    i = tl.arange(0, BLOCK)
    acc_t: tl.constexpr = maps_ptr.dtype.element_ty
    gamma, c = _coefs(gamma_hi, gamma_lo, c_hi, c_lo, acc_t)
    a, b, e, f, g, t, inb, v, m = _tile_scan(r_ptr, v_ptr, m_ptr, row * T, k * BLOCK, T, gamma, c, acc_t, HAS_VALUES,
                                             BLOCK)
    out = maps_ptr + (row * n_tiles + k) * 5
    tl.store(out, _last(a, i, BLOCK))
    tl.store(out + 1, _last(b, i, BLOCK))
    tl.store(out + 2, _last(e, i, BLOCK))
    tl.store(out + 3, _last(f, i, BLOCK))
    tl.store(out + 4, _last(g, i, BLOCK))


@triton.jit
def _carry_kernel(maps_ptr, carry_ptr, n_tiles, CHUNK: tl.constexpr):
    """Split rows, step 2 — one program per row: the state (A, N) entering each tile, the
    composition of the tiles after it applied to the row's final state 0 — an exclusive scan
    of the tile maps (map j - 1 at place j, the identity at place 0)."""
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, CHUNK)
    acc_t: tl.constexpr = maps_ptr.dtype.element_ty
    A = tl.zeros((), dtype=acc_t)
    N = tl.zeros((), dtype=acc_t)
    for start in range(0, n_tiles, CHUNK):
        j = start + i
        src = maps_ptr + (row * n_tiles + j - 1) * 5
        ok = (j >= 1) & (j < n_tiles)  # place 0 and the padding: the identity (1, 0, 0, 1, 0)
        a = tl.load(src, mask=ok, other=1.0)
        b = tl.load(src + 1, mask=ok, other=0.0)
        e = tl.load(src + 2, mask=ok, other=0.0)
        f = tl.load(src + 3, mask=ok, other=1.0)
        g = tl.load(src + 4, mask=ok, other=0.0)
        a, b, e, f, g = tl.associative_scan((a, b, e, f, g), 0, _compose)
        dst = carry_ptr + (row * n_tiles + j) * 2
        tl.store(dst, a * A + b * N + e, mask=j < n_tiles)
        tl.store(dst + 1, f * N + g, mask=j < n_tiles)
        # the state entering the chunk's last place: the next chunk's first place loads the
        # map of that tile itself
        A, N = (_last(a, i, CHUNK) * A + _last(b, i, CHUNK) * N + _last(e, i, CHUNK),
                _last(f, i, CHUNK) * N + _last(g, i, CHUNK))


@triton.jit
def _apply_kernel(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, carry_ptr, T, n_tiles, gamma_hi, gamma_lo, c_hi, c_lo,
                  HAS_VALUES: tl.constexpr, BLOCK: tl.constexpr):
    """Split rows, step 3 — grid (tiles, B): each tile again, from the state entering it."""
    k = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    acc_t: tl.constexpr = adv_ptr.dtype.element_ty
    gamma, c = _coefs(gamma_hi, gamma_lo, c_hi, c_lo, acc_t)
    base = row * T
    a, b, e, f, g, t, inb, v, m = _tile_scan(r_ptr, v_ptr, m_ptr, base, k * BLOCK, T, gamma, c, acc_t, HAS_VALUES,
                                             BLOCK)
    src = carry_ptr + (row * n_tiles + k) * 2
    A = tl.load(src)
    N = tl.load(src + 1)
    _store_tile(adv_ptr, ret_ptr, base, t, inb, v, m, a * A + b * N + e, HAS_VALUES)


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


CARRY_CHUNK = 1024


def _split_rows(B: int, n_tiles: int, device: torch.device) -> bool:
    """Whether to spread each row's tiles over programs (maps, carries, apply)."""
    return few_long_rows(B, n_tiles, device)


def _launch(r, v, m, adv, ret, gamma, c, has_values):
    B, T = r.shape
    blk = _block(T)
    n_tiles = triton.cdiv(T, blk)
    args = (*_split(gamma), *_split(c))
    if not _split_rows(B, n_tiles, r.device):
        _rows_kernel[(B,)](r, v, m, adv, ret, T, *args, HAS_VALUES=has_values, BLOCK=blk)
        return
    maps = torch.empty(B, n_tiles, 5, dtype=adv.dtype, device=adv.device)
    carry = torch.empty(B, n_tiles, 2, dtype=adv.dtype, device=adv.device)
    _tile_maps_kernel[(n_tiles, B)](r, v, m, maps, T, n_tiles, *args, HAS_VALUES=has_values, BLOCK=blk)
    _carry_kernel[(B,)](maps, carry, n_tiles, CHUNK=min(CARRY_CHUNK, max(2, triton.next_power_of_2(n_tiles))))
    _apply_kernel[(n_tiles, B)](r, v, m, adv, ret, carry, T, n_tiles, *args, HAS_VALUES=has_values, BLOCK=blk)


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
        _launch(rewards.contiguous(), values.contiguous(), _mask_u8(mask), adv, ret, float(gamma),
                float(gamma) * float(lam), True)
    return adv, ret


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """:func:`rlhf_fast.ops.discounted_returns` on Triton: rewards, mask ``[B, T]`` →
    ``[B, T]`` float32 (float64 for float64 input); inputs that require grad go to the reference.
    The GAE kernels without values and with λ = 1: A <- γ·A + r."""
    if _wants_grad(rewards):
        return reference.discounted_returns(rewards, mask, gamma=gamma)
    B, T = rewards.shape
    out = torch.empty(B, T, dtype=out_dtype(rewards.dtype), device=rewards.device)
    if B and T:
        r = rewards.contiguous()
        _launch(r, r, _mask_u8(mask), out, out, float(gamma), float(gamma), False)
    return out
