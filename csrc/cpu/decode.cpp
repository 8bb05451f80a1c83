// One decode step of one Llama-style decoder layer (pre-norm RMSNorm, RoPE, grouped-query
// attention over a preallocated KV buffer, SiLU-gated MLP) for a batch of single tokens,
// float32 on the CPU. Called by rlhf_fast/rollout/llama_decode.py in place of ~40 Python
// tensor ops per layer: at a small model's decode shapes ([B, H] activations) each of those
// costs microseconds of Python and dispatcher overhead, more than its arithmetic. The four
// matmuls go to at::mm (MKL / oneDNN); norms, RoPE, the KV append, attention and the gated
// activation are plain loops over the rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace rlhf_fast {
namespace {

// transformers' Llama RMSNorm in float32: w * (x * rsqrt(mean(x^2) + eps))
void rms_norm_rows(const float* x, const float* w, float eps, float* out, int64_t B, int64_t H) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* xr = x + b * H;
      float* o = out + b * H;
      float ss = 0.f;
      for (int64_t j = 0; j < H; ++j) ss += xr[j] * xr[j];
      const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
      for (int64_t j = 0; j < H; ++j) o[j] = w[j] * (xr[j] * r);
    }
  });
}

at::Tensor rms_norm_f32(const at::Tensor& x, const at::Tensor& w, double eps) {
  auto out = at::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), static_cast<float>(eps), out.data_ptr<float>(), x.size(0),
                x.size(1));
  return out;
}

at::Tensor mm_bias(const at::Tensor& x, const at::Tensor& wt, const c10::optional<at::Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, x, wt) : at::mm(x, wt);
}

void check_f32(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dim && t.is_contiguous(),
                    "llama_decode_layer: ", name, " must be a contiguous float32 CPU tensor with ", dim,
                    " dims, got ", t.scalar_type(), " ", t.sizes());
}

