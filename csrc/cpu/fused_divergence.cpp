// Distillation divergence from two LM heads (TRL 1.16 DistillationTrainer's generalised JSD,
// trl/kernels/chunked_divergence.py), the Liger-Kernel LigerFusedLinearJSD way: per chunk of
// rows, project the student's and the teacher's logits (2 matmuls), reduce each row in place
// (log-sum-exps, then the divergence terms and, when asked, dDiv/dz of the student written over
// its logits), then grad_hidden = G @ W_s, grad_W += G^T @ h, grad_b += G.sum(0) (2 matmuls).
// At most one chunk of logits of each model is alive. TRL's autograd Function projects both
// models again in its backward (6 projections, 8 for the JSD); the summed op here needs 4.
//
// Per row, with log p = log_softmax(z_s / T), log q = log_softmax(z_t / T):
//   beta == 0: KL(q || p),   dDiv/dz_s = (p - q) / T
//   beta == 1: KL(p || q),   dDiv/dz_s = p·(log p - log q - KL) / T
//   otherwise: beta·KL(q || m) + (1 - beta)·KL(p || m), m = (1 - beta)·p + beta·q,
//              dDiv/dz_s = (1 - beta)·p·(log p - log m - KL(p || m)) / T
// Entries of zero probability contribute 0 (the reference's convention), so -inf logits work.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "fast_exp.h"

