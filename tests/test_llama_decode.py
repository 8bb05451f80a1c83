"""The C++ decode-layer op (csrc/cpu/decode.cpp) against the Python decode step it replaces,
and the engine with and without it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from rlhf_fast import ops  # noqa: E402
from rlhf_fast.models import sample_texts, tiny_causal_lm, train_tokenizer  # noqa: E402
from rlhf_fast.ops import _dispatch  # noqa: E402
from rlhf_fast.rollout import HFRolloutEngine, SamplingParams  # noqa: E402
from rlhf_fast.rollout.llama_decode import _Layer, _LlamaDecoder  # noqa: E402

needs_cpp = pytest.mark.skipif(not _dispatch.backend_available("cpp")[0], reason="rlhf_fast._C not built")
pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["hello world", "the cat sat on the", "one", "what is two and three"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(sample_texts(), 256)


def _python_layer(L: _Layer, h, K, V, cos, sin, mask, col):
    """The decode step's Python ops for one layer (the ``use_backend("torch")`` path), with
    the same sliced-KV semantics as the op."""
    B, d = h.shape[0], L.head_dim
    x = L.norm1(h)
    q, k = L.qk(x, cos[:, None], sin[:, None])
    K[:, :, col], V[:, :, col] = k, L.v(x).view(B, -1, d)
    keys, values = K[:, :, :col + 1], V[:, :, :col + 1]
    o = F.scaled_dot_product_attention(q.reshape(B, keys.shape[1], -1, d), keys, values,
                                       attn_mask=mask[:, None, None, :col + 1], scale=L.scaling)
    h = h + L.o(o.reshape(B, -1))
    return h + L.mlp(L.norm2(h))


@needs_cpp
@pytest.mark.parametrize("stack", [True, False])
@pytest.mark.parametrize("family,heads,kv_heads,B,col", [("llama", 4, 2, 3, 5), ("qwen2", 4, 2, 1, 0),
                                                         ("llama", 2, None, 5, 11), ("qwen2", 8, 2, 2, 7),
                                                         ("qwen3", 4, 2, 3, 4)])
def test_decode_layer_op_equals_python_ops(tok, family, heads, kv_heads, B, col, stack, monkeypatch):
    """GQA and plain heads, Qwen2's q/k/v biases, B = 1, the first and the last column, keys
    masked in the middle of a row, with q / k / v and gate / up stacked (a small model) or as
    the modules' own weights: the op writes the same keys / values at ``col`` and returns the
    same layer output as the Python ops (float32 rounding apart); Qwen3's per-head q / k norms
    go in as the op's trailing arguments."""
    from rlhf_fast.rollout import llama_decode

    monkeypatch.setattr(llama_decode, "_STACK_MAX_BYTES", llama_decode._STACK_MAX_BYTES if stack else 0)
    m = tiny_causal_lm(len(tok), family=family, num_heads=heads, num_kv_heads=kv_heads, seed=2).eval()
    g = torch.Generator().manual_seed(col)
    with torch.no_grad():
        for p in m.parameters():  # random norms and biases too, so a swapped weight shows
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        L = _Layer(m.model.layers[0])
        args = L.native_args()
        assert args is not None and len(args[2]) == (1 if stack else 3)
        assert (args[3][0] is not None) == (family == "qwen2")  # Qwen2's q / k / v biases
        H, d, n_kv, S = m.config.hidden_size, L.head_dim, kv_heads or heads, col + 1 + 2
        h = torch.randn(B, H, generator=g)
        K0, V0 = torch.randn(B, n_kv, S, d, generator=g), torch.randn(B, n_kv, S, d, generator=g)
        cos, sin = torch.randn(B, d, generator=g), torch.randn(B, d, generator=g)
        mask = torch.rand(B, S, generator=g) > 0.3
        mask[:, col] = True
        wide = torch.zeros(B, S + 3, dtype=torch.bool)  # the engine passes a slice of a wider buffer
        wide[:, :col + 1] = mask[:, :col + 1]
        K1, V1, K2, V2 = K0.clone(), V0.clone(), K0.clone(), V0.clone()
        got = torch.ops.rlhf_fast.llama_decode_layer(h, *args, K1, V1, cos, sin, wide[:, :col + 1], col, L.scaling,
                                                     *L.native_head_norms())
        assert (L.native_head_norms()[0] is not None) == (family == "qwen3")
        exp = _python_layer(L, h, K2, V2, cos, sin, mask, col)
    torch.testing.assert_close(K1, K2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(V1, V2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4)
    assert torch.equal(K1[:, :, col + 1:], K0[:, :, col + 1:]) and torch.equal(K1[:, :, :col], K0[:, :, :col])


@needs_cpp
def test_rms_norm_op_equals_transformers_norm(tok):
    m = tiny_causal_lm(len(tok), seed=1)
    norm = m.model.norm
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-2, 2, norm.weight.numel()))
        x = torch.randn(7, norm.weight.numel()) * 3
        torch.testing.assert_close(torch.ops.rlhf_fast.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_python_rms_norm_equals_transformers_norm(tok, dtype):
    """The decode step's RMSNorm (the fused ATen kernel in float32, the module's formula
    otherwise) gives the module's values, on [B, H] rows and on [B, heads, d] heads (Qwen3)."""
    from rlhf_fast.rollout.llama_decode import _RMSNorm

    m = tiny_causal_lm(len(tok), family="qwen3", num_heads=4, num_kv_heads=2, seed=1, dtype=dtype)
    for norm, shape in ((m.model.norm, (7, 64)), (m.model.layers[0].self_attn.q_norm, (7, 4, 16))):
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(-2, 2, norm.weight.numel()))
            x = (torch.randn(shape) * 3).to(dtype)
            assert torch.equal(_RMSNorm(norm)(x), norm(x))


