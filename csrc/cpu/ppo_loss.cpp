// Clipped PPO policy and value losses on the CPU, forward and backward, each one
// fused pass over the [B, T] inputs.
//
// The forward computes, per row, the masked sums the aggregation needs (loss sum,
// token count) and the statistics (clip counts, KL, ratio sum/max) in the same pass;
// rows run in parallel and the per-row partials are combined in row order, so the
// result does not depend on the thread count. The backward recomputes the per-token
// loss branch (cheaper than saving [B, T] masks) and writes d loss / d input.
//
// The per-token math is branch-free (selects, a polynomial exp) and runs as `omp simd`
// loops over blocks of a row, multi-versioned for AVX2 / AVX-512: the scalar, branchy
// version with std::exp took ~12 ns a token a pass; see the block kernels below.
//
// Gradients follow torch autograd of reference.py exactly: clamp passes gradient on
// its closed interval (none at NaN), maximum/minimum split it in half at ties and send all
// of it to both operands when one is NaN.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "fast_exp.h"

namespace rlhf_fast {
namespace {

constexpr double kLogRatioClamp = 20.0;

enum class Agg { TokenMean, SeqMeanTokenMean, SeqMeanTokenSum, SeqMeanTokenSumNorm };

Agg parse_agg(const std::string& agg, const char* op) {
  if (agg == "token-mean") return Agg::TokenMean;
  if (agg == "seq-mean-token-mean") return Agg::SeqMeanTokenMean;
  if (agg == "seq-mean-token-sum") return Agg::SeqMeanTokenSum;
  if (agg == "seq-mean-token-sum-norm") return Agg::SeqMeanTokenSumNorm;
  TORCH_CHECK_VALUE(false, op, ": agg must be one of token-mean, seq-mean-token-mean, seq-mean-token-sum, ",
                    "seq-mean-token-sum-norm, got '", agg, "'");
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// rows per parallel task: ~256k tokens (~0.25 ms a pass with the vectorised block kernels; it
// was 64k tokens when a token took ~12 ns), so small batches stay on one thread rather than
// paying a fork/join that cost milliseconds on a loaded 2-core machine (advantages.cpp)
int64_t row_grain(int64_t T) { return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(T, 1)); }

// Inputs as the kernels read them: the differentiated tensor in its own dtype, the two
// constants either in that dtype (the common case, no copy) or converted to the math dtype
// (mixed dtypes, as reference.py converts them), the mask as bool.
struct Inputs {
  at::Tensor x, a, b, mask;
  bool aux_in_x_dtype;
};

Inputs prepare(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const at::Tensor& mask,
               const char* op, const char* xn, const char* an, const char* bn) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": ", xn, " must be [B, T], got shape ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": ", xn, " must be floating, got ", x.scalar_type());
  TORCH_CHECK_VALUE(a.sizes() == x.sizes(), op, ": ", an, " must have the shape of ", xn, " ", x.sizes(), ", got ",
                    a.sizes());
  TORCH_CHECK_VALUE(b.sizes() == x.sizes(), op, ": ", bn, " must have the shape of ", xn, " ", x.sizes(), ", got ",
                    b.sizes());
  TORCH_CHECK_VALUE(mask.sizes() == x.sizes(), op, ": mask must have shape ", x.sizes(), ", got ", mask.sizes());
  Inputs in;
  in.x = x.contiguous();
  in.aux_in_x_dtype = a.scalar_type() == x.scalar_type() && b.scalar_type() == x.scalar_type();
  const auto aux = in.aux_in_x_dtype ? x.scalar_type() : acc_type(x.scalar_type());
  in.a = a.to(aux).contiguous();
  in.b = b.to(aux).contiguous();
  in.mask = (mask.scalar_type() == at::kBool ? mask : mask.ne(0)).contiguous();
  return in;
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<x_t>, Tag<aux_t>, Tag<acc_t>) for the dtypes of `in` (C++17: no template lambdas).
template <typename F>
void dispatch_inputs(const Inputs& in, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.x.scalar_type(), "ppo_loss", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (in.aux_in_x_dtype) {
      f(Tag<scalar_t>{}, Tag<scalar_t>{}, Tag<acc_t>{});
    } else {
      f(Tag<scalar_t>{}, Tag<acc_t>{}, Tag<acc_t>{});
    }
  });
}

