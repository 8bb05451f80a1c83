// CUDA sampler: one token per row of logits [B, V] from the temperature / top-k / top-p /
// min-p processed distribution, without sorting the vocabulary. One block per row, except
// for plain draws of few rows (below).
//
// * Plain temperature sampling with in-kernel Philox (sample_philox, no filters): ONE pass.
//   Gumbel-max — argmax_i x_i + g_i with g_i = -log(E_i), E_i ~ Exp(1) — is an exact draw from
//   softmax(x); the same pass keeps the online max / sum-exp for the chosen token's log-prob.
//   Greedy is the same pass without noise. When there are too few rows to fill the GPU (one
//   block per row left B = 1 on one SM), each row is split over several blocks whose partial
//   (max, sum-exp, best score, argmax) a second, one-warp-per-row kernel merges: the argmax
//   merge (larger score, then the lower index) is associative, and every entry keeps its
//   Philox noise, so the tokens are those of the one-block pass.
// * Filters: every filter keeps a prefix of the order (value desc, index asc), so the kept set
//   is a threshold key plus the number of ties at it that survive (lowest indices first, as the
//   reference's stable sort). The thresholds are found by radix select on the order-preserving
//   uint32 key of the fp32 scaled logit (as torch.topk does): 4 passes of 8 bits, each a
//   256-bin shared-memory histogram of counts (top-k) or of fixed-point probability mass
//   (top-p). Integer masses make the sums exact and independent of the atomics' order, so the
//   boundary is deterministic and the bookkeeping across passes consistent. Each warp adds one
//   atomic per distinct bin among its 32 entries: in the first passes (sign and exponent bits)
//   nearly all of a row falls into a few bins, where per-entry shared atomics serialise. min-p
//   is a weight threshold. A last pass in index order ranks the boundary ties (block scans,
//   only when some ties are cut; continuous logits rarely tie) and draws: Gumbel-max over
//   the kept set (Philox variant) or the inverse CDF in vocabulary order of a given uniform
//   (the `sample` schema, which picks the reference's tokens for the same uniforms).
// * Rows with NaN, +inf, or only -inf logits have no distribution: they give a defined token
//   (0, or the first +inf) and logp = NaN, never an out-of-range index (greedy rows with +inf
//   are defined: the first +inf, logp 0, as the other backends). The Python glue documents it;
//   no host sync is spent to raise.
// * Philox stream: key = seed, counter = (offset / 4 as 64 bits, row·⌈V/4⌉ + i/4 as 64 bits),
//   output i mod 4 — the layout of curand_init(seed, subsequence = row·⌈V/4⌉ + i/4, offset),
//   each Philox block serving 4 consecutive entries, so one launch uses exactly the slot
//   [offset, offset + 4) that the Python glue reserves by advancing the generator.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <atomic>
#include <cfloat>

#include "common.cuh"

