"""Triton sampler for ``sample``: greedy, temperature, top-k, top-p and min-p without sorting
the vocabulary, with in-kernel Philox noise (Gumbel-max).

One program per row, tiles of BLOCK_V logits:

* pass 1: the online max and Σ exp(x − max) of the scaled logits x = z / T (the chosen
  token's log-prob), NaN / +inf detection, and the argmax of x + g — Gumbel-max, an exact
  draw from softmax(x) — or of x alone for greedy;
* top-k / top-p: every filter keeps a prefix of the order (value desc, index asc), so the kept
  set is a threshold key plus how many of its ties (lowest indices first) survive, as the
  reference's stable sort. The threshold comes from a radix select on the order-preserving
  key of the fp32 logit: 8 passes of 4 bits, each a 16-bin histogram of counts (top-k) or of
  fixed-point probability mass (top-p) — the CUDA kernel's algorithm, with 4-bit digits;
* a last pass in index order: the kept set (min-p: exp(x − max) ≥ min_p), its mass and the
  Gumbel-max over it.

Plain and greedy sampling of few long rows (B·4 ≤ SMs) spread each row over programs: pass 1
per chunk, then a merge of the chunks' statistics — the same tokens as one program per row.

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

from rlhf_fast.kernels._grid import few_long_rows, sm_count
from rlhf_fast.ops import reference

BLOCK_V = 2048
RADIX_BLOCK = 512


@triton.jit
def _gumbel(bits):
    """Gumbel noise −log(E), E = −log(1 − v) ~ Exp(1), v uniform with 2^-32 resolution near 0
    (as the CUDA kernel: the large noise values stay resolved up to ~22.9)."""
    v = (bits.to(tl.float32) + 0.5) * 2.3283064365386963e-10
    v = tl.minimum(v, 0.99999994)
    # −log1p(−v) without libdevice, as the CUDA kernel: the series to v^6 / 6 below 2^-5, where
    # 1 − v would round away v's low bits
    series = v * (1.0 + v * (0.5 + v * (0.3333333333333333 + v * (0.25 + v * (0.2 + v * 0.16666666666666666)))))
    e = tl.where(v < 0.03125, series, -tl.log(1.0 - v))
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
def _argmax_merge(score, offs, V, best, arg):
    """The running (best score, its first index) after one more tile of scores at ``offs``:
    earlier tiles win ties, so the result is the first maximum (index V: none yet)."""
    t_best = tl.max(score, axis=0)
    t_arg = tl.min(tl.where(score == t_best, offs, V), axis=0)
    return tl.maximum(best, t_best), tl.where(t_best > best, t_arg, arg)


@triton.jit
def _key(x):
    """The order-preserving key of fp32 x as an int64 in [0, 2^32) (csrc/cuda/sampling.cu's
    float_key): −0.0 and +0.0 share one key."""
    v = x.to(tl.int32, bitcast=True).to(tl.int64)
    v = tl.where(v == -2147483648, 0, v)
    return tl.where(v >= 0, v + 2147483648, -1 - v)


@triton.jit
def _kept(key, inb, thr, ntie, run):
    """Membership of a tile in the kept set {key > thr} ∪ {the first ntie entries, by index,
    with key == thr} (thr = −1: everything), given ``run`` ties at thr in earlier tiles;
    returns (kept, run after this tile)."""
    eq = (inb & (key == thr)).to(tl.int64)
    rank = run + tl.cumsum(eq, axis=0) - eq
    return inb & ((key > thr) | ((eq > 0) & (rank < ntie))), run + tl.sum(eq, axis=0)


@triton.jit
def _kept_fast(key, inb, thr, ntie, run, all_ties):
    """``_kept`` without its index-order tie ranking (a cumsum per tile) when every tie at thr
    is kept — the usual case with continuous logits — or when nothing is filtered (thr = −1)."""
    if all_ties:
        return inb & (key >= thr), run
    else:
        return _kept(key, inb, thr, ntie, run)


@triton.jit
def _radix_select(z_row, V, temperature, m, scale, thr, ntie, all_ties, top_k, top_p, MASS: tl.constexpr,
                  BLOCK_V: tl.constexpr):
    """The boundary key of a filter over the kept set (thr, ntie; ``all_ties``: every entry at
    thr is kept): where the count (top-k, target top_k) or the fixed-point mass (top-p, target
    ⌈top_p · total⌉) of the entries from the top first reaches the target. 8 passes of 4 bits,
    each a 16-bin histogram of the entries whose key matches the digits chosen so far; integer
    sums, so the result does not depend on the order of the additions. Returns (key, count or
    mass strictly above it, entries at it, their mass, target)."""
    lanes = tl.arange(0, BLOCK_V)
    bins = tl.arange(0, 16).to(tl.int64)
    halves = tl.arange(0, 2)
    prefix = tl.zeros((), tl.int64)
    above = tl.zeros((), tl.int64)
    target = tl.zeros((), tl.int64) + top_k
    eq_cnt = tl.zeros((), tl.int64)
    eq_mass = tl.zeros((), tl.int64)
    for p in range(8):  # not unrolled: 8 copies of the tile loop would only grow the code
        shift = 28 - 4 * p
        cnt = tl.zeros((16,), tl.int64)
        mass = tl.zeros((16,), tl.int64)
        run = tl.zeros((), tl.int64)
        for start in range(0, V, BLOCK_V):
            offs = start + lanes
            inb = offs < V
            x = tl.load(z_row + offs, mask=inb, other=float("-inf")).to(tl.float32) / temperature
            key = _key(x)
            kept, run = _kept_fast(key, inb, thr, ntie, run, all_ties)
            part = kept & ((key >> (shift + 4)) == (prefix >> (shift + 4)))
            digit = (key >> shift) & 15
            if MASS:
                hit = part[:, None] & (digit[:, None] == bins[None, :])
                cnt += tl.sum(hit.to(tl.int32), axis=0).to(tl.int64)
                fw = (tl.exp(x - m) * scale).to(tl.int64)
                mass += tl.sum(tl.where(hit, fw[:, None], 0), axis=0)
            else:
                # counts alone: tl.histogram (warp ballots) instead of a [tile, 16] one-hot sum;
                # entries outside the prefix go to bin 16, the upper half of 32 bins, dropped
                h = tl.reshape(tl.histogram(tl.where(part, digit, 16).to(tl.int32), 32), (2, 16))
                cnt += tl.sum(tl.where(halves[:, None] == 0, h, 0), axis=0).to(tl.int64)
        if MASS:
            val = mass
            # the kept set's total mass is the first pass's sum; keep the smallest prefix whose
            # mass reaches top_p of it (the reference's mass_before < p): >= 1 unit, <= total
            total = tl.sum(val, axis=0)
            t = tl.ceil(tl.cast(top_p, tl.float64) * total.to(tl.float64)).to(tl.int64)
            target = tl.where(p == 0, tl.minimum(tl.maximum(t, 1), total), target)
        else:
            val = cnt
        # from the top: the highest bin where the running total reaches the target
        upto = tl.sum(tl.where(bins[None, :] >= bins[:, None], val[None, :], 0), axis=1)
        chosen = tl.maximum(tl.max(tl.where(above + upto >= target, bins, -1), axis=0), 0)
        sel = bins == chosen
        above += tl.sum(tl.where(sel, upto - val, 0), axis=0)
        prefix = prefix | (chosen << shift)
        eq_cnt = tl.sum(tl.where(sel, cnt, 0), axis=0)
        eq_mass = tl.sum(tl.where(sel, mass, 0), axis=0)
    return prefix, above, eq_cnt, eq_mass, target


@triton.jit
def _sample_kernel(z_ptr, tok_ptr, logp_ptr, V, stride, temperature, top_k, top_p, min_p, scale, seed, ctr_lo,
                   ctr_hi, GREEDY: tl.constexpr, TOPK: tl.constexpr, TOPP: tl.constexpr, MIN_P: tl.constexpr,
                   BLOCK_V: tl.constexpr, RADIX_BLOCK: tl.constexpr):
    FILTERED: tl.constexpr = TOPK or TOPP or MIN_P
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride
    sub0 = row * ((V + 3) // 4)
    lanes = tl.arange(0, BLOCK_V)
    NEG: tl.constexpr = float("-inf")
    # pass 1: max, Σ exp(x − max), NaN / +inf, and the argmax of x (greedy) or of x + noise
    # (plain sampling, the whole draw)
    m, s, best, arg, pinf, nan = _row_stats(z_row, 0, V, V, temperature, seed, ctr_lo, ctr_hi, sub0,
                                            GREEDY or FILTERED, BLOCK_V)
    total = s
    if FILTERED:
        # the kept set: a threshold key and how many of its ties (lowest indices first) survive,
        # as the reference's stable sort; thr = −1 keeps everything
        thr = tl.zeros((), tl.int64) - 1
        ntie = tl.zeros((), tl.int64)
        all_ties = thr < 0  # nothing filtered yet: every entry is kept
        if TOPK:
            key_k, above_k, eq_k, _m, _t = _radix_select(z_row, V, temperature, m, scale, thr, ntie, all_ties,
                                                         top_k, top_p, False, RADIX_BLOCK)
            thr = key_k
            ntie = top_k - above_k  # <= the entries at key_k, by the select's invariant
            all_ties = ntie >= eq_k
        if TOPP:
            key_p, above_p, eq_cnt, eq_mass, target = _radix_select(z_row, V, temperature, m, scale, thr, ntie,
                                                                    all_ties, top_k, top_p, True, RADIX_BLOCK)
            # the j-th tie (by index) is kept iff the mass before it is < target: at least one,
            # at most all of them
            wt = eq_mass // tl.maximum(eq_cnt, 1)
            need = tl.maximum(target - above_p, 0)
            n_p = tl.where(wt > 0, (need + wt - 1) // tl.maximum(wt, 1), eq_cnt)
            ntie = tl.maximum(tl.minimum(n_p, eq_cnt), 1)
            # eq_cnt counts the kept entries at key_p: all of its real ties unless key_p is
            # top-k's threshold and top-k cut some of them
            all_ties = (ntie >= eq_cnt) & ((key_p != thr) | all_ties)
            thr = key_p
        # last pass in index order: the kept set (min-p: exp(x − max) >= min_p, the max always
        # kept), its mass, and the Gumbel-max over it
        total = tl.zeros((), tl.float32)
        best = tl.full((), NEG, tl.float32)
        arg = tl.zeros((), tl.int64) + V
        run = tl.zeros((), tl.int64)
        for start in range(0, V, BLOCK_V):
            offs = start + lanes
            inb = offs < V
            x = tl.load(z_row + offs, mask=inb, other=NEG).to(tl.float32) / temperature
            keep, run = _kept_fast(_key(x), inb, thr, ntie, run, all_ties)
            w = tl.exp(x - m)
            if MIN_P:
                keep = keep & (w >= min_p)
            total += tl.sum(tl.where(keep, w, 0.0), axis=0)
            score = tl.where(keep, x + _noise(seed, ctr_lo, ctr_hi, sub0, start, BLOCK_V), NEG)
            best, arg = _argmax_merge(score, offs, V, best, arg)
    _finish(z_row, tok_ptr + row, logp_ptr + row, V, temperature, m, total, arg, pinf, nan, GREEDY)


@triton.jit
def _row_stats(z_row, lo, hi, V, temperature, seed, ctr_lo, ctr_hi, sub0, NO_NOISE: tl.constexpr,
               BLOCK_V: tl.constexpr):
    """Entries lo .. hi - 1 of a row (lo a multiple of BLOCK_V): max and Σ exp(x − max) of the
    scaled logits, NaN flag, first +inf (V: none), and the best score with its first index (V:
    none); the score is x + Gumbel noise, or x when NO_NOISE."""
    lanes = tl.arange(0, BLOCK_V)
    NEG: tl.constexpr = float("-inf")
    m = tl.full((), NEG, tl.float32)
    s = tl.zeros((), tl.float32)
    best = tl.full((), NEG, tl.float32)
    arg = tl.zeros((), tl.int64) + V
    pinf = tl.zeros((), tl.int64) + V
    nan = tl.zeros((), tl.int32)
    for start in range(lo, hi, BLOCK_V):
        offs = start + lanes
        inb = offs < hi
        x = tl.load(z_row + offs, mask=inb, other=NEG).to(tl.float32) / temperature
        bad = x != x
        nan = tl.maximum(nan, tl.max(bad.to(tl.int32), axis=0))
        pinf = tl.minimum(pinf, tl.min(tl.where(x == float("inf"), offs, V), axis=0))
        x = tl.where(bad, NEG, x)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == NEG, 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
        if NO_NOISE:
            score = x
        else:
            score = x + _noise(seed, ctr_lo, ctr_hi, sub0, start, BLOCK_V)
        best, arg = _argmax_merge(score, offs, V, best, arg)
    return m, s, best, arg, pinf, nan


@triton.jit
def _finish(z_row, tok_out, logp_out, V, temperature, m, total, arg, pinf, nan, GREEDY: tl.constexpr):
    """Store a row's token and log-prob (total: Σ exp(x − m) over the kept tokens)."""
    # no distribution: NaN, +inf (greedy excepted: its answer is the first +inf) or only −inf
    if GREEDY:
        broken = (nan > 0) | (m == float("-inf"))
    else:
        broken = (nan > 0) | (pinf < V) | (m == float("-inf"))
    tok = tl.where(broken, tl.where(pinf < V, pinf, 0), tl.where(arg < V, arg, 0))
    x_tok = tl.load(z_row + tok).to(tl.float32) / temperature
    if GREEDY:
        lp = tl.where(broken, float("nan"), 0.0)
    else:
        lp = tl.where(broken, float("nan"), x_tok - m - tl.log(total))
    tl.store(tok_out, tok)
    tl.store(logp_out, lp)


