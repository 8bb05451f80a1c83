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
//   1. x = z / T (fp32), max m, with NaN / +inf / all -inf detection;  w = exp(x - m)
//   2. top-k: std::nth_element on a copy of x (O(V)) gives the k-th largest value;
//   3. top-p: weighted quickselect (pivot partitions on (x, w) pairs, expected O(V)) finds the
//      value t where the mass of the larger tokens is < p·S and with t's ties reaches it; the
//      ties at t are then resolved one by one in index order, as the stable sort would;
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
#include <limits>
#include <vector>

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
               std::vector<XW>& cand, int64_t* tok_out, float* logp_out) {
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
  for (int64_t i = 0; i < V; ++i) {
    const float xi = static_cast<float>(z[i]) / temperature;
    if (std::isnan(xi)) return kNaN;
    x[i] = xi;
    m = std::max(m, xi);
  }
  if (m == std::numeric_limits<float>::infinity()) return kPosInf;
  if (m == -std::numeric_limits<float>::infinity()) return kAllNegInf;
  for (int64_t i = 0; i < V; ++i) w[i] = std::exp(x[i] - m);

  Kept kept;
  // ---- 2. top-k by selection
  if (top_k > 0 && top_k < V) {
    std::copy(x.begin(), x.begin() + V, scratch.begin());
    std::nth_element(scratch.begin(), scratch.begin() + (top_k - 1), scratch.begin() + V, std::greater<float>());
    const float vk = scratch[top_k - 1];
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
    cand.clear();
    double total = 0.0;
    for_kept(kept, [&](int64_t i) {
      total += w[i];
      if (w[i] > 0.0f) cand.push_back({x[i], w[i]});
    });
    const double target = top_p * total;
    float t;
    if (weighted_select(cand, target, &t)) {
      double m_gt = 0.0;
      int64_t n_eq_kept = 0;  // ties at t that survived the earlier stage
      for_kept(kept, [&](int64_t i) {
        if (x[i] > t) m_gt += w[i];
        else if (x[i] == t) ++n_eq_kept;
      });
      // stable order: the j-th tie (by index) is kept iff the mass before it is < target
      const float wt = std::exp(t - m);  // the same fp32 weight the ties carry in w
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
      if (need_buffers && top_p < 1.0) cand.reserve(V);
      for (int64_t b = b0; b < b1; ++b) {
        const int st = sample_row<scalar_t>(zp + b * V, V, up[b], static_cast<float>(temperature), top_k, top_p,
                                            min_p, x, w, scratch, cand, tp + b, lp + b);
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
