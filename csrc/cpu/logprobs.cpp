// Per-token log-probs (and entropy) of labels under softmax(logits / T), forward and
// backward, one row per token. The forward reads each row once in its own dtype with an
// online log-sum-exp (running max, -inf as identity), so no [N, V] float32 temporary
// exists; the backward recomputes the probabilities from the saved lse.
//
// The row kernels (logprobs_rows_fwd / logprobs_rows_bwd) are shared with
// csrc/cpu/fused_linear.cpp, which runs them on one chunk of LM-head logits at a time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "fast_exp.h"

namespace rlhf_fast {
namespace {

// Elements per block of the online log-sum-exp: the running max is updated once per
// block, so the inner loops are branch-free and vectorise (8 KiB of fp32 per block, in L1).
constexpr int64_t kBlock = 2048;

// exp(x) for x <= 0 in float, vectorisable (fast_exp.h); exactly 0 at and below -88, and
// exp(-inf) = 0.
inline float exp_nonpos(float x) { return fast_exp(x < -88.0f ? -88.0f : x); }

inline double exp_nonpos(double x) { return std::exp(x); }

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// The row loops are compiled for AVX-512 and AVX2+FMA as well as the baseline, picked at
// load time by the CPU (GCC function multi-versioning): the extension is built without
// -march, and baseline SSE2 is about half the speed of PyTorch's own AVX2 log_softmax.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RLHF_ROW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RLHF_ROW_CLONES
#endif

// One row: returns lse of z = x / T and, when `want_ent`, H = lse - E_p[z], computed as
// log s - Σ e^(z-m)(z-m) / s so that logits of ±1e4 lose no digits to cancellation.
template <typename in_t, typename acc_t>
RLHF_ROW_CLONES void row_fwd(const in_t* x, int64_t V, acc_t inv_t, bool scale, bool want_ent, acc_t* zbuf, acc_t& max_out,
             acc_t& log_s_out, acc_t& ent_out) {
  acc_t m = neg_inf<acc_t>();
  acc_t s = 0;  // Σ e^(z - m)
  acc_t t = 0;  // Σ e^(z - m)·(z - m)
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t n = std::min(kBlock, V - b0);
    const in_t* xb = x + b0;
    acc_t bm = neg_inf<acc_t>();
    if (scale) {
#pragma omp simd reduction(max : bm)
      for (int64_t j = 0; j < n; ++j) {
        const acc_t z = static_cast<acc_t>(xb[j]) * inv_t;
        zbuf[j] = z;
        bm = z > bm ? z : bm;
      }
    } else {
#pragma omp simd reduction(max : bm)
      for (int64_t j = 0; j < n; ++j) {
        const acc_t z = static_cast<acc_t>(xb[j]);
        zbuf[j] = z;
        bm = z > bm ? z : bm;
      }
    }
    if (!(bm > neg_inf<acc_t>())) {
      // an all -inf block adds nothing; but the max comparisons skip NaN, so a block of NaN
      // (and -inf) logits lands here too, and must make the row NaN as in log_softmax
      bool nan = false;
      for (int64_t j = 0; j < n; ++j) nan |= zbuf[j] != zbuf[j];
      if (nan) s = t = std::numeric_limits<acc_t>::quiet_NaN();
      continue;
    }
    if (bm > m) {
      if (s > 0) {
        // move the running sums to the new max: e^(z-m') = f·e^(z-m), (z-m') = (z-m) + (m-m')
        const acc_t f = std::exp(m - bm);
        t = f * (t + (m - bm) * s);
        s = f * s;
      }
      m = bm;
    }
    acc_t bs = 0, bt = 0;
    if (want_ent) {
#pragma omp simd reduction(+ : bs, bt)
      for (int64_t j = 0; j < n; ++j) {
        const acc_t d = zbuf[j] - m;
        const acc_t e = exp_nonpos(d);
        bs += e;
        bt += e > 0 ? e * d : acc_t(0);  // p·log p = 0 where p = 0 (z = -inf)
      }
    } else {
#pragma omp simd reduction(+ : bs)
      for (int64_t j = 0; j < n; ++j) bs += exp_nonpos(zbuf[j] - m);
    }
    s += bs;
    t += bt;
  }
  const acc_t log_s = std::log(s);
  max_out = m;
  log_s_out = log_s;
  ent_out = want_ent ? log_s - t / s : acc_t(0);
}

// Below this temperature x·(1/T) can overflow float for ordinary logits (1/T alone does below
// 2.9e-39) and give inf - inf = NaN: such rows take tiny_row_* instead, in double from the raw
// row max, (x - m) / T <= 0, which can only underflow, so T -> 0 reaches the greedy limit
// (the argmax's logp 0). Never taken at ordinary temperatures, whose results stay as they were.
constexpr double kTinyTemperature = 1e-20;

struct TinyRow {
  double m, log_s, ent;  // raw row max (NaN if any logit is), log Σ e^((x-m)/T), entropy
};

template <typename in_t>
TinyRow tiny_row_stats(const in_t* x, int64_t V, double temperature) {
  double m = -std::numeric_limits<double>::infinity();
  bool nan = false;
  for (int64_t j = 0; j < V; ++j) {
    const double v = static_cast<double>(x[j]);
    nan |= v != v;
    m = v > m ? v : m;
  }
  if (nan) m = std::numeric_limits<double>::quiet_NaN();
  double s = 0, t = 0;
  for (int64_t j = 0; j < V; ++j) {
    const double d = (static_cast<double>(x[j]) - m) / temperature;
    const double e = std::exp(d);
    s += e;
    t += e > 0 ? e * d : 0.0;
  }
  const double log_s = std::log(s);
  return {m, log_s, log_s - t / s};
}

template <typename in_t, typename acc_t>
void tiny_row_fwd(const in_t* x, int64_t V, int64_t y, double temperature, int64_t ignore_index, bool want_ent,
                  acc_t& logp, acc_t* ent, acc_t& lse) {
  const TinyRow r = tiny_row_stats(x, V, temperature);
  lse = static_cast<acc_t>(r.m / temperature + r.log_s);  // may be ±inf; the backward does not read it
  if (y == ignore_index) {
    logp = 0;
    if (want_ent) *ent = 0;
    return;
  }
  logp = static_cast<acc_t>((static_cast<double>(x[y]) - r.m) / temperature - r.log_s);
  if (want_ent) *ent = static_cast<acc_t>(r.ent);
}

// gl, ge: the raw output gradients (1/T is applied last, in double, as it overflows float)
template <typename in_t>
void tiny_row_bwd(const in_t* x, in_t* out, int64_t V, int64_t y, double gl, double ge, bool with_ent,
                  double temperature) {
  const TinyRow r = tiny_row_stats(x, V, temperature);
  const double H = with_ent ? r.ent : 0.0;
  for (int64_t j = 0; j < V; ++j) {
    const double lp = (static_cast<double>(x[j]) - r.m) / temperature - r.log_s;
    const double p = std::exp(lp);
    const double dh = with_ent && p > 0 ? -p * (lp + H) : 0.0;
    out[j] = static_cast<in_t>(((j == y ? gl : 0.0) - gl * p + ge * dh) / temperature);
  }
}

template <typename in_t, typename acc_t>
void fwd_impl(const in_t* x, const int64_t* labels, int64_t N, int64_t V, double temperature, bool want_ent,
              int64_t ignore_index, acc_t* logp, acc_t* ent, acc_t* lse) {
  const bool scale = temperature != 1.0;
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  // rows of V >= 64k are worth a thread each; small rows are grouped
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  const bool tiny = temperature < kTinyTemperature;
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> zbuf(static_cast<size_t>(std::min(kBlock, V)));
    for (int64_t r = r0; r < r1; ++r) {
      const in_t* row = x + r * V;
      if (tiny) {
        tiny_row_fwd<in_t, acc_t>(row, V, labels[r], temperature, ignore_index, want_ent, logp[r],
                                  want_ent ? ent + r : nullptr, lse[r]);
        continue;
      }
      acc_t m, log_s, h;
      row_fwd<in_t, acc_t>(row, V, inv_t, scale, want_ent, zbuf.data(), m, log_s, h);
      lse[r] = m + log_s;
      const int64_t y = labels[r];
      if (y == ignore_index) {
        logp[r] = 0;
        if (want_ent) ent[r] = 0;
        continue;
      }
      const acc_t zy = scale ? static_cast<acc_t>(row[y]) * inv_t : static_cast<acc_t>(row[y]);
      // (z - m) - log s as log_softmax does: exact for the likely tokens, where rounding
      // m + log s to the magnitude of the logits would cost up to one ulp of lse
      logp[r] = (zy - m) - log_s;
      if (want_ent) ent[r] = h;
    }
  });
}

