"""Review of the training / scoring forward (rlhf_fast/models/llama_forward.py and the log-prob
paths of rlhf_fast/models/logprobs.py) against transformers' own forward, on configs the fast
path accepts but the main suite does not build: an MLP with biases, and RoPE variants whose
frequencies depend on the longest position of the call (dynamic NTK, LongRoPE); and packed rows
(``packed=True``) of other model families: those checked to keep packed sequences apart
(``logprobs.PACKED_CHECKED``) and one whose mask ignores the position ids (OPT)."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast.models import llama_forward  # noqa: E402
from rlhf_fast.models import logprobs as L  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
V = 64


def _llama(seed=0, **kw):
    """A tiny random LlamaForCausalLM (eval mode, fp32, sdpa), its norms and biases random too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    cfg.update(kw)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def _hf_logprobs(model, ids, am, pos):
    """``log p(ids[:, t] | ids[:, :t])`` ``[B, T]`` from transformers' own logits (0 at t = 0)."""
    logits = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(lp, (1, 0))


def test_llama_with_mlp_bias_trains_as_transformers_does():
    """``mlp_bias=True`` (a Llama config key): the down projection's F.linear with a bias returns a
    view, which the residual's in-place add may not modify as the output of a custom autograd
    Function (RuntimeError in every training forward); the log-probs and all gradients must be
    transformers'."""
    m = _llama(mlp_bias=True, attention_bias=True)
    assert llama_forward.supported(m.model, 10)
    ids = torch.randint(3, V, (3, 10), generator=torch.Generator().manual_seed(3))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    am[2, -2:] = 0
    pos = L.default_position_ids(am)
    target = L._target_mask(am, None)
    params = list(m.parameters())
    ours = L.sequence_logprobs(m, ids, am)
    g_ours = torch.autograd.grad(ours.sum(), params)
    ref = torch.where(target, _hf_logprobs(m, ids, am, pos), 0.0)
    g_ref = torch.autograd.grad(ref.sum(), params)
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=0)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


_ROPES = {
    # frequencies rescaled once the longest position passes max_position_embeddings (8)
    "dynamic": dict(rope_parameters=dict(rope_type="dynamic", factor=4.0, rope_theta=10000.0),
                    max_position_embeddings=8),
    # the long factors once the longest position passes original_max_position_embeddings (8)
    "longrope": dict(rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 4,
                                          long_factor=[8.0] * 4, original_max_position_embeddings=8),
                     max_position_embeddings=32),
}


@pytest.mark.parametrize("rope", sorted(_ROPES))
def test_columns_before_the_row_end_take_the_rope_of_the_whole_row(rope):
    """The log-prob paths compute only the columns up to the last scored one
    (``hidden_states(columns=(a, b))`` drops the columns from b on). Dynamic and LongRoPE
    frequencies depend on the longest position of the call, so the RoPE tables must still come
    from the whole row's position ids: transformers' forward of the row (whose logits a
    response ending before the row's end reads) uses them."""
    m = _llama(**_ROPES[rope])
    ref_model = copy.deepcopy(m)  # (dynamic RoPE keeps state between calls: a fresh copy each)
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(5))
    resp = torch.zeros_like(ids)
    resp[:, 3:6] = 1  # scored columns 3..5: the forward stops at column 5, positions up to 4
    with torch.no_grad():
        h = L.hidden_states(copy.deepcopy(m), ids, None, columns=(2, 6))
        h_ref = copy.deepcopy(m).model(input_ids=ids, use_cache=False).last_hidden_state[:, 2:6]
        ours = L.sequence_logprobs(m, ids, response_mask=resp)
        ref = _hf_logprobs(ref_model, ids, None, None) * resp
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_packed_rows_of_a_family_whose_mask_ignores_position_ids_are_not_silently_wrong():
    """``packed=True`` (SFT ``packing``, DPO ``padding_free``) is documented to change speed, not
    the loss. OPT builds its causal mask without the position ids (transformers'
    ``create_causal_mask(..., position_ids)`` is what separates packed sequences), so one packed row
    would let each sequence attend to the ones before it: the log-probs and gradients must be the
    padded ones (not other values with only a RuntimeWarning)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    m = OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 ffn_dim=48, word_embed_proj_dim=32, max_position_embeddings=64,
                                 pad_token_id=0)).eval()
    ids = torch.randint(3, V, (3, 9), generator=torch.Generator().manual_seed(2))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    am[2, -2:] = 0
    params = list(m.parameters())
    padded = L.sequence_logprobs(m, ids, am)
    g_padded = torch.autograd.grad(padded.sum(), params)
    packed = L.sequence_logprobs(m, ids, am, packed=True)  # (through the padded forward)
    g_packed = torch.autograd.grad(packed.sum(), params)
    torch.testing.assert_close(packed, padded, atol=2e-6, rtol=0)
    for a, b in zip(g_packed, g_padded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


_CHECKED = {  # config keys of a tiny model of each family in logprobs.PACKED_CHECKED
    "gemma": dict(head_dim=8), "gemma2": dict(head_dim=8, sliding_window=4, final_logit_softcapping=3.0),
    "gemma3_text": dict(head_dim=8, sliding_window=4), "phi3": {}, "olmo2": {}, "cohere": {},
    "granite": dict(embedding_multiplier=2.0, attention_multiplier=0.3, residual_multiplier=0.5, logits_scaling=4.0),
    "gpt_neox": dict(rotary_pct=0.5), "starcoder2": {}, "phi": {}, "stablelm": {}, "falcon": {},
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=16),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}


def test_checked_families_are_those_built_here():
    assert set(_CHECKED) == set(L.PACKED_CHECKED)


@pytest.mark.parametrize("family", sorted(_CHECKED))
def test_packed_rows_of_a_checked_family_equal_its_padded_rows(family):
    """The model types of ``logprobs.PACKED_CHECKED`` run ``packed=True`` as one packed row through
    their own forward (transformers separates the sequences by their position ids): the log-probs
    and entropies of the padded forward, left and right padding, a one-token row included."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, **_CHECKED[family])
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager" if family == "gemma2" else "sdpa").eval()
    ids = torch.randint(3, V, (4, 12), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    am[2, -4:] = 0
    am[3, :11] = 0  # one token
    calls = []
    base = L.backbone(m)
    base.register_forward_pre_hook(lambda mod, args, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    with torch.no_grad():
        a, ea = L.sequence_logprobs(m, ids, am, return_entropy=True)
        b, eb = L.sequence_logprobs(m, ids, am, return_entropy=True, packed=True)
    assert calls[-1] == (1, int(am.sum()))  # one packed row
    torch.testing.assert_close(b, a, atol=2e-6, rtol=0)
    torch.testing.assert_close(eb, ea, atol=2e-6, rtol=0)