namespace rlhf_fast {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kBins = 256;

// -0.0 and +0.0 share one key: the reference's sort sees them as equal
__device__ __forceinline__ uint32_t float_key(float x) {
  uint32_t b = __float_as_uint(x);
  if (b == 0x80000000u) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// x = z / T with IEEE division, as the reference and the CPU kernel (fast-math `/` is not
// correctly rounded and would move ties and top-k / top-p boundaries)
// z / 1 is z exactly (NaN and ±inf included), so temperature 1 — the usual RL rollout —
// skips the division, which every radix pass repeats per entry.
template <typename scalar_t>
__device__ __forceinline__ float scaled(scalar_t z, float temperature) {
  return temperature == 1.f ? static_cast<float>(z) : __fdiv_rn(static_cast<float>(z), temperature);
}

// exp(x - m). __fsub_rn is never contracted into an FMA, so the weight of a key recomputed from
// key_float() is bit-identical to the weight the same token got in a histogram.
__device__ __forceinline__ float weight(float x, float m) { return __expf(__fsub_rn(x, m)); }

// w in [0, 1] as an integer count of 2^-e units; e = 62 - bits(V) keeps V weights below 2^62.
__device__ __forceinline__ unsigned long long fixed_weight(float w, float scale) {
  return __float2ull_rz(w * scale);
}

// Gumbel noise -log(E), E = -log(1 - v) ~ Exp(1), v uniform on (0, 1) with 2^-32 resolution
// near 0: the large noise values, which let unlikely tokens win, are resolved up to ~22.9
// (24 bits of u in -log(-log u) would cap them at 17.3, making every token 20 nats below the
// max impossible). v is capped below 1 so that the noise is always finite. E is the Triton
// kernel's: below 2^-5 the series of -log1p(-v) to v^6 / 6 (truncation < 2^-30 relative),
// where 1 - v would round away v's low bits; above, the fast log of 1 - v, whose absolute error
// (2^-21.4 on [0.5, 2]) is below 2^-16 of E >= 2^-5 (log1pf, a long polynomial per entry, was a
// good part of the cost of plain sampling).
__device__ __forceinline__ float gumbel(uint32_t bits) {
  const float v = fminf((static_cast<float>(bits) + 0.5f) * 2.3283064365386963e-10f, 0.99999994f);
  const float e = v < 0.03125f
                      ? v * (1.f + v * (0.5f + v * (0.33333333f + v * (0.25f + v * (0.2f + v * 0.16666667f)))))
                      : -__logf(1.f - v);
  return -__logf(e);
}

__device__ __forceinline__ uint4 philox_block(uint2 key, uint64_t ctr_hi /* offset / 4 */, uint64_t sub) {
  return philox4x32_10(make_uint4(static_cast<uint32_t>(ctr_hi), static_cast<uint32_t>(ctr_hi >> 32),
                                  static_cast<uint32_t>(sub), static_cast<uint32_t>(sub >> 32)),
                       key);
}

__device__ __forceinline__ uint32_t philox_word(const uint4& r, int j) {
  return j == 0 ? r.x : (j == 1 ? r.y : (j == 2 ? r.z : r.w));
}

// The noise of entry i of the row whose first Philox subsequence is sub0 (see the file comment).
__device__ __forceinline__ float philox_gumbel(uint2 key, uint64_t ctr_hi, uint64_t sub0, int64_t i) {
  return gumbel(philox_word(philox_block(key, ctr_hi, sub0 + static_cast<uint64_t>(i >> 2)), static_cast<int>(i & 3)));
}

// Adds a warp's entries to a radix histogram: `bin` (-1: not counted) and, with MASS, the
// fixed-point weight `w`. One count atomic per distinct bin of the warp; the masses of up to
// 4 distinct bins are warp sums (one atomic each), beyond that one atomic per entry. Every lane
// of the warp must call it (warp-uniform trip counts); integer sums keep it exact.
template <bool MASS>
__device__ __forceinline__ void warp_histogram_add(int bin, unsigned long long w, unsigned int* h_cnt,
                                                   unsigned long long* h_mass) {
  const int lane = threadIdx.x & 31;
  const unsigned peers = __match_any_sync(kFull, bin);
  const bool leader = bin >= 0 && lane == __ffs(peers) - 1;
  const unsigned leaders = __ballot_sync(kFull, leader);
  if (leader) atomicAdd(&h_cnt[bin], static_cast<unsigned int>(__popc(peers)));
  if (!MASS) return;
  if (__popc(leaders) <= 4) {
    for (unsigned rest = leaders; rest; rest &= rest - 1) {  // warp-uniform loop
      const int l = __ffs(rest) - 1;
      const int b = __shfl_sync(kFull, bin, l);
      const unsigned long long sum = warp_sum<unsigned long long>(bin == b ? w : 0ull);
      if (lane == l) atomicAdd(&h_mass[b], sum);
    }
  } else if (bin >= 0) {
    atomicAdd(&h_mass[bin], w);
  }
}

// online (max, Σ exp(x - max)) merge, -inf as the identity
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    s = s2;
    return;
  }
  const float M = fmaxf(m, m2);
  s = s * __expf(m - M) + s2 * __expf(m2 - M);
  m = M;
}

// larger score wins, the smaller index on ties (the reference's argmax)
__device__ __forceinline__ void arg_merge(float& v, int64_t& i, float v2, int64_t i2) {
  if (v2 > v || (v2 == v && i2 < i)) {
    v = v2;
    i = i2;
  }
}

// x into the online (max, Σ exp(x - max)): one exp per entry (lse_merge's two are for merging
// partial sums). -inf is skipped; m = -inf has s = 0, so the first finite x gives s = 1.
__device__ __forceinline__ void lse_add(float& m, float& s, float x) {
  if (x > m) {
    s = s * __expf(m - x) + 1.f;
    m = x;
  } else if (x != -INFINITY) {
    s += __expf(x - m);
  }
}

// 4 consecutive entries, one vector load: what a thread reads per Philox block
template <typename scalar_t>
struct alignas(4 * sizeof(scalar_t)) Vec4 {
  scalar_t v[4];
};

