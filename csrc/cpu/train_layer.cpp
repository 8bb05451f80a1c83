// Elementwise kernels of the Llama-family training forward (rlhf_fast/models/llama_forward.py)
// on the CPU: RMSNorm forward and backward, the SwiGLU backward, and RoPE on q / k (forward and
// backward). In torch each is a chain of 3-8 elementwise ops, every one a pass over an
// [N, width] tensor plus its dispatch, and RoPE's multiplies by a broadcast cos / sin run on
// the transposed [B, heads, T, d] view at a quarter of their contiguous speed. Here each is one
// pass over its rows: the training forward + backward of hidden_states went 7.3 -> 6.0 ms at
// h = 64, 2 layers, 16 x 37 tokens (1 thread) and 1295 -> 1223 ms at h = 512, 8 heads,
// 8 x 512 tokens. Statistics and activations are computed in float32 for float32, bfloat16 and
// float16 inputs; float64 (gradcheck) keeps the torch code in Python.
//
// The forwards give torch's bits (the training forward matches transformers' bit for bit):
// RMSNorm takes its row sums from at::sum and rounds as the module's ops do; RoPE rounds
// x·cos and rotate_half(x)·sin to the input dtype, then their sum, with no FMA contraction.
// The backward kernels are within rounding of the torch code: sigmoid uses fast_exp (2 ulp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "fast_exp.h"

namespace rlhf_fast {
namespace {

// Row loops also compiled for AVX-512 and AVX2, picked at load time by the CPU (GCC function
// multi-versioning, as logprobs.cpp) while the extension stays baseline x86-64.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RLHF_TRAIN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RLHF_TRAIN_CLONES
#endif

// Elements per parallel task: below this a tensor runs on the calling thread
constexpr int64_t kGrain = 32768;

void check_cpu_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  const auto st = t.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op, ": ", name,
                    " must be float32, bfloat16 or float16, got ", st);
}

template <typename T>
inline void to_float(const T* p, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
}

// f(T{}) for T the C++ type of st: float32, bfloat16 or float16 (the dtypes check_cpu_float lets
// through); AT_DISPATCH's float64 instantiations would only be dead code here
template <typename F>
void dispatch_float(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    case at::kHalf:
      return f(c10::Half{});
    default:
      TORCH_CHECK_VALUE(false, op, ": unsupported dtype ", st);
  }
}

// ------------------------------------------------------------------ RMSNorm forward
//
// transformers' Llama RMSNorm, bit for bit: r = rsqrt(mean(x²) + eps) in float32 and
// y = w · (x · r) rounded to x's dtype. The row sums come from at::sum, the one step whose
// order is torch's own (its vectorised cascade); the rest is a pass per row.

template <typename T>
RLHF_TRAIN_CLONES void rms_fwd_rows(const float* __restrict xf, const float* __restrict ss, const T* __restrict w,
                                    float eps, T* __restrict y, float* __restrict rstd, int64_t r0, int64_t r1,
                                    int64_t H) {
  for (int64_t r = r0; r < r1; ++r) {
    // torch: sum, div_ by H, add_ eps, rsqrt (1 / sqrt)
    const float r_ = 1.f / std::sqrt(ss[r] / static_cast<float>(H) + eps);
    rstd[r] = r_;
    const float* x = xf + r * H;
    T* out = y + r * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      out[j] = static_cast<T>(static_cast<float>(static_cast<T>(x[j] * r_)) * static_cast<float>(w[j]));
    }
  }
}

