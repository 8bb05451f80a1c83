"""Heads that transform their logits (rlhf_fast.models.lm_head) and the log-prob path for them.

A scaled or softcapped head cannot take the fused op; its log-probs go through its logits a chunk of
rows at a time (logprobs.logits_head_token_stats), which must equal the model's own full logits —
values, entropies and gradients — and never hold [B, T, V]. The attributes may live on a multimodal
wrapper's text config (Aya Vision, Muse); a wrapper whose forward does not apply them (Gemma 3's)
keeps the model's own forward.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings

import pytest
import torch

from rlhf_fast.models import lm_head
from rlhf_fast.models import logprobs as lp

V = 96


def _small(cfg, **over):
    for k, v in dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     **over).items():
        setattr(cfg, k, v)
    if getattr(cfg, "layer_types", None):  # (Gemma 3: one per layer, checked on validation)
        cfg.layer_types = cfg.layer_types[:cfg.num_hidden_layers]
    return cfg


def _causal(model_type, **over):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_small(AutoConfig.for_model(model_type), **over)).eval()


def _multimodal(model_type, **text):
    """A tiny image-text model of ``model_type`` (a one-layer vision tower), its text config's ``text``."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.for_model(model_type)
    _small(cfg.get_text_config(), **text)
    for k, v in dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).items():
        setattr(cfg.vision_config, k, v)
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(cfg).eval()


def _gemma3_mm(softcap):
    return _multimodal("gemma3", final_logit_softcapping=softcap)


HEADS = {
    "gemma2 softcap": lambda: _causal("gemma2", final_logit_softcapping=1.5),
    "cohere logit_scale": lambda: _causal("cohere", logit_scale=3.0),
    "granite logits_scaling": lambda: _causal("granite", logits_scaling=0.2),
    "aya vision text_config.logit_scale": lambda: _multimodal("aya_vision", logit_scale=4.0),
}


def _batch(seed=0, B=3, T=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    am = torch.ones_like(ids)
    am[1, :4] = 0  # a left-padded row
    resp = torch.zeros_like(ids)
    resp[:, 5:] = 1
    resp[2, -2:] = 0
    return ids, am, resp


def _own_logits(model, ids, am, resp, temperature=1.0):
    """The oracle: the model's own logits (its forward applies its scale / softcap), shifted and masked."""
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    z = model(input_ids=ids, attention_mask=am, position_ids=pos).logits.float() / temperature
    logp = torch.log_softmax(z[:, :-1], -1)
    got = logp.gather(-1, ids[:, 1:, None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    m = (am.bool() & resp.bool())[:, 1:] & am[:, :-1].bool()
    zero = torch.zeros(ids.shape[0], 1)
    return torch.cat([zero, got * m], 1), torch.cat([zero, ent * m], 1)


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the one-time "falling back" warning
        return fn()


@pytest.mark.parametrize("name", list(HEADS))
def test_transformed_head_logprobs_equal_the_models_own_logits(name):
    model = HEADS[name]()
    assert lp.unfusable_reason(model) is not None
    assert lp._logits_head(model) is not None  # the chunked logits path, not the full forward
    ids, am, resp = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    got, ent = _quiet(lambda: lp.sequence_logprobs(model, ids, am, response_mask=resp, temperature=0.7,
                                                   return_entropy=True, chunk_size=4))
    exp, exp_ent = _own_logits(model, ids, am, resp, 0.7)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, exp_ent, rtol=1e-5, atol=1e-5)
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))
    g_got = torch.autograd.grad((got * w).sum() + ent.sum(), params, allow_unused=True)
    g_exp = torch.autograd.grad((exp * w).sum() + exp_ent.sum(), params, allow_unused=True)
    for a, b in zip(g_got, g_exp):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_transformed_head_top1_and_mean_logit():
    model = HEADS["gemma2 softcap"]()
    ids, am, resp = _batch(2)
    with torch.no_grad():
        logp, top1, mean = _quiet(lambda: lp.sequence_logprobs(model, ids, am, response_mask=resp, return_top1=True,
                                                               return_mean_logit=True, chunk_size=5))
        z = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits.float()
    m = (am.bool() & resp.bool())[:, 1:] & am[:, :-1].bool()
    exp_top1 = (z[:, :-1].argmax(-1) == ids[:, 1:]) & m
    assert torch.equal(top1[:, 1:], exp_top1)
    torch.testing.assert_close(mean[:, 1:], z[:, :-1].mean(-1) * m, rtol=1e-5, atol=1e-6)