// One row of the gradient: d logp / dz = onehot - p, d H / dz = -p·(log p + H), times 1/T
// (folded into gl, ge). `out` may alias `x` (the fused head writes in place).
template <typename in_t, typename acc_t>
RLHF_ROW_CLONES void row_bwd(const in_t* row, in_t* orow, int64_t V, int64_t y, acc_t l, acc_t gl, acc_t ge, acc_t H,
                             bool with_ent, acc_t inv_t, bool scale) {
  // the label's entry first, before the loop may overwrite it
  const acc_t zy = scale ? static_cast<acc_t>(row[y]) * inv_t : static_cast<acc_t>(row[y]);
  const acc_t lpy = zy - l;
  const acc_t py = exp_nonpos(lpy);
  const acc_t dhy = py > 0 ? -py * (lpy + H) : acc_t(0);
  const in_t gy = static_cast<in_t>(gl * (acc_t(1) - py) + ge * dhy);
  if (with_ent) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const acc_t z = scale ? static_cast<acc_t>(row[j]) * inv_t : static_cast<acc_t>(row[j]);
      const acc_t lp = z - l;
      const acc_t p = exp_nonpos(lp);
      const acc_t dh = p > 0 ? -p * (lp + H) : acc_t(0);
      orow[j] = static_cast<in_t>(-gl * p + ge * dh);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const acc_t z = scale ? static_cast<acc_t>(row[j]) * inv_t : static_cast<acc_t>(row[j]);
      orow[j] = static_cast<in_t>(-gl * exp_nonpos(z - l));
    }
  }
  orow[y] = gy;  // with its one-hot term, rounded once
}