// x [..., H], weight [H] of x's dtype. Returns (y like x, rstd [..., 1] float32).
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_cpu_float(x, "rms_norm_fwd", "x");
  TORCH_CHECK_VALUE(weight.device().is_cpu() && weight.scalar_type() == x.scalar_type() && weight.dim() == 1 &&
                        x.dim() >= 1 && weight.size(0) == x.size(-1),
                    "rms_norm_fwd: weight must be a [", x.size(-1), "] CPU tensor of x's dtype, got ",
                    weight.scalar_type(), " ", weight.sizes());
  // the squares in x's own layout: torch's sum order over a strided last dim is not the contiguous one
  const at::Tensor x32 = x.to(at::kFloat);
  const at::Tensor ss = at::sum(at::pow(x32, 2), {-1}, /*keepdim=*/true).contiguous();  // [..., 1]
  const at::Tensor xf = x32.contiguous(), w = weight.contiguous();
  const int64_t H = x.size(-1);
  const int64_t N = H > 0 ? x.numel() / H : 0;
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor rstd = at::empty(ss.sizes(), ss.options());
  dispatch_float(x.scalar_type(), "rms_norm_fwd", [&](auto tag) {
    using scalar_t = decltype(tag);
    const float* xp = xf.data_ptr<float>();
    const float* sp = ss.data_ptr<float>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    float* rp = rstd.data_ptr<float>();
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / std::max<int64_t>(H, 1)), [&](int64_t r0, int64_t r1) {
      rms_fwd_rows(xp, sp, wp, static_cast<float>(eps), yp, rp, r0, r1, H);
    });
  });
  return {y, rstd};
}

// ------------------------------------------------------------------ RMSNorm backward
//
// y = w · x̂, x̂ = x · r (r = rstd of the row): dx = r · (g·w − x · c) with c = r² · Σ g·w·x / H,
// dw = Σ_rows g · x̂.

RLHF_TRAIN_CLONES void rms_dx_row(const float* __restrict g, const float* __restrict x, const float* __restrict w,
                                  float r, float inv_h, float* __restrict dx, int64_t H) {
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < H; ++j) dot += g[j] * w[j] * x[j];
  const float c = r * r * dot * inv_h;
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) dx[j] = r * (g[j] * w[j] - x[j] * c);
}

RLHF_TRAIN_CLONES void rms_dw_row(const float* __restrict g, const float* __restrict x, float r,
                                  float* __restrict acc, int64_t H) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) acc[j] += g[j] * (x[j] * r);
}

RLHF_TRAIN_CLONES void add_to_double(const float* __restrict a, double* __restrict out, int64_t H) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) out[j] += static_cast<double>(a[j]);
}

// Rows [r0, r1): dx rows, and their dw sum added into dw_sum [H] (double; float blocks of
// kDwBlock rows, so a long column loses no more than torch's pairwise sum does)
template <typename T>
void rms_bwd_rows(const T* g, const T* x, const T* w, const float* rstd, T* dx, double* dw_sum, int64_t r0,
                  int64_t r1, int64_t H) {
  constexpr int64_t kDwBlock = 64;
  constexpr bool kF32 = std::is_same_v<T, float>;
  std::vector<float> buf((kF32 ? 0 : 4 * H) + (dw_sum != nullptr ? H : 0));
  float* gb = buf.data();
  float* xb = gb + (kF32 ? 0 : H);
  float* wb = xb + (kF32 ? 0 : H);
  float* db = wb + (kF32 ? 0 : H);
  float* acc = db + (kF32 ? 0 : H);
  const float* wf;
  if constexpr (kF32) {
    wf = w;
  } else {
    to_float(w, wb, H);
    wf = wb;
  }
  const float inv_h = 1.f / static_cast<float>(H);
  if (dw_sum != nullptr) std::fill(acc, acc + H, 0.f);
  for (int64_t r = r0; r < r1; ++r) {
    const float* gf;
    const float* xf;
    if constexpr (kF32) {
      gf = g + r * H;
      xf = x + r * H;
    } else {
      to_float(g + r * H, gb, H);
      to_float(x + r * H, xb, H);
      gf = gb;
      xf = xb;
    }
    if (dx != nullptr) {
      if constexpr (kF32) {
        rms_dx_row(gf, xf, wf, rstd[r], inv_h, dx + r * H, H);
      } else {
        rms_dx_row(gf, xf, wf, rstd[r], inv_h, db, H);
        for (int64_t j = 0; j < H; ++j) dx[r * H + j] = static_cast<T>(db[j]);
      }
    }
    if (dw_sum != nullptr) {
      rms_dw_row(gf, xf, rstd[r], acc, H);
      if ((r - r0) % kDwBlock == kDwBlock - 1 || r == r1 - 1) {
        add_to_double(acc, dw_sum, H);
        std::fill(acc, acc + H, 0.f);
      }
    }
  }
}