// Denominator of the aggregation: the normalizer when given, else the mode's default.
double agg_denominator(Agg agg, const c10::optional<at::Tensor>& normalizer, int64_t count, int64_t B, int64_t T) {
  if (normalizer.has_value() && normalizer->defined()) {
    TORCH_CHECK_VALUE(normalizer->numel() == 1, "normalizer must be a 0-dim tensor, got shape ",
                      normalizer->sizes());
    return normalizer->item<double>();
  }
  switch (agg) {
    case Agg::TokenMean: return static_cast<double>(std::max<int64_t>(count, 1));
    case Agg::SeqMeanTokenSumNorm: return static_cast<double>(B * T);
    default: return static_cast<double>(B);
  }
}

// Per-row partial sums of one forward pass.
struct RowPartial {
  double loss = 0, kl = 0, ratio = 0, value = 0;
  double ratio_max = -std::numeric_limits<double>::infinity();
  int64_t count = 0, clipped = 0, dual = 0;
};

double aggregate(Agg agg, const std::vector<RowPartial>& rows, double den) {
  double s = 0;
  for (const auto& r : rows) {
    s += agg == Agg::SeqMeanTokenMean ? r.loss / static_cast<double>(std::max<int64_t>(r.count, 1)) : r.loss;
  }
  return s / den;
}

int64_t row_count(const bool* m, int64_t T) {
  // bytes summed in 32-bit lanes (vectorisable), folded every 2^31 tokens; a bool viewed
  // from other bytes counts as set when nonzero, as everywhere else
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(m);
  int64_t k = 0;
  for (int64_t t0 = 0; t0 < T; t0 += (int64_t{1} << 31)) {
    const int64_t e = std::min(T, t0 + (int64_t{1} << 31));
    uint32_t part = 0;
    for (int64_t t = t0; t < e; ++t) part += static_cast<uint32_t>(bytes[t] != 0);
    k += part;
  }
  return k;
}

int64_t mask_count(const at::Tensor& mask) {
  // only token-mean without a normalizer needs the global count in the backward. A byte loop:
  // mask.sum() first converts the bool mask to an int64 copy (8 bytes a token), which took a
  // fifth of a B·T = 65536 forward + backward.
  return row_count(mask.data_ptr<bool>(), mask.numel());
}

// weight of a token of a row with `row_count` set tokens in d loss
inline double token_weight(Agg agg, double g_over_den, int64_t row_count) {
  return agg == Agg::SeqMeanTokenMean ? g_over_den / static_cast<double>(std::max<int64_t>(row_count, 1))
                                      : g_over_den;
}

// ------------------------------------------------------------------ block kernels

// Tokens per block: the per-token math runs as one branch-free `omp simd` loop over a block,
// its sums kept in the math dtype (exact counts, 1024 terms split over the vector lanes) and
// folded into the row's double partials. One block covers a row of T = 1024 in one call.
constexpr int64_t kBlock = 1024;

// exp of the clamped log-ratio, x in [-20, 20] (or NaN): fast_exp.h. Within 1 ulp of the
// correctly rounded exp for every float in [-20, 20] (checked exhaustively against double
// std::exp for x86-64, -v3 and -v4), and exp(0) = 1 exactly, so ratio = 1 ties stay ties.
__attribute__((always_inline)) inline float exp_clamped(float x) { return fast_exp(x); }

// fp64 keeps libm's exp: the fp64 path is the gradcheck / reference-precision one, not the hot one
__attribute__((always_inline)) inline double exp_clamped(double x) { return std::exp(x); }

// The block loops also compiled for AVX-512 and AVX2, picked at load time by the CPU (GCC
// function multi-versioning, as logprobs.cpp and sampling.cpp) while the extension stays
// baseline x86-64. The AVX2 / AVX-512 clones contract multiply-adds into FMAs (GCC's default
// for C++), so a token's values may differ from the baseline clone's in the last bit, and the
// lane split of the block sums differs; results depend on the CPU, never on the thread count.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RLHF_PPO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RLHF_PPO_CLONES
#endif

