// One decode step of one Llama-style decoder layer (pre-norm RMSNorm, RoPE, grouped-query
// attention over a preallocated KV buffer, SiLU-gated MLP) for a batch of single tokens (or
// of a few tokens per row: a short prompt's prefill), float32 on the CPU. Called by
// rlhf_fast/rollout/llama_decode.py in place of ~40 Python tensor ops per layer: at a small
// model's decode shapes ([B, H] activations) each of those costs microseconds of Python and
// dispatcher overhead, more than its arithmetic. The projections go to at::mm (MKL /
// oneDNN): on the modules' own weights, or for a small model on copies with q / k / v and
// gate / up stacked (see rollout/llama_decode.py); norms, RoPE, the KV append and attention
// are plain loops over the rows; the gated activation is ATen's silu and mul.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace rlhf_fast {
namespace {

// transformers' Llama RMSNorm in float32 of one row of H: w * (x * rsqrt(mean(x^2) + eps));
// out may be x
inline void rms_norm_row(const float* x, const float* w, float eps, float* out, int64_t H) {
  float ss = 0.f;
  for (int64_t j = 0; j < H; ++j) ss += x[j] * x[j];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
  for (int64_t j = 0; j < H; ++j) out[j] = w[j] * (x[j] * r);
}

void rms_norm_rows(const float* x, const float* w, float eps, float* out, int64_t B, int64_t H) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) rms_norm_row(x + b * H, w, eps, out + b * H, H);
  });
}

at::Tensor rms_norm_f32(const at::Tensor& x, const at::Tensor& w, double eps) {
  auto out = at::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), static_cast<float>(eps), out.data_ptr<float>(), x.size(0),
                x.size(1));
  return out;
}

void check_f32(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dim && t.is_contiguous(),
                    "llama_decode_layer: ", name, " must be a contiguous float32 CPU tensor with ", dim,
                    " dims, got ", t.scalar_type(), " ", t.sizes());
}

// Rows of a [rows, cols] float32 view: row r starts at p + r * stride.
struct Rows {
  float* p;
  int64_t stride;
  explicit Rows(const at::Tensor& t) : p(t.data_ptr<float>()), stride(t.stride(0)) {}
  float* row(int64_t r) const { return p + r * stride; }
};

// x [B, in] times the weights `parts` given as [in, out] (an nn.Linear weight's transposed
// view, read by MKL without a copy, or one contiguous copy of several stacked side by side:
// one call for q / k / v): one mm / addmm per part. Returns one [B, width] output per logical
// projection of `widths` (q, k, v or gate, up): the parts' outputs, or column views of the
// stacked one.
std::vector<at::Tensor> project(const at::Tensor& x, at::TensorList parts,
                                const c10::List<std::optional<at::Tensor>>& bias, const std::vector<int64_t>& widths,
                                const char* name) {
  TORCH_CHECK_VALUE(parts.size() == 1 || parts.size() == widths.size(), "llama_decode_layer: ", name, " must be 1 or ",
                    widths.size(), " weights, got ", parts.size());
  TORCH_CHECK_VALUE(bias.size() == parts.size(), "llama_decode_layer: ", name, " needs one bias (or None) per weight");
  int64_t total = 0;
  for (int64_t w : widths) total += w;
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < parts.size(); ++i) {
    const at::Tensor& w = parts[i];
    const int64_t want = parts.size() == 1 ? total : widths[i];
    TORCH_CHECK_VALUE(w.scalar_type() == at::kFloat && w.device().is_cpu() && w.dim() == 2 && w.size(0) == x.size(1) &&
                          w.size(1) == want,
                      "llama_decode_layer: ", name, " weight ", i, " must be a float32 CPU [", x.size(1), ", ", want,
                      "] tensor, got ", w.scalar_type(), " ", w.sizes());
    const std::optional<at::Tensor> b = bias.get(i);
    outs.push_back((b.has_value() ? at::addmm(*b, x, w) : at::mm(x, w)).contiguous());
  }
  if (parts.size() > 1) return outs;
  std::vector<at::Tensor> views;
  int64_t off = 0;
  for (int64_t w : widths) {
    views.push_back(outs[0].narrow(1, off, w));
    off += w;
  }
  return views;
}

