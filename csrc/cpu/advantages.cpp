// Advantage estimators and masked statistics on the CPU: gae, discounted_returns,
// group_advantages, masked_mean, masked_whiten.
//
// GAE and returns are one reverse pass per row in which a masked token is the
// identity (it neither consumes nor changes the running state), so each row is the
// sequence of its unmasked tokens whatever the padding. Rows run in parallel
// (at::parallel_for, OpenMP); the math is float32 for fp16/bf16/fp32 inputs and
// float64 for float64. Full reductions accumulate in double over fixed chunks that
// are summed in order afterwards, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

namespace rlhf_fast {
namespace {

// elements per reduction chunk: big enough to amortise the task, small enough to split
constexpr int64_t kChunk = 1 << 15;

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// bool view of a 0/1 (or bool) mask with the given shape; nonzero counts as set, as mask.bool()
at::Tensor bool_mask(const at::Tensor& mask, at::IntArrayRef shape, const char* op) {
  TORCH_CHECK_VALUE(mask.sizes() == shape, op, ": mask must have shape ", shape, ", got ", mask.sizes());
  return (mask.scalar_type() == at::kBool ? mask : mask.ne(0)).contiguous();
}

void check_rows(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": ", name, " must be [B, T], got shape ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": ", name, " must be floating, got ",
                   x.scalar_type());
}

void check_discount(double x, const char* name, const char* op) {
  TORCH_CHECK_VALUE(x >= 0.0 && x <= 1.0, op, ": ", name, " must be in [0, 1], got ", x);
}

// Work per parallel task, in elements. Large on purpose: one thread scans ~5 tokens/ns,
// so a task is ~0.1-0.2 ms, well above a fork/join; with a 16k grain, gae at B=64, T=2048
// took 12-24 ms on a loaded 2-core machine (threads descheduled at the join) against
// 0.21 ms on one thread.
constexpr int64_t kTaskElems = 1 << 17;

// rows per task
int64_t row_grain(int64_t T) { return std::max<int64_t>(1, kTaskElems / std::max<int64_t>(T, 1)); }

// ------------------------------------------------------------------ gae / returns

template <typename in_t, typename acc_t>
void gae_impl(const in_t* r, const in_t* v, const bool* m, acc_t* adv, acc_t* ret, int64_t B, int64_t T,
              acc_t gamma, acc_t lam) {
  const acc_t gl = gamma * lam;
  at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * T;
      acc_t next_value = 0, last = 0;  // the value after the last unmasked token is 0
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t i = o + t;
        if (m[i]) {
          const acc_t vt = static_cast<acc_t>(v[i]);
          const acc_t delta = static_cast<acc_t>(r[i]) + gamma * next_value - vt;
          last = delta + gl * last;
          next_value = vt;
          adv[i] = last;
          ret[i] = last + vt;
        } else {
          adv[i] = 0;
          ret[i] = 0;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam) {
  check_rows(rewards, "rewards", "gae");
  check_rows(values, "values", "gae");
  TORCH_CHECK_VALUE(rewards.sizes() == values.sizes(), "gae: values must have the shape of rewards ",
                    rewards.sizes(), ", got ", values.sizes());
  check_discount(gamma, "gamma", "gae");
  check_discount(lam, "lam", "gae");
  const auto common = at::promote_types(rewards.scalar_type(), values.scalar_type());
  auto r = rewards.to(common).contiguous();
  auto v = values.to(common).contiguous();
  auto m = bool_mask(mask, rewards.sizes(), "gae");
  const auto opts = rewards.options().dtype(acc_type(common));
  auto adv = at::empty(rewards.sizes(), opts);
  auto ret = at::empty(rewards.sizes(), opts);
  const int64_t B = r.size(0), T = r.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, common, "gae", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    gae_impl<scalar_t, acc_t>(r.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), m.data_ptr<bool>(),
                              adv.data_ptr<acc_t>(), ret.data_ptr<acc_t>(), B, T, static_cast<acc_t>(gamma),
                              static_cast<acc_t>(lam));
  });
  return {adv, ret};
}

template <typename in_t, typename acc_t>
void returns_impl(const in_t* r, const bool* m, acc_t* out, int64_t B, int64_t T, acc_t gamma) {
  at::parallel_for(0, B, row_grain(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * T;
      acc_t running = 0;
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t i = o + t;
        if (m[i]) {
          running = static_cast<acc_t>(r[i]) + gamma * running;
          out[i] = running;
        } else {
          out[i] = 0;
        }
      }
    }
  });
}