// grad, x [..., H], weight [H] (all one dtype), rstd [N] float32 (N = rows of x).
// Returns (dx like x or [0], dw [H] in weight's dtype or [0]).
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& rstd, bool need_dx, bool need_dw) {
  check_cpu_float(x, "rms_norm_bwd", "x");
  TORCH_CHECK_VALUE(grad.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
                    "rms_norm_bwd: grad, x and weight must share one dtype, got ", grad.scalar_type(), ", ",
                    x.scalar_type(), ", ", weight.scalar_type());
  TORCH_CHECK_VALUE(grad.device().is_cpu() && weight.device().is_cpu() && rstd.device().is_cpu(),
                    "rms_norm_bwd: CPU tensors only");
  TORCH_CHECK_VALUE(x.dim() >= 1 && grad.sizes() == x.sizes(), "rms_norm_bwd: grad ", grad.sizes(),
                    " must have x's shape ", x.sizes());
  const int64_t H = x.size(-1);
  const int64_t N = H > 0 ? x.numel() / H : 0;
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == H, "rms_norm_bwd: weight must be [", H, "], got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(rstd.scalar_type() == at::kFloat && rstd.numel() == N, "rms_norm_bwd: rstd must be float32 with ",
                    N, " entries (one per row), got ", rstd.scalar_type(), " ", rstd.sizes());
  const at::Tensor g = grad.contiguous(), xc = x.contiguous(), w = weight.contiguous(), rs = rstd.contiguous();
  at::Tensor dx = need_dx ? at::empty_like(xc) : at::empty({0}, x.options());
  at::Tensor dw = need_dw ? at::empty({H}, weight.options()) : at::empty({0}, weight.options());
  if (!need_dx && !need_dw) return {dx, dw};
  // one chunk per thread, at most; each sums its rows' dw, the chunks are added in order
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), N, N * H / kGrain}));
  const int64_t per = chunks > 0 ? (N + chunks - 1) / chunks : 0;
  std::vector<double> partial(need_dw ? chunks * H : 0, 0.0);
  dispatch_float(x.scalar_type(), "rms_norm_bwd", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const float* rp = rs.data_ptr<float>();
    scalar_t* dxp = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = c * per, r1 = std::min(N, r0 + per);
        if (r0 < r1) rms_bwd_rows(gp, xp, wp, rp, dxp, need_dw ? partial.data() + c * H : nullptr, r0, r1, H);
      }
    });
    if (need_dw) {
      scalar_t* dwp = dw.data_ptr<scalar_t>();
      for (int64_t j = 0; j < H; ++j) {
        double s = 0.0;
        for (int64_t c = 0; c < chunks; ++c) s += partial[c * H + j];
        dwp[j] = static_cast<scalar_t>(static_cast<float>(s));
      }
    }
  });
  return {dx, dw};
}

// ------------------------------------------------------------------ SwiGLU backward

// sigmoid through fast_exp; the clamp keeps fast_exp in its range (|x| <= 88) and passes NaN
__attribute__((always_inline)) inline float sigmoid(float v) {
  return 1.f / (1.f + fast_exp(std::max(std::min(-v, 88.f), -88.f)));
}

// x rounded to T and back: where the torch code rounds a bfloat16 / float16 intermediate, so do
// these loops (the same roundings as the torch backward, more precise only in exp; a no-op for
// float32). Rounding once instead moved Qwen3's bf16 q_norm gradient further from the float32
// truth than transformers' in tests/test_llama_forward.py.
template <typename T>
__attribute__((always_inline)) inline float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}