// h [B, H]; qkv_wt [H, (n_q + 2 n_kv) d]; o_wt [n_q d, H]; gate_up_wt [H, 2 I]; down_wt [I, H];
// K, V [B, n_kv, S, d] (column `col` is written); cos, sin_signed [B, d] (sin with its first
// half negated: rotate_half's sign); mask [B, S'] bool, S' > col: the keys 0..col to attend.
// Returns the layer's output [B, H].
at::Tensor llama_decode_layer(const at::Tensor& h, const at::Tensor& ln1_w, double ln1_eps, const at::Tensor& qkv_wt,
                              const c10::optional<at::Tensor>& qkv_b, const at::Tensor& o_wt,
                              const c10::optional<at::Tensor>& o_b, const at::Tensor& ln2_w, double ln2_eps,
                              const at::Tensor& gate_up_wt, const c10::optional<at::Tensor>& gate_up_b,
                              const at::Tensor& down_wt, const c10::optional<at::Tensor>& down_b, at::Tensor& K,
                              at::Tensor& V, const at::Tensor& cos, const at::Tensor& sin_signed,
                              const at::Tensor& mask, int64_t col, int64_t n_q, double scaling) {
  check_f32(h, "h", 2);
  check_f32(K, "K", 4);
  check_f32(V, "V", 4);
  check_f32(cos, "cos", 2);
  check_f32(sin_signed, "sin_signed", 2);
  check_f32(ln1_w, "ln1_w", 1);
  check_f32(ln2_w, "ln2_w", 1);
  const int64_t B = h.size(0), H = h.size(1), n_kv = K.size(1), S = K.size(2), d = K.size(3);
  TORCH_CHECK_VALUE(n_q > 0 && n_q % n_kv == 0, "llama_decode_layer: n_q must be a multiple of n_kv, got ", n_q, ", ",
                    n_kv);
  TORCH_CHECK_VALUE(d % 2 == 0, "llama_decode_layer: head_dim must be even, got ", d);
  TORCH_CHECK_VALUE(col >= 0 && col < S, "llama_decode_layer: col must be in [0, ", S, "), got ", col);
  TORCH_CHECK_VALUE(ln1_w.size(0) == H && ln2_w.size(0) == H, "llama_decode_layer: ln1_w and ln2_w must be [H]");
  TORCH_CHECK_VALUE(qkv_wt.size(0) == H && qkv_wt.size(1) == (n_q + 2 * n_kv) * d,
                    "llama_decode_layer: qkv_wt must be [H, (n_q + 2 n_kv) d], got ", qkv_wt.sizes());
  TORCH_CHECK_VALUE(V.sizes() == K.sizes() && cos.size(0) == B && cos.size(1) == d && sin_signed.sizes() == cos.sizes(),
                    "llama_decode_layer: V, cos and sin_signed must match K [B, n_kv, S, d]");
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B && mask.size(1) > col &&
                        mask.is_contiguous(),
                    "llama_decode_layer: mask must be a contiguous bool [B, > col] tensor, got ", mask.sizes());
  const int64_t G = n_q / n_kv, half = d / 2, nqk = n_q + n_kv, width = (n_q + 2 * n_kv) * d;

  at::Tensor y = mm_bias(rms_norm_f32(h, ln1_w, ln1_eps), qkv_wt, qkv_b);  // [B, width]
  at::Tensor attn = at::empty({B, n_q * d}, h.options());
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin_signed.data_ptr<float>();
  const bool* mk = mask.data_ptr<bool>();
  const int64_t mstride = mask.size(1);
  float* yp = y.data_ptr<float>();
  float* Kp = K.data_ptr<float>();
  float* Vp = V.data_ptr<float>();
  float* ap = attn.data_ptr<float>();
  const float sc = static_cast<float>(scaling);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> tmp(d), p(col + 1);
    for (int64_t b = b0; b < b1; ++b) {
      float* yr = yp + b * width;
      const float* c = cs + b * d;
      const float* s = sn + b * d;
      // RoPE on the q and k heads: x·cos + roll(x, d/2)·sin_signed (= rotate_half(x)·sin)
      for (int64_t hd = 0; hd < nqk; ++hd) {
        float* x = yr + hd * d;
        for (int64_t j = 0; j < d; ++j) tmp[j] = x[j] * c[j] + x[(j + half) % d] * s[j];
        std::copy(tmp.begin(), tmp.end(), x);
      }
      for (int64_t kh = 0; kh < n_kv; ++kh) {  // append this token's keys / values at `col`
        const int64_t at_col = ((b * n_kv + kh) * S + col) * d;
        std::copy(yr + (n_q + kh) * d, yr + (n_q + kh + 1) * d, Kp + at_col);
        std::copy(yr + (nqk + kh) * d, yr + (nqk + kh + 1) * d, Vp + at_col);
      }
      const bool* mr = mk + b * mstride;
      for (int64_t qh = 0; qh < n_q; ++qh) {
        const float* q = yr + qh * d;
        const float* Kh = Kp + (b * n_kv + qh / G) * S * d;
        const float* Vh = Vp + (b * n_kv + qh / G) * S * d;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t <= col; ++t) {
          if (!mr[t]) continue;
          float dot = 0.f;
          for (int64_t j = 0; j < d; ++j) dot += q[j] * Kh[t * d + j];
          p[t] = dot * sc;
          mx = std::max(mx, p[t]);
        }
        float* o = ap + (b * n_q + qh) * d;
        std::fill(o, o + d, 0.f);
        if (mx == -std::numeric_limits<float>::infinity()) continue;  // no key to attend: zeros, not NaN
        float z = 0.f;
        for (int64_t t = 0; t <= col; ++t) {
          if (!mr[t]) continue;
          const float e = std::exp(p[t] - mx);
          z += e;
          for (int64_t j = 0; j < d; ++j) o[j] += e * Vh[t * d + j];
        }
        const float inv = 1.f / z;
        for (int64_t j = 0; j < d; ++j) o[j] *= inv;
      }
    }
  });
  at::Tensor h2 = mm_bias(attn, o_wt, o_b).add_(h);
  at::Tensor gu = mm_bias(rms_norm_f32(h2, ln2_w, ln2_eps), gate_up_wt, gate_up_b);  // [B, 2 I]
  const int64_t I = gu.size(1) / 2;
  at::Tensor act = at::empty({B, I}, h.options());
  const float* gp = gu.data_ptr<float>();
  float* acp = act.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t j = 0; j < I; ++j) {
        const float g = gp[b * 2 * I + j];
        acp[b * I + j] = (g / (1.f + std::exp(-g))) * gp[b * 2 * I + I + j];
      }
  });
  return mm_bias(act, down_wt, down_b).add_(h2);
}

at::Tensor rms_norm_op(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_f32(x, "x", 2);
  TORCH_CHECK_VALUE(w.numel() == x.size(1) && w.scalar_type() == at::kFloat && w.is_contiguous(),
                    "rms_norm: weight must be a contiguous float32 [H] tensor");
  return rms_norm_f32(x, w, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("llama_decode_layer", &llama_decode_layer);
  m.impl("rms_norm", &rms_norm_op);
}

}  // namespace rlhf_fast