// `p` itself when it is already in the math dtype, else its first n values converted into buf.
template <typename acc_t, typename T>
const acc_t* as_acc(const T* p, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return p;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(p[i]);
    return buf;
  }
}

// Where the block kernels write d loss / d x: straight into the output when it has the math
// dtype, else into buf, which store_from() then converts.
template <typename acc_t, typename T>
acc_t* out_acc(T* p, acc_t* buf) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return p;
  } else {
    return buf;
  }
}

template <typename acc_t, typename T>
void store_from(const acc_t* buf, int64_t n, T* p) {
  if constexpr (!std::is_same_v<T, acc_t>) {
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);
  }
}

// Sums of one block, in the math dtype; flags and counts as 0/1 values so that the block loop
// is one vectorisable reduction.
template <typename acc_t>
struct BlockSums {
  acc_t loss = 0, kl = 0, ratio = 0, value = 0, count = 0, clipped = 0, dual = 0;
  acc_t ratio_max = -std::numeric_limits<acc_t>::infinity();

  void fold_into(RowPartial& r) const {
    r.loss += loss;
    r.kl += kl;
    r.ratio += ratio;
    r.value += value;
    r.ratio_max = std::max<double>(r.ratio_max, ratio_max);
    r.count += static_cast<int64_t>(count);
    r.clipped += static_cast<int64_t>(clipped);
    r.dual += static_cast<int64_t>(dual);
  }
};

// ------------------------------------------------------------------ policy loss

template <typename acc_t>
struct PolicyParams {
  acc_t lo, hi;  // ratio clip range [1 - clip_low, 1 + clip_high]
  acc_t dual;
  // the dual clip applies to tokens with A < dual_below: 0 with a dual clip, -inf without
  // (no A is below it), so the loop needs no branch on whether there is one
  acc_t dual_below;
};

// The per-token surrogate of reference.ppo_token_loss, branch-free (selects only); with kGrad
// also d loss / d logp. Flags are 0/1 in the math dtype.
template <typename acc_t>
struct PolicyToken {
  acc_t loss, ratio, d, clipped, dual, grad;
};

template <typename acc_t, bool kGrad>
__attribute__((always_inline)) inline PolicyToken<acc_t> policy_token(acc_t lp, acc_t old, acc_t A,
                                                                       const PolicyParams<acc_t>& p) {
  PolicyToken<acc_t> t;
  t.d = lp - old;
  const acc_t lr = std::min<acc_t>(std::max<acc_t>(t.d, -kLogRatioClamp), kLogRatioClamp);
  t.ratio = exp_clamped(lr);
  const acc_t rc = std::min<acc_t>(std::max<acc_t>(t.ratio, p.lo), p.hi);
  const acc_t l1 = -A * t.ratio;
  const acc_t l2 = -A * rc;
  const acc_t mx = std::max(l1, l2);
  t.clipped = l2 > l1 ? acc_t(1) : acc_t(0);
  const bool dual_on = A < p.dual_below;
  const acc_t l3 = -A * p.dual;
  const bool dual_hit = dual_on & (l3 < mx);
  t.loss = dual_hit ? l3 : mx;  // min(mx, l3) where the dual clip applies
  t.dual = dual_hit ? acc_t(1) : acc_t(0);
  if (kGrad) {
    // The conditions combine with & and the half-shares of ties add as a second select: with
    // && and nested ?: GCC 12 leaves control flow in the loop and does not vectorise it.
    // Share of the gradient that reaches max(l1, l2): all of it outside the dual clip.
    const acc_t gmin = ((!dual_on) | (mx < l3) ? acc_t(1) : acc_t(0)) + (dual_on & (mx == l3) ? acc_t(0.5) : acc_t(0));
    const acc_t g1 = (l1 > l2 ? acc_t(1) : acc_t(0)) + (l1 == l2 ? acc_t(0.5) : acc_t(0));
    const acc_t g2 = acc_t(1) - g1;
    const acc_t cg = (t.ratio >= p.lo) & (t.ratio <= p.hi) ? acc_t(1) : acc_t(0);
    // the log-ratio clamp passes no gradient outside [-20, 20], a NaN log-ratio included: a
    // select, as torch.clamp's backward (a product with a 0/1 flag gave NaN · 0 = NaN there)
    const bool inside = (t.d >= -kLogRatioClamp) & (t.d <= kLogRatioClamp);
    t.grad = inside ? -A * gmin * (g1 + g2 * cg) * t.ratio : acc_t(0);
  } else {
    t.grad = 0;
  }
  return t;
}