// The first pass of every draw over the groups [g_begin, g_end) of 4 entries of row z: online
// max / sum-exp, NaN / +inf detection and the argmax of the scores (x plus its Gumbel noise
// when `noise`, x alone otherwise). `vec`: z + 4g is aligned for a Vec4 load (V % 4 == 0).
template <typename scalar_t>
__device__ __forceinline__ void row_stats(const scalar_t* __restrict__ z, int64_t V, int64_t g_begin, int64_t g_end,
                                          float temp, bool noise, bool vec, uint2 key, uint64_t ctr_hi, uint64_t sub0,
                                          float& m, float& s, float& best, int64_t& arg, int64_t& pinf, int& nan) {
  for (int64_t g = g_begin + threadIdx.x; g < g_end; g += blockDim.x) {
    const int64_t i0 = 4 * g;
    float x[4];
    if (vec) {
      const Vec4<scalar_t> q = *reinterpret_cast<const Vec4<scalar_t>*>(z + i0);
#pragma unroll
      for (int j = 0; j < 4; ++j) x[j] = scaled(q.v[j], temp);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) x[j] = i0 + j < V ? scaled(z[i0 + j], temp) : -INFINITY;
    }
    // one Philox block gives the 4 noises
    const uint4 r = noise ? philox_block(key, ctr_hi, sub0 + static_cast<uint64_t>(g)) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = i0 + j;
      if (i >= V) break;
      if (isnan(x[j])) {
        nan = 1;
        continue;
      }
      if (x[j] == INFINITY) pinf = min(pinf, i);
      lse_add(m, s, x[j]);
      arg_merge(best, arg, noise ? x[j] + gumbel(philox_word(r, j)) : x[j], i);
    }
  }
}

// The token and log-prob of a plain (greedy or unfiltered Gumbel-max) draw from its row's
// merged statistics: greedy gives the first maximum (+inf included) with logp 0; rows with
// NaN, +inf or only -inf have no distribution: a defined token, logp NaN.
template <typename scalar_t>
__device__ __forceinline__ void finish_plain(const scalar_t* __restrict__ z, int64_t V, bool greedy, float temp,
                                             float m, float s, int64_t arg, int64_t pinf, int nan,
                                             int64_t* __restrict__ token, float* __restrict__ logp) {
  if (greedy && !nan && m != -INFINITY) {
    *token = arg;
    *logp = 0.f;
  } else if (nan || pinf < V || m == -INFINITY) {
    *token = pinf < V ? pinf : 0;
    *logp = NAN;
  } else {
    const int64_t tok = arg < V ? arg : 0;
    *token = tok;
    *logp = scaled(z[tok], temp) - m - __logf(s);
  }
}

// Merge of the online statistics (max, sum-exp, best score and its index, first +inf, NaN seen).
__device__ __forceinline__ void stats_merge(float& m, float& s, float& best, int64_t& arg, int64_t& pinf, int& nan,
                                            float m2, float s2, float b2, int64_t a2, int64_t p2, int n2) {
  lse_merge(m, s, m2, s2);
  arg_merge(best, arg, b2, a2);
  pinf = min(pinf, p2);
  nan |= n2;
}

// The warp's statistics merged into lane 0 (a shfl_down tree: lanes past the end merge with
// themselves, but lane 0 only ever reads lanes whose values are still exact).
__device__ __forceinline__ void warp_reduce_stats(float& m, float& s, float& best, int64_t& arg, int64_t& pinf,
                                                  int& nan) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    stats_merge(m, s, best, arg, pinf, nan, __shfl_down_sync(kFull, m, o), __shfl_down_sync(kFull, s, o),
                __shfl_down_sync(kFull, best, o), __shfl_down_sync(kFull, arg, o), __shfl_down_sync(kFull, pinf, o),
                __shfl_down_sync(kFull, nan, o));
  }
}

// Block-wide merge of the per-thread online statistics (and a Gumbel argmax when used); every
// thread gets the result. blockDim.x is a multiple of 32.
__device__ void block_reduce_stats(float& m, float& s, float& best, int64_t& arg, int64_t& pinf, int& nan) {
  __shared__ float sm[32], ss[32], sb[32];
  __shared__ int64_t sa[32], sp[32];
  __shared__ int sn[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  warp_reduce_stats(m, s, best, arg, pinf, nan);
  __syncthreads();
  if (lane == 0) {
    sm[warp] = m, ss[warp] = s, sb[warp] = best, sa[warp] = arg, sp[warp] = pinf, sn[warp] = nan;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < nwarps; ++w) {
      stats_merge(m, s, best, arg, pinf, nan, sm[w], ss[w], sb[w], sa[w], sp[w], sn[w]);
    }
    sm[0] = m, ss[0] = s, sb[0] = best, sa[0] = arg, sp[0] = pinf, sn[0] = nan;
  }
  __syncthreads();
  m = sm[0], s = ss[0], best = sb[0], arg = sa[0], pinf = sp[0], nan = sn[0];
  __syncthreads();
}