@triton.jit
def _partial_kernel(z_ptr, part_f_ptr, part_i_ptr, V, stride, chunk, n_chunks, temperature, seed, ctr_lo, ctr_hi,
                    GREEDY: tl.constexpr, BLOCK_V: tl.constexpr):
    """Split rows, step 1 — grid (B, chunks): pass 1 over one chunk of a row; (max, Σ exp,
    best score) and (first index of it, first +inf, NaN flag) to the partial buffers."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    lo = c * chunk
    m, s, best, arg, pinf, nan = _row_stats(z_ptr + row * stride, lo, tl.minimum(lo + chunk, V), V, temperature,
                                            seed, ctr_lo, ctr_hi, row * ((V + 3) // 4), GREEDY, BLOCK_V)
    k = (row * n_chunks + c) * 3
    tl.store(part_f_ptr + k, m)
    tl.store(part_f_ptr + k + 1, s)
    tl.store(part_f_ptr + k + 2, best)
    tl.store(part_i_ptr + k, arg)
    tl.store(part_i_ptr + k + 1, pinf)
    tl.store(part_i_ptr + k + 2, nan.to(tl.int64))


@triton.jit
def _merge_kernel(z_ptr, part_f_ptr, part_i_ptr, tok_ptr, logp_ptr, V, stride, n_chunks, temperature,
                  GREEDY: tl.constexpr, CHUNKS: tl.constexpr):
    """Split rows, step 2 — one program per row: the chunks' statistics merged (the lowest
    index wins a tie of best scores, as in one pass), then the token and its log-prob."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, CHUNKS)
    ok = j < n_chunks
    k = (row * n_chunks + j) * 3
    NEG: tl.constexpr = float("-inf")
    ms = tl.load(part_f_ptr + k, mask=ok, other=NEG)
    ss = tl.load(part_f_ptr + k + 1, mask=ok, other=0.0)
    bs = tl.load(part_f_ptr + k + 2, mask=ok, other=NEG)
    args = tl.load(part_i_ptr + k, mask=ok, other=V)
    pinfs = tl.load(part_i_ptr + k + 1, mask=ok, other=V)
    nans = tl.load(part_i_ptr + k + 2, mask=ok, other=0)
    m = tl.max(ms, axis=0)
    shift = tl.where(m == NEG, 0.0, m)
    total = tl.sum(ss * tl.exp(ms - shift), axis=0)
    best = tl.max(bs, axis=0)
    arg = tl.min(tl.where((bs == best) & (args < V), args, V), axis=0)
    _finish(z_ptr + row * stride, tok_ptr + row, logp_ptr + row, V, temperature, m, total, arg,
            tl.min(pinfs, axis=0), tl.max(nans, axis=0), GREEDY)


