// CUDA sampler: one token per row of logits [B, V] from the temperature / top-k / top-p /
// min-p processed distribution, without sorting the vocabulary. One block per row.
//
// * Plain temperature sampling with in-kernel Philox (sample_philox, no filters): ONE pass.
//   Gumbel-max — argmax_i x_i + g_i with g_i = -log(-log u_i) — is an exact draw from
//   softmax(x); the same pass keeps the online max / sum-exp for the chosen token's log-prob.
// * Filters: every filter keeps a prefix of the order (value desc, index asc), so the kept set
//   is a threshold key plus the number of ties at it that survive (lowest indices first, as the
//   reference's stable sort). The thresholds are found by radix select on the order-preserving
//   uint32 key of the fp32 scaled logit (as torch.topk does): 4 passes of 8 bits, each a
//   256-bin shared-memory histogram of counts (top-k) or probability mass (top-p), so the
//   boundary is exact without any sort. min-p is a weight threshold. A last pass in index
//   order ranks the boundary ties and draws: Gumbel-max over the kept set (Philox variant) or
//   the inverse CDF in vocabulary order of a given uniform (the `sample` schema, which picks
//   the reference's tokens for the same uniforms).
// * Rows with NaN, +inf, or only -inf logits have no distribution: they give a defined token
//   (0, or the first +inf) and logp = NaN, never an out-of-range index. The Python glue
//   documents it; no host sync is spent to raise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cfloat>

#include "common.cuh"