// The kept set: key > thr, or key == thr with rank (among key == thr, by index) < ntie.
struct Kept {
  uint32_t thr;
  int64_t ntie;
  bool all;       // no filter yet: everything is kept
  bool all_ties;  // every entry with key == thr is kept (ntie is their count): no ranking needed
};

struct SelectResult {
  uint32_t key;
  unsigned long long above;   // kept entries with key > result key: count (top-k) or fixed mass (top-p)
  long long eq_cnt;           // kept entries with key == result key
  unsigned long long target;  // the count / fixed mass that had to be reached
};

// Radix select over the kept entries `prev` (those with key > prev.thr, plus prev.ntie entries
// at prev.thr) for the boundary key where the count (MASS = false; target = param = top_k) or
// the fixed-point mass (MASS = true; target = ceil(param·total), param = top_p) from the top
// first reaches the target. Exact: 4 passes, integer sums. Invariant at every pass:
// above < target <= above + (sum of this pass's bins), so a bin is always found.
template <typename scalar_t, bool MASS>
__device__ SelectResult radix_select(const scalar_t* __restrict__ z, int64_t V, float temperature, float m,
                                     float scale, const Kept& prev, double param) {
  __shared__ unsigned long long h_mass[MASS ? kBins : 1];
  __shared__ unsigned int h_cnt[kBins];
  __shared__ uint32_t s_prefix;
  __shared__ unsigned long long s_above, s_target;
  __shared__ long long s_eq;
  if (threadIdx.x == 0) {
    s_prefix = 0;
    s_above = 0;
    s_target = MASS ? 0ull : static_cast<unsigned long long>(param);
    s_eq = 0;
  }
  const unsigned long long w_prev = prev.all ? 0ull : fixed_weight(weight(key_float(prev.thr), m), scale);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
      h_cnt[b] = 0;
      if (MASS) h_mass[b] = 0;
    }
    __syncthreads();  // also publishes thread 0's s_* of the previous pass / the init
    const uint32_t prefix = s_prefix;
    const uint32_t hi_mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
    // warp-uniform trip count: warp_histogram_add is a warp collective
    for (int64_t base = threadIdx.x & ~31; base < V; base += blockDim.x) {
      const int64_t i = base + (threadIdx.x & 31);
      int bin = -1;
      unsigned long long w = 0;
      if (i < V) {
        const float x = scaled(z[i], temperature);
        const uint32_t k = float_key(x);
        // ties at the previous threshold are added below as `ntie` virtual entries
        if ((prev.all || k > prev.thr) && ((k ^ prefix) & hi_mask) == 0) {
          bin = static_cast<int>((k >> shift) & 0xff);
          if (MASS) w = fixed_weight(weight(x, m), scale);
        }
      }
      warp_histogram_add<MASS>(bin, w, h_cnt, h_mass);
    }
    __syncthreads();
    if (threadIdx.x == 0 && !prev.all && ((prev.thr ^ prefix) & hi_mask) == 0) {
      const int bin = (prev.thr >> shift) & 0xff;
      h_cnt[bin] += static_cast<unsigned int>(prev.ntie);
      if (MASS) h_mass[bin] += static_cast<unsigned long long>(prev.ntie) * w_prev;
    }
    __syncthreads();
    // warp 0 finds the bin where the running total from the top reaches the target: lane L
    // owns bins 255-8L .. 248-8L
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      unsigned long long tot = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int bin = 255 - 8 * lane - j;
        tot += MASS ? h_mass[bin] : static_cast<unsigned long long>(h_cnt[bin]);
      }
      unsigned long long inc = tot;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long n = __shfl_up_sync(kFull, inc, o);
        if (lane >= o) inc += n;
      }
      unsigned long long target = s_target;
      if (MASS && shift == 24) {
        // the kept set's total mass is the first pass's sum; keep the smallest prefix whose
        // mass reaches top_p of it (the reference's `mass_before < p`); >= 1 unit and <= total
        const unsigned long long total = __shfl_sync(kFull, inc, 31);
        const double t = ceil(param * static_cast<double>(total));
        target = t < 1.0 ? 1ull : (t >= static_cast<double>(total) ? total : static_cast<unsigned long long>(t));
      }
      const unsigned long long base = s_above;
      const unsigned hit = __ballot_sync(kFull, base + inc >= target);
      // hit != 0 by the invariant; if it ever were 0, s_prefix keeps zero bits here: a
      // wrong-but-defined threshold, never an out-of-range access
      if (hit && lane == __ffs(hit) - 1) {
        unsigned long long run = base + inc - tot;
        int chosen = 255 - 8 * lane - 7;
        for (int j = 0; j < 8; ++j) {
          const int bin = 255 - 8 * lane - j;
          const unsigned long long v = MASS ? h_mass[bin] : static_cast<unsigned long long>(h_cnt[bin]);
          if (run + v >= target) {
            chosen = bin;
            break;
          }
          run += v;
        }
        s_prefix = prefix | (static_cast<uint32_t>(chosen) << shift);
        s_above = run;
        s_eq = h_cnt[chosen];
        s_target = target;
      }
    }
    __syncthreads();
  }
  SelectResult r{s_prefix, s_above, s_eq, s_target};
  __syncthreads();  // the next call's thread 0 re-initialises the shared state
  return r;
}