// Masked tokens are selected away (not multiplied by 0), so NaN or inf in padding stays out.
template <typename acc_t>
__attribute__((noinline)) RLHF_PPO_CLONES void policy_fwd_block(const acc_t* __restrict lp,
                                                                const acc_t* __restrict old,
                                                                const acc_t* __restrict adv,
                                                                const uint8_t* __restrict m, int64_t n,
                                                                const PolicyParams<acc_t> p, BlockSums<acc_t>& out) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  // the mask as 0/1 in the math dtype first: read as bytes inside the reduction loop, GCC 12
  // sizes that loop's vectors by the bytes and runs the float math in xmm registers (policy
  // forward at B·T = 65536 on the AVX-512 CI machine: 356 us that way, 66 us this way)
  acc_t keep[kBlock];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) keep[i] = m[i] != 0 ? acc_t(1) : acc_t(0);
  acc_t loss = 0, kl = 0, ratio = 0, count = 0, clipped = 0, dual = 0, rmax = kNegInf;
#pragma omp simd reduction(+ : loss, kl, ratio, count, clipped, dual) reduction(max : rmax)
  for (int64_t i = 0; i < n; ++i) {
    const PolicyToken<acc_t> t = policy_token<acc_t, false>(lp[i], old[i], adv[i], p);
    const bool on = keep[i] != acc_t(0);
    loss += on ? t.loss : acc_t(0);
    kl += on ? acc_t(0.5) * t.d * t.d : acc_t(0);
    ratio += on ? t.ratio : acc_t(0);
    rmax = std::max(rmax, on ? t.ratio : kNegInf);
    count += on ? acc_t(1) : acc_t(0);
    clipped += on ? t.clipped : acc_t(0);
    dual += on ? t.dual : acc_t(0);
  }
  out.loss = loss;
  out.kl = kl;
  out.ratio = ratio;
  out.ratio_max = rmax;
  out.count = count;
  out.clipped = clipped;
  out.dual = dual;
}

template <typename acc_t>
__attribute__((noinline)) RLHF_PPO_CLONES void policy_bwd_block(const acc_t* __restrict lp,
                                                                const acc_t* __restrict old,
                                                                const acc_t* __restrict adv,
                                                                const uint8_t* __restrict m, int64_t n,
                                                                const PolicyParams<acc_t> p, acc_t w,
                                                                acc_t* __restrict g) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const PolicyToken<acc_t> t = policy_token<acc_t, true>(lp[i], old[i], adv[i], p);
    g[i] = m[i] != 0 ? t.grad * w : acc_t(0);
  }
}

// d loss / d (one token's loss) before the per-row weighting: grad_loss / the aggregation's
// denominator (the mask's global count only for token-mean without a normalizer)
double grad_over_denominator(const at::Tensor& grad_loss, Agg agg, const c10::optional<at::Tensor>& normalizer,
                             const at::Tensor& mask) {
  const bool need_count = agg == Agg::TokenMean && !(normalizer.has_value() && normalizer->defined());
  const int64_t count = need_count ? mask_count(mask) : 0;
  return grad_loss.item<double>() / agg_denominator(agg, normalizer, count, mask.size(0), mask.size(1));
}