@needs_cpp
def test_decode_layer_op_rejects_bad_input(tok):
    m = tiny_causal_lm(len(tok), seed=1).eval()
    with torch.no_grad():
        L = _Layer(m.model.layers[0])
        args = L.native_args()
        H, d = m.config.hidden_size, L.head_dim
        n_kv = m.config.num_key_value_heads
        h, K, V = torch.randn(2, H), torch.zeros(2, n_kv, 4, d), torch.zeros(2, n_kv, 4, d)
        cos, sin, mask = torch.ones(2, d), torch.zeros(2, d), torch.ones(2, 4, dtype=torch.bool)
        norms, eps, qkv, qkv_b, o, o_b, gu, gu_b, down, down_b = args
        with pytest.raises(ValueError, match="h must be a contiguous float32"):
            torch.ops.rlhf_fast.llama_decode_layer(h.double(), *args, K, V, cos, sin, mask, 1, L.scaling)
        with pytest.raises(ValueError, match="col must be in"):
            torch.ops.rlhf_fast.llama_decode_layer(h, *args, K, V, cos, sin, mask, 4, L.scaling)
        with pytest.raises(ValueError, match="mask must be a bool"):
            torch.ops.rlhf_fast.llama_decode_layer(h, *args, K, V, cos, sin, mask.float(), 1, L.scaling)
        with pytest.raises(ValueError, match="with contiguous rows"):  # columns strided: not a row slice
            torch.ops.rlhf_fast.llama_decode_layer(h, *args, K, V, cos, sin, mask.t().contiguous().t(), 1,
                                                   L.scaling)
        with pytest.raises(ValueError, match="o must be"):  # K holds one KV head too many for o's heads
            torch.ops.rlhf_fast.llama_decode_layer(h, *args, K.repeat(1, 2, 1, 1)[:, :n_kv + 1].contiguous(),
                                                   V.repeat(1, 2, 1, 1)[:, :n_kv + 1].contiguous(), cos, sin, mask,
                                                   1, L.scaling)
        with pytest.raises(ValueError, match="norms and eps must have 2 entries"):
            torch.ops.rlhf_fast.llama_decode_layer(h, norms[:1], eps, qkv, qkv_b, o, o_b, gu, gu_b, down, down_b,
                                                   K, V, cos, sin, mask, 1, L.scaling)
        with pytest.raises(ValueError, match="qkv weight 0 must be a float32"):
            torch.ops.rlhf_fast.llama_decode_layer(h, norms, eps, [qkv[0].double()], qkv_b, o, o_b, gu, gu_b, down,
                                                   down_b, K, V, cos, sin, mask, 1, L.scaling)
        with pytest.raises(ValueError, match="q_norm and k_norm go together"):
            torch.ops.rlhf_fast.llama_decode_layer(h, *args, K, V, cos, sin, mask, 1, L.scaling, torch.ones(d), None)
        with pytest.raises(ValueError, match=r"q_norm and k_norm must be \["):
            torch.ops.rlhf_fast.llama_decode_layer(h, *args, K, V, cos, sin, mask, 1, L.scaling, torch.ones(d + 2),
                                                   torch.ones(d + 2))
        with pytest.raises(ValueError, match="gate_up must be 1 or 2 weights"):
            torch.ops.rlhf_fast.llama_decode_layer(h, norms, eps, qkv, qkv_b, o, o_b, gu * 3, gu_b * 3, down,
                                                   down_b, K, V, cos, sin, mask, 1, L.scaling)