// h [B T, H]: T new tokens per row (1 when decoding); norms = (input norm, post-attention
// norm) weights [H], eps theirs; qkv: the q, k, v weights as [in, out] (3 tensors, or 1
// holding them side by side), qkv_bias one per tensor; o [n_q d, H]; gate_up: gate, up as
// [in, out] (2, or 1 side by side); down [I, H]; K, V [B, n_kv, S, d] (columns
// col .. col + T - 1 are written); cos, sin_signed [B T, d] (sin with its first half negated:
// rotate_half's sign); mask [B, S'] bool (rows contiguous), S' >= col + T: the keys to attend,
// token t of a row seeing columns 0 .. col + t of them (causal). A token with no key to attend
// (a left-pad query) gets zeros from attention, not NaN. q_norm / k_norm [d] (Qwen3, eps
// qk_eps): an RMSNorm over each head's query / key before RoPE, or None.
// Returns the layer's output [B T, H].
at::Tensor llama_decode_layer(const at::Tensor& h, at::TensorList norms, at::ArrayRef<double> eps, at::TensorList qkv,
                              const c10::List<std::optional<at::Tensor>>& qkv_bias, const at::Tensor& o_w,
                              const std::optional<at::Tensor>& o_bias, at::TensorList gate_up,
                              const c10::List<std::optional<at::Tensor>>& gate_up_bias, const at::Tensor& down_w,
                              const std::optional<at::Tensor>& down_bias, at::Tensor& K, at::Tensor& V,
                              const at::Tensor& cos, const at::Tensor& sin_signed, const at::Tensor& mask, int64_t col,
                              double scaling, const std::optional<at::Tensor>& q_norm,
                              const std::optional<at::Tensor>& k_norm, double qk_eps) {
  TORCH_CHECK_VALUE(norms.size() == 2 && eps.size() == 2, "llama_decode_layer: norms and eps must have 2 entries");
  check_f32(h, "h", 2);
  check_f32(K, "K", 4);
  check_f32(V, "V", 4);
  check_f32(cos, "cos", 2);
  check_f32(sin_signed, "sin_signed", 2);
  check_f32(norms[0], "norms[0]", 1);
  check_f32(norms[1], "norms[1]", 1);
  const int64_t B = K.size(0), N = h.size(0), H = h.size(1), n_kv = K.size(1), S = K.size(2), d = K.size(3);
  TORCH_CHECK_VALUE(B > 0 && N % B == 0, "llama_decode_layer: h must be [B T, H] with B = K.size(0) = ", B, ", got ",
                    h.sizes());
  const int64_t T = N / B;  // new tokens per row: 1 when decoding, the prompt when prefilling
  TORCH_CHECK_VALUE(norms[0].size(0) == H && norms[1].size(0) == H, "llama_decode_layer: norms must be [", H, "]");
  TORCH_CHECK_VALUE(d % 2 == 0, "llama_decode_layer: head_dim must be even, got ", d);
  TORCH_CHECK_VALUE(o_w.dim() == 2 && o_w.size(1) == H && o_w.size(0) % (d * n_kv) == 0,
                    "llama_decode_layer: o must be [n_q d, ", H, "] with n_q a multiple of n_kv (K's dim 1), got ",
                    o_w.sizes());
  const int64_t n_q = o_w.size(0) / d, G = n_q / n_kv, half = d / 2;
  TORCH_CHECK_VALUE(col >= 0 && col + T <= S, "llama_decode_layer: col must be in [0, ", S - T, "] (", T,
                    " new tokens per row, ", S, " KV columns), got ", col);
  TORCH_CHECK_VALUE(V.sizes() == K.sizes() && cos.size(0) == N && cos.size(1) == d && sin_signed.sizes() == cos.sizes(),
                    "llama_decode_layer: V must match K [B, n_kv, S, d], cos and sin_signed must be [B T, d]");
  TORCH_CHECK_VALUE(q_norm.has_value() == k_norm.has_value(), "llama_decode_layer: q_norm and k_norm go together");
  if (q_norm.has_value()) {
    check_f32(*q_norm, "q_norm", 1);
    check_f32(*k_norm, "k_norm", 1);
    TORCH_CHECK_VALUE(q_norm->size(0) == d && k_norm->size(0) == d, "llama_decode_layer: q_norm and k_norm must be [",
                      d, "]");
  }
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B &&
                        mask.size(1) >= col + T && (mask.size(1) == 1 || mask.stride(1) == 1),
                    "llama_decode_layer: mask must be a bool [B, >= col + T] tensor with contiguous rows, got ",
                    mask.sizes(), " with strides ", mask.strides());

  const std::vector<at::Tensor> y =
      project(rms_norm_f32(h, norms[0], eps[0]), qkv, qkv_bias, {n_q * d, n_kv * d, n_kv * d}, "qkv");
  const Rows cq(y[0]), ck(y[1]), cv(y[2]);
  at::Tensor attn = at::empty({N, n_q * d}, h.options());
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin_signed.data_ptr<float>();
  const bool* mk = mask.data_ptr<bool>();
  const int64_t mstride = mask.stride(0);  // rows may be a slice of a wider buffer
  float* Kp = K.data_ptr<float>();
  float* Vp = V.data_ptr<float>();
  float* ap = attn.data_ptr<float>();
  const float sc = static_cast<float>(scaling);
  const float* qn = q_norm.has_value() ? q_norm->data_ptr<float>() : nullptr;
  const float* kn = k_norm.has_value() ? k_norm->data_ptr<float>() : nullptr;
  const float qk_e = static_cast<float>(qk_eps);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> tmp(d), p(col + T);
    // [the head's RMSNorm, then] RoPE: x·cos + roll(x, d/2)·sin_signed (= rotate_half(x)·sin),
    // in place on one head
    auto rope = [&](float* x, const float* norm_w, const float* c, const float* s) {
      if (norm_w != nullptr) rms_norm_row(x, norm_w, qk_e, x, d);
      for (int64_t j = 0; j < d; ++j) tmp[j] = x[j] * c[j] + x[(j + half) % d] * s[j];
      std::copy(tmp.begin(), tmp.end(), x);
    };
    // token t of row b (h's row r = b T + t) sits at KV column c_t = col + t and attends to
    // the unmasked columns 0 .. c_t: its keys are written before its query reads them
    for (int64_t r = b0 * T; r < b1 * T; ++r) {
      const int64_t b = r / T, ct = col + r % T;
      const float* c = cs + r * d;
      const float* s = sn + r * d;
      float* qb = cq.row(r);
      for (int64_t hd = 0; hd < n_q; ++hd) rope(qb + hd * d, qn, c, s);
      for (int64_t kh = 0; kh < n_kv; ++kh) {  // rotate this token's keys, append keys / values at c_t
        float* kr = ck.row(r) + kh * d;
        rope(kr, kn, c, s);
        const int64_t at_col = ((b * n_kv + kh) * S + ct) * d;
        std::copy(kr, kr + d, Kp + at_col);
        std::copy(cv.row(r) + kh * d, cv.row(r) + (kh + 1) * d, Vp + at_col);
      }
      const bool* mr = mk + b * mstride;
      for (int64_t qh = 0; qh < n_q; ++qh) {  // query head qh reads KV head qh / G, as repeat_kv
        const float* qr = qb + qh * d;
        const float* Kh = Kp + (b * n_kv + qh / G) * S * d;
        const float* Vh = Vp + (b * n_kv + qh / G) * S * d;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t <= ct; ++t) {
          if (!mr[t]) continue;
          float dot = 0.f;
          for (int64_t j = 0; j < d; ++j) dot += qr[j] * Kh[t * d + j];
          p[t] = dot * sc;
          mx = std::max(mx, p[t]);
        }
        float* o = ap + (r * n_q + qh) * d;
        std::fill(o, o + d, 0.f);
        if (mx == -std::numeric_limits<float>::infinity()) continue;  // no key to attend: zeros, not NaN
        float z = 0.f;
        for (int64_t t = 0; t <= ct; ++t) {
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
  at::Tensor h2 = (o_bias.has_value() ? at::addmm(*o_bias, attn, o_w) : at::mm(attn, o_w)).add_(h);
  const int64_t I = down_w.size(0);
  TORCH_CHECK_VALUE(down_w.dim() == 2 && down_w.size(1) == H, "llama_decode_layer: down must be [I, ", H, "], got ",
                    down_w.sizes());
  const std::vector<at::Tensor> gu =
      project(rms_norm_f32(h2, norms[1], eps[1]), gate_up, gate_up_bias, {I, I}, "gate_up");
  // SiLU(gate) * up with ATen's vectorised kernels (an expf call per element costs more than
  // the rest of the layer's loops at a small model's width)
  at::Tensor act = at::silu(gu[0]).mul_(gu[1]);
  return (down_bias.has_value() ? at::addmm(*down_bias, act, down_w) : at::mm(act, down_w)).add_(h2);
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