// One block per row. uniforms != nullptr: inverse CDF of uniforms[row]; else Gumbel-max with
// Philox (see the file comment for the counter).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sample_kernel(const scalar_t* __restrict__ logits, int64_t V,
                                                          float temperature, int64_t top_k, float top_p, float min_p,
                                                          const double* __restrict__ uniforms, uint64_t seed,
                                                          uint64_t offset, bool vec, int64_t* __restrict__ tokens,
                                                          float* __restrict__ logp_out) {
  const int64_t row = blockIdx.x;
  const scalar_t* z = logits + row * V;
  const bool greedy = temperature == 0.f;
  const float temp = greedy ? 1.f : temperature;
  const bool filtered = (top_k > 0 && top_k < V) || top_p < 1.f || min_p > 0.f;
  const bool gumbel_one_pass = !greedy && !filtered && uniforms == nullptr;
  const uint2 key = make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint64_t ctr_hi = offset >> 2;  // torch keeps Philox offsets multiples of 4
  const uint64_t sub0 = static_cast<uint64_t>(row) * static_cast<uint64_t>((V + 3) >> 2);

  // ---- pass 1: online max / sum-exp, argmax, NaN / +inf detection (and, without filters,
  // the whole Gumbel-max draw)
  float m = -INFINITY, s = 0.f, best = -INFINITY;
  int64_t arg = V, pinf = V;
  int nan = 0;
  row_stats(z, V, 0, (V + 3) >> 2, temp, gumbel_one_pass, vec, key, ctr_hi, sub0, m, s, best, arg, pinf, nan);
  block_reduce_stats(m, s, best, arg, pinf, nan);
  // all of the branches below depend only on block-uniform values
  if ((greedy && !nan && m != -INFINITY) || nan || pinf < V || m == -INFINITY || gumbel_one_pass) {
    if (threadIdx.x == 0) finish_plain(z, V, greedy, temp, m, s, arg, pinf, nan, tokens + row, logp_out + row);
    return;
  }

  // ---- filters: thresholds by radix select
  // fixed-point scale 2^(62 - bits(V)): V weights <= 1 sum below 2^62
  const int vbits = 64 - __clzll(static_cast<unsigned long long>(V));
  const float scale = __int_as_float((127 + 62 - vbits) << 23);
  Kept kept{0u, 0, true, true};
  if (top_k > 0 && top_k < V) {
    const SelectResult r = radix_select<scalar_t, false>(z, V, temp, m, scale, kept, static_cast<double>(top_k));
    const int64_t ntie = top_k - static_cast<int64_t>(r.above);  // <= r.eq_cnt by the select's invariant
    kept = Kept{r.key, ntie, false, ntie >= r.eq_cnt};
  }
  if (top_p < 1.f) {
    const SelectResult r = radix_select<scalar_t, true>(z, V, temp, m, scale, kept, static_cast<double>(top_p));
    // stable order: the j-th tie (by index) is kept iff the mass before it is < target, i.e.
    // j < ceil((target - above) / wt); at least one, at most all of them
    const unsigned long long wt = fixed_weight(weight(key_float(r.key), m), scale);
    const unsigned long long need = r.target > r.above ? r.target - r.above : 0ull;
    long long ntie = wt > 0 ? static_cast<long long>((need + wt - 1) / wt) : r.eq_cnt;
    ntie = ntie < r.eq_cnt ? ntie : r.eq_cnt;
    if (ntie < 1) ntie = 1;
    // r.eq_cnt counts the real ties, unless the threshold is top-k's, where it counts the ties
    // top-k kept: all of the real ones only if top-k kept them all
    const bool same_thr = !kept.all && r.key == kept.thr;
    kept = Kept{r.key, ntie, false, ntie >= r.eq_cnt && (!same_thr || kept.all_ties)};
  }

  // ---- last pass(es) in index order: rank the ties, apply min-p, then draw
  __shared__ int s_scan[33];
  __shared__ double s_dscan[33];
  __shared__ double s_red[33];
  __shared__ double s_S;
  __shared__ long long s_found, s_last;
  const float wmin = min_p;  // p >= min_p·p_max  <=>  exp(x - m) >= min_p (the max is always kept)
  double S = 0.0;  // kept mass, in units of exp(x - m)
  best = -INFINITY;
  arg = V;
  int64_t last_kept = -1;
  const int passes = uniforms ? 2 : 1;  // the inverse CDF needs the total first
  double target = 0.0, cum = 0.0;
  for (int pass = 0; pass < passes; ++pass) {
    const bool draw = pass + 1 == passes && uniforms;
    int64_t tie_base = 0;
    // uniform trip count: block_exclusive_scan has __syncthreads inside
    for (int64_t start = 0; start < V; start += blockDim.x) {
      const int64_t i = start + threadIdx.x;
      float x = -INFINITY;
      uint32_t k = 0;
      if (i < V) {
        x = scaled(z[i], temp);
        k = float_key(x);
      }
      const int eq = (i < V && !kept.all && k == kept.thr) ? 1 : 0;
      int tie_total = 0, rank = 0;
      if (!kept.all_ties) rank = block_exclusive_scan(eq, s_scan, &tie_total);  // block-uniform branch
      const float w = i < V ? weight(x, m) : 0.f;
      const bool in = i < V && (kept.all || k > kept.thr || (eq && (kept.all_ties || tie_base + rank < kept.ntie))) &&
                      w >= wmin;
      tie_base += tie_total;
      if (!draw) {
        if (in) {
          S += w;
          if (w > 0.f) last_kept = max(last_kept, i);  // never fall back onto a zero-probability token
          if (!uniforms) arg_merge(best, arg, x + philox_gumbel(key, ctr_hi, sub0, i), i);
        }
      } else {
        // inverse CDF: first index whose cumulative kept mass exceeds u·S
        double tile_total;
        const double excl = block_exclusive_scan(in ? static_cast<double>(w) : 0.0, s_dscan, &tile_total);
        const double inc = cum + excl + (in ? static_cast<double>(w) : 0.0);
        const unsigned hit = __ballot_sync(kFull, in && inc > target);
        if (hit && (threadIdx.x & 31) == __ffs(hit) - 1) atomicMin(&s_found, static_cast<long long>(i));
        cum += tile_total;
        __syncthreads();
        if (s_found < V) break;  // block-uniform: every thread reads the same shared value
      }
    }
    if (!draw && uniforms) {
      S = block_sum(S, s_red);
      target = uniforms[row] * S;
      if (threadIdx.x == 0) {
        s_last = -1;
        s_found = V;  // V: not found yet (atomicMin in the draw pass)
        s_S = S;
      }
      __syncthreads();
      atomicMax(&s_last, static_cast<long long>(last_kept));
      __syncthreads();
    }
  }
  if (uniforms) {
    if (threadIdx.x == 0) {
      // u·S rounded up to S: the last kept token (the reference's clamp to the end)
      int64_t tok = s_found < V ? s_found : s_last;
      if (tok < 0 || tok >= V) tok = 0;
      tokens[row] = tok;
      logp_out[row] = static_cast<float>(static_cast<double>(__fsub_rn(scaled(z[tok], temp), m)) - log(s_S));
    }
    return;
  }
  S = block_sum(S, s_red);
  float mm = 0.f, ss = 0.f;  // unused lanes of the shared reduction
  int64_t pp = V;
  int nn = 0;
  block_reduce_stats(mm, ss, best, arg, pp, nn);
  if (threadIdx.x == 0) {
    const int64_t tok = arg < V ? arg : 0;
    tokens[row] = tok;
    logp_out[row] = static_cast<float>(static_cast<double>(__fsub_rn(scaled(z[tok], temp), m)) - log(S));
  }
}