namespace rlhf_fast {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kBins = 256;

__device__ __forceinline__ uint32_t float_key(float x) {
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
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

struct RowStats {
  float m, s;
  int64_t argmax, first_posinf;
  int nan;
};

// Block-wide merge of the per-thread online statistics (and a Gumbel argmax when used).
__device__ void block_reduce_stats(float& m, float& s, float& best, int64_t& arg, int64_t& pinf, int& nan) {
  __shared__ float sm[32], ss[32], sb[32];
  __shared__ int64_t sa[32], sp[32];
  __shared__ int sn[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_down_sync(kFull, m, o), s2 = __shfl_down_sync(kFull, s, o);
    const float b2 = __shfl_down_sync(kFull, best, o);
    const int64_t a2 = __shfl_down_sync(kFull, arg, o), p2 = __shfl_down_sync(kFull, pinf, o);
    const int n2 = __shfl_down_sync(kFull, nan, o);
    lse_merge(m, s, m2, s2);
    arg_merge(best, arg, b2, a2);
    pinf = min(pinf, p2);
    nan |= n2;
  }
  __syncthreads();
  if (lane == 0) {
    sm[warp] = m, ss[warp] = s, sb[warp] = best, sa[warp] = arg, sp[warp] = pinf, sn[warp] = nan;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < nwarps; ++w) {
      lse_merge(m, s, sm[w], ss[w]);
      arg_merge(best, arg, sb[w], sa[w]);
      pinf = min(pinf, sp[w]);
      nan |= sn[w];
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
  bool all;  // no filter yet: everything is kept
};

struct SelectResult {
  uint32_t key;
  int64_t above_cnt;   // kept entries with key > result key
  double above_mass;   // their mass (weights exp(x - m))
  int64_t eq_cnt;      // kept entries with key == result key
};

// Radix select over the kept entries `prev` for the boundary key where the count (MASS =
// false) or the mass (MASS = true) from the top first reaches `target`. Exact: 4 passes.
template <typename scalar_t, bool MASS>
__device__ SelectResult radix_select(const scalar_t* __restrict__ z, int64_t V, float inv_temp, float m,
                                     const Kept& prev, double target) {
  __shared__ uint32_t h_cnt[kBins];
  __shared__ float h_mass[kBins];
  __shared__ uint32_t s_prefix;
  __shared__ long long s_above_cnt;
  __shared__ double s_above_mass;
  __shared__ long long s_eq;
  if (threadIdx.x == 0) {
    s_prefix = 0;
    s_above_cnt = 0;
    s_above_mass = 0.0;
    s_eq = 0;
  }
  const float w_prev = prev.all ? 0.f : __expf(key_float(prev.thr) * 1.0f - m);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
      h_cnt[b] = 0;
      h_mass[b] = 0.f;
    }
    __syncthreads();
    const uint32_t prefix = s_prefix;
    const uint32_t hi_mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const float x = static_cast<float>(z[i]) * inv_temp;
      const uint32_t k = float_key(x);
      // ties at the previous threshold are added below as `ntie` virtual entries
      if (!prev.all && k <= prev.thr) continue;
      if ((k & hi_mask) != (prefix & hi_mask)) continue;
      const int bin = (k >> shift) & 0xff;
      atomicAdd(&h_cnt[bin], 1u);
      if (MASS) atomicAdd(&h_mass[bin], __expf(x - m));
    }
    __syncthreads();
    if (threadIdx.x == 0 && !prev.all && (prev.thr & hi_mask) == (prefix & hi_mask)) {
      const int bin = (prev.thr >> shift) & 0xff;
      h_cnt[bin] += static_cast<uint32_t>(prev.ntie);
      if (MASS) h_mass[bin] += static_cast<float>(prev.ntie) * w_prev;
    }
    __syncthreads();
    // warp 0 finds the bin where the running total from the top reaches the target: lane L
    // owns bins 255-8L .. 248-8L
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      double tot = 0.0;
      for (int j = 0; j < 8; ++j) {
        const int bin = 255 - 8 * lane - j;
        tot += MASS ? static_cast<double>(h_mass[bin]) : static_cast<double>(h_cnt[bin]);
      }
      double inc = tot;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const double n = __shfl_up_sync(kFull, inc, o);
        if (lane >= o) inc += n;
      }
      const double base = MASS ? s_above_mass : static_cast<double>(s_above_cnt);
      const double excl = inc - tot;
      const unsigned hit = __ballot_sync(kFull, base + inc >= target && tot > 0.0);
      // rounding can leave the whole mass just below target: then keep everything (the
      // lowest non-empty bin)
      const unsigned nonempty = __ballot_sync(kFull, tot > 0.0);
      const int owner = hit ? (__ffs(hit) - 1) : (nonempty ? 31 - __clz(nonempty) : 0);
      if (lane == owner) {
        double run = base + excl;
        long long cnt_before = 0;
        double mass_before = 0.0;
        int chosen = 255 - 8 * lane - 7;
        for (int j = 0; j < 8; ++j) {
          const int bin = 255 - 8 * lane - j;
          const double v = MASS ? static_cast<double>(h_mass[bin]) : static_cast<double>(h_cnt[bin]);
          if (hit ? (run + v >= target && v > 0.0) : false) {
            chosen = bin;
            break;
          }
          if (!hit && h_cnt[bin] > 0) chosen = bin;  // keep walking to the lowest non-empty
          run += v;
        }
        // totals of the bins above `chosen` (all lanes before `owner`, then this lane's)
        for (int L = 0; L < 32; ++L) {
          for (int j = 0; j < 8; ++j) {
            const int bin = 255 - 8 * L - j;
            if (bin <= chosen) break;
            cnt_before += h_cnt[bin];
            mass_before += h_mass[bin];
          }
          if (255 - 8 * L - 7 <= chosen) break;
        }
        s_prefix = prefix | (static_cast<uint32_t>(chosen) << shift);
        s_above_cnt += cnt_before;
        s_above_mass += mass_before;
        s_eq = h_cnt[chosen];
      }
    }
    __syncthreads();
  }
  SelectResult r{s_prefix, s_above_cnt, s_above_mass, s_eq};
  __syncthreads();
  return r;
}

