// sample: one token per row of logits [B, V] from the temperature / top-k / top-p / min-p
// processed distribution, WITHOUT sorting the vocabulary.
//
// The draw is the inverse CDF, in vocabulary order, of one uniform per row (drawn by the
// Python glue from the torch generator), exactly as reference.sample, so on tie-free logits
// the cpp and torch backends pick the same tokens.
//
// Every filter keeps a prefix of the order (value desc, index asc) — top-k, top-p and min-p
// all keep "the most likely tokens" — so the kept set of each stage is described by a
// threshold value `thr` and the number `ntie` of tokens equal to `thr` that survive (the
// ones with the lowest indices, as the reference's stable argsort keeps). Per row:
//   1. x = z / T (fp32), max m, NaN / +inf / all -inf detection; w = exp(x - m) (polynomial exp)
//   2. top-k: a count histogram of the order-preserving key's top 12 bits (fewer for V < 4096)
//      finds the bin of the k-th largest value, std::nth_element on that bin's values gives it
//      (O(V));
//   3. top-p: the same histogram of mass finds the boundary bin; a weighted quickselect (pivot
//      partitions on (x, w) pairs) inside it finds the value t where the mass of the larger
//      tokens is < p·S and with t's ties reaches it; the ties at t are then resolved one by one
//      in index order, as the stable sort would;
//   4. min-p: a threshold w >= min_p (p_max has weight exp(0) = 1 and is always kept);
//   5. inverse CDF over the kept weights in vocabulary order.
// Sums are fp64, so the kept set differs from the fp32 sort-based reference only when a
// cumulative mass lies within fp32 rounding of top_p.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "fast_exp.h"

namespace rlhf_fast {
namespace {

constexpr int kOk = 0, kNaN = 1, kPosInf = 2, kAllNegInf = 3;

// Kept set of a stage: x > thr, or x == thr among the first `ntie` such indices.
struct Kept {
  float thr = -std::numeric_limits<float>::infinity();
  int64_t ntie = std::numeric_limits<int64_t>::max();
};

struct XW {
  float x;
  float w;
};

// exp(x) for x <= 0 (the scaled logits minus their max), vectorisable (fast_exp.h); exactly 0
// below -87, so -inf logits have weight 0. With it and the no-filter fast path, plain sampling
// went from 30 to 19 ms (B=64, V=32000, one thread, 2-core CI machine; std::exp before).
__attribute__((always_inline)) inline float exp_nonpos(float x) {
  const float out = fast_exp(x > -87.0f ? x : -87.0f);
  return x < -87.0f ? 0.0f : out;
}

// The exp loop also compiled for AVX-512 and AVX2, picked at load time by the CPU (GCC function
// multi-versioning, as logprobs.cpp's row loops) while the extension stays baseline x86-64:
// 34 -> 17 us a row at V = 32768 with AVX2. GCC may contract the polynomial's multiply-adds into
// FMAs in the AVX2 / AVX-512 clones, so weights can differ from the baseline clone in the last
// bit (draws are deterministic on a given machine, not across CPU generations).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RLHF_FAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RLHF_FAST_SIMD_CLONES
#endif

// w = exp(x - m) over a row; a separate function with restrict pointers so that GCC vectorises it
__attribute__((noinline)) RLHF_FAST_SIMD_CLONES float exp_weights(const float* __restrict x, float* __restrict w, float m, int64_t V) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < V; ++i) {
    w[i] = exp_nonpos(x[i] - m);
    s += w[i];
  }
  return s;
}

// Order-preserving uint32 key of a float (larger float -> larger key).
inline uint32_t float_key(float x) {
  if (x == 0.0f) x = 0.0f;  // -0.0 ties with +0.0, as in the reference's sort
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Weighted quickselect: among `c` (values x with weights w), the value t such that the mass of
// entries with x > t is < target and the mass with x >= t is >= target. Returns false when the
// whole mass stays below target (fp rounding): then everything is kept.
bool weighted_select(std::vector<XW>& c, double target, float* t_out) {
  size_t lo = 0, hi = c.size();
  double above = 0.0;  // mass of entries already known to be larger than c[lo, hi)
  while (lo < hi) {
    // median of three as pivot: robust on already ordered vocabularies
    const float a = c[lo].x, b = c[lo + (hi - lo) / 2].x, d = c[hi - 1].x;
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), d));
    // three-way partition [lo, hi) into > pivot | == pivot | < pivot
    size_t gt = lo, i = lo, lt = hi;
    double m_gt = 0.0, m_eq = 0.0;
    while (i < lt) {
      const float xi = c[i].x;
      if (xi > pivot) {
        m_gt += c[i].w;
        std::swap(c[gt++], c[i++]);
      } else if (xi < pivot) {
        std::swap(c[i], c[--lt]);
      } else {
        m_eq += c[i].w;
        ++i;
      }
    }
    if (above + m_gt >= target) {
      hi = gt;
    } else if (above + m_gt + m_eq >= target) {
      *t_out = pivot;
      return true;
    } else {
      above += m_gt + m_eq;
      lo = lt;
    }
  }
  return false;
}