// Above this |lse| (128 in float), p = exp(z - lse) read from the saved lse is off by up to
// ulp(lse)/2 in log p (and z·(1/T) recomputed with a fused multiply-add is not the forward's
// rounded z, another ulp(z)/2): 6e-5 relative at |z| ~ 600, 1.5% at 1e5, inf at T = 1e-15.
// Such rows (low temperatures, logits of ±1e4) take row_bwd_exact; ordinary ones are unchanged.
template <typename acc_t>
constexpr acc_t kLargeLse = acc_t(1) / (acc_t(65536) * std::numeric_limits<acc_t>::epsilon());

// row_bwd for a row of large |lse|: the forward's statistics recomputed (row_fwd: max m and
// log s of the rounded z), then log p = (z - m) - log s as log_softmax, with each block's z
// rounded into zbuf first (a separate loop, so no multiply-add fuses it into z - m). About twice
// row_bwd's time (one more pass with exp).
template <typename in_t, typename acc_t>
RLHF_ROW_CLONES void row_bwd_exact(const in_t* row, in_t* orow, int64_t V, int64_t y, acc_t gl, acc_t ge, acc_t H, bool with_ent,
                   acc_t inv_t, bool scale, acc_t* zbuf) {
  acc_t m, log_s, unused;
  row_fwd<in_t, acc_t>(row, V, inv_t, scale, false, zbuf, m, log_s, unused);
  // the label's entry first, before a block may overwrite it (volatile: z rounded as stored)
  volatile acc_t zy = scale ? static_cast<acc_t>(row[y]) * inv_t : static_cast<acc_t>(row[y]);
  const acc_t lpy = (zy - m) - log_s;
  const acc_t py = exp_nonpos(lpy);
  const acc_t dhy = py > 0 ? -py * (lpy + H) : acc_t(0);
  const in_t gy = static_cast<in_t>(gl * (acc_t(1) - py) + ge * dhy);
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t n = std::min(kBlock, V - b0);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      zbuf[j] = scale ? static_cast<acc_t>(row[b0 + j]) * inv_t : static_cast<acc_t>(row[b0 + j]);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const acc_t lp = (zbuf[j] - m) - log_s;
      const acc_t p = exp_nonpos(lp);
      const acc_t dh = with_ent && p > 0 ? -p * (lp + H) : acc_t(0);
      orow[b0 + j] = static_cast<in_t>(-gl * p + ge * dh);
    }
  }
  orow[y] = gy;
}

template <typename in_t, typename acc_t>
void bwd_impl(const acc_t* g_logp, const acc_t* g_ent, const in_t* x, const int64_t* labels, const acc_t* lse,
              const acc_t* ent, int64_t N, int64_t V, double temperature, int64_t ignore_index, in_t* out) {
  const bool scale = temperature != 1.0;
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> zbuf;  // for row_bwd_exact only, allocated on its first row
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t y = labels[r];
      if (y == ignore_index) {
        std::fill(out + r * V, out + (r + 1) * V, in_t(0));
        continue;
      }
      if (temperature < kTinyTemperature) {
        tiny_row_bwd<in_t>(x + r * V, out + r * V, V, y, g_logp ? g_logp[r] : 0.0, g_ent ? g_ent[r] : 0.0,
                           g_ent != nullptr, temperature);
        continue;
      }
      const acc_t gl = g_logp ? g_logp[r] * inv_t : acc_t(0);
      const acc_t ge = g_ent ? g_ent[r] * inv_t : acc_t(0);
      const acc_t H = g_ent ? ent[r] : acc_t(0);
      if (std::abs(lse[r]) > kLargeLse<acc_t> && std::isfinite(lse[r])) {
        if (zbuf.empty()) zbuf.resize(static_cast<size_t>(std::min(kBlock, V)));
        row_bwd_exact<in_t, acc_t>(x + r * V, out + r * V, V, y, gl, ge, H, g_ent != nullptr, inv_t, scale,
                                   zbuf.data());
        continue;
      }
      row_bwd<in_t, acc_t>(x + r * V, out + r * V, V, y, lse[r], gl, ge, H, g_ent != nullptr, inv_t, scale);
    }
  });
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// the kernels index rows by label, so an out-of-range label must never reach them
void check_labels(const at::Tensor& labels, int64_t V, int64_t ignore_index) {
  const int64_t* y = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0, n = labels.numel(); i < n; ++i) {
    TORCH_CHECK_VALUE(y[i] == ignore_index || (y[i] >= 0 && y[i] < V), "labels must lie in [0, ", V,
                      ") or equal ignore_index=", ignore_index, "; found ", y[i]);
  }
}