def test_policy_loss_through_a_transformed_head_equals_composition():
    from rlhf_fast.ops import reference

    model = HEADS["cohere logit_scale"]()
    ids, am, resp = _batch(3)
    g = torch.Generator().manual_seed(4)
    old = torch.randn(ids.shape, generator=g) * 0.1 - 4.0
    adv = torch.randn(ids.shape, generator=g)
    loss, _ = _quiet(lambda: lp.policy_loss(model, ids, am, resp, old, adv, entropy_coef=0.01))
    logp, ent = _own_logits(model, ids, am, resp)
    m = lp._target_mask(am, resp)
    exp, _ = reference.policy_loss_from_logp(logp, ent, old, adv, m, entropy_coef=0.01)
    torch.testing.assert_close(loss, exp, rtol=1e-5, atol=1e-6)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(loss, params, allow_unused=True),
                    torch.autograd.grad(exp, params, allow_unused=True)):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lora_on_the_lm_head_goes_through_its_logits():
    peft = pytest.importorskip("peft")
    model = HEADS["gemma2 softcap"]()
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                                       init_lora_weights=False))
    assert "peft adapter" in lp.unfusable_reason(model)
    assert lp._logits_head(model) is not None
    ids, am, resp = _batch(5)
    got = _quiet(lambda: lp.sequence_logprobs(model, ids, am, response_mask=resp, chunk_size=3))
    exp, _ = _own_logits(model, ids, am, resp)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    lora = [p for n, p in model.named_parameters() if "lora_" in n and "lm_head" in n]
    assert lora
    for a, b in zip(torch.autograd.grad(got.sum(), lora), torch.autograd.grad(exp.sum(), lora)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_wrapper_that_does_not_apply_its_text_softcap_keeps_its_own_forward():
    # Gemma 3's multimodal forward never applies text_config.final_logit_softcapping: the head is
    # still kept off the fused op (the text config names a transform), but its logits come from the
    # model's own forward, whatever our reading of the config would give
    model = _gemma3_mm(2.0)
    assert "final_logit_softcapping" in lp.unfusable_reason(model)
    assert lp._logits_head(model) is None
    ids, am, resp = _batch(6)
    with torch.no_grad():
        got = _quiet(lambda: lp.sequence_logprobs(model, ids, am, response_mask=resp))
        exp, _ = _own_logits(model, ids, am, resp)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)


def test_text_config_transforms_are_seen():
    from transformers import AutoConfig
    from transformers.models.muse_spark.modeling_muse_spark import MuseSparkForConditionalGeneration

    muse = AutoConfig.for_model("muse_spark")  # the attributes live on its text config only
    assert getattr(muse, "output_multiplier", None) is None
    active = dict(lm_head.active_logit_transforms(muse))
    assert set(active) == {"final_logit_softcapping", "output_multiplier"}
    tf = lm_head.head_transform(muse)
    text = muse.get_text_config()
    assert tf == lm_head.HeadTransform(text.output_multiplier, text.final_logit_softcapping)
    # its forward applies both (scale, then softcap: HeadTransform's order)
    assert {"final_logit_softcapping", "output_multiplier"} <= lp._forward_names(MuseSparkForConditionalGeneration)
    assert lm_head.head_transform(AutoConfig.for_model("recurrent_gemma")).softcap == 30.0
    assert lm_head.active_logit_transforms(AutoConfig.for_model("llama")) == []
    assert lm_head.head_transform(None) == lm_head.HeadTransform()


def test_transform_logits_order():
    z = torch.tensor([[-3.0, 0.5, 8.0]])
    tf = lm_head.HeadTransform(scale=0.5, softcap=2.0)
    exp = torch.tanh(z * 0.5 / 2.0) * 2.0 / 0.7
    torch.testing.assert_close(lm_head.transform_logits(z, tf, 0.7), exp)
    assert torch.equal(lm_head.transform_logits(z, lm_head.HeadTransform()), z)