// ---- plain draws of few rows: each row split over `chunks` blocks

// One block's share of a row: the statistics row_stats gathered over its groups.
struct RowPartial {
  float m, s, best;
  int nan;
  int64_t arg, pinf;
};

constexpr int kSplitThreads = 256;
constexpr int kMergeRowsPerBlock = 4;  // one warp per row

// Block b = row · chunks + c covers the groups [c·groups_per_chunk, (c + 1)·groups_per_chunk)
// of its row; the noise of every entry is the one-block pass's (the same Philox counter).
template <typename scalar_t>
__global__ void __launch_bounds__(kSplitThreads) plain_partial_kernel(const scalar_t* __restrict__ logits, int64_t V,
                                                                      int64_t chunks, int64_t groups_per_chunk,
                                                                      float temperature, uint64_t seed, uint64_t offset,
                                                                      bool vec, RowPartial* __restrict__ parts) {
  const int64_t row = blockIdx.x / chunks, c = blockIdx.x % chunks;
  const bool greedy = temperature == 0.f;
  const float temp = greedy ? 1.f : temperature;
  const uint2 key = make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const int64_t groups = (V + 3) >> 2;
  const uint64_t sub0 = static_cast<uint64_t>(row) * static_cast<uint64_t>(groups);
  const int64_t g_begin = c * groups_per_chunk;
  const int64_t g_end = g_begin + groups_per_chunk < groups ? g_begin + groups_per_chunk : groups;
  float m = -INFINITY, s = 0.f, best = -INFINITY;
  int64_t arg = V, pinf = V;
  int nan = 0;
  row_stats(logits + row * V, V, g_begin, g_end, temp, !greedy, vec, key, offset >> 2, sub0, m, s, best, arg, pinf,
            nan);
  block_reduce_stats(m, s, best, arg, pinf, nan);
  if (threadIdx.x == 0) parts[blockIdx.x] = RowPartial{m, s, best, nan, arg, pinf};
}