// silu(gate) · up (torch: silu, then mul)
template <typename T>
RLHF_TRAIN_CLONES void silu_mul_loop(const T* __restrict gate, const T* __restrict up, T* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float g = static_cast<float>(gate[i]);
    out[i] = static_cast<T>(round_to<T>(g * sigmoid(g)) * static_cast<float>(up[i]));
  }
}

// dp holds d(silu(gate)·up) on entry and d_gate on return; d_up = silu(gate) · dp (torch: silu,
// mul; mul, silu_backward)
template <typename T>
RLHF_TRAIN_CLONES void swiglu_bwd_loop(T* __restrict dp, const T* __restrict gate, const T* __restrict up,
                                       T* __restrict d_up, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float g = static_cast<float>(gate[i]);
    const float s = sigmoid(g);
    const float d = static_cast<float>(dp[i]);
    d_up[i] = static_cast<T>(round_to<T>(g * s) * d);
    dp[i] = static_cast<T>(round_to<T>(d * static_cast<float>(up[i])) * s * (1.f + g * (1.f - s)));
  }
}

void check_swiglu(const at::Tensor& gate, const at::Tensor& up, const char* op) {
  check_cpu_float(gate, op, "gate");
  TORCH_CHECK_VALUE(up.device().is_cpu() && up.scalar_type() == gate.scalar_type() && up.sizes() == gate.sizes(),
                    op, ": up must be a CPU tensor of gate's dtype and shape ", gate.sizes(), ", got ",
                    up.scalar_type(), " ", up.sizes());
}

// silu(gate) · up (the product the down projection's weight gradient needs)
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu(gate, up, "silu_mul");
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor out = at::empty_like(g);
  dispatch_float(g.scalar_type(), "silu_mul", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* up_ = u.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, g.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      silu_mul_loop(gp + i0, up_ + i0, op + i0, i1 - i0);
    });
  });
  return out;
}

// grad (d of silu(gate) · up, contiguous) is overwritten with d_gate; returns d_up
at::Tensor swiglu_bwd_(at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu(gate, up, "swiglu_bwd_");
  TORCH_CHECK_VALUE(grad.device().is_cpu() && grad.scalar_type() == gate.scalar_type() &&
                        grad.sizes() == gate.sizes() && grad.is_contiguous(),
                    "swiglu_bwd_: grad must be a contiguous CPU tensor of gate's dtype and shape");
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor d_up = at::empty_like(g);
  dispatch_float(g.scalar_type(), "swiglu_bwd_", [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* dp = grad.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* up_ = u.data_ptr<scalar_t>();
    scalar_t* dup = d_up.data_ptr<scalar_t>();
    at::parallel_for(0, g.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      swiglu_bwd_loop(dp + i0, gp + i0, up_ + i0, dup + i0, i1 - i0);
    });
  });
  return d_up;
}

// ------------------------------------------------------------------ RoPE
//
// Forward: y = x·c + rotate_half(x)·s with rotate_half's sign carried by s (sin_signed: its
// first half negated), so y[j] = x[j]·c[j] + x[j ± d/2]·s[j]. Backward (its transpose):
// dx[j] = g[j]·c[j] + g[j ± d/2]·s[j ± d/2]. Products and the sum rounded to T as torch's
// separate ops round them; no FMA contraction, so the forward gives torch's bits.

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

template <typename T>
__attribute__((always_inline)) inline float mul_rounded(T a, T b) {
  return static_cast<float>(static_cast<T>(static_cast<float>(a) * static_cast<float>(b)));
}

template <typename T>
RLHF_TRAIN_CLONES void rope_row(const T* __restrict x, const T* __restrict c, const T* __restrict s, T* __restrict y,
                                int64_t half, bool backward) {
  const T* x2 = x + half;
  const T* c2 = c + half;
  const T* s2 = s + half;
  T* y2 = y + half;
  if (!backward) {
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
      y[j] = static_cast<T>(mul_rounded(x[j], c[j]) + mul_rounded(x2[j], s[j]));
      y2[j] = static_cast<T>(mul_rounded(x2[j], c2[j]) + mul_rounded(x[j], s2[j]));
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
      y[j] = static_cast<T>(mul_rounded(x[j], c[j]) + mul_rounded(x2[j], s2[j]));
      y2[j] = static_cast<T>(mul_rounded(x2[j], c2[j]) + mul_rounded(x[j], s[j]));
    }
  }
}

