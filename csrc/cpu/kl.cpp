// KL estimators between policy and reference log-probs, elementwise, forward and
// backward. One pass over the inputs; float32 math (float64 for float64 inputs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <string>

namespace rlhf_fast {
namespace {

constexpr double kLogRatioClamp = 20.0;

enum class KLKind { K1, K2, K3, Abs };

KLKind parse_kind(const std::string& kind) {
  if (kind == "k1") return KLKind::K1;
  if (kind == "k2" || kind == "mse") return KLKind::K2;
  if (kind == "k3") return KLKind::K3;
  if (kind == "abs") return KLKind::Abs;
  TORCH_CHECK_VALUE(false, "kl_penalty: kind must be one of k1, k2, k3, abs, mse, got '", kind, "'");
}

template <typename in_t, typename acc_t>
void kl_fwd_impl(const in_t* lp, const in_t* ref, acc_t* out, int64_t n, KLKind kind) {
  at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      acc_t d = static_cast<acc_t>(lp[i]) - static_cast<acc_t>(ref[i]);
      acc_t v;
      switch (kind) {
        case KLKind::K1: v = d; break;
        case KLKind::K2: v = acc_t(0.5) * d * d; break;
        case KLKind::Abs: v = std::abs(d); break;
        default: {
          acc_t c = std::min<acc_t>(std::max<acc_t>(-d, -kLogRatioClamp), kLogRatioClamp);
          v = std::exp(c) - acc_t(1) + d;
        }
      }
      out[i] = v;
    }
  });
}

template <typename in_t, typename acc_t>
void kl_bwd_impl(const acc_t* g, const in_t* lp, const in_t* ref, in_t* out, int64_t n, KLKind kind) {
  at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      acc_t d = static_cast<acc_t>(lp[i]) - static_cast<acc_t>(ref[i]);
      acc_t dv;
      switch (kind) {
        case KLKind::K1: dv = 1; break;
        case KLKind::K2: dv = d; break;
        // sign(0) = 0, as torch.abs's gradient
        case KLKind::Abs: dv = (d > 0) - (d < 0); break;
        default: {
          // the clamp passes gradient only inside [-20, 20], as torch.clamp
          acc_t nd = -d;
          dv = (nd >= -kLogRatioClamp && nd <= kLogRatioClamp) ? acc_t(1) - std::exp(nd) : acc_t(1);
        }
      }
      out[i] = static_cast<in_t>(g[i] * dv);
    }
  });
}

at::Tensor kl_penalty_fwd_cpu(const at::Tensor& logp, const at::Tensor& ref_logp, c10::string_view kind_sv) {
  const KLKind kind = parse_kind(std::string(kind_sv));
  TORCH_CHECK(logp.sizes() == ref_logp.sizes(), "kl_penalty: logp and ref_logp shapes differ");
  const auto acc = logp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto lp = logp.contiguous();
  auto ref = ref_logp.to(logp.scalar_type()).contiguous();
  auto out = at::empty(logp.sizes(), logp.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lp.scalar_type(), "kl_penalty_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    kl_fwd_impl<scalar_t, acc_t>(lp.data_ptr<scalar_t>(), ref.data_ptr<scalar_t>(), out.data_ptr<acc_t>(),
                                 lp.numel(), kind);
  });
  return out;
}

at::Tensor kl_penalty_bwd_cpu(const at::Tensor& grad, const at::Tensor& logp, const at::Tensor& ref_logp,
                              c10::string_view kind_sv) {
  const KLKind kind = parse_kind(std::string(kind_sv));
  const auto acc = logp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto g = grad.to(acc).contiguous();
  auto lp = logp.contiguous();
  auto ref = ref_logp.to(logp.scalar_type()).contiguous();
  auto out = at::empty_like(lp);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lp.scalar_type(), "kl_penalty_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    kl_bwd_impl<scalar_t, acc_t>(g.data_ptr<acc_t>(), lp.data_ptr<scalar_t>(), ref.data_ptr<scalar_t>(),
                                 out.data_ptr<scalar_t>(), lp.numel(), kind);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("kl_penalty_fwd", &kl_penalty_fwd_cpu);
  m.impl("kl_penalty_bwd", &kl_penalty_bwd_cpu);
}

}  // namespace rlhf_fast