namespace rlhf_fast {
namespace {

// One auto chunk of fp32 logits (of one model) is at most this many bytes, as in fused_linear.cpp.
constexpr int64_t kAutoChunkBytes = int64_t(32) << 20;

// As in logprobs.cpp: the row loops are compiled for AVX-512 and AVX2+FMA as well as the
// baseline and picked at load time (the extension is built without -march).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RLHF_DIV_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RLHF_DIV_CLONES
#endif

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// exp of a log-probability (<= 0 up to rounding): exactly 0 at and below -88, and for -inf.
inline float exp_lp(float x) { return fast_exp(x < -88.0f ? -88.0f : x); }
inline double exp_lp(double x) { return std::exp(x); }

// log x for x in (0, 1] without calls or branches, so that `omp simd` vectorises it: Cephes'
// logf (frexp, then its degree-9 polynomial on [sqrt(1/2) - 1, sqrt(2) - 1]), within 2 ulp.
// x = 0 or subnormal gives a finite value near -87.5; every caller multiplies the result by a
// probability that is then 0 (or subnormal), so the term vanishes as it should.
__attribute__((always_inline)) inline float log_prob(float x) {
  const int32_t bits = __builtin_bit_cast(int32_t, x);
  float e = static_cast<float>((bits >> 23) - 126);
  float m = __builtin_bit_cast(float, (bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return (m + y) + 0.693359375f * e;
}
inline double log_prob(double x) { return std::log(x); }

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int64_t resolve_chunk(int64_t chunk_size, int64_t N, int64_t V) {
  TORCH_CHECK_VALUE(chunk_size >= 0, "fused_linear_divergence: chunk_size must be >= 0 (0 = auto), got ", chunk_size);
  int64_t c = chunk_size > 0 ? chunk_size : std::max<int64_t>(1, kAutoChunkBytes / (4 * std::max<int64_t>(V, 1)));
  return std::max<int64_t>(1, std::min(c, std::max<int64_t>(N, 1)));
}

// The row statistics the passes share.
template <typename acc_t>
struct RowStats {
  acc_t ms, mt;  // maxima of z_s / T and z_t / T
  acc_t ls, lt;  // log Σ exp(z / T - max)
};

// Pass 1: both log-sum-exps (max, then the sum: the row is in L2, a second read is cheaper
// than the online rescaling).
template <typename s_t, typename acc_t>
RLHF_DIV_CLONES RowStats<acc_t> row_stats(const s_t* zs, const acc_t* zt, int64_t V, acc_t inv_t) {
  acc_t ms = neg_inf<acc_t>(), mt = neg_inf<acc_t>();
  int nan_s = 0, nan_t = 0;
#pragma omp simd reduction(max : ms, mt) reduction(| : nan_s, nan_t)
  for (int64_t j = 0; j < V; ++j) {
    const acc_t a = static_cast<acc_t>(zs[j]), b = zt[j];
    ms = a > ms ? a : ms;
    mt = b > mt ? b : mt;
    nan_s |= a != a;
    nan_t |= b != b;
  }
  // scaling by a positive constant is monotone, so max(z)·(1/T) is the max of z·(1/T) exactly
  ms *= inv_t;
  mt *= inv_t;
  acc_t ss = 0, st = 0;
#pragma omp simd reduction(+ : ss, st)
  for (int64_t j = 0; j < V; ++j) {
    ss += exp_lp(static_cast<acc_t>(zs[j]) * inv_t - ms);
    st += exp_lp(zt[j] * inv_t - mt);
  }
  RowStats<acc_t> r{ms, mt, std::log(ss), std::log(st)};
  // the max comparisons skip NaN (and exp_lp need not keep it), so a NaN logit would vanish
  // from the row: mark that model's statistics NaN, as log_softmax makes its row
  if (nan_s) r.ms = r.ls = std::numeric_limits<acc_t>::quiet_NaN();
  if (nan_t) r.mt = r.lt = std::numeric_limits<acc_t>::quiet_NaN();
  return r;
}

// Passes 2 (and 3): the divergence and the student's entropy of one row; with GRAD, dDiv/dz_s
// times `g` (the row's grad_output / T) written over the student's logits `zs` in place. The
// reverse KL and the JSD need the row's KL before their gradient: pass 2 keeps p and the
// log-ratio in the per-thread rows `bp`, `bu` (L2-resident), pass 3 forms the gradient.
template <int MODE, bool GRAD, typename s_t, typename acc_t>
RLHF_DIV_CLONES void row_divergence(s_t* zs, const acc_t* zt, int64_t V, acc_t inv_t, acc_t beta, acc_t g, acc_t* bp,
                                    acc_t* bu, acc_t& div_out, acc_t& ent_out) {
  const RowStats<acc_t> r = row_stats<s_t, acc_t>(zs, zt, V, inv_t);
  if (r.ms != r.ms) {  // a NaN student logit: NaN divergence, entropy and gradient
    div_out = ent_out = std::numeric_limits<acc_t>::quiet_NaN();
    if constexpr (GRAD) std::fill(zs, zs + V, static_cast<s_t>(div_out));
    return;
  }
  const acc_t cs = acc_t(1) - beta, ct = beta;
  acc_t d = 0, k = 0, h = 0;
#pragma omp simd reduction(+ : d, k, h)
  for (int64_t j = 0; j < V; ++j) {
    // (z - max) - log s, as log_softmax does: no digits lost to the magnitude of the logits
    const acc_t lps = (static_cast<acc_t>(zs[j]) * inv_t - r.ms) - r.ls;
    const acc_t lpt = (zt[j] * inv_t - r.mt) - r.lt;
    const acc_t ps = exp_lp(lps);
    h += ps > 0 ? -ps * lps : acc_t(0);
    if constexpr (MODE == 0) {
      const acc_t pt = exp_lp(lpt);
      d += pt > 0 ? pt * (lpt - lps) : acc_t(0);
      if constexpr (GRAD) zs[j] = static_cast<s_t>(g * (ps - pt));
    } else if constexpr (MODE == 1) {
      const acc_t u = lps - lpt;
      d += ps > 0 ? ps * u : acc_t(0);
      if constexpr (GRAD) {
        bp[j] = ps;
        bu[j] = u;
      }
    } else {
      const acc_t pt = exp_lp(lpt);
      // log m from the probabilities: exact where m matters; where both underflow the terms
      // below are multiplied by 0
      const acc_t lm = log_prob(cs * ps + ct * pt);
      const acc_t us = lps - lm;
      const acc_t kls = ps > 0 ? ps * us : acc_t(0);
      d += ct * (pt > 0 ? pt * (lpt - lm) : acc_t(0)) + cs * kls;
      k += kls;
      if constexpr (GRAD) {
        bp[j] = ps;
        bu[j] = us;
      }
    }
  }
  div_out = d;
  ent_out = h;
  if (r.mt != r.mt) {  // a NaN teacher logit: NaN divergence and gradient (the entropy is the student's)
    div_out = std::numeric_limits<acc_t>::quiet_NaN();
    if constexpr (GRAD) std::fill(zs, zs + V, static_cast<s_t>(div_out));
    return;
  }
  if constexpr (GRAD && MODE != 0) {
    const acc_t kl = MODE == 1 ? d : k;
    const acc_t c = MODE == 1 ? g : g * cs;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) zs[j] = static_cast<s_t>(bp[j] > 0 ? c * bp[j] * (bu[j] - kl) : acc_t(0));
  }
}

template <int MODE, bool GRAD, typename s_t, typename acc_t>
void rows_mode(s_t* zs, const acc_t* zt, int64_t n, int64_t V, const bool* keep, const acc_t* grow, acc_t inv_t,
               acc_t beta, acc_t* div, acc_t* ent) {
  // rows of V >= 32k are worth a thread each; small rows are grouped
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    const size_t scratch = (GRAD && MODE != 0) ? static_cast<size_t>(V) : 0;
    std::vector<acc_t> bp(scratch), bu(scratch);
    for (int64_t r = r0; r < r1; ++r) {
      s_t* zr = zs + r * V;
      if (keep != nullptr && !keep[r]) {  // outside the mask: 0, and no gradient
        div[r] = 0;
        if (ent != nullptr) ent[r] = 0;
        if (GRAD) std::fill(zr, zr + V, s_t(0));
        continue;
      }
      const acc_t g = (grow != nullptr ? grow[r] : acc_t(1)) * inv_t;
      acc_t d, h;
      row_divergence<MODE, GRAD, s_t, acc_t>(zr, zt + r * V, V, inv_t, beta, g, bp.data(), bu.data(), d, h);
      div[r] = d;
      if (ent != nullptr) ent[r] = h;
    }
  });
}

// One chunk: zs [n, V] (student dtype, overwritten by its gradient when `grad`), zt [n, V] acc.
template <typename s_t, typename acc_t>
void rows(const at::Tensor& zs, const at::Tensor& zt, const bool* keep, const acc_t* grow, bool grad, double beta,
          double temperature, acc_t* div, acc_t* ent) {
  const int64_t n = zs.size(0), V = zs.size(1);
  s_t* z = zs.data_ptr<s_t>();
  const acc_t* t = zt.const_data_ptr<acc_t>();
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature), b = static_cast<acc_t>(beta);
  const int mode = beta == 0.0 ? 0 : (beta == 1.0 ? 1 : 2);
#define RLHF_DIV_ROWS(M, G) rows_mode<M, G, s_t, acc_t>(z, t, n, V, keep, grow, inv_t, b, div, ent)
  if (mode == 0) {
    grad ? RLHF_DIV_ROWS(0, true) : RLHF_DIV_ROWS(0, false);
  } else if (mode == 1) {
    grad ? RLHF_DIV_ROWS(1, true) : RLHF_DIV_ROWS(1, false);
  } else {
    grad ? RLHF_DIV_ROWS(2, true) : RLHF_DIV_ROWS(2, false);
  }
#undef RLHF_DIV_ROWS
}

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_inputs(const at::Tensor& sh, const at::Tensor& sw, const std::optional<at::Tensor>& sb, const at::Tensor& th,
                  const at::Tensor& tw, const std::optional<at::Tensor>& tb, const std::optional<at::Tensor>& mask,
                  double beta, double temperature, const char* op) {
  TORCH_CHECK(sh.dim() == 2, op, ": student_hidden must be [N, H], got ", sh.sizes());
  TORCH_CHECK(sw.dim() == 2 && sw.size(1) == sh.size(1), op, ": student_weight must be [V, H] with H = ", sh.size(1),
              ", got ", sw.sizes());
  TORCH_CHECK(sw.scalar_type() == sh.scalar_type(), op, ": student_weight dtype ", sw.scalar_type(),
              " differs from student_hidden dtype ", sh.scalar_type());
  TORCH_CHECK(th.dim() == 2 && th.size(0) == sh.size(0), op, ": teacher_hidden must be [N, Ht] with N = ", sh.size(0),
              ", got ", th.sizes());
  TORCH_CHECK(tw.dim() == 2 && tw.size(1) == th.size(1) && tw.size(0) == sw.size(0), op,
              ": teacher_weight must be [V, Ht] with V = ", sw.size(0), " and Ht = ", th.size(1), ", got ", tw.sizes());
  TORCH_CHECK(tw.scalar_type() == th.scalar_type(), op, ": teacher_weight dtype ", tw.scalar_type(),
              " differs from teacher_hidden dtype ", th.scalar_type());
  if (has(sb)) TORCH_CHECK(sb->dim() == 1 && sb->size(0) == sw.size(0), op, ": student_bias must be [V], got ", sb->sizes());
  if (has(tb)) TORCH_CHECK(tb->dim() == 1 && tb->size(0) == sw.size(0), op, ": teacher_bias must be [V], got ", tb->sizes());
  if (has(mask)) TORCH_CHECK(mask->dim() == 1 && mask->size(0) == sh.size(0), op, ": mask must be [N], got ", mask->sizes());
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, op, ": beta must be in [0, 1], got ", beta);
  TORCH_CHECK_VALUE(temperature > 0, op, ": temperature must be > 0, got ", temperature);
}

