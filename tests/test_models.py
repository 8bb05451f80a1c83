import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; fail fast instead of retrying

import pytest
import torch

from rlhf_fast.models import FAMILIES, sample_texts, tiny_causal_lm, tiny_reward_model, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(sample_texts(), 256)


def test_tokenizer_roundtrip_and_specials(tok):
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token) == ("<pad>", "<eos>", "<bos>", "<unk>")
    text = "hello world the cat sat"
    assert tok.decode(tok(text)["input_ids"]) == text
    enc = tok(["a", "hello world the cat"], padding=True, return_tensors="pt")
    assert enc["attention_mask"][0, 0] == 0 and enc["input_ids"][0, 0] == tok.pad_token_id  # left padding
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("assistant: ") and "user: hi" in chat
    right = train_tokenizer(sample_texts(), 256, padding_side="right")
    enc = right(["a", "hello world"], padding=True, return_tensors="pt")
    assert enc["attention_mask"][0, -1] == 0


def test_tokenizer_full_byte_alphabet():
    tok = train_tokenizer(sample_texts(), 300)
    assert tok.decode(tok("héllo ✓")["input_ids"]) == "héllo ✓"


def test_tokenizer_bad_input():
    with pytest.raises(TypeError, match="texts"):
        train_tokenizer("abc")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], 3)
    with pytest.raises(ValueError, match="padding_side"):
        train_tokenizer(["abc"], padding_side="middle")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_causal_lm_families(tok, family):
    m = tiny_causal_lm(len(tok), family=family, seed=1)
    enc = tok(["hello world", "the cat"], padding=True, return_tensors="pt")
    out = m(**enc)
    assert out.logits.shape == (2, enc["input_ids"].shape[1], len(tok))
    m2 = tiny_causal_lm(len(tok), family=family, seed=1)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_tiny_causal_lm_bad_family():
    with pytest.raises(ValueError, match="family"):
        tiny_causal_lm(100, family="bert")


def test_tiny_reward_model(tok):
    rm = tiny_reward_model(len(tok))
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    enc = tok(["hello world", "the cat"], padding=True, return_tensors="pt")
    assert rm(**enc).logits.shape == (2, 1)


# --------------------------------------------------------------------------- log-probs

import warnings  # noqa: E402

from rlhf_fast.models import logprobs as lp  # noqa: E402
from rlhf_fast.ops import reference  # noqa: E402


def _batch(tok, texts=("hello world the cat sat on the mat", "a dog", "one two three four five")):
    enc = tok(list(texts), padding=True, return_tensors="pt")
    ids, am = enc["input_ids"], enc["attention_mask"]
    # responses: the last 3 tokens of each row
    resp = torch.zeros_like(am)
    resp[:, -3:] = 1
    return ids, am, resp