// The forward driver: rows in parallel, each in kBlock-token blocks whose inputs are converted
// to the math dtype acc_t where they are not in it. make_block(Tag<acc_t>) returns the block
// kernel, called as block(x, a, b, mask_bytes, n, BlockSums<acc_t>&). Returns each row's sums.
template <typename MakeBlock>
std::vector<RowPartial> forward_rows(const Inputs& in, MakeBlock&& make_block) {
  const int64_t B = in.x.size(0), T = in.x.size(1);
  std::vector<RowPartial> rows(B);
  dispatch_inputs(in, [&](auto x_tag, auto aux_tag, auto acc_tag) {
    using x_t = typename decltype(x_tag)::type;
    using aux_t = typename decltype(aux_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
    const auto block = make_block(acc_tag);
    const x_t* x = in.x.data_ptr<x_t>();
    const aux_t* a = in.a.data_ptr<aux_t>();
    const aux_t* bv = in.b.data_ptr<aux_t>();
    // the kernels read the mask as bytes: with bool loads GCC 12 does not vectorise the masked stores
    const uint8_t* mb = reinterpret_cast<const uint8_t*>(in.mask.data_ptr<bool>());
    at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
      acc_t buf[3][kBlock];
      for (int64_t b = b0; b < b1; ++b) {
        RowPartial r;
        for (int64_t o = b * T, e = (b + 1) * T; o < e; o += kBlock) {
          const int64_t n = std::min(kBlock, e - o);
          BlockSums<acc_t> s;
          block(as_acc(x + o, n, buf[0]), as_acc(a + o, n, buf[1]), as_acc(bv + o, n, buf[2]), mb + o, n, s);
          s.fold_into(r);
        }
        rows[b] = r;
      }
    });
  });
  return rows;
}

// The backward driver: d loss / d x in x's dtype, row by row as forward_rows; each token's
// weight is token_weight(agg, g_over_den, its row's count). make_block(Tag<acc_t>) returns
// the block kernel, called as block(x, a, b, mask_bytes, n, weight, grad_out).
template <typename MakeBlock>
at::Tensor backward_rows(const Inputs& in, Agg agg, double g_over_den, MakeBlock&& make_block) {
  const int64_t B = in.x.size(0), T = in.x.size(1);
  auto out = at::empty_like(in.x);
  dispatch_inputs(in, [&](auto x_tag, auto aux_tag, auto acc_tag) {
    using x_t = typename decltype(x_tag)::type;
    using aux_t = typename decltype(aux_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
    const auto block = make_block(acc_tag);
    const x_t* x = in.x.data_ptr<x_t>();
    const aux_t* a = in.a.data_ptr<aux_t>();
    const aux_t* bv = in.b.data_ptr<aux_t>();
    const bool* m = in.mask.data_ptr<bool>();
    const uint8_t* mb = reinterpret_cast<const uint8_t*>(m);  // bytes: see forward_rows
    x_t* g = out.data_ptr<x_t>();
    at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
      acc_t buf[4][kBlock];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t rc = agg == Agg::SeqMeanTokenMean ? row_count(m + b * T, T) : 0;
        const acc_t w = static_cast<acc_t>(token_weight(agg, g_over_den, rc));
        for (int64_t o = b * T, e = (b + 1) * T; o < e; o += kBlock) {
          const int64_t n = std::min(kBlock, e - o);
          acc_t* go = out_acc(g + o, buf[3]);
          block(as_acc(x + o, n, buf[0]), as_acc(a + o, n, buf[1]), as_acc(bv + o, n, buf[2]), mb + o, n, w, go);
          store_from(go, n, g + o);
        }
      }
    });
  });
  return out;
}

template <typename acc_t>
PolicyParams<acc_t> policy_params(double clip_low, double clip_high, c10::optional<double> dual_clip) {
  TORCH_CHECK_VALUE(clip_low >= 0, "ppo_policy_loss: clip_low must be >= 0, got ", clip_low);
  TORCH_CHECK_VALUE(clip_high >= 0, "ppo_policy_loss: clip_high must be >= 0, got ", clip_high);
  TORCH_CHECK_VALUE(!dual_clip.has_value() || *dual_clip > 1.0, "ppo_policy_loss: dual_clip must be > 1, got ",
                    dual_clip.value_or(0.0));
  // the bounds in the math dtype, as reference.py's clamp(ratio, 1 - clip_low, 1 + clip_high)
  return {static_cast<acc_t>(1.0 - clip_low), static_cast<acc_t>(1.0 + clip_high),
          static_cast<acc_t>(dual_clip.value_or(0.0)),
          dual_clip.has_value() ? acc_t(0) : -std::numeric_limits<acc_t>::infinity()};
}