template <typename scalar_t>
int sample_row(const scalar_t* z, int64_t V, double u, float temperature, int64_t top_k, double top_p,
               double min_p, std::vector<float>& x, std::vector<float>& w, std::vector<float>& scratch,
               std::vector<XW>& cand, std::vector<double>& hist, std::vector<int64_t>& counts, int64_t* tok_out, float* logp_out) {
  // ---- greedy: first argmax, log-prob 0 (the one-hot distribution)
  if (temperature == 0.0f) {
    float best = -std::numeric_limits<float>::infinity();
    int64_t arg = 0;
    bool any_finite_or_inf = false;
    for (int64_t i = 0; i < V; ++i) {
      const float zi = static_cast<float>(z[i]);
      if (std::isnan(zi)) return kNaN;
      if (zi > best) {
        best = zi;
        arg = i;
      }
      any_finite_or_inf |= zi != -std::numeric_limits<float>::infinity();
    }
    if (!any_finite_or_inf) return kAllNegInf;
    *tok_out = arg;
    *logp_out = 0.0f;
    return kOk;
  }

  // ---- 1. scaled logits and their max
  float m = -std::numeric_limits<float>::infinity();
  int nan = 0;
  float* xp = x.data();
  float* wp = w.data();
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t i = 0; i < V; ++i) {
    const float xi = static_cast<float>(z[i]) / temperature;
    nan |= xi != xi;
    xp[i] = xi;
    m = std::max(m, xi);
  }
  if (nan) return kNaN;
  if (!std::isfinite(m)) {
    // z / T overflowed (a tiny temperature: 1/T alone overflows float below 2.9e-39) or the
    // logits hold ±inf. Rebased on the raw max instead, (z - max) / T <= 0 can only underflow,
    // so T -> 0 reaches the greedy limit; the max itself is set to 0 directly, since 0 / T is
    // NaN where a subnormal T is read as 0.
    float mr = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < V; ++i) mr = std::max(mr, static_cast<float>(z[i]));
    if (mr == std::numeric_limits<float>::infinity()) return kPosInf;
    if (mr == -std::numeric_limits<float>::infinity()) return kAllNegInf;
    for (int64_t i = 0; i < V; ++i) {
      const float zi = static_cast<float>(z[i]);
      xp[i] = zi == mr ? 0.0f : (zi - mr) / temperature;
    }
    m = 0.0f;
  }
  exp_weights(xp, wp, m, V);
  const bool filtered = (top_k > 0 && top_k < V) || top_p < 1.0 || min_p > 0.0;
  if (!filtered) {
    // plain temperature sampling: inverse CDF straight over w (no kept-set bookkeeping). A
    // serial fp64 running sum over V is latency-bound (~4 cycles a token); instead the block
    // sums are vectorised, the crossing block is found on them and only it is scanned
    // serially: V = 32768 went from 5.0 to 1.4 ms for 16 rows (one thread).
    constexpr int64_t kBlock = 512;
    const int64_t nb = (V + kBlock - 1) / kBlock;
    hist.resize(nb);
    double S = 0.0;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t lo = b * kBlock, hi = std::min(V, lo + kBlock);
      double sb = 0.0;
#pragma omp simd reduction(+ : sb)
      for (int64_t i = lo; i < hi; ++i) sb += static_cast<double>(wp[i]);
      hist[b] = sb;
      S += sb;
    }
    const double target = u * S;
    double cum = 0.0;
    int64_t blk = 0;
    while (blk < nb && cum + hist[blk] <= target) cum += hist[blk++];
    int64_t chosen = -1;
    // scanned on past the block in case its serial sum rounds below the vectorised one
    for (int64_t i = blk * kBlock; i < V; ++i) {
      cum += wp[i];
      if (cum > target) {
        chosen = i;
        break;
      }
    }
    if (chosen < 0) {  // u·S rounded up to S: the last token of non-zero weight
      chosen = V - 1;
      while (chosen > 0 && !(wp[chosen] > 0.0f)) --chosen;
    }
    *tok_out = chosen;
    *logp_out = static_cast<float>(static_cast<double>(xp[chosen]) - m - std::log(S));
    return kOk;
  }

  Kept kept;
  // Histogram bins of the filters: the key's top 12 bits (4096 bins) for real vocabularies, fewer
  // for small ones (tests, the demo), where clearing and scanning 4096 bins cost more than the
  // row: 2^ceil(log2 V), at least 16 (V = 256 gets 2^8). Any bin count gives the same kept set;
  // it only sizes the selection's candidate bin.
  int bins_log2 = 4;
  while (bins_log2 < 12 && (int64_t{1} << bins_log2) < V) ++bins_log2;
  const int kBins = 1 << bins_log2, shift = 32 - bins_log2;
  // ---- 2. top-k by selection
  if (top_k > 0 && top_k < V) {
    // a count histogram of the key's top bits finds the bin holding the k-th
    // largest value; std::nth_element then runs on that bin's values only
    counts.assign(kBins, 0);
    for (int64_t i = 0; i < V; ++i) ++counts[float_key(x[i]) >> shift];
    int64_t above = 0;
    int bin = kBins - 1;
    for (; bin > 0 && above + counts[bin] < top_k; --bin) above += counts[bin];
    int64_t nb = 0;
    for (int64_t i = 0; i < V; ++i)
      if (static_cast<int>(float_key(x[i]) >> shift) == bin) scratch[nb++] = x[i];
    const int64_t r = top_k - 1 - above;  // rank of the k-th largest inside the bin
    std::nth_element(scratch.begin(), scratch.begin() + r, scratch.begin() + nb, std::greater<float>());
    const float vk = scratch[r];
    int64_t n_gt = 0;
    for (int64_t i = 0; i < V; ++i) n_gt += x[i] > vk;
    kept.thr = vk;
    kept.ntie = top_k - n_gt;  // the lowest-index ties fill the remaining slots
  }
  auto for_kept = [&](const Kept& k, auto&& fn) {
    int64_t seen = 0;
    for (int64_t i = 0; i < V; ++i) {
      const float xi = x[i];
      if (xi > k.thr || (xi == k.thr && seen++ < k.ntie)) fn(i);
    }
  };

  // ---- 3. top-p: weighted selection of the boundary value, then exact tie resolution
  if (top_p < 1.0) {
    // A histogram of the kept mass by the top bits of the order-preserving key
    // finds the bin holding the boundary in one pass; only that bin's tokens go to the
    // weighted quickselect (typically a few hundred of V).
    hist.assign(kBins, 0.0);
    double total = 0.0;
    for_kept(kept, [&](int64_t i) {
      hist[float_key(x[i]) >> shift] += w[i];
      total += w[i];
    });
    const double target_all = top_p * total;
    double above_bins = 0.0;
    int bin = 0;
    for (int b = kBins - 1; b >= 0; --b) {
      if (above_bins + hist[b] >= target_all && hist[b] > 0.0) {
        bin = b;
        break;
      }
      above_bins += hist[b];
    }
    cand.clear();
    for_kept(kept, [&](int64_t i) {
      if (static_cast<int>(float_key(x[i]) >> shift) == bin && w[i] > 0.0f) cand.push_back({x[i], w[i]});
    });
    const double target = target_all;
    float t;
    if (weighted_select(cand, target - above_bins, &t)) {
      double m_gt = 0.0;
      int64_t n_eq_kept = 0;  // ties at t that survived the earlier stage
      for_kept(kept, [&](int64_t i) {
        if (x[i] > t) m_gt += w[i];
        else if (x[i] == t) ++n_eq_kept;
      });
      // stable order: the j-th tie (by index) is kept iff the mass before it is < target
      const float wt = exp_nonpos(t - m);  // the same fp32 weight the ties carry in w
      int64_t ntie = 0;
      while (ntie < n_eq_kept && m_gt + static_cast<double>(ntie) * wt < target) ++ntie;
      kept.thr = t;
      kept.ntie = std::max<int64_t>(ntie, 1);
    }
  }

  // ---- 4. min-p as a weight threshold; 5. inverse CDF in vocabulary order
  const float wmin = static_cast<float>(min_p);
  double S = 0.0;
  int64_t last_kept = -1;
  for_kept(kept, [&](int64_t i) {
    if (w[i] >= wmin) {
      S += w[i];
      last_kept = i;
    }
  });
  const double target = u * S;
  double cum = 0.0;
  int64_t chosen = -1;
  {
    int64_t seen = 0;
    for (int64_t i = 0; i < V && chosen < 0; ++i) {
      const float xi = x[i];
      const bool in = (xi > kept.thr || (xi == kept.thr && seen++ < kept.ntie)) && w[i] >= wmin;
      if (!in) continue;
      cum += w[i];
      if (cum > target) chosen = i;
    }
  }
  if (chosen < 0) chosen = last_kept;  // u·S rounded up to S: the reference's clamp to the end
  *tok_out = chosen;
  *logp_out = static_cast<float>(static_cast<double>(x[chosen]) - m - std::log(S));
  return kOk;
}