// One block per row. uniforms != nullptr: inverse CDF of uniforms[row]; else Gumbel-max with
// Philox(seed; counter = (index, row, offset)).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sample_kernel(const scalar_t* __restrict__ logits, int64_t V,
                                                          float temperature, int64_t top_k, float top_p, float min_p,
                                                          const double* __restrict__ uniforms, uint64_t seed,
                                                          uint64_t offset, int64_t* __restrict__ tokens,
                                                          float* __restrict__ logp_out) {
  const int64_t row = blockIdx.x;
  const scalar_t* z = logits + row * V;
  const bool greedy = temperature == 0.f;
  const float inv_temp = greedy ? 1.f : 1.f / temperature;
  const bool filtered = (top_k > 0 && top_k < V) || top_p < 1.f || min_p > 0.f;
  const bool gumbel_one_pass = !greedy && !filtered && uniforms == nullptr;
  const uint2 key = make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));

  // ---- pass 1: online max / sum-exp, argmax, NaN / +inf detection (and, without filters,
  // the whole Gumbel-max draw)
  float m = -INFINITY, s = 0.f, best = -INFINITY;
  int64_t arg = V, pinf = V;
  int nan = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const float x = static_cast<float>(z[i]) * inv_temp;
    if (isnan(x)) {
      nan = 1;
      continue;
    }
    if (x == INFINITY) pinf = min(pinf, i);
    lse_merge(m, s, x, 1.f);
    float score = x;
    if (gumbel_one_pass) {
      const uint4 r = philox4x32_10(
          make_uint4(static_cast<uint32_t>(i), static_cast<uint32_t>(row), static_cast<uint32_t>(offset),
                     static_cast<uint32_t>(offset >> 32)),
          key);
      score = x - __logf(-__logf(uniform_open(r.x)));
    }
    arg_merge(best, arg, score, i);
  }
  block_reduce_stats(m, s, best, arg, pinf, nan);
  if (nan || pinf < V || m == -INFINITY) {
    if (threadIdx.x == 0) {
      tokens[row] = pinf < V ? pinf : 0;
      logp_out[row] = NAN;
    }
    return;
  }
  if (greedy) {
    if (threadIdx.x == 0) {
      tokens[row] = arg;  // first index of the max (best holds the logits themselves)
      logp_out[row] = 0.f;
    }
    return;
  }
  if (gumbel_one_pass) {
    if (threadIdx.x == 0) {
      tokens[row] = arg;
      logp_out[row] = static_cast<float>(z[arg]) * inv_temp - m - __logf(s);
    }
    return;
  }

  // ---- filters: thresholds by radix select
  Kept kept{0u, 0, true};
  double mass = s;  // mass of the kept set, in units of exp(x - m)
  if (top_k > 0 && top_k < V) {
    const SelectResult r = radix_select<scalar_t, false>(z, V, inv_temp, m, kept, static_cast<double>(top_k));
    kept = Kept{r.key, top_k - r.above_cnt, false};
    // mass of the top-k set: the entries above, then the kept ties (one weight each)
    const float wt = __expf(key_float(r.key) - m);
    double above = 0.0;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const float x = static_cast<float>(z[i]) * inv_temp;
      if (float_key(x) > r.key) above += __expf(x - m);
    }
    __shared__ double red[33];
    above = block_sum(above, red);
    mass = above + static_cast<double>(kept.ntie) * wt;
  }
  if (top_p < 1.f) {
    const double target = static_cast<double>(top_p) * mass;
    const SelectResult r = radix_select<scalar_t, true>(z, V, inv_temp, m, kept, target);
    const float wt = __expf(key_float(r.key) - m);
    // stable order: the j-th tie is kept iff the mass before it is < target
    const double need = (target - r.above_mass) / static_cast<double>(wt);
    int64_t ntie = need > 0.0 ? static_cast<int64_t>(ceil(need)) : 1;
    ntie = ntie < r.eq_cnt ? ntie : r.eq_cnt;
    if (ntie < 1) ntie = 1;
    kept = Kept{r.key, ntie, false};
  }

  // ---- last pass(es) in index order: rank the ties, then draw
  __shared__ int s_scan[33];
  __shared__ double s_dscan[33];
  __shared__ double s_S;
  __shared__ long long s_found;
  const float wmin = min_p;
  const double u = uniforms ? uniforms[row] : 0.0;
  double S = 0.0;  // kept mass
  best = -INFINITY;
  arg = V;
  int64_t last_kept = -1;
  const int passes = uniforms ? 2 : 1;  // inverse CDF needs the total first
  double target = 0.0, cum = 0.0;
  if (threadIdx.x == 0) s_found = V;  // V: not found yet (atomicMin below)
  for (int pass = 0; pass < passes; ++pass) {
    int64_t tie_base = 0;
    for (int64_t start = 0; start < V; start += blockDim.x) {
      const int64_t i = start + threadIdx.x;
      float x = -INFINITY;
      uint32_t k = 0;
      if (i < V) {
        x = static_cast<float>(z[i]) * inv_temp;
        k = float_key(x);
      }
      const int eq = (i < V && !kept.all && k == kept.thr) ? 1 : 0;
      int tie_total;
      const int rank = block_exclusive_scan(eq, s_scan, &tie_total);
      const float w = __expf(x - m);
      const bool in = i < V && (kept.all || k > kept.thr || (eq && tie_base + rank < kept.ntie)) && w >= wmin;
      tie_base += tie_total;
      if (pass + 1 < passes || !uniforms) {
        if (in) {
          S += w;
          last_kept = max(last_kept, i);
          if (!uniforms) {
            const uint4 r = philox4x32_10(
                make_uint4(static_cast<uint32_t>(i), static_cast<uint32_t>(row), static_cast<uint32_t>(offset),
                           static_cast<uint32_t>(offset >> 32)),
                key);
            arg_merge(best, arg, x - __logf(-__logf(uniform_open(r.x))), i);
          }
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
        if (s_found < V) break;  // uniform: every thread reads the same shared value
      }
    }
    if (pass + 1 < passes) {
      __shared__ double red2[33];
      S = block_sum(S, red2);
      target = u * S;
      __shared__ long long s_last;
      if (threadIdx.x == 0) s_last = -1;
      __syncthreads();
      atomicMax(&s_last, static_cast<long long>(last_kept));
      __syncthreads();
      last_kept = s_last;
      if (threadIdx.x == 0) {
        s_S = S;
        s_found = V;
      }
      __syncthreads();
    }
  }
  if (uniforms) {
    if (threadIdx.x == 0) {
      int64_t tok = s_found < V ? s_found : last_kept;  // u·S rounded to S: the last kept token
      if (tok < 0) tok = 0;
      tokens[row] = tok;
      logp_out[row] = static_cast<float>(static_cast<double>(static_cast<float>(z[tok]) * inv_temp - m) - log(s_S));
    }
    return;
  }
  {
    __shared__ double red3[33];
    S = block_sum(S, red3);
    float mm = 0.f, ss = 0.f;  // unused lanes of the shared reduction
    int64_t pp = V;
    int nn = 0;
    block_reduce_stats(mm, ss, best, arg, pp, nn);
    if (threadIdx.x == 0) {
      const int64_t tok = arg < V ? arg : 0;
      tokens[row] = tok;
      logp_out[row] = static_cast<float>(static_cast<double>(static_cast<float>(z[tok]) * inv_temp - m) - log(S));
    }
  }
}