std::tuple<at::Tensor, at::Tensor> ppo_policy_loss_fwd_cpu(const at::Tensor& logp, const at::Tensor& old_logp,
                                                           const at::Tensor& advantages, const at::Tensor& mask,
                                                           double clip_low, double clip_high,
                                                           c10::optional<double> dual_clip, c10::string_view agg_sv,
                                                           const c10::optional<at::Tensor>& normalizer) {
  const Agg agg = parse_agg(std::string(agg_sv), "ppo_policy_loss");
  Inputs in = prepare(logp, old_logp, advantages, mask, "ppo_policy_loss", "logp", "old_logp", "advantages");
  const int64_t B = in.x.size(0), T = in.x.size(1);
  const auto rows = forward_rows(in, [&](auto acc_tag) {
    using acc_t = typename decltype(acc_tag)::type;
    const auto p = policy_params<acc_t>(clip_low, clip_high, dual_clip);
    return [p](const acc_t* lp, const acc_t* old, const acc_t* adv, const uint8_t* m, int64_t n,
               BlockSums<acc_t>& s) { policy_fwd_block<acc_t>(lp, old, adv, m, n, p, s); };
  });
  RowPartial tot;
  for (const auto& r : rows) {
    tot.kl += r.kl;
    tot.ratio += r.ratio;
    tot.ratio_max = std::max(tot.ratio_max, r.ratio_max);
    tot.count += r.count;
    tot.clipped += r.clipped;
    tot.dual += r.dual;
  }
  const double loss = aggregate(agg, rows, agg_denominator(agg, normalizer, tot.count, B, T));
  const double n = static_cast<double>(std::max<int64_t>(tot.count, 1));
  const auto opts = logp.options().dtype(acc_type(logp.scalar_type()));
  auto stats = at::empty({5}, opts.dtype(at::kDouble));
  double* s = stats.data_ptr<double>();
  s[0] = tot.clipped / n;                             // clip_frac
  s[1] = tot.dual / n;                                // dual_clip_frac
  s[2] = tot.kl / n;                                  // approx_kl: masked mean of ½(logp − old)²
  s[3] = tot.ratio / n;                               // ratio_mean
  // ratio_max (0 when nothing is masked in). NaN when a counted ratio is NaN, as torch.max:
  // the running std::max drops NaN, but the ratio sum keeps it (each ratio is within e^±20)
  s[4] = tot.count > 0 ? (std::isnan(tot.ratio) ? tot.ratio : tot.ratio_max) : 0.0;
  return {at::scalar_tensor(loss, opts), stats.to(opts.dtype())};
}

at::Tensor ppo_policy_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& old_logp,
                                   const at::Tensor& advantages, const at::Tensor& mask, double clip_low,
                                   double clip_high, c10::optional<double> dual_clip, c10::string_view agg_sv,
                                   const c10::optional<at::Tensor>& normalizer) {
  const Agg agg = parse_agg(std::string(agg_sv), "ppo_policy_loss");
  Inputs in = prepare(logp, old_logp, advantages, mask, "ppo_policy_loss", "logp", "old_logp", "advantages");
  return backward_rows(in, agg, grad_over_denominator(grad_loss, agg, normalizer, in.mask), [&](auto acc_tag) {
    using acc_t = typename decltype(acc_tag)::type;
    const auto p = policy_params<acc_t>(clip_low, clip_high, dual_clip);
    return [p](const acc_t* lp, const acc_t* old, const acc_t* adv, const uint8_t* m, int64_t n, acc_t w,
               acc_t* go) { policy_bwd_block<acc_t>(lp, old, adv, m, n, p, w, go); };
  });
}