def _logits_path(model, ids, am, resp, temperature=1.0):
    """The oracle: log_softmax of the model's real logits, shifted, masked."""
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=am, position_ids=pos).logits.float() / temperature
    logp_all = torch.log_softmax(logits[:, :-1], -1)
    got = logp_all.gather(-1, ids[:, 1:, None])[..., 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    m = (am.bool() & resp.bool())[:, 1:] & am[:, :-1].bool()  # a left-padded row's first token has no context
    z = torch.zeros(ids.shape[0], 1)
    return torch.cat([z, got * m], 1), torch.cat([z, ent * m], 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_logprobs_equals_logits_path(tok, family):
    model = tiny_causal_lm(len(tok), family=family, seed=2)
    ids, am, resp = _batch(tok)
    with torch.no_grad():
        logp, ent = lp.sequence_logprobs(model, ids, am, response_mask=resp, temperature=0.7, return_entropy=True)
        exp_lp, exp_ent = _logits_path(model, ids, am, resp, 0.7)
    assert logp.dtype == torch.float32 and logp.shape == ids.shape
    torch.testing.assert_close(logp, exp_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, exp_ent, rtol=1e-5, atol=1e-5)
    # without a response mask every attended position after the first is computed
    with torch.no_grad():
        full = lp.sequence_logprobs(model, ids, am, chunk_size=3)
        exp_full, _ = _logits_path(model, ids, am, torch.ones_like(am))
    torch.testing.assert_close(full, exp_full, rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_gradients_match(tok):
    model = tiny_causal_lm(len(tok), seed=3)
    ids, am, resp = _batch(tok)
    w = torch.randn(ids.shape)
    a = (lp.sequence_logprobs(model, ids, am, response_mask=resp, chunk_size=2) * w).sum()
    ga = torch.autograd.grad(a, list(model.parameters()))
    b = (_logits_path(model, ids, am, resp)[0] * w).sum()
    gb = torch.autograd.grad(b, list(model.parameters()))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", sorted(lp.PACKED_TESTED))
def test_packed_equals_padded(family):
    tok = train_tokenizer(sample_texts(), 256, padding_side="right")
    model = tiny_causal_lm(len(tok), family=family, seed=4)
    for side in ("left", "right"):
        tok.padding_side = side
        ids, am, resp = _batch(tok)
        resp = am.clone()
        with torch.no_grad():
            a, ea = lp.sequence_logprobs(model, ids, am, response_mask=resp, return_entropy=True)
            b, eb = lp.sequence_logprobs(model, ids, am, response_mask=resp, return_entropy=True, packed=True)
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ea, eb, rtol=1e-5, atol=1e-5)


def test_policy_loss_matches_composition(tok):
    model = tiny_causal_lm(len(tok), seed=5)
    ids, am, resp = _batch(tok)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        base = lp.sequence_logprobs(model, ids, am, response_mask=resp)
    old = base + 0.1 * torch.randn(ids.shape, generator=g)
    ref = base + 0.1 * torch.randn(ids.shape, generator=g)
    adv = torch.randn(ids.shape, generator=g)
    kw = dict(kl_coef=0.1, entropy_coef=0.01, clip_low=0.2, agg="seq-mean-token-mean")
    loss, stats = lp.policy_loss(model, ids, am, resp, old, adv, ref_logp=ref, **kw)
    gl = torch.autograd.grad(loss, list(model.parameters()))
    logp, ent = _logits_path(model, ids, am, resp)
    m = resp.bool() & am.bool()
    m[:, 0] = False
    m[:, 1:] &= am[:, :-1].bool()
    exp, _ = reference.policy_loss_from_logp(logp, ent, old, adv, m, ref_logp=ref, **kw)
    ge = torch.autograd.grad(exp, list(model.parameters()))
    torch.testing.assert_close(loss, exp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["logp"], logp.detach() * m, rtol=1e-5, atol=1e-5)
    for x, y in zip(gl, ge):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def _gemma2(vocab):
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=16, final_logit_softcapping=5.0,
                       pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_softcapped_head_falls_back_with_warning(tok):
    model = _gemma2(len(tok))
    assert "final_logit_softcapping" in lp.unfusable_reason(model)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        lp.lm_head_params(model)
    ids, am, resp = _batch(tok)
    lp._warn_unfused.cache_clear()
    with pytest.warns(RuntimeWarning, match="final_logit_softcapping"):
        with torch.no_grad():
            got = lp.sequence_logprobs(model, ids, am, response_mask=resp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one-time: the second call is silent
        with torch.no_grad():
            lp.sequence_logprobs(model, ids, am, response_mask=resp)
            exp, _ = _logits_path(model, ids, am, resp)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    # and the (capped) head really differs from the plain matmul
    with torch.no_grad():
        h = lp.hidden_states(model, ids, am)
        plain = torch.log_softmax((h @ model.lm_head.weight.t()).float(), -1)
    assert not torch.allclose(plain[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * resp[:, 1:], exp[:, 1:])


def test_fused_path_never_allocates_btv():
    from torch.profiler import ProfilerActivity, profile

    V, B, T = 65536, 2, 48
    model = tiny_causal_lm(V, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    btv = B * T * V * 4

    def peak_alloc(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.no_grad():
                fn()
        return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)

    fused = peak_alloc(lambda: lp.sequence_logprobs(model, ids, am, chunk_size=8))
    plain = peak_alloc(lambda: torch.log_softmax(model(input_ids=ids, attention_mask=am).logits.float(), -1))
    assert plain >= btv * 0.9  # the logits path holds [B, T, V]
    assert fused < btv / 8, (fused, btv)


def test_sequence_logprobs_bad_input(tok):
    model = tiny_causal_lm(len(tok))
    ids, am, resp = _batch(tok)
    with pytest.raises(ValueError, match="response_mask"):
        lp.sequence_logprobs(model, ids, am, response_mask=resp[:, 1:])
    with pytest.raises(ValueError, match="temperature"):
        lp.sequence_logprobs(model, ids, am, temperature=0)
    with pytest.raises(ValueError, match="input_ids"):
        lp.sequence_logprobs(model, ids[0], am)


# --------------------------------------------------------------------------- loading

from rlhf_fast.models import (  # noqa: E402
    AdapterDisabledReference,
    ValueModel,
    load_policy,
    load_reward_model,
    make_reference,
    reward_scores,
)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_policy_save_load_roundtrip(tok, family, tmp_path):
    model = tiny_causal_lm(len(tok), family=family, seed=6)
    model.save_pretrained(tmp_path)
    loaded = load_policy(str(tmp_path))
    ids, am, resp = _batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(lp.sequence_logprobs(loaded, ids, am), lp.sequence_logprobs(model, ids, am))
    bf = load_policy(model, dtype=torch.bfloat16, gradient_checkpointing=True)
    assert bf.dtype == torch.bfloat16 and any(getattr(m, "gradient_checkpointing", False) for m in bf.modules())


def test_load_policy_bad_input(tmp_path):
    with pytest.raises(ValueError, match="model_or_path"):
        load_policy(str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="model_or_path"):
        load_policy(3)
    with pytest.raises(TypeError, match="dtype"):
        load_policy(tiny_causal_lm(50), dtype="fp16")


def test_make_reference_is_frozen_copy(tok):
    policy = tiny_causal_lm(len(tok), seed=7)
    ref = make_reference(policy)
    assert ref is not policy and not any(p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)
    assert not torch.equal(next(policy.parameters()), next(ref.parameters()))


def test_lora_policy_reference_and_roundtrip(tok, tmp_path):
    base = tiny_causal_lm(len(tok), seed=8)
    ids, am, resp = _batch(tok)
    with torch.no_grad():
        base_lp = lp.sequence_logprobs(base, ids, am)
        base_logits = base(input_ids=ids, attention_mask=am).logits
    policy = load_policy(base, lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    # move the adapters off zero so the policy differs from its base
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ref = make_reference(policy)
    assert isinstance(ref, AdapterDisabledReference)
    with torch.no_grad():
        pol_lp = lp.sequence_logprobs(policy, ids, am)
    ref_lp = lp.sequence_logprobs(ref, ids, am)
    assert not ref_lp.requires_grad
    torch.testing.assert_close(ref_lp, base_lp)  # adapters disabled = the base model
    assert (pol_lp - base_lp).abs().max() > 1e-3
    torch.testing.assert_close(ref(input_ids=ids, attention_mask=am).logits, base_logits)
    # gradients reach only the adapters through the fused path
    loss = -lp.sequence_logprobs(policy, ids, am).sum()
    loss.backward()
    assert all(p.grad is not None for n, p in policy.named_parameters() if p.requires_grad)
    policy.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    base_copy = tiny_causal_lm(len(tok), seed=8)  # a fresh base (the first one now carries the adapters)
    base_copy.save_pretrained(tmp_path / "base")
    reloaded = load_policy(str(tmp_path / "base"), lora=str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(lp.sequence_logprobs(reloaded, ids, am), pol_lp)
    assert any(p.requires_grad for p in reloaded.parameters())
    # an adapter saved from a policy whose base came from disk reloads from its directory alone
    reloaded.save_pretrained(tmp_path / "adapter2")
    again = load_policy(str(tmp_path / "adapter2"))
    with torch.no_grad():
        torch.testing.assert_close(lp.sequence_logprobs(again, ids, am), pol_lp)
    # a critic from a LoRA policy holds the base weights and no adapter modules
    vm = ValueModel(policy)
    assert not any("lora" in n for n, _ in vm.named_parameters())
    assert any("lora" in n for n, _ in policy.named_parameters())  # the policy keeps its adapters
    with torch.no_grad():
        torch.testing.assert_close(vm.backbone(input_ids=ids).last_hidden_state,
                                   lp.backbone(base_copy)(input_ids=ids).last_hidden_state)


def test_value_model_roundtrip_and_padding(tok, tmp_path):
    policy = tiny_causal_lm(len(tok), seed=9)
    vm = ValueModel(policy)
    assert vm.backbone is not policy.model
    ids, am, _ = _batch(tok)
    v = vm(ids, am)
    assert v.shape == ids.shape and v.dtype == torch.float32
    v.sum().backward()
    assert vm.value_head.weight.grad is not None and next(vm.backbone.parameters()).grad is not None
    # a left-padded row has the values of the same sequence unpadded
    row = 1
    real = am[row].bool()
    single = vm(ids[row:row + 1, real], am[row:row + 1, real])
    torch.testing.assert_close(v[row, real], single[0], rtol=1e-5, atol=1e-5)
    vm.save_pretrained(tmp_path)
    vm2 = ValueModel.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(vm2(ids, am), vm(ids, am))
    with pytest.raises(ValueError, match="ValueModel"):
        ValueModel.from_pretrained(tmp_path / "nope")


def test_value_model_from_reward_model_starts_at_its_score(tok):
    rm = tiny_reward_model(len(tok), seed=10)
    vm = ValueModel(rm)
    ids, am, _ = _batch(tok)
    with torch.no_grad():
        v = vm(ids, am)
        s = reward_scores(rm, ids, am)
    last = am.shape[1] - 1  # left padding: the last column is every row's last token
    torch.testing.assert_close(v[:, last], s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_scores_and_roundtrip(side, tmp_path):
    tok = train_tokenizer(sample_texts(), 256, padding_side=side)
    rm = tiny_reward_model(len(tok), seed=11)
    texts = ["hello world the cat sat", "a dog", "one two three"]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = reward_scores(rm, enc["input_ids"], enc["attention_mask"])
        # oracle: each text scored alone (no padding), by the model's own forward
        alone = torch.stack([rm(**tok([t], return_tensors="pt")).logits[0, 0] for t in texts])
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
    rm.save_pretrained(tmp_path)
    rm2 = load_reward_model(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(reward_scores(rm2, enc["input_ids"], enc["attention_mask"]), got)
    with pytest.raises(ValueError, match="num_labels"):
        bad = tiny_reward_model(len(tok), hidden_size=16, num_layers=1, num_heads=2)
        bad.config.num_labels = 2
        load_reward_model(bad)


def test_softcapped_policy_loss_fallback_matches_composition(tok):
    model = _gemma2(len(tok))
    ids, am, resp = _batch(tok)
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(ids.shape, generator=g)
    adv = torch.randn(ids.shape, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loss, stats = lp.policy_loss(model, ids, am, resp, old, adv, kl_coef=0.0, entropy_coef=0.01)
    gl = torch.autograd.grad(loss, [model.lm_head.weight])[0]
    logp, ent = _logits_path(model, ids, am, resp)
    m = resp.bool() & am.bool()
    m[:, 0] = False
    m[:, 1:] &= am[:, :-1].bool()
    exp, _ = reference.policy_loss_from_logp(logp, ent, old, adv, m, entropy_coef=0.01)
    ge = torch.autograd.grad(exp, [model.lm_head.weight])[0]
    torch.testing.assert_close(loss, exp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gl, ge, rtol=1e-4, atol=1e-6)


def test_ids_out_of_vocab_empty_batches_and_long_inputs_are_named(tok):
    """Probe: ids outside the vocabulary or float ids, inputs past GPT-2's position table and
    1-D / mismatched inputs to ValueModel are named (not IndexError / RuntimeError in torch);
    empty batches give zero log-probs (packed too, with no attended token)."""
    from rlhf_fast.models import ValueModel, make_reference, policy_loss, reward_scores, sequence_logprobs

    m = tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, num_heads=2)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    am, rm, z = torch.ones_like(ids), torch.tensor([[0, 0, 1, 1]] * 2), torch.zeros(2, 4)
    V = len(tok)
    for bad in (ids + V, ids - 100):
        with pytest.raises(ValueError, match=rf"input_ids must be token ids in \[0, {V}\)"):
            sequence_logprobs(m, bad, am, response_mask=rm)
        with pytest.raises(ValueError, match="input_ids must be token ids"):
            policy_loss(m, bad, am, rm, z, z)
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        sequence_logprobs(m, ids.float(), am)
    rmod = tiny_reward_model(len(tok), hidden_size=32, num_layers=2, num_heads=2)
    with pytest.raises(ValueError, match="input_ids must be token ids"):
        reward_scores(rmod, ids + V, am)
    with pytest.raises(ValueError, match="at least one row and one column"):
        reward_scores(rmod, ids[:0], am[:0])
    assert sequence_logprobs(m, ids[:0], am[:0]).shape == (0, 4)
    lp, ent = sequence_logprobs(m, ids[:, :0], am[:, :0], return_entropy=True)
    assert lp.shape == ent.shape == (2, 0)
    assert not sequence_logprobs(m, ids, torch.zeros_like(am), response_mask=rm, packed=True).any()
    g = tiny_causal_lm(len(tok), family="gpt2", hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=8)
    with pytest.raises(ValueError, match="9 columns, more than the 8 positions"):
        sequence_logprobs(g, torch.randint(4, 50, (1, 9)))
    v = ValueModel(m)
    with pytest.raises(ValueError, match="input_ids must be token ids"):
        v(ids + V, am)
    with pytest.raises(ValueError, match=r"input_ids must be a \[B, T\] tensor"):
        v(ids[0], am[0])
    with pytest.raises(ValueError, match="attention_mask must be None or a tensor of shape"):
        v(ids, am[:, :2])
    with pytest.raises(TypeError, match="policy must be a torch.nn.Module"):
        make_reference(None)


def test_tiny_builders_check_sizes_and_dtype():
    """Probe: a huge vocab_size aborted the process inside the tokenizers library (Rust panic);
    a dtype string failed as 'Invalid device string'; sample_texts(-1) returned []."""
    with pytest.raises(ValueError, match="vocab_size must be an int in"):
        train_tokenizer(["a b"], 10**12)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        tiny_causal_lm(50, dtype="float16")
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        sample_texts(-1)


def test_reward_scores_gradients_equal_the_models_own_forward():
    """reward_scores computes only each row's last state (``select``): the scores and the
    gradients of every parameter equal those of the model's own forward at that token."""
    tok = train_tokenizer(sample_texts(), 256, padding_side="right")
    rm = tiny_reward_model(len(tok), seed=12)
    enc = tok(["hello world the cat sat", "a dog", "one two three"], padding=True, return_tensors="pt")
    ours = reward_scores(rm, enc["input_ids"], enc["attention_mask"])
    g_ours = torch.autograd.grad(ours.square().sum(), list(rm.parameters()), allow_unused=True)
    logits = rm(**enc).logits[:, 0]  # transformers picks each row's last non-pad token
    torch.testing.assert_close(ours, logits, rtol=1e-5, atol=1e-5)
    g_theirs = torch.autograd.grad(logits.square().sum(), list(rm.parameters()), allow_unused=True)
    for (name, _), a, b in zip(rm.named_parameters(), g_ours, g_theirs):
        if a is None or b is None:
            assert a is None and b is None or float((a if a is not None else b).abs().max()) == 0, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
