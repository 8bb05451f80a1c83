"""Numerics of loading and casting models (rlhf_fast/models/loading.py, tiny.py) and the
fallback rules of the Llama-family forward, against what transformers computes for the same
weights loaded with ``from_pretrained``."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast.models import (ValueModel, llama_forward, load_policy, load_reward_model, make_reference,  # noqa: E402
                              tiny_causal_lm, tiny_reward_model)
from rlhf_fast.models.logprobs import backbone  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
V = 97


def _ids(T=300, B=2, seed=0):
    return torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _rotary_dtypes(model):
    return {b.dtype for n, b in model.named_buffers() if n.endswith("inv_freq")}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_casting_to_bf16_keeps_rope_frequencies_as_from_pretrained_does(family, tmp_path):
    """load_policy / make_reference / tiny_causal_lm with dtype=bf16 give the model that
    from_pretrained(dtype=bf16) gives for the same weights: RoPE inv_freq stays float32 (a
    plain .to(bf16) rounds it and moves every rotary angle)."""
    from transformers import AutoModelForCausalLM

    m32 = tiny_causal_lm(V, family=family, hidden_size=32, num_heads=2, seed=3)
    m32.save_pretrained(tmp_path / "m")
    disk = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).eval()
    assert _rotary_dtypes(disk) == {torch.float32}
    ids = _ids()
    with torch.no_grad():
        want = disk(ids).logits
        for got in (load_policy(tiny_causal_lm(V, family=family, hidden_size=32, num_heads=2, seed=3),
                                dtype=torch.bfloat16),
                    make_reference(m32, dtype=torch.bfloat16),
                    tiny_causal_lm(V, family=family, hidden_size=32, num_heads=2, seed=3, dtype=torch.bfloat16)):
            assert _rotary_dtypes(got) == {torch.float32}
            assert next(got.parameters()).dtype == torch.bfloat16
            assert torch.equal(got.eval()(ids).logits, want)
    rm = tiny_reward_model(V, family=family, hidden_size=32, num_heads=2, dtype=torch.bfloat16)
    assert _rotary_dtypes(rm) == {torch.float32}
    assert _rotary_dtypes(load_reward_model(tiny_reward_model(V, family=family, hidden_size=32, num_heads=2),
                                            dtype=torch.bfloat16)) == {torch.float32}


def test_bf16_value_model_round_trip_is_exact(tmp_path):
    vm = ValueModel(tiny_causal_lm(V, hidden_size=32, num_heads=2, seed=4, dtype=torch.bfloat16))
    vm.save_pretrained(tmp_path)
    again = ValueModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = _ids(T=200)
    with torch.no_grad():
        assert torch.equal(again(ids), vm(ids))


def test_loading_a_bf16_checkpoint_gives_float32_weights_unless_asked(tmp_path):
    """transformers >= 5 loads a checkpoint in its saved dtype by default; the loaders here
    give float32 weights (float32 master weights for training) unless dtype is given."""
    tiny_causal_lm(V, hidden_size=32, num_heads=2, dtype=torch.bfloat16).save_pretrained(tmp_path / "p")
    tiny_reward_model(V, hidden_size=32, num_heads=2, dtype=torch.bfloat16).save_pretrained(tmp_path / "r")
    ValueModel(tiny_causal_lm(V, hidden_size=32, num_heads=2, dtype=torch.bfloat16)).save_pretrained(tmp_path / "v")
    for m in (load_policy(str(tmp_path / "p")), load_reward_model(str(tmp_path / "r")),
              ValueModel.from_pretrained(tmp_path / "v")):
        assert {p.dtype for p in m.parameters()} == {torch.float32}
    assert {p.dtype for p in load_policy(str(tmp_path / "p"), dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


def test_attention_dropout_of_a_training_layer_leaves_it_to_transformers():
    """transformers applies attention dropout per attention module (its own training flag), so
    a backbone in eval mode with one attention module in training mode is not ours to run."""
    m = tiny_causal_lm(V, hidden_size=32, num_heads=2)
    base = backbone(m)
    base.config.attention_dropout = 0.1
    for layer in base.layers:
        layer.self_attn.attention_dropout = 0.1
    assert llama_forward.supported(base, 8)
    base.layers[1].self_attn.train()
    assert not base.training
    assert not llama_forward.supported(base, 8)


def test_a_same_named_class_outside_transformers_is_left_to_its_own_forward():
    """Remote-code models define classes named like transformers' (``LlamaRMSNorm`` in
    ``transformers_modules.<repo>.modeling_llama``) whose forward may differ: matched by name
    alone this forward would compute transformers' math instead of theirs."""
    from torch import nn

    class _Norm(nn.Module):
        def __init__(self, weight, eps):
            super().__init__()
            self.weight, self.variance_epsilon = weight, eps

        def forward(self, x):  # a LayerNorm-like variant: mean removed
            x = x - x.mean(-1, keepdim=True)
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    remote = type("LlamaRMSNorm", (_Norm,), {"__module__": "transformers_modules.acme.modeling_llama"})
    m = tiny_causal_lm(V, hidden_size=32, num_heads=2)
    base = backbone(m)
    base.norm = remote(base.norm.weight, base.norm.variance_epsilon)
    ids = _ids(T=12)
    assert not llama_forward.supported(base, 12)
    from rlhf_fast.models.logprobs import hidden_states

    with torch.no_grad():
        torch.testing.assert_close(hidden_states(m, ids, None), base(input_ids=ids).last_hidden_state)
