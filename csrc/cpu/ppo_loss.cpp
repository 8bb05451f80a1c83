// Clipped PPO policy and value losses on the CPU, forward and backward, each one
// fused pass over the [B, T] inputs.
//
// The forward computes, per row, the masked sums the aggregation needs (loss sum,
// token count) and the statistics (clip counts, KL, ratio sum/max) in the same pass;
// rows run in parallel and the per-row partials are combined in row order, so the
// result does not depend on the thread count. The backward recomputes the per-token
// loss branch (cheaper than saving [B, T] masks) and writes d loss / d input.
//
// Gradients follow torch autograd of reference.py exactly: clamp passes gradient on
// its closed interval, maximum/minimum split it in half at ties.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

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

// rows per parallel task: ~64k tokens (~0.7 ms), so small batches stay on one thread rather
// than paying a fork/join that cost milliseconds on a loaded 2-core machine (advantages.cpp)
int64_t row_grain(int64_t T) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(T, 1)); }

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

int64_t mask_count(const at::Tensor& mask) {
  // only token-mean without a normalizer needs the global count in the backward
  return mask.sum().item<int64_t>();
}

// weight of a token of a row with `row_count` set tokens in d loss
inline double token_weight(Agg agg, double g_over_den, int64_t row_count) {
  return agg == Agg::SeqMeanTokenMean ? g_over_den / static_cast<double>(std::max<int64_t>(row_count, 1))
                                      : g_over_den;
}

int64_t row_count(const bool* m, int64_t T) {
  int64_t k = 0;
  for (int64_t t = 0; t < T; ++t) k += m[t];
  return k;
}

// ------------------------------------------------------------------ policy loss

template <typename acc_t>
struct PolicyParams {
  acc_t lo, hi;  // ratio clip range [1 - clip_low, 1 + clip_high]
  bool has_dual;
  acc_t dual;
};

// The per-token surrogate of reference.ppo_token_loss; with kGrad also d loss / d logp.
template <typename acc_t, bool kGrad>
struct PolicyToken {
  acc_t loss, ratio, d, grad;
  bool clipped, dual;

  inline PolicyToken(acc_t lp, acc_t old, acc_t A, const PolicyParams<acc_t>& p) {
    d = lp - old;
    const acc_t lr = std::min<acc_t>(std::max<acc_t>(d, -kLogRatioClamp), kLogRatioClamp);
    ratio = std::exp(lr);
    const acc_t rc = std::min<acc_t>(std::max<acc_t>(ratio, p.lo), p.hi);
    const acc_t l1 = -A * ratio;
    const acc_t l2 = -A * rc;
    const acc_t mx = std::max(l1, l2);
    clipped = l2 > l1;
    loss = mx;
    dual = false;
    acc_t gmin = 1;  // share of the gradient that reaches max(l1, l2)
    if (p.has_dual && A < 0) {
      const acc_t l3 = -A * p.dual;
      dual = l3 < mx;
      loss = std::min(mx, l3);
      if (kGrad) gmin = mx < l3 ? acc_t(1) : (mx == l3 ? acc_t(0.5) : acc_t(0));
    }
    if (kGrad) {
      const acc_t g1 = l1 > l2 ? acc_t(1) : (l1 == l2 ? acc_t(0.5) : acc_t(0));
      const acc_t g2 = acc_t(1) - g1;
      const acc_t cg = (ratio >= p.lo && ratio <= p.hi) ? acc_t(1) : acc_t(0);
      const acc_t inside = (d >= -kLogRatioClamp && d <= kLogRatioClamp) ? acc_t(1) : acc_t(0);
      grad = -A * gmin * (g1 + g2 * cg) * ratio * inside;
    } else {
      grad = 0;
    }
  }
};

template <typename acc_t>
PolicyParams<acc_t> policy_params(double clip_low, double clip_high, c10::optional<double> dual_clip) {
  TORCH_CHECK_VALUE(clip_low >= 0, "ppo_policy_loss: clip_low must be >= 0, got ", clip_low);
  TORCH_CHECK_VALUE(clip_high >= 0, "ppo_policy_loss: clip_high must be >= 0, got ", clip_high);
  TORCH_CHECK_VALUE(!dual_clip.has_value() || *dual_clip > 1.0, "ppo_policy_loss: dual_clip must be > 1, got ",
                    dual_clip.value_or(0.0));
  // the bounds in the math dtype, as reference.py's clamp(ratio, 1 - clip_low, 1 + clip_high)
  return {static_cast<acc_t>(1.0 - clip_low), static_cast<acc_t>(1.0 + clip_high), dual_clip.has_value(),
          static_cast<acc_t>(dual_clip.value_or(0.0))};
}