#pragma GCC pop_options

// x [B, H, T, d] (any strides, last one 1) -> a new [B, H, T, d] laid out as [B, T, H, d] (the
// transposed view of a projection's output, which transposes back to contiguous). cos / sin
// [B or 1, 1, Tc, d] with Tc >= T: x holds the last T of the Tc positions (a training
// forward's last layer takes the queries of its last columns only, the keys of all)
at::Tensor rope_one(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  check_cpu_float(x_in, "rope", "q / k");
  TORCH_CHECK_VALUE(x_in.dim() == 4 && x_in.scalar_type() == cos.scalar_type(),
                    "rope: q and k must be [B, heads, T, d] of cos' dtype, got ", x_in.scalar_type(), " ",
                    x_in.sizes());
  const int64_t B = x_in.size(0), H = x_in.size(1), T = x_in.size(2), d = x_in.size(3);
  TORCH_CHECK_VALUE(cos.size(2) >= T && cos.size(3) == d && (cos.size(0) == B || cos.size(0) == 1),
                    "rope: cos / sin ", cos.sizes(), " do not broadcast to q / k ", x_in.sizes());
  const int64_t t0 = cos.size(2) - T;  // x's first position in the tables
  const at::Tensor x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  at::Tensor y = at::empty({B, T, H, d}, x.options()).transpose(1, 2);
  if (y.numel() == 0) return y;
  const int64_t half = d / 2;
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  const int64_t ys0 = y.stride(0), ys1 = y.stride(1), ys2 = y.stride(2);
  const int64_t cs0 = cos.size(0) == 1 ? 0 : cos.stride(0), cs2 = cos.stride(2);
  const int64_t ss0 = sin.size(0) == 1 ? 0 : sin.stride(0), ss2 = sin.stride(2);
  dispatch_float(x.scalar_type(), "rope", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, B * H * T, std::max<int64_t>(1, kGrain / d), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r % T, h = (r / T) % H, b = r / (T * H);
        rope_row(xp + b * xs0 + h * xs1 + t * xs2, cp + b * cs0 + (t0 + t) * cs2, sp + b * ss0 + (t0 + t) * ss2,
                 yp + b * ys0 + h * ys1 + t * ys2, half, backward);
      }
    });
  });
  return y;
}

// q [B, Hq, Tq, d], k [B, Hk, Tk, d]; cos, sin_signed [B or 1, 1, T, d] with Tq, Tk <= T, each of
// q and k the last of the T positions; one dtype throughout
std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                        const at::Tensor& sin_signed, bool backward) {
  check_cpu_float(cos, "rope", "cos");
  TORCH_CHECK_VALUE(cos.dim() == 4 && cos.size(1) == 1 && cos.size(3) % 2 == 0 && sin_signed.sizes() == cos.sizes() &&
                        sin_signed.scalar_type() == cos.scalar_type() && sin_signed.device().is_cpu(),
                    "rope: cos and sin_signed must be [B or 1, 1, T, d] (d even) of one dtype, got ", cos.sizes(),
                    " and ", sin_signed.sizes());
  const at::Tensor c = cos.stride(3) == 1 ? cos : cos.contiguous();
  const at::Tensor s = sin_signed.stride(3) == 1 ? sin_signed : sin_signed.contiguous();
  return {rope_one(q, c, s, backward), rope_one(k, c, s, backward)};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("silu_mul", &silu_mul);
  m.impl("swiglu_bwd_", &swiglu_bwd_);
  m.impl("rope", &rope);
}

}  // namespace rlhf_fast