at::Tensor discounted_returns_cpu(const at::Tensor& rewards, const at::Tensor& mask, double gamma) {
  check_rows(rewards, "rewards", "discounted_returns");
  check_discount(gamma, "gamma", "discounted_returns");
  auto r = rewards.contiguous();
  auto m = bool_mask(mask, rewards.sizes(), "discounted_returns");
  auto out = at::empty(rewards.sizes(), rewards.options().dtype(acc_type(r.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.scalar_type(), "discounted_returns", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    returns_impl<scalar_t, acc_t>(r.data_ptr<scalar_t>(), m.data_ptr<bool>(), out.data_ptr<acc_t>(), r.size(0),
                                  r.size(1), static_cast<acc_t>(gamma));
  });
  return out;
}

// ------------------------------------------------------------------ group advantages

enum class GroupKind { GRPO, RLOO, DrGRPO };

GroupKind parse_group_kind(const std::string& kind) {
  if (kind == "grpo") return GroupKind::GRPO;
  if (kind == "rloo") return GroupKind::RLOO;
  if (kind == "dr_grpo") return GroupKind::DrGRPO;
  TORCH_CHECK_VALUE(false, "group_advantages: kind must be one of grpo, rloo, dr_grpo, got '", kind, "'");
}

template <typename in_t, typename acc_t>
void group_impl(const in_t* s, acc_t* out, int64_t n_groups, int64_t G, GroupKind kind, bool normalize_std,
                double eps) {
  at::parallel_for(0, n_groups, std::max<int64_t>(1, kTaskElems / G), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const in_t* x = s + g * G;
      acc_t* y = out + g * G;
      double sum = 0;
      for (int64_t j = 0; j < G; ++j) sum += static_cast<double>(x[j]);
      const double mean = sum / static_cast<double>(G);
      if (kind == GroupKind::RLOO) {
        // s - mean of the others = s - (sum - s) / (G - 1)
        const double inv = 1.0 / static_cast<double>(G - 1);
        for (int64_t j = 0; j < G; ++j) {
          const double xj = static_cast<double>(x[j]);
          y[j] = static_cast<acc_t>(xj - (sum - xj) * inv);
        }
        continue;
      }
      if (kind == GroupKind::DrGRPO || !normalize_std) {
        for (int64_t j = 0; j < G; ++j) y[j] = static_cast<acc_t>(static_cast<double>(x[j]) - mean);
        continue;
      }
      if (G == 1) {  // one answer: no spread to normalise by, the advantage is 0
        y[0] = 0;
        continue;
      }
      double sq = 0;  // second pass about the mean: no cancellation for large scores
      for (int64_t j = 0; j < G; ++j) {
        const double d = static_cast<double>(x[j]) - mean;
        sq += d * d;
      }
      const double inv = 1.0 / (std::sqrt(sq / static_cast<double>(G - 1)) + eps);
      for (int64_t j = 0; j < G; ++j) y[j] = static_cast<acc_t>((static_cast<double>(x[j]) - mean) * inv);
    }
  });
}