def test_transformed_head_never_holds_btv():
    from torch.profiler import ProfilerActivity, profile

    from rlhf_fast.models import tiny_causal_lm

    Vbig, B, T = 32768, 2, 48
    model = tiny_causal_lm(Vbig, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    model.config.logit_scale = 0.5  # a Llama forward ignores it, so this is only a memory check
    lp._forward_names.cache_clear()
    ids = torch.randint(0, Vbig, (B, T), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    btv = B * T * Vbig * 4

    def peak(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)

    from unittest import mock

    with mock.patch.object(lp, "_forward_names", lambda cls: lm_head.KNOWN_TRANSFORM_ATTRS):
        assert lp._logits_head(model) is not None

        def step():
            out = _quiet(lambda: lp.sequence_logprobs(model, ids, am, chunk_size=8))
            out.sum().backward()

        chunked = peak(step)
    with mock.patch.object(lp, "_logits_head", lambda m: None):
        full = peak(step)  # the model's own forward: [B, T, V] logits
    # the chunked path's largest block is the head's [V, H] gradient (4 MiB), not [B, T, V] (12 MiB)
    assert full >= btv * 0.9, (full, btv)
    assert chunked < btv / 2, (chunked, btv)


def test_wpo_weights_of_a_transformed_head_equal_its_own_logits():
    from rlhf_fast.trainers.dpo import wpo_token_logps

    model = HEADS["gemma2 softcap"]()
    ids, am, resp = _batch(7)
    batch = {"input_ids": ids, "attention_mask": am, "response_mask": resp}
    tok, lss, ent = _quiet(lambda: wpo_token_logps(model, batch, return_entropy=True))
    exp, exp_ent = _own_logits(model, ids, am, resp)
    torch.testing.assert_close(tok, exp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, exp_ent, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        z = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits.float()
    m = (am.bool() & resp.bool())[:, 1:] & am[:, :-1].bool()
    exp_lss = (torch.logsumexp(2 * z[:, :-1], -1) - 2 * torch.logsumexp(z[:, :-1], -1)) * m
    torch.testing.assert_close(lss[:, 1:], exp_lss, rtol=1e-5, atol=1e-5)
    assert lss[:, 0].eq(0).all()


@pytest.mark.parametrize("name", ["gemma2 softcap", "cohere logit_scale"])
def test_packed_rows_through_a_transformed_head_equal_its_own_padded_logits(name):
    from rlhf_fast.trainers.packing import check_packable

    model = HEADS[name]()
    check_packable("padding_free", model)  # computable: not refused
    ids, am, resp = _batch(8)
    got, ent = _quiet(lambda: lp.sequence_logprobs(model, ids, am, response_mask=resp, packed=True,
                                                   return_entropy=True, chunk_size=4))
    exp, exp_ent = _own_logits(model, ids, am, resp)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, exp_ent, rtol=1e-5, atol=1e-5)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(got.sum(), params, allow_unused=True),
                    torch.autograd.grad(exp.sum(), params, allow_unused=True)):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_packed_rows_refuse_a_head_only_its_forward_computes():
    from rlhf_fast.trainers.packing import check_packable

    model = _gemma3_mm(2.0)  # its forward does not apply the text softcap: only the padded forward is known
    ids, am, resp = _batch(9)
    with pytest.raises(ValueError, match="packed=True needs an LM head .*final_logit_softcapping"):
        _quiet(lambda: lp.sequence_logprobs(model, ids, am, response_mask=resp, packed=True))
    with pytest.raises(ValueError, match="padding_free: true needs .*final_logit_softcapping"):
        check_packable("padding_free", model)


def test_packed_wpo_weights_of_a_transformed_head():
    from rlhf_fast.trainers.dpo import wpo_token_logps

    model = HEADS["gemma2 softcap"]()
    ids, am, resp = _batch(10)
    batch = {"input_ids": ids, "attention_mask": am, "response_mask": resp}
    tok, lss = _quiet(lambda: wpo_token_logps(model, batch, packed=True))
    exp_tok, exp_lss = _quiet(lambda: wpo_token_logps(model, batch))
    torch.testing.assert_close(tok, exp_tok, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lss, exp_lss, rtol=1e-5, atol=1e-5)


def test_sft_packing_refuses_at_the_start_a_head_only_its_forward_computes(tmp_path):
    """SFT's packed rows (packing: true, bfd) need a head the packed path computes: a model whose
    forward keeps a transform we cannot apply is refused when the trainer is built, naming the key
    (not at the first packed batch); a softcapped Gemma 2 head is taken."""
    from rlhf_fast.models import train_tokenizer
    from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records

    records = synthetic_sft_records(8)
    tok = train_tokenizer([r.prompt + " " + r.completion for r in records], V)
    with pytest.raises(ValueError, match="packing: true needs .*final_logit_softcapping"):
        SFTTrainer(SFTConfig(output_dir=str(tmp_path / "a"), packing=True, max_steps=1), model=_gemma3_mm(2.0),
                   tokenizer=tok, train_records=records)
    tr = SFTTrainer(SFTConfig(output_dir=str(tmp_path / "b"), packing=True, max_steps=1, eval_every=0),
                    model=HEADS["gemma2 softcap"](), tokenizer=tok, train_records=records)
    _quiet(tr.train)


def test_a_model_passed_in_keeps_its_dtype_with_a_warning(tmp_path):
    from rlhf_fast.models import train_tokenizer
    from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records

    records = synthetic_sft_records(8)
    tok = train_tokenizer([r.prompt + " " + r.completion for r in records], V)
    model = HEADS["cohere logit_scale"]()
    with pytest.warns(UserWarning, match="model_init_kwargs .* not applied to the model passed in"):
        SFTTrainer(SFTConfig(output_dir=str(tmp_path / "a"), max_steps=1, model_init_kwargs={"dtype": "bfloat16"}),
                   model=model, tokenizer=tok, train_records=records)
    assert next(model.parameters()).dtype == torch.float32