void check_rows(const at::Tensor& logits, const at::Tensor& labels, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), op, ": labels must be [N] with N = ",
              logits.size(0), ", got ", labels.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating, got ",
              logits.scalar_type());
}

}  // namespace

// ---------------------------------------------------------------- shared row kernels

// logits [n, V] contiguous, labels [n] int64 contiguous; writes logp/lse (and entropy when
// want_ent) into contiguous [n] tensors of the accumulation dtype.
void logprobs_rows_fwd(const at::Tensor& logits, const at::Tensor& labels, double temperature, bool want_ent,
                       int64_t ignore_index, const at::Tensor& logp, const at::Tensor& entropy, const at::Tensor& lse) {
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N == 0) return;
  check_labels(labels, V, ignore_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fwd_impl<scalar_t, acc_t>(logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), N, V,
                              temperature, want_ent, ignore_index, logp.data_ptr<acc_t>(),
                              want_ent ? entropy.data_ptr<acc_t>() : nullptr, lse.data_ptr<acc_t>());
  });
}

// grad_logits [n, V] (logits dtype, contiguous) from g_logp [n] and optional g_ent [n]
// (accumulation dtype, contiguous; undefined = 0).
void logprobs_rows_bwd(const at::Tensor& g_logp, const at::Tensor& g_ent, const at::Tensor& logits,
                       const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy, double temperature,
                       int64_t ignore_index, const at::Tensor& grad_logits) {
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N == 0) return;
  check_labels(labels, V, ignore_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    bwd_impl<scalar_t, acc_t>(g_logp.defined() ? g_logp.const_data_ptr<acc_t>() : nullptr,
                              g_ent.defined() ? g_ent.const_data_ptr<acc_t>() : nullptr,
                              logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(),
                              lse.const_data_ptr<acc_t>(), g_ent.defined() ? entropy.const_data_ptr<acc_t>() : nullptr,
                              N, V, temperature, ignore_index, grad_logits.data_ptr<scalar_t>());
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cpu(const at::Tensor& logits,
                                                                      const at::Tensor& labels, double temperature,
                                                                      bool return_entropy, int64_t ignore_index) {
  check_rows(logits, labels, "token_logprobs_fwd");
  TORCH_CHECK_VALUE(temperature > 0, "token_logprobs_fwd: temperature must be > 0, got ", temperature);
  auto x = logits.contiguous();
  auto y = labels.to(at::kLong).contiguous();
  const int64_t N = x.size(0);
  auto opts = x.options().dtype(acc_type(x.scalar_type()));
  auto logp = at::empty({N}, opts);
  auto lse = at::empty({N}, opts);
  auto ent = at::empty({return_entropy ? N : 0}, opts);
  logprobs_rows_fwd(x, y, temperature, return_entropy, ignore_index, logp, ent, lse);
  return {logp, ent, lse};
}

at::Tensor token_logprobs_bwd_cpu(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                                  const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                  const at::Tensor& entropy, double temperature, int64_t ignore_index) {
  check_rows(logits, labels, "token_logprobs_bwd");
  const int64_t N = logits.size(0);
  const auto acc = acc_type(logits.scalar_type());
  auto x = logits.contiguous();
  auto y = labels.to(at::kLong).contiguous();
  auto gl = grad_logp.to(acc).contiguous();
  TORCH_CHECK(gl.numel() == N, "token_logprobs_bwd: grad_logp must be [N]");
  at::Tensor ge, H;
  // an entropy gradient only matters when the forward computed the entropy
  if (grad_entropy.has_value() && grad_entropy->defined() && grad_entropy->numel() == N && entropy.numel() == N) {
    ge = grad_entropy->to(acc).contiguous();
    H = entropy.to(acc).contiguous();
  }
  auto l = lse.to(acc).contiguous();
  auto out = at::empty_like(x);
  logprobs_rows_bwd(gl, ge, x, y, l, H, temperature, ignore_index, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd_cpu);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd_cpu);
}

}  // namespace rlhf_fast