std::tuple<at::Tensor, at::Tensor> ppo_policy_loss_fwd_cpu(const at::Tensor& logp, const at::Tensor& old_logp,
                                                           const at::Tensor& advantages, const at::Tensor& mask,
                                                           double clip_low, double clip_high,
                                                           c10::optional<double> dual_clip, c10::string_view agg_sv,
                                                           const c10::optional<at::Tensor>& normalizer) {
  const Agg agg = parse_agg(std::string(agg_sv), "ppo_policy_loss");
  Inputs in = prepare(logp, old_logp, advantages, mask, "ppo_policy_loss", "logp", "old_logp", "advantages");
  const int64_t B = in.x.size(0), T = in.x.size(1);
  std::vector<RowPartial> rows(B);
  dispatch_inputs(in, [&](auto x_tag, auto aux_tag, auto acc_tag) {
    using x_t = typename decltype(x_tag)::type;
    using aux_t = typename decltype(aux_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
    const auto p = policy_params<acc_t>(clip_low, clip_high, dual_clip);
    const x_t* lp = in.x.data_ptr<x_t>();
    const aux_t* old = in.a.data_ptr<aux_t>();
    const aux_t* adv = in.b.data_ptr<aux_t>();
    const bool* m = in.mask.data_ptr<bool>();
    at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        RowPartial r;
        for (int64_t i = b * T, e = (b + 1) * T; i < e; ++i) {
          if (!m[i]) continue;
          PolicyToken<acc_t, false> tok(static_cast<acc_t>(lp[i]), static_cast<acc_t>(old[i]),
                                        static_cast<acc_t>(adv[i]), p);
          r.loss += tok.loss;
          r.kl += 0.5 * static_cast<double>(tok.d) * static_cast<double>(tok.d);
          r.ratio += tok.ratio;
          r.ratio_max = std::max<double>(r.ratio_max, tok.ratio);
          r.count += 1;
          r.clipped += tok.clipped;
          r.dual += tok.dual;
        }
        rows[b] = r;
      }
    });
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
  s[4] = tot.count > 0 ? tot.ratio_max : 0.0;         // ratio_max (0 when nothing is masked in)
  return {at::scalar_tensor(loss, opts), stats.to(opts.dtype())};
}