// logits of rows [c0, c0 + n): [n, V] in the hidden's dtype (at::mm accumulates bf16/fp16 in fp32)
at::Tensor chunk_logits(const at::Tensor& h, const at::Tensor& wt, const at::Tensor& b, int64_t c0, int64_t n) {
  auto hc = h.narrow(0, c0, n);
  return b.defined() ? at::addmm(b, hc, wt) : at::mm(hc, wt);
}

struct Result {
  at::Tensor div, ent, grad_h, grad_w, grad_b;
};

// The whole op: divergence (and entropy) per row; with any need_* flag, the gradients of
// Σ_i grow_i·div_i (grow undefined: every grow_i = 1), from the same logits.
Result run(const at::Tensor& student_hidden, const at::Tensor& student_weight,
           const std::optional<at::Tensor>& student_bias, const at::Tensor& teacher_hidden,
           const at::Tensor& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
           const std::optional<at::Tensor>& mask, double beta, double temperature, bool want_ent,
           const at::Tensor& grow_in, bool need_h, bool need_w, bool need_b, int64_t chunk_size, const char* op) {
  check_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask, beta,
               temperature, op);
  need_b = need_b && has(student_bias);
  const bool grad = need_h || need_w || need_b;
  auto sh = student_hidden.contiguous();
  auto th = teacher_hidden.contiguous();
  auto sw = student_weight;
  const auto acc = acc_type(sh.scalar_type());
  const bool low = acc != sh.scalar_type();  // bf16/fp16: accumulate weight/bias grads in fp32
  at::Tensor sb = has(student_bias) ? student_bias->contiguous() : at::Tensor();
  at::Tensor tb = has(teacher_bias) ? teacher_bias->contiguous() : at::Tensor();
  at::Tensor keep = has(mask) ? mask->to(at::kBool).contiguous() : at::Tensor();
  const int64_t N = sh.size(0), V = sw.size(0), H = sw.size(1);
  auto opts = sh.options().dtype(acc);
  at::Tensor grow = (grad && grow_in.defined()) ? grow_in.to(acc).contiguous() : at::Tensor();
  TORCH_CHECK(!grow.defined() || grow.numel() == N, op, ": grad_div must be [N] = [", N, "], got ", grow.sizes());
  Result out;
  out.div = at::empty({N}, opts);
  out.ent = at::empty({want_ent ? N : 0}, opts);
  out.grad_h = need_h ? at::empty_like(sh) : at::empty({0}, sh.options());
  // the first chunk writes the weight gradient (mm_out), the others add to it: no zero-fill of [V, H]
  at::Tensor gw = need_w ? at::empty({V, H}, opts) : at::Tensor();
  at::Tensor gb = need_b ? at::zeros({V}, opts) : at::Tensor();
  const int64_t C = resolve_chunk(chunk_size, N, V);
  for (int64_t c0 = 0; c0 < N; c0 += C) {
    const int64_t n = std::min(C, N - c0);
    at::Tensor zs = chunk_logits(sh, sw.t(), sb, c0, n).contiguous();  // [n, V], the student's chunk
    // the teacher's chunk in the accumulation dtype (a copy only when its dtype differs)
    at::Tensor zt = chunk_logits(th, teacher_weight.t(), tb, c0, n).to(acc).contiguous();
    const bool* kp = keep.defined() ? keep.const_data_ptr<bool>() + c0 : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, sh.scalar_type(), "fused_linear_divergence", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      rows<scalar_t, acc_t>(zs, zt, kp, grow.defined() ? grow.const_data_ptr<acc_t>() + c0 : nullptr, grad, beta,
                            temperature, out.div.data_ptr<acc_t>() + c0,
                            want_ent ? out.ent.data_ptr<acc_t>() + c0 : nullptr);
    });
    zt.reset();
    if (!grad) continue;
    // zs now holds G = dDiv/dz_s of the chunk
    if (need_h) {
      auto grad_hc = out.grad_h.narrow(0, c0, n);
      at::mm_out(grad_hc, zs, sw);
    }
    if (need_w || need_b) {
      auto g = low ? zs.to(acc) : zs;
      if (need_w) {
        auto hc = low ? sh.narrow(0, c0, n).to(acc) : sh.narrow(0, c0, n);
        c0 == 0 ? at::mm_out(gw, g.t(), hc) : gw.addmm_(g.t(), hc);
      }
      if (need_b) gb.add_(g.sum(0));
    }
  }
  out.grad_w = need_w ? gw.to(student_weight.scalar_type()) : at::empty({0}, sh.options());
  out.grad_b = need_b ? gb.to(student_bias->scalar_type()) : at::empty({0}, sh.options());
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_linear_divergence_fwd_cpu(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const std::optional<at::Tensor>& student_bias,
    const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& mask, double beta, double temperature, bool return_entropy, int64_t chunk_size) {
  Result r = run(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask, beta,
                 temperature, return_entropy, at::Tensor(), false, false, false, chunk_size,
                 "fused_linear_divergence_fwd");
  return {r.div, r.ent};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_divergence_bwd_cpu(
    const at::Tensor& grad_div, const at::Tensor& student_hidden, const at::Tensor& student_weight,
    const std::optional<at::Tensor>& student_bias, const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight,
    const std::optional<at::Tensor>& teacher_bias, const std::optional<at::Tensor>& mask, double beta,
    double temperature, bool grad_hidden, bool grad_weight, bool grad_bias, int64_t chunk_size) {
  Result r = run(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask, beta,
                 temperature, false, grad_div, grad_hidden, grad_weight, grad_bias, chunk_size,
                 "fused_linear_divergence_bwd");
  return {r.grad_h, r.grad_w, r.grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_divergence_sum_fwd_cpu(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const std::optional<at::Tensor>& student_bias,
    const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& mask, double beta, double temperature, bool return_entropy, bool grad_hidden,
    bool grad_weight, bool grad_bias, int64_t chunk_size) {
  Result r = run(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask, beta,
                 temperature, return_entropy, at::Tensor(), grad_hidden, grad_weight, grad_bias, chunk_size,
                 "fused_linear_divergence_sum_fwd");
  return {r.div.sum(), r.ent, r.grad_h, r.grad_w, r.grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("fused_linear_divergence_fwd", &fused_linear_divergence_fwd_cpu);
  m.impl("fused_linear_divergence_bwd", &fused_linear_divergence_bwd_cpu);
  m.impl("fused_linear_divergence_sum_fwd", &fused_linear_divergence_sum_fwd_cpu);
}

}  // namespace rlhf_fast