def _split_chunks(B: int, V: int, blk: int, device: torch.device) -> int:
    """How many programs share a row in plain / greedy sampling: 1 (one program per row) unless
    the rows are few next to the SMs and long (``few_long_rows``); then about 2·SMs programs in all."""
    tiles = triton.cdiv(V, blk)
    if not few_long_rows(B, tiles, device):
        return 1
    return max(1, min(tiles, (2 * sm_count(device)) // B))


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
    ``(tokens [B] int64, logp [B] float32)``, logp under the processed distribution (0 for
    greedy)."""
    if 0 < temperature < reference.TINY_TEMPERATURE:
        # z / T overflows float32 in the kernel (NaN log-probs); the reference reaches the greedy limit
        return reference.sample(logits.detach(), temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                generator=generator)
    z = logits.detach()
    if z.stride(1) != 1:
        z = z.contiguous()
    B, V = z.shape
    tok = torch.empty(B, dtype=torch.int64, device=z.device)
    logp = torch.empty(B, dtype=torch.float32, device=z.device)
    if B == 0:
        return tok, logp
    # fp32 temperature as the other backends; one that rounds to 0 is greedy, the limit
    t32 = float(torch.tensor(temperature, dtype=torch.float32))
    greedy = temperature == 0 or t32 == 0.0
    seed, offset = (0, 0) if greedy else _seed_offset(z.device, generator)
    ctr = (offset // 4) % 2**64
    topk = not greedy and 0 < top_k < V
    topp = not greedy and top_p < 1.0
    blk = min(BLOCK_V, max(16, triton.next_power_of_2(V)))
    minp = not greedy and min_p > 0.0
    temp = 1.0 if greedy else t32
    n_chunks = _split_chunks(B, V, blk, z.device) if not (topk or topp or minp) else 1
    if n_chunks > 1:
        chunk = triton.cdiv(triton.cdiv(V, n_chunks), blk) * blk
        n_chunks = triton.cdiv(V, chunk)
        part_f = torch.empty(B, n_chunks, 3, dtype=torch.float32, device=z.device)
        part_i = torch.empty(B, n_chunks, 3, dtype=torch.int64, device=z.device)
        _partial_kernel[(B, n_chunks)](z, part_f, part_i, V, z.stride(0), chunk, n_chunks, temp, seed,
                                       ctr & 0xFFFFFFFF, ctr >> 32, GREEDY=greedy, BLOCK_V=blk)
        _merge_kernel[(B,)](z, part_f, part_i, tok, logp, V, z.stride(0), n_chunks, temp, GREEDY=greedy,
                            CHUNKS=max(2, triton.next_power_of_2(n_chunks)))
        return tok, logp
    # fixed-point mass unit 2^-(62 - bits(V)): V weights <= 1 sum below 2^62
    scale = float(2 ** (62 - V.bit_length()))
    _sample_kernel[(B,)](z, tok, logp, V, z.stride(0), temp, int(top_k), float(top_p),
                         float(min_p), scale, seed, ctr & 0xFFFFFFFF, ctr >> 32, GREEDY=greedy, TOPK=topk, TOPP=topp,
                         MIN_P=minp, BLOCK_V=blk,
                         # a 16-bin histogram holds [tile, 16] flags: a smaller tile for the radix passes
                         RADIX_BLOCK=min(RADIX_BLOCK, blk))
    return tok, logp