// ------------------------------------------------------------------ value loss

// The per-token loss of reference.ppo_value_loss, branch-free; with kGrad also d loss / d v.
// kClip is a template parameter: without a clip the loss is ½(v − R)², which the clipped
// formula with c = inf would not reproduce (old + (v − old) is not always v in floating point).
template <typename acc_t>
struct ValueToken {
  acc_t loss, clipped, grad;
};

template <typename acc_t, bool kClip, bool kGrad>
__attribute__((always_inline)) inline ValueToken<acc_t> value_token(acc_t v, acc_t old, acc_t R, acc_t c) {
  ValueToken<acc_t> t;
  const acc_t e = v - R;
  const acc_t err = e * e;
  if (!kClip) {
    t.loss = acc_t(0.5) * err;
    t.clipped = 0;
    t.grad = kGrad ? e : acc_t(0);
    return t;
  }
  const acc_t dv = v - old;
  const acc_t vc = old + std::min<acc_t>(std::max<acc_t>(dv, -c), c);
  const acc_t ec = vc - R;
  const acc_t errc = ec * ec;
  // NaN propagates, as torch.maximum (std::max(err, NaN) is err: a NaN old value gave a finite
  // loss). errc is NaN whenever err is (a NaN v or R reaches vc through the clamp, whose
  // std::max / std::min keep a NaN first operand), so one select does it (testing both took
  // the value loss's forward + backward from 245 to 315 us, B·T = 65536, one thread)
  const bool unordered = errc != errc;
  t.loss = acc_t(0.5) * (err > errc ? err : errc);
  t.clipped = errc > err ? acc_t(1) : acc_t(0);
  if (kGrad) {
    // torch.maximum's backward: the larger operand's share, half each at a tie, and the whole
    // gradient to both when one is NaN; the clamp passes none outside [-c, c] (NaN included),
    // a select: (vc − R) · 0 is NaN when vc − R is infinite or NaN
    const acc_t tie = err == errc ? acc_t(0.5) : acc_t(0);
    const acc_t both = unordered ? acc_t(1) : acc_t(0);
    const acc_t g1 = (err > errc ? acc_t(1) : acc_t(0)) + tie + both;
    const acc_t g2 = (errc > err ? acc_t(1) : acc_t(0)) + tie + both;
    const bool cg = (dv >= -c) & (dv <= c);
    // d ½max(err, errc) = ½(g1·2e + g2·2ec·cg)
    t.grad = g1 * e + (cg ? g2 * ec : acc_t(0));
  } else {
    t.grad = 0;
  }
  return t;
}

template <typename acc_t, bool kClip>
__attribute__((noinline)) RLHF_PPO_CLONES void value_fwd_block(const acc_t* __restrict v, const acc_t* __restrict old,
                                                               const acc_t* __restrict R, const uint8_t* __restrict m,
                                                               int64_t n, acc_t c, BlockSums<acc_t>& out) {
  acc_t keep[kBlock];  // as in policy_fwd_block
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) keep[i] = m[i] != 0 ? acc_t(1) : acc_t(0);
  acc_t loss = 0, value = 0, count = 0, clipped = 0;
#pragma omp simd reduction(+ : loss, value, count, clipped)
  for (int64_t i = 0; i < n; ++i) {
    const ValueToken<acc_t> t = value_token<acc_t, kClip, false>(v[i], old[i], R[i], c);
    const bool on = keep[i] != acc_t(0);
    loss += on ? t.loss : acc_t(0);
    value += on ? v[i] : acc_t(0);
    count += on ? acc_t(1) : acc_t(0);
    clipped += on ? t.clipped : acc_t(0);
  }
  out.loss = loss;
  out.value = value;
  out.count = count;
  out.clipped = clipped;
}

