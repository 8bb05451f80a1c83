// Schemas of every native op, in one TORCH_LIBRARY block, so that the CPU and
// CUDA implementations (TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp, csrc/cuda/*.cu)
// and the Python fake/autograd registrations (rlhf_fast/ops/*.py) agree on one
// signature. The ops appear as torch.ops.rlhf_fast.<name>.
//
// Conventions: tensors arrive contiguous and flattened by the Python front end
// ([N, V] logits, [N] labels, [B, T] per-token tensors). Reductions that return
// "stats" return one float tensor whose entries are documented beside the op.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A bare module, so that `import rlhf_fast._C` loads this library (and with it
// the registrations below) without pybind11, which would double compile time.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(rlhf_fast, m) {
  // ---- log-probs (csrc/cpu/logprobs.cpp) --------------------------------
  // logits [N, V] any float dtype, labels [N] int64. logp/entropy/lse [N] in
  // float32 (float64 for float64 logits); entropy is [0] when not requested.
  m.def("token_logprobs_fwd(Tensor logits, Tensor labels, float temperature, bool return_entropy, int ignore_index) -> (Tensor, Tensor, Tensor)");
  // grad_logits [N, V] in the logits dtype.
  m.def("token_logprobs_bwd(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, Tensor labels, Tensor lse, Tensor entropy, float temperature, int ignore_index) -> Tensor");

  // ---- fused LM head + log-probs (csrc/cpu/fused_linear.cpp) ------------
  // hidden [N, H], weight [V, H], bias [V]; chunk_size tokens per chunk (0 = auto). Returns
  // (logp, entropy or [0], lse, argmax [N] int64 or [0]): argmax the first index of each row's
  // maximal logit (torch.argmax's choice on a tie), only when return_argmax.
  m.def("fused_linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, float temperature, bool return_entropy, int ignore_index, int chunk_size, bool return_argmax=False) -> (Tensor, Tensor, Tensor, Tensor)");
  // returns (grad_hidden [N, H], grad_weight [V, H] or [0] without need_weight, grad_bias [V] or [0])
  m.def("fused_linear_logprobs_bwd(Tensor grad_logp, Tensor? grad_entropy, Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor lse, Tensor entropy, float temperature, int ignore_index, int chunk_size, bool need_weight=True) -> (Tensor, Tensor, Tensor)");

  // ---- distillation divergence from two LM heads (csrc/cpu/fused_divergence.cpp) ----
  // student_hidden [N, H], student_weight [V, H], student_bias [V]; teacher_hidden [N, Ht],
  // teacher_weight [V, Ht], teacher_bias [V] (the teacher may have another dtype); mask [N] bool
  // (None: every row); beta in [0, 1]; chunk_size rows per chunk (0 = auto). Returns
  // (divergence [N], student entropy [N] or [0]) float32 (float64 for float64 student_hidden).
  m.def("fused_linear_divergence_fwd(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor teacher_hidden, Tensor teacher_weight, Tensor? teacher_bias, Tensor? mask, float beta, float temperature, bool return_entropy, int chunk_size) -> (Tensor, Tensor)");
  // grad_div [N]: recomputes each chunk's logits. Returns (grad_student_hidden, grad_student_weight,
  // grad_student_bias), each [0] when its flag is off (or there is no bias).
  m.def("fused_linear_divergence_bwd(Tensor grad_div, Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor teacher_hidden, Tensor teacher_weight, Tensor? teacher_bias, Tensor? mask, float beta, float temperature, bool grad_hidden, bool grad_weight, bool grad_bias, int chunk_size) -> (Tensor, Tensor, Tensor)");
  // The summed divergence with the gradients of the sum from the same logits (the backward only
  // scales them): returns (loss 0-dim, entropy [N] or [0], grad_student_hidden, grad_student_weight,
  // grad_student_bias), the gradients [0] when their flag is off.
  m.def("fused_linear_divergence_sum_fwd(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor teacher_hidden, Tensor teacher_weight, Tensor? teacher_bias, Tensor? mask, float beta, float temperature, bool return_entropy, bool grad_hidden, bool grad_weight, bool grad_bias, int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- KL estimators (csrc/cpu/kl.cpp) ----------------------------------
  // kind in {k1, k2, k3, abs, mse}; elementwise on any shape.
  m.def("kl_penalty_fwd(Tensor logp, Tensor ref_logp, str kind) -> Tensor");
  m.def("kl_penalty_bwd(Tensor grad, Tensor logp, Tensor ref_logp, str kind) -> Tensor");

  // ---- advantages and masked statistics (csrc/cpu/advantages.cpp) -------
  // [B, T] in, (advantages, returns) [B, T] out.
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  m.def("discounted_returns(Tensor rewards, Tensor mask, float gamma) -> Tensor");
  // scores [B], kind in {grpo, rloo, dr_grpo}.
  m.def("group_advantages(Tensor scores, int group_size, str kind, bool normalize_std, float eps) -> Tensor");
  // full reductions over the masked entries of any shape
  m.def("masked_mean(Tensor x, Tensor mask) -> Tensor");
  m.def("masked_whiten(Tensor x, Tensor mask, bool shift_mean, float eps) -> Tensor");

  // ---- PPO losses (csrc/cpu/ppo_loss.cpp) -------------------------------
  // agg in {token-mean, seq-mean-token-mean, seq-mean-token-sum,
  // seq-mean-token-sum-norm}; normalizer: 0-dim tensor replacing the default
  // denominator. Returns (loss 0-dim, stats [5] = clip_frac, dual_clip_frac,
  // approx_kl, ratio_mean, ratio_max).
  m.def("ppo_policy_loss_fwd(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, float clip_low, float clip_high, float? dual_clip, str agg, Tensor? normalizer) -> (Tensor, Tensor)");
  m.def("ppo_policy_loss_bwd(Tensor grad_loss, Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, float clip_low, float clip_high, float? dual_clip, str agg, Tensor? normalizer) -> Tensor");
  // Returns (loss 0-dim, stats [2] = clip_frac, values_mean).
  m.def("ppo_value_loss_fwd(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float? clip, str agg, Tensor? normalizer) -> (Tensor, Tensor)");
  m.def("ppo_value_loss_bwd(Tensor grad_loss, Tensor values, Tensor old_values, Tensor returns, Tensor mask, float? clip, str agg, Tensor? normalizer) -> Tensor");

  // ---- sampling (csrc/cpu/sampling.cpp) ---------------------------------
  // logits [B, V], uniforms [B] float64 in [0, 1): inverse CDF in vocabulary
  // order over the processed distribution. Returns (tokens [B] int64, logp [B] float32).
  m.def("sample(Tensor logits, Tensor uniforms, float temperature, int top_k, float top_p, float min_p) -> (Tensor, Tensor)");

  // ---- decoding (csrc/cpu/decode.cpp; internal, used by rlhf_fast/rollout/llama_decode.py)
  // One decode step of one Llama-style layer, float32, CPU: h [B T, H] -> [B T, H] for T new
  // tokens per row (1 when decoding); writes their keys / values at columns col .. col + T - 1
  // of K, V [B, n_kv, S, d]; mask [B, >= col + T] bool, causal within the new tokens.
  // Projection weights as [in, out] (x @ w): qkv 3 tensors or 1 with q | k | v side by side,
  // gate_up 2 or 1; a bias (or None) per weight tensor; norms and eps: the two RMSNorms'.
  m.def("llama_decode_layer(Tensor h, Tensor[] norms, float[] eps, Tensor[] qkv, Tensor?[] qkv_bias, Tensor o, Tensor? o_bias, Tensor[] gate_up, Tensor?[] gate_up_bias, Tensor down, Tensor? down_bias, Tensor(a!) K, Tensor(b!) V, Tensor cos, Tensor sin_signed, Tensor mask, int col, float scaling, Tensor? q_norm=None, Tensor? k_norm=None, float qk_eps=1e-6) -> Tensor");
  // transformers' Llama RMSNorm of x [B, H] float32 with weight [H].
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");

  // ---- training forward (csrc/cpu/train_layer.cpp; internal, used by rlhf_fast/models/llama_forward.py)
  // CPU, float32 / bfloat16 / float16, one dtype per op (statistics and activations in float32).
  // transformers' Llama RMSNorm of x [..., H] with weight [H] (x's dtype), bit for bit. Returns
  // (y like x, rstd [..., 1] float32).
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  // RMSNorm backward: grad, x [..., H], weight [H], rstd (float32, one per row of x). Returns
  // (dx like x, dw [H]); each [0] when not needed.
  m.def("rms_norm_bwd(Tensor grad, Tensor x, Tensor weight, Tensor rstd, bool need_dx, bool need_dw) -> (Tensor, Tensor)");
  // silu(gate) · up, for the down projection's weight gradient.
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  // SwiGLU backward: grad = d(silu(gate) · up) (contiguous) is overwritten with d_gate; returns d_up.
  m.def("swiglu_bwd_(Tensor(a!) grad, Tensor gate, Tensor up) -> Tensor");
  // RoPE x·cos + rotate_half(x)·sin with rotate_half's sign in sin_signed, on q [B, heads, T, d] and
  // k [B, kv_heads, T, d] (any strides); cos, sin_signed [B or 1, 1, T, d]. backward: the transposed map,
  // for the gradients. Returns new tensors laid out as [B, T, heads, d].
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin_signed, bool backward) -> (Tensor, Tensor)");

  // ---- CUDA-only ops (csrc/cuda/*.cu) -----------------------------------
  // (schemas of ops that only the CUDA backend implements go here)
  // sample with in-kernel Philox4x32-10 (key = seed, counter = (vocab index, row, offset)):
  // Gumbel-max; seed/offset come from the torch CUDA generator on the host (no device sync).
  m.def("sample_philox(Tensor logits, int seed, int offset, float temperature, int top_k, float top_p, float min_p) -> (Tensor, Tensor)");
}