std::tuple<at::Tensor, at::Tensor> sample_cpu(const at::Tensor& logits, const at::Tensor& uniforms,
                                              double temperature, int64_t top_k, double top_p, double min_p) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "sample: logits must be [B, V], got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) > 0, "sample: logits must have a non-empty vocabulary");
  TORCH_CHECK_VALUE(uniforms.dim() == 1 && uniforms.size(0) == logits.size(0),
                    "sample: uniforms must be [B] with B = logits.size(0)");
  TORCH_CHECK_VALUE(temperature >= 0.0, "sample: temperature must be >= 0, got ", temperature);
  TORCH_CHECK_VALUE(top_k >= 0, "sample: top_k must be >= 0, got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0.0 && top_p <= 1.0, "sample: top_p must be in (0, 1], got ", top_p);
  TORCH_CHECK_VALUE(min_p >= 0.0 && min_p <= 1.0, "sample: min_p must be in [0, 1], got ", min_p);
  const int64_t B = logits.size(0), V = logits.size(1);
  auto z = logits.contiguous();
  auto us = uniforms.to(at::kDouble).contiguous();
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  auto logp = at::empty({B}, logits.options().dtype(at::kFloat));
  std::atomic<int> status{kOk};
  std::atomic<int64_t> bad_row{-1};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "sample_cpu", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const double* up = us.data_ptr<double>();
    int64_t* tp = tokens.data_ptr<int64_t>();
    float* lp = logp.data_ptr<float>();
    const bool need_buffers = temperature != 0.0;
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      // per-thread scratch, reused across this chunk's rows
      std::vector<float> x(need_buffers ? V : 0), w(need_buffers ? V : 0);
      std::vector<float> scratch((need_buffers && top_k > 0 && top_k < V) ? V : 0);
      std::vector<XW> cand;
      std::vector<double> hist;
      std::vector<int64_t> counts;
      if (need_buffers && top_p < 1.0) cand.reserve(V);
      for (int64_t b = b0; b < b1; ++b) {
        const int st = sample_row<scalar_t>(zp + b * V, V, up[b], static_cast<float>(temperature), top_k, top_p,
                                            min_p, x, w, scratch, cand, hist, counts, tp + b, lp + b);
        if (st != kOk) {
          int expected = kOk;
          if (status.compare_exchange_strong(expected, st)) bad_row.store(b);
          return;  // exceptions must not cross the parallel region; raised below
        }
      }
    });
  });
  const int st = status.load();
  TORCH_CHECK_VALUE(st != kNaN, "sample: logits contain NaN (row ", bad_row.load(), ")");
  TORCH_CHECK_VALUE(st != kPosInf, "sample: logits contain +inf (row ", bad_row.load(),
                    "); the sampling distribution is undefined");
  TORCH_CHECK_VALUE(st != kAllNegInf, "sample: every logit of row ", bad_row.load(),
                    " is -inf; the sampling distribution is undefined");
  return {tokens, logp};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) { m.impl("sample", &sample_cpu); }

}  // namespace rlhf_fast