at::Tensor group_advantages_cpu(const at::Tensor& scores, int64_t group_size, c10::string_view kind_sv,
                                bool normalize_std, double eps) {
  const GroupKind kind = parse_group_kind(std::string(kind_sv));
  TORCH_CHECK_VALUE(scores.dim() == 1, "group_advantages: scores must be [B], got shape ", scores.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(scores.scalar_type()), "group_advantages: scores must be floating, got ",
                   scores.scalar_type());
  TORCH_CHECK_VALUE(group_size >= 1, "group_advantages: group_size must be >= 1, got ", group_size);
  const int64_t B = scores.size(0);
  TORCH_CHECK_VALUE(B % group_size == 0, "group_advantages: group_size=", group_size,
                    " must divide the number of scores B=", B);
  TORCH_CHECK_VALUE(kind != GroupKind::RLOO || group_size >= 2,
                    "group_advantages: group_size must be >= 2 for kind='rloo', got ", group_size);
  auto s = scores.contiguous();
  auto out = at::empty({B}, scores.options().dtype(acc_type(s.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "group_advantages", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    group_impl<scalar_t, acc_t>(s.data_ptr<scalar_t>(), out.data_ptr<acc_t>(), B / group_size, group_size, kind,
                                normalize_std, eps);
  });
  return out;
}

// ------------------------------------------------------------------ masked statistics

// Σ x and the count over the set entries, in double, chunk by chunk then in order.
template <typename in_t>
std::pair<double, int64_t> masked_sum_count(const in_t* x, const bool* m, int64_t n) {
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> sums(n_chunks, 0.0);
  std::vector<int64_t> counts(n_chunks, 0);
  at::parallel_for(0, n_chunks, kTaskElems / kChunk, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double s = 0;
      int64_t k = 0;
      for (int64_t i = c * kChunk, e = std::min(n, (c + 1) * kChunk); i < e; ++i) {
        if (m[i]) {
          s += static_cast<double>(x[i]);
          ++k;
        }
      }
      sums[c] = s;
      counts[c] = k;
    }
  });
  double s = 0;
  int64_t k = 0;
  for (int64_t c = 0; c < n_chunks; ++c) {
    s += sums[c];
    k += counts[c];
  }
  return {s, k};
}

template <typename in_t>
double masked_sq_dev(const in_t* x, const bool* m, int64_t n, double mean) {
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> sums(n_chunks, 0.0);
  at::parallel_for(0, n_chunks, kTaskElems / kChunk, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double s = 0;
      for (int64_t i = c * kChunk, e = std::min(n, (c + 1) * kChunk); i < e; ++i) {
        if (m[i]) {
          const double d = static_cast<double>(x[i]) - mean;
          s += d * d;
        }
      }
      sums[c] = s;
    }
  });
  double s = 0;
  for (double p : sums) s += p;
  return s;
}

void check_stat_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x must be floating, got ", x.scalar_type());
}

at::Tensor masked_mean_cpu(const at::Tensor& x, const at::Tensor& mask) {
  check_stat_input(x, "masked_mean");
  auto xc = x.contiguous();
  auto m = bool_mask(mask, x.sizes(), "masked_mean");
  const auto acc = acc_type(x.scalar_type());
  double mean = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "masked_mean", [&] {
    auto sc = masked_sum_count(xc.data_ptr<scalar_t>(), m.data_ptr<bool>(), xc.numel());
    mean = sc.first / static_cast<double>(std::max<int64_t>(sc.second, 1));  // empty mask gives 0
  });
  return at::scalar_tensor(mean, x.options().dtype(acc));
}

at::Tensor masked_whiten_cpu(const at::Tensor& x, const at::Tensor& mask, bool shift_mean, double eps) {
  check_stat_input(x, "masked_whiten");
  TORCH_CHECK_VALUE(eps >= 0, "masked_whiten: eps must be >= 0, got ", eps);
  auto xc = x.contiguous();
  auto m = bool_mask(mask, x.sizes(), "masked_whiten");
  auto out = at::empty(x.sizes(), x.options().dtype(acc_type(x.scalar_type())));
  const int64_t n = xc.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "masked_whiten", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const bool* mp = m.data_ptr<bool>();
    // two passes (mean, then squared deviations) rather than Welford: simpler, and the
    // second pass about the mean keeps the variance exact enough in double
    auto sc = masked_sum_count(xp, mp, n);
    const double mean = sc.first / static_cast<double>(std::max<int64_t>(sc.second, 1));
    const double sq = masked_sq_dev(xp, mp, n, mean);
    // Bessel's correction; a single entry has variance 0
    const double var = sq / static_cast<double>(std::max<int64_t>(sc.second - 1, 1));
    const acc_t scale = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
    const acc_t mu = static_cast<acc_t>(mean);
    const acc_t back = shift_mean ? acc_t(0) : mu;
    acc_t* op = out.data_ptr<acc_t>();
    at::parallel_for(0, n, kTaskElems, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) op[i] = mp[i] ? (static_cast<acc_t>(xp[i]) - mu) * scale + back : acc_t(0);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("gae", &gae_cpu);
  m.impl("discounted_returns", &discounted_returns_cpu);
  m.impl("group_advantages", &group_advantages_cpu);
  m.impl("masked_mean", &masked_mean_cpu);
  m.impl("masked_whiten", &masked_whiten_cpu);
}

}  // namespace rlhf_fast