template <typename acc_t, bool kClip>
__attribute__((noinline)) RLHF_PPO_CLONES void value_bwd_block(const acc_t* __restrict v, const acc_t* __restrict old,
                                                               const acc_t* __restrict R, const uint8_t* __restrict m,
                                                               int64_t n, acc_t c, acc_t w, acc_t* __restrict g) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const ValueToken<acc_t> t = value_token<acc_t, kClip, true>(v[i], old[i], R[i], c);
    g[i] = m[i] != 0 ? t.grad * w : acc_t(0);
  }
}

std::tuple<at::Tensor, at::Tensor> ppo_value_loss_fwd_cpu(const at::Tensor& values, const at::Tensor& old_values,
                                                          const at::Tensor& returns, const at::Tensor& mask,
                                                          c10::optional<double> clip, c10::string_view agg_sv,
                                                          const c10::optional<at::Tensor>& normalizer) {
  const Agg agg = parse_agg(std::string(agg_sv), "ppo_value_loss");
  TORCH_CHECK_VALUE(!clip.has_value() || *clip >= 0, "ppo_value_loss: clip must be >= 0 or None, got ",
                    clip.value_or(0.0));
  Inputs in = prepare(values, old_values, returns, mask, "ppo_value_loss", "values", "old_values", "returns");
  const int64_t B = in.x.size(0), T = in.x.size(1);
  const auto rows = forward_rows(in, [&](auto acc_tag) {
    using acc_t = typename decltype(acc_tag)::type;
    const bool has_clip = clip.has_value();
    const acc_t c = static_cast<acc_t>(clip.value_or(0.0));
    return [has_clip, c](const acc_t* v, const acc_t* old, const acc_t* R, const uint8_t* m, int64_t n,
                         BlockSums<acc_t>& s) {
      if (has_clip) {
        value_fwd_block<acc_t, true>(v, old, R, m, n, c, s);
      } else {
        value_fwd_block<acc_t, false>(v, old, R, m, n, c, s);
      }
    };
  });
  double value = 0;
  int64_t count = 0, clipped = 0;
  for (const auto& r : rows) {
    value += r.value;
    count += r.count;
    clipped += r.clipped;
  }
  const double loss = aggregate(agg, rows, agg_denominator(agg, normalizer, count, B, T));
  const double n = static_cast<double>(std::max<int64_t>(count, 1));
  const auto opts = values.options().dtype(acc_type(values.scalar_type()));
  auto stats = at::empty({2}, opts.dtype(at::kDouble));
  stats.data_ptr<double>()[0] = clipped / n;  // clip_frac
  stats.data_ptr<double>()[1] = value / n;    // values_mean
  return {at::scalar_tensor(loss, opts), stats.to(opts.dtype())};
}

at::Tensor ppo_value_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& values, const at::Tensor& old_values,
                                  const at::Tensor& returns, const at::Tensor& mask, c10::optional<double> clip,
                                  c10::string_view agg_sv, const c10::optional<at::Tensor>& normalizer) {
  const Agg agg = parse_agg(std::string(agg_sv), "ppo_value_loss");
  Inputs in = prepare(values, old_values, returns, mask, "ppo_value_loss", "values", "old_values", "returns");
  return backward_rows(in, agg, grad_over_denominator(grad_loss, agg, normalizer, in.mask), [&](auto acc_tag) {
    using acc_t = typename decltype(acc_tag)::type;
    const bool has_clip = clip.has_value();
    const acc_t c = static_cast<acc_t>(clip.value_or(0.0));
    return [has_clip, c](const acc_t* v, const acc_t* old, const acc_t* R, const uint8_t* m, int64_t n, acc_t w,
                         acc_t* go) {
      if (has_clip) {
        value_bwd_block<acc_t, true>(v, old, R, m, n, c, w, go);
      } else {
        value_bwd_block<acc_t, false>(v, old, R, m, n, c, w, go);
      }
    };
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("ppo_policy_loss_fwd", &ppo_policy_loss_fwd_cpu);
  m.impl("ppo_policy_loss_bwd", &ppo_policy_loss_bwd_cpu);
  m.impl("ppo_value_loss_fwd", &ppo_value_loss_fwd_cpu);
  m.impl("ppo_value_loss_bwd", &ppo_value_loss_bwd_cpu);
}

}  // namespace rlhf_fast