at::Tensor ppo_policy_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& old_logp,
                                   const at::Tensor& advantages, const at::Tensor& mask, double clip_low,
                                   double clip_high, c10::optional<double> dual_clip, c10::string_view agg_sv,
                                   const c10::optional<at::Tensor>& normalizer) {
  const Agg agg = parse_agg(std::string(agg_sv), "ppo_policy_loss");
  Inputs in = prepare(logp, old_logp, advantages, mask, "ppo_policy_loss", "logp", "old_logp", "advantages");
  const int64_t B = in.x.size(0), T = in.x.size(1);
  const bool need_count = agg == Agg::TokenMean && !(normalizer.has_value() && normalizer->defined());
  const int64_t count = need_count ? mask_count(in.mask) : 0;
  const double g_over_den = grad_loss.item<double>() / agg_denominator(agg, normalizer, count, B, T);
  auto out = at::empty_like(in.x);
  dispatch_inputs(in, [&](auto x_tag, auto aux_tag, auto acc_tag) {
    using x_t = typename decltype(x_tag)::type;
    using aux_t = typename decltype(aux_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
    const auto p = policy_params<acc_t>(clip_low, clip_high, dual_clip);
    const x_t* lp = in.x.data_ptr<x_t>();
    const aux_t* old = in.a.data_ptr<aux_t>();
    const aux_t* adv = in.b.data_ptr<aux_t>();
    const bool* m = in.mask.data_ptr<bool>();
    x_t* g = out.data_ptr<x_t>();
    at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * T;
        const int64_t rc = agg == Agg::SeqMeanTokenMean ? row_count(m + o, T) : 0;
        const acc_t w = static_cast<acc_t>(token_weight(agg, g_over_den, rc));
        for (int64_t i = o, e = o + T; i < e; ++i) {
          if (!m[i]) {
            g[i] = x_t(0);
            continue;
          }
          PolicyToken<acc_t, true> tok(static_cast<acc_t>(lp[i]), static_cast<acc_t>(old[i]),
                                       static_cast<acc_t>(adv[i]), p);
          g[i] = static_cast<x_t>(tok.grad * w);
        }
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------ value loss

// The per-token loss of reference.ppo_value_loss; with kGrad also d loss / d v.
template <typename acc_t, bool kGrad>
struct ValueToken {
  acc_t loss, grad;
  bool clipped;

  inline ValueToken(acc_t v, acc_t old, acc_t R, bool has_clip, acc_t c) {
    const acc_t e = v - R;
    const acc_t err = e * e;
    clipped = false;
    grad = 0;
    if (!has_clip) {
      loss = acc_t(0.5) * err;
      if (kGrad) grad = e;
      return;
    }
    const acc_t dv = v - old;
    const acc_t vc = old + std::min<acc_t>(std::max<acc_t>(dv, -c), c);
    const acc_t ec = vc - R;
    const acc_t errc = ec * ec;
    loss = acc_t(0.5) * std::max(err, errc);
    clipped = errc > err;
    if (kGrad) {
      const acc_t g1 = err > errc ? acc_t(1) : (err == errc ? acc_t(0.5) : acc_t(0));
      const acc_t cg = (dv >= -c && dv <= c) ? acc_t(1) : acc_t(0);
      // d ½max(err, errc) = ½(g1·2e + (1 − g1)·2ec·cg)
      grad = g1 * e + (acc_t(1) - g1) * ec * cg;
    }
  }
};

std::tuple<at::Tensor, at::Tensor> ppo_value_loss_fwd_cpu(const at::Tensor& values, const at::Tensor& old_values,
                                                          const at::Tensor& returns, const at::Tensor& mask,
                                                          c10::optional<double> clip, c10::string_view agg_sv,
                                                          const c10::optional<at::Tensor>& normalizer) {
  const Agg agg = parse_agg(std::string(agg_sv), "ppo_value_loss");
  TORCH_CHECK_VALUE(!clip.has_value() || *clip >= 0, "ppo_value_loss: clip must be >= 0 or None, got ",
                    clip.value_or(0.0));
  Inputs in = prepare(values, old_values, returns, mask, "ppo_value_loss", "values", "old_values", "returns");
  const int64_t B = in.x.size(0), T = in.x.size(1);
  std::vector<RowPartial> rows(B);
  dispatch_inputs(in, [&](auto x_tag, auto aux_tag, auto acc_tag) {
    using x_t = typename decltype(x_tag)::type;
    using aux_t = typename decltype(aux_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
    const bool has_clip = clip.has_value();
    const acc_t c = static_cast<acc_t>(clip.value_or(0.0));
    const x_t* v = in.x.data_ptr<x_t>();
    const aux_t* old = in.a.data_ptr<aux_t>();
    const aux_t* R = in.b.data_ptr<aux_t>();
    const bool* m = in.mask.data_ptr<bool>();
    at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        RowPartial r;
        for (int64_t i = b * T, e = (b + 1) * T; i < e; ++i) {
          if (!m[i]) continue;
          const acc_t vi = static_cast<acc_t>(v[i]);
          ValueToken<acc_t, false> tok(vi, static_cast<acc_t>(old[i]), static_cast<acc_t>(R[i]), has_clip, c);
          r.loss += tok.loss;
          r.value += vi;
          r.count += 1;
          r.clipped += tok.clipped;
        }
        rows[b] = r;
      }
    });
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
  const int64_t B = in.x.size(0), T = in.x.size(1);
  const bool need_count = agg == Agg::TokenMean && !(normalizer.has_value() && normalizer->defined());
  const int64_t count = need_count ? mask_count(in.mask) : 0;
  const double g_over_den = grad_loss.item<double>() / agg_denominator(agg, normalizer, count, B, T);
  auto out = at::empty_like(in.x);
  dispatch_inputs(in, [&](auto x_tag, auto aux_tag, auto acc_tag) {
    using x_t = typename decltype(x_tag)::type;
    using aux_t = typename decltype(aux_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
    const bool has_clip = clip.has_value();
    const acc_t c = static_cast<acc_t>(clip.value_or(0.0));
    const x_t* v = in.x.data_ptr<x_t>();
    const aux_t* old = in.a.data_ptr<aux_t>();
    const aux_t* R = in.b.data_ptr<aux_t>();
    const bool* m = in.mask.data_ptr<bool>();
    x_t* g = out.data_ptr<x_t>();
    at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * T;
        const int64_t rc = agg == Agg::SeqMeanTokenMean ? row_count(m + o, T) : 0;
        const acc_t w = static_cast<acc_t>(token_weight(agg, g_over_den, rc));
        for (int64_t i = o, e = o + T; i < e; ++i) {
          if (!m[i]) {
            g[i] = x_t(0);
            continue;
          }
          ValueToken<acc_t, true> tok(static_cast<acc_t>(v[i]), static_cast<acc_t>(old[i]),
                                      static_cast<acc_t>(R[i]), has_clip, c);
          g[i] = static_cast<x_t>(tok.grad * w);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("ppo_policy_loss_fwd", &ppo_policy_loss_fwd_cpu);
  m.impl("ppo_policy_loss_bwd", &ppo_policy_loss_bwd_cpu);
  m.impl("ppo_value_loss_fwd", &ppo_value_loss_fwd_cpu);
  m.impl("ppo_value_loss_bwd", &ppo_value_loss_bwd_cpu);
}

}  // namespace rlhf_fast
