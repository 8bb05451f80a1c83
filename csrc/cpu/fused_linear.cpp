// The LM head fused with the per-token log-softmax: logits = hidden @ weight.T (+ bias)
// are formed one chunk of tokens at a time and reduced at once by the row kernel of
// csrc/cpu/logprobs.cpp, so at most one chunk of logits is alive. Only lse and entropy
// ([N], fp32 or fp64) are saved; the backward recomputes each chunk's logits. On request the
// forward also returns each row's argmax over the vocabulary (the first maximal index, as
// torch.argmax), read from the same chunk: the trainers' top-1 token accuracy.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace rlhf_fast {

// defined in csrc/cpu/logprobs.cpp
void logprobs_rows_fwd(const at::Tensor& logits, const at::Tensor& labels, double temperature, bool want_ent,
                       int64_t ignore_index, const at::Tensor& logp, const at::Tensor& entropy, const at::Tensor& lse);
void logprobs_rows_bwd(const at::Tensor& g_logp, const at::Tensor& g_ent, const at::Tensor& logits,
                       const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy, double temperature,
                       int64_t ignore_index, const at::Tensor& grad_logits);

namespace {

// One auto chunk of fp32 logits is at most this many bytes.
constexpr int64_t kAutoChunkBytes = int64_t(32) << 20;

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int64_t resolve_chunk(int64_t chunk_size, int64_t N, int64_t V) {
  TORCH_CHECK_VALUE(chunk_size >= 0, "fused_linear_logprobs: chunk_size must be >= 0 (0 = auto), got ", chunk_size);
  int64_t c = chunk_size > 0 ? chunk_size : std::max<int64_t>(1, kAutoChunkBytes / (4 * std::max<int64_t>(V, 1)));
  return std::max<int64_t>(1, std::min(c, std::max<int64_t>(N, 1)));
}

void check_head(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const at::Tensor& labels, const char* op) {
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be [N, H], got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), op, ": weight must be [V, H] with H = ",
              hidden.size(1), ", got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " differs from hidden dtype ", hidden.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), op, ": labels must be [N], got ",
              labels.sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be [V], got ", bias->sizes());
  }
}

// logits of rows [c0, c0 + n): [n, V] in the hidden dtype (at::mm accumulates bf16/fp16 in fp32)
at::Tensor chunk_logits(const at::Tensor& h, const at::Tensor& wt, const at::Tensor& b, int64_t c0, int64_t n) {
  auto hc = h.narrow(0, c0, n);
  return b.defined() ? at::addmm(b, hc, wt) : at::mm(hc, wt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_logprobs_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, double temperature, bool return_entropy, int64_t ignore_index, int64_t chunk_size,
    bool return_argmax) {
  check_head(hidden, weight, bias, labels, "fused_linear_logprobs_fwd");
  TORCH_CHECK_VALUE(temperature > 0, "fused_linear_logprobs_fwd: temperature must be > 0, got ", temperature);
  auto h = hidden.contiguous();
  auto wt = weight.t();  // a view: mm reads W transposed without a copy
  at::Tensor b = (bias.has_value() && bias->defined()) ? bias->to(h.scalar_type()).contiguous() : at::Tensor();
  auto y = labels.to(at::kLong).contiguous();
  const int64_t N = h.size(0), V = weight.size(0);
  auto opts = h.options().dtype(acc_type(h.scalar_type()));
  auto logp = at::empty({N}, opts);
  auto lse = at::empty({N}, opts);
  auto ent = at::empty({return_entropy ? N : 0}, opts);
  auto amax = at::empty({return_argmax ? N : 0}, h.options().dtype(at::kLong));
  const int64_t C = resolve_chunk(chunk_size, N, V);
  for (int64_t c0 = 0; c0 < N; c0 += C) {
    const int64_t n = std::min(C, N - c0);
    at::Tensor logits = chunk_logits(h, wt, b, c0, n);  // [n, V], the only chunk alive
    logprobs_rows_fwd(logits, y.narrow(0, c0, n), temperature, return_entropy, ignore_index, logp.narrow(0, c0, n),
                      return_entropy ? ent.narrow(0, c0, n) : ent, lse.narrow(0, c0, n));
    // of the unscaled logits: dividing by temperature > 0 keeps the order
    if (return_argmax) {
      auto out = amax.narrow(0, c0, n);
      at::argmax_out(out, logits, 1);
    }
  }
  return {logp, ent, lse, amax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_logprobs_bwd_cpu(
    const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& lse,
    const at::Tensor& entropy, double temperature, int64_t ignore_index, int64_t chunk_size, bool need_weight) {
  check_head(hidden, weight, bias, labels, "fused_linear_logprobs_bwd");
  auto h = hidden.contiguous();
  auto w = weight.contiguous();
  auto wt = w.t();
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor b = has_bias ? bias->to(h.scalar_type()).contiguous() : at::Tensor();
  auto y = labels.to(at::kLong).contiguous();
  const int64_t N = h.size(0), V = w.size(0), H = w.size(1);
  const auto acc = acc_type(h.scalar_type());
  const bool low = acc != h.scalar_type();  // bf16/fp16: accumulate weight/bias grads in fp32
  auto gl = grad_logp.to(acc).contiguous();
  at::Tensor ge, ent;
  if (grad_entropy.has_value() && grad_entropy->defined() && grad_entropy->numel() == N && entropy.numel() == N) {
    ge = grad_entropy->to(acc).contiguous();
    ent = entropy.to(acc).contiguous();
  }
  auto l = lse.to(acc).contiguous();
  auto grad_h = at::empty_like(h);
  // a frozen head (LoRA on the backbone) forms no [V, H] fp32 weight gradient: 2.2 GB and a
  // third of the backward for Qwen2.5-7B's head
  auto grad_w = need_weight ? at::zeros({V, H}, h.options().dtype(acc)) : at::empty({0}, h.options().dtype(acc));
  auto grad_b = at::zeros({has_bias ? V : 0}, h.options().dtype(acc));
  const int64_t C = resolve_chunk(chunk_size, N, V);
  for (int64_t c0 = 0; c0 < N; c0 += C) {
    const int64_t n = std::min(C, N - c0);
    at::Tensor dlogits = chunk_logits(h, wt, b, c0, n);  // recomputed, then overwritten by its gradient
    logprobs_rows_bwd(gl.narrow(0, c0, n), ge.defined() ? ge.narrow(0, c0, n) : ge, dlogits, y.narrow(0, c0, n),
                      l.narrow(0, c0, n), ent.defined() ? ent.narrow(0, c0, n) : ent, temperature, ignore_index,
                      dlogits);
    auto hc = h.narrow(0, c0, n);
    auto grad_hc = grad_h.narrow(0, c0, n);
    at::mm_out(grad_hc, dlogits, w);
    if (need_weight || has_bias) {
      const auto d = low ? dlogits.to(acc) : dlogits;
      if (need_weight) grad_w.addmm_(d.t(), low ? hc.to(acc) : hc);
      if (has_bias) grad_b.add_(d.sum(0));
    }
  }
  return {grad_h, need_weight ? grad_w.to(weight.scalar_type()) : grad_w,
          has_bias ? grad_b.to(bias->scalar_type()) : grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("fused_linear_logprobs_fwd", &fused_linear_logprobs_fwd_cpu);
  m.impl("fused_linear_logprobs_bwd", &fused_linear_logprobs_bwd_cpu);
}

}  // namespace rlhf_fast