@needs_cpp
@pytest.mark.parametrize("family,kv_heads,prefill_max", [("llama", 2, 64), ("qwen2", 2, 64), ("mistral", None, 64),
                                                         ("qwen2", 2, 2), ("qwen3", 2, 64)])
def test_engine_with_the_op_equals_engine_on_python_ops(tok, family, kv_heads, prefill_max, monkeypatch):
    """Generation through the op (prefill included, for prompts up to NATIVE_PREFILL_MAX tokens;
    longer ones take transformers' prefill) gives the tokens and behaviour log-probs of the
    Python decode ops (forced with use_backend("torch")), and the op path is the one a float32
    CPU model takes."""
    m = tiny_causal_lm(len(tok), family=family, num_heads=4, num_kv_heads=kv_heads, seed=4)
    if family == "mistral":
        m.config.sliding_window = None
    monkeypatch.setattr(_LlamaDecoder, "NATIVE_PREFILL_MAX", prefill_max)
    params = SamplingParams(temperature=1.0, top_k=30, max_new_tokens=16, n=3, seed=2)
    built, prefilled = [], []
    real_init, real_prefill = _LlamaDecoder.__init__, _LlamaDecoder.prefill

    def init(self, *a, **k):
        real_init(self, *a, **k)
        built.append(self.native is not None)

    def prefill(self, *a, **k):
        prefilled.append(True)
        return real_prefill(self, *a, **k)

    monkeypatch.setattr(_LlamaDecoder, "__init__", init)
    monkeypatch.setattr(_LlamaDecoder, "prefill", prefill)
    native = HFRolloutEngine(m, tok).generate(PROMPTS, params)
    with ops.use_backend("torch"):
        python = HFRolloutEngine(m, tok).generate(PROMPTS, params)
    assert built == [True, False]
    assert prefilled == ([True] if prefill_max == 64 else [])  # the prompts here are 2-7 tokens
    assert torch.equal(native.input_ids, python.input_ids)
    assert torch.equal(native.response_mask, python.response_mask)
    torch.testing.assert_close(native.behaviour_logp, python.behaviour_logp, rtol=0, atol=1e-5)


def test_decoder_keeps_python_ops_for_layers_the_op_does_not_compute(tok):
    """A bfloat16 model, an MLP whose activation is not SiLU, or a projection that is not a
    plain nn.Linear (a quantised or adapter layer) decodes on the Python ops."""

    class Wrapped(torch.nn.Linear):
        pass

    m = tiny_causal_lm(len(tok), seed=1).eval()
    assert _Layer(m.model.layers[0]).native_args() is not None
    m.model.layers[0].mlp.act_fn = torch.nn.GELU()
    assert _Layer(m.model.layers[0]).native_args() is None
    up = m.model.layers[1].mlp.up_proj
    m.model.layers[1].mlp.up_proj = Wrapped(up.in_features, up.out_features, bias=False)
    assert _Layer(m.model.layers[1]).native_args() is None
    b = tiny_causal_lm(len(tok), seed=1).to(torch.bfloat16).eval()
    assert _Layer(b.model.layers[0]).native_args() is None


@pytest.mark.parametrize("native", [True, False])
def test_decoder_runs_the_layers_of_a_shortened_config(tok, native):
    """transformers runs ``layers[:config.num_hidden_layers]``; the decoder does too, through
    the op (prefill included) and through the Python ops."""
    m = tiny_causal_lm(len(tok), num_heads=4, num_kv_heads=2, num_layers=3, seed=7)
    m.config.num_hidden_layers = 2
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=3)
    with ops.use_backend("cpp" if native else "torch"):
        fast = HFRolloutEngine(m, tok).generate(PROMPTS, params)
    handle = m.register_forward_hook(lambda *a: None)  # forces transformers' own decode
    try:
        slow = HFRolloutEngine(m, tok).generate(PROMPTS, params)
    finally:
        handle.remove()
    assert torch.equal(fast.input_ids, slow.input_ids)
    torch.testing.assert_close(fast.behaviour_logp, slow.behaviour_logp, rtol=0, atol=1e-5)


def test_a_same_named_norm_outside_transformers_keeps_its_own_forward():
    # remote code may ship a class called LlamaRMSNorm that computes something else: the decoder
    # writes out transformers' own classes only, and calls any other module as it is
    import torch

    from rlhf_fast.rollout.llama_decode import _norm

    LlamaRMSNorm = type("LlamaRMSNorm", (torch.nn.Module,), {"__module__": "transformers_modules.repo.modeling",
                                                             "forward": lambda self, x: 2 * x})
    fake = LlamaRMSNorm()
    assert _norm(fake) is fake