// One warp per row merges its `chunks` partials and writes the draw.
template <typename scalar_t>
__global__ void __launch_bounds__(32 * kMergeRowsPerBlock) plain_merge_kernel(
    const scalar_t* __restrict__ logits, int64_t B, int64_t V, int64_t chunks, float temperature,
    const RowPartial* __restrict__ parts, int64_t* __restrict__ tokens, float* __restrict__ logp_out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeRowsPerBlock + (threadIdx.x >> 5);
  if (row >= B) return;  // the whole warp: rows are warp-uniform
  const int lane = threadIdx.x & 31;
  float m = -INFINITY, s = 0.f, best = -INFINITY;
  int64_t arg = V, pinf = V;
  int nan = 0;
  for (int64_t c = lane; c < chunks; c += 32) {
    const RowPartial p = parts[row * chunks + c];
    stats_merge(m, s, best, arg, pinf, nan, p.m, p.s, p.best, p.arg, p.pinf, p.nan);
  }
  warp_reduce_stats(m, s, best, arg, pinf, nan);
  if (lane == 0) {
    const bool greedy = temperature == 0.f;
    finish_plain(logits + row * V, V, greedy, greedy ? 1.f : temperature, m, s, arg, pinf, nan, tokens + row,
                 logp_out + row);
  }
}

// The streaming multiprocessors of `device` (cached: the attribute query is not free; threads
// that race to fill an entry store the same value).
int sm_count(int device) {
  static std::atomic<int> cache[64];
  if (device < 0 || device >= 64) return 132;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
      // the query's own error, cleared so that the launch check does not report it; the split
      // only sizes blocks, so a guess is harmless
      cudaGetLastError();
      n = 132;
    }
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// How many blocks share each row of a plain draw: enough for ~4 blocks of kSplitThreads per
// SM over all rows (one wave: the partial kernel holds 5 at its ~45 registers), each of more
// than 256 groups (1024 entries; ⌈groups / 512⌉ chunks at most), so that the merge stays small;
// 1 (the one-block-per-row kernel) when the rows alone fill the GPU.
int64_t plain_chunks(int64_t B, int64_t V, int device) {
  const int64_t target = 4 * static_cast<int64_t>(sm_count(device));
  const int64_t by_rows = ceil_div(target, B), by_size = ceil_div(ceil_div(V, 4), 512);
  const int64_t chunks = by_rows < by_size ? by_rows : by_size;
  return chunks > 1 ? chunks : 1;
}

void check_args(const at::Tensor& logits, double temperature, int64_t top_k, double top_p, double min_p) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) > 0, "sample: logits must be [B, V] with V > 0");
  TORCH_CHECK_VALUE(logits.size(1) < (int64_t(1) << 31), "sample: V must be < 2^31");
  TORCH_CHECK_VALUE(logits.size(0) < (int64_t(1) << 31), "sample: B must be < 2^31 (one block per row)");
  TORCH_CHECK_VALUE(temperature >= 0.0, "sample: temperature must be >= 0, got ", temperature);
  TORCH_CHECK_VALUE(top_k >= 0, "sample: top_k must be >= 0, got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0.0 && top_p <= 1.0, "sample: top_p must be in (0, 1], got ", top_p);
  TORCH_CHECK_VALUE(min_p >= 0.0 && min_p <= 1.0, "sample: min_p must be in [0, 1], got ", min_p);
}