void check_args(const at::Tensor& logits, double temperature, int64_t top_k, double top_p, double min_p) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) > 0, "sample: logits must be [B, V] with V > 0");
  TORCH_CHECK_VALUE(logits.size(1) < (int64_t(1) << 31), "sample: V must be < 2^31");
  TORCH_CHECK_VALUE(temperature >= 0.0, "sample: temperature must be >= 0, got ", temperature);
  TORCH_CHECK_VALUE(top_k >= 0, "sample: top_k must be >= 0, got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0.0 && top_p <= 1.0, "sample: top_p must be in (0, 1], got ", top_p);
  TORCH_CHECK_VALUE(min_p >= 0.0 && min_p <= 1.0, "sample: min_p must be in [0, 1], got ", min_p);
}

std::tuple<at::Tensor, at::Tensor> launch(const at::Tensor& logits, const double* uniforms, double temperature,
                                          int64_t top_k, double top_p, double min_p, uint64_t seed,
                                          uint64_t offset) {
  const c10::DeviceGuard guard(logits.device());
  auto z = logits.contiguous();
  const int64_t B = z.size(0), V = z.size(1);
  auto tokens = at::empty({B}, z.options().dtype(at::kLong));
  auto logp = at::empty({B}, z.options().dtype(at::kFloat));
  if (B == 0) return {tokens, logp};
  const int threads = V >= 4096 ? kThreads : 128;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "sample_cuda", [&] {
    sample_kernel<scalar_t><<<B, threads, 0, current_stream(z)>>>(
        z.data_ptr<scalar_t>(), V, static_cast<float>(temperature), top_k, static_cast<float>(top_p),
        static_cast<float>(min_p), uniforms, seed, offset, tokens.data_ptr<int64_t>(), logp.data_ptr<float>());
  });
  check_launch("sample");
  return {tokens, logp};
}

std::tuple<at::Tensor, at::Tensor> sample_cuda(const at::Tensor& logits, const at::Tensor& uniforms,
                                               double temperature, int64_t top_k, double top_p, double min_p) {
  check_args(logits, temperature, top_k, top_p, min_p);
  TORCH_CHECK_VALUE(uniforms.dim() == 1 && uniforms.size(0) == logits.size(0),
                    "sample: uniforms must be [B] with B = logits.size(0)");
  auto u = uniforms.to(logits.device(), at::kDouble).contiguous();
  return launch(logits, u.data_ptr<double>(), temperature, top_k, top_p, min_p, 0, 0);
}

std::tuple<at::Tensor, at::Tensor> sample_philox_cuda(const at::Tensor& logits, int64_t seed, int64_t offset,
                                                      double temperature, int64_t top_k, double top_p,
                                                      double min_p) {
  check_args(logits, temperature, top_k, top_p, min_p);
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