std::tuple<at::Tensor, at::Tensor> launch(const at::Tensor& logits, const at::Tensor* uniforms, double temperature,
                                          int64_t top_k, double top_p, double min_p, uint64_t seed,
                                          uint64_t offset) {
  const c10::DeviceGuard guard(logits.device());
  auto z = logits.contiguous();
  const int64_t B = z.size(0), V = z.size(1);
  auto tokens = at::empty({B}, z.options().dtype(at::kLong));
  auto logp = at::empty({B}, z.options().dtype(at::kFloat));
  if (B == 0) return {tokens, logp};
  at::Tensor u;
  if (uniforms) u = uniforms->to(z.device(), at::kDouble).contiguous();
  // a temperature that rounds to 0 in fp32 would divide by 0: treat it as greedy, the limit
  const float t32 = static_cast<float>(temperature);
  const bool greedy = t32 == 0.f;
  const bool filtered = (top_k > 0 && top_k < V) || top_p < 1.0 || min_p > 0.0;
  // plain draws (greedy, or Gumbel-max without filters) of few rows: several blocks per row
  const int64_t chunks = greedy || (!filtered && !uniforms) ? plain_chunks(B, V, z.get_device()) : 1;
  const int threads = V >= 4096 ? kThreads : 128;
  const cudaStream_t stream = current_stream(z);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "sample_cuda", [&] {
    const scalar_t* data = z.data_ptr<scalar_t>();
    // every row start is aligned for Vec4 loads when V % 4 == 0 and the first one is
    const bool vec = V % 4 == 0 && reinterpret_cast<uintptr_t>(data) % sizeof(Vec4<scalar_t>) == 0;
    if (chunks > 1) {
      auto parts = at::empty({B * chunks * static_cast<int64_t>(sizeof(RowPartial))}, z.options().dtype(at::kByte));
      auto* p = reinterpret_cast<RowPartial*>(parts.data_ptr<uint8_t>());
      plain_partial_kernel<scalar_t><<<static_cast<unsigned int>(B * chunks), kSplitThreads, 0, stream>>>(
          data, V, chunks, ceil_div(ceil_div(V, 4), chunks), t32, seed, offset, vec, p);
      check_launch("sample (partial)");
      plain_merge_kernel<scalar_t><<<static_cast<unsigned int>(ceil_div(B, kMergeRowsPerBlock)),
                                     32 * kMergeRowsPerBlock, 0, stream>>>(data, B, V, chunks, t32, p,
                                                                          tokens.data_ptr<int64_t>(),
                                                                          logp.data_ptr<float>());
    } else {
      sample_kernel<scalar_t><<<static_cast<unsigned int>(B), threads, 0, stream>>>(
          data, V, t32, top_k, static_cast<float>(top_p), static_cast<float>(min_p),
          uniforms ? u.data_ptr<double>() : nullptr, seed, offset, vec, tokens.data_ptr<int64_t>(),
          logp.data_ptr<float>());
    }
  });
  check_launch("sample");
  return {tokens, logp};
}

std::tuple<at::Tensor, at::Tensor> sample_cuda(const at::Tensor& logits, const at::Tensor& uniforms,
                                               double temperature, int64_t top_k, double top_p, double min_p) {
  check_args(logits, temperature, top_k, top_p, min_p);
  TORCH_CHECK_VALUE(uniforms.dim() == 1 && uniforms.size(0) == logits.size(0),
                    "sample: uniforms must be [B] with B = logits.size(0)");
  return launch(logits, &uniforms, temperature, top_k, top_p, min_p, 0, 0);
}

std::tuple<at::Tensor, at::Tensor> sample_philox_cuda(const at::Tensor& logits, int64_t seed, int64_t offset,
                                                      double temperature, int64_t top_k, double top_p,
                                                      double min_p) {
  check_args(logits, temperature, top_k, top_p, min_p);
  TORCH_CHECK_VALUE(offset >= 0 && offset % 4 == 0, "sample: the Philox offset must be a multiple of 4 >= 0, got ",
                    offset);
  return launch(logits, nullptr, temperature, top_k, top_p, min_p, static_cast<uint64_t>(seed),
                static_cast<uint64_t>(offset));
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) {
  m.impl("sample", &cuda::sample_cuda);
  m.impl("sample_philox", &cuda::sample_philox_cuda);
}

}  // namespace rlhf_fast
