"""Generation against transformers' ``generate``: the tokens and log-probs a user expects.

Sampling filters against transformers' logits warpers (same order), greedy against
``generate`` on every supported family with left-padded prompts of different lengths, every
decode step's logits against a full forward over prefix + generated tokens (finished rows
padded), and the eos ids of the model's ``generation_config`` (a list for chat models).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast.models import sample_texts, tiny_causal_lm, train_tokenizer  # noqa: E402
from rlhf_fast.models.logprobs import default_position_ids  # noqa: E402
from rlhf_fast.ops import reference  # noqa: E402
from rlhf_fast.rollout import HFRolloutEngine, RolloutBatch, SamplingParams  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# different lengths (left padding), one past the C++ op's prefill limit (64 tokens)
PROMPTS = ["hello world", "the cat sat on the", "one", "what is two and three " * 12]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(sample_texts(), 256)


def _responses(batch: RolloutBatch):
    masks = batch.response_mask[:, batch.prompt_length:]
    return [r[m.bool()].tolist() for r, m in zip(batch.response_ids, masks)]


def _hf_generate(model, tok, prompts, **kw):
    """transformers' generate on the same left-padded batch, responses cut after the first of
    the model's eos ids (its generation_config's, as generate uses them)."""
    enc = tok(prompts, padding=True, return_tensors="pt")
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    with torch.no_grad():
        seqs = model.generate(**enc, pad_token_id=tok.pad_token_id, **kw)
    out = []
    for row in seqs[:, enc["input_ids"].shape[1]:].tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        out.append(row[:cut])
    return out


def _hf_warpers(temperature, top_k, top_p, min_p):
    """The warpers transformers' generate builds for these values, in its order
    (GenerationMixin._get_logits_processor)."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    if min_p:
        procs.append(MinPLogitsWarper(min_p))
    return procs


def test_sampling_filters_equal_transformers_warpers():
    """The processed distribution (support and log-probs) is the one transformers' warpers give
    in generate's order temperature → top-k → top-p → min-p, and a sampled token's logp is its
    log-prob there."""
    from rlhf_fast import ops

    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        V = int(torch.randint(5, 300, (1,), generator=g))
        logits = torch.randn(4, V, generator=g) * float(torch.rand(1, generator=g) * 5 + 0.1)
        T = float(torch.rand(1, generator=g) * 1.5 + 0.2)
        k = int(torch.randint(1, V + 3, (1,), generator=g)) if trial % 3 else 0
        p = max(float(torch.rand(1, generator=g)), 0.01) if trial % 2 else 1.0
        mp = float(torch.rand(1, generator=g) * 0.5) if trial % 5 else 0.0
        hf = torch.log_softmax(_hf_warpers(T, k, p, mp)(None, logits.clone()), -1)
        ours = reference.process_logits(logits, temperature=T, top_k=k, top_p=p, min_p=mp)
        assert torch.equal(torch.isinf(hf), torch.isinf(ours)), (trial, T, k, p, mp)
        fin = ~torch.isinf(hf)
        torch.testing.assert_close(ours[fin], hf[fin], rtol=0, atol=1e-5)
        t, lp = ops.sample(logits, temperature=T, top_k=k, top_p=p, min_p=mp,
                           generator=torch.Generator().manual_seed(trial))
        torch.testing.assert_close(lp, hf.gather(1, t[:, None]).squeeze(1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,kv_heads", [("qwen2", 2), ("qwen3", None), ("mistral", 2), ("llama", 2)])
def test_greedy_equals_hf_generate_every_family(tok, family, kv_heads):
    """Greedy is generate's greedy token for token, left-padded prompts of different lengths
    (short ones prefilled by the C++ op, the long one by transformers), behaviour_logp 0."""
    model = tiny_causal_lm(len(tok), family=family, num_kv_heads=kv_heads, seed=3)
    b = HFRolloutEngine(model, tok).greedy(PROMPTS, max_new_tokens=10)
    assert _responses(b) == _hf_generate(model, tok, PROMPTS, do_sample=False, max_new_tokens=10)
    assert (b.behaviour_logp == 0).all()


# the preallocated-KV decoder (sliced steps, C++ op on the CPU), its static (CUDA-graph) steps
# run eagerly, and the generic transformers path
@pytest.mark.parametrize("family,static", [("llama", False), ("qwen3", True), ("gpt2", False)])
def test_every_decode_step_sees_the_logits_of_a_full_forward(tok, family, static, monkeypatch):
    """At every step, the logits the sampler is given for a live row are those of one forward
    over the whole sequence (left-padded prompt + tokens generated so far, positions counting
    attended tokens); rows that finished early hold pad tokens after their stop token, and
    behaviour_logp is the sampled token's log-prob under the processed full-forward logits."""
    from rlhf_fast import ops

    model = tiny_causal_lm(len(tok), family=family, num_kv_heads=2 if static else None, seed=3)
    if static:
        monkeypatch.setattr(HFRolloutEngine, "_decode_plan", lambda self, gathered: (True, False))
    seen = []
    real = ops.sample

    def spy(logits, **kw):
        seen.append(logits.clone())
        return real(logits, **kw)

    monkeypatch.setattr(ops, "sample", spy)
    kw = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02)
    # common stop tokens: rows stop at different steps and the others go on past them
    params = SamplingParams(max_new_tokens=12, n=2, seed=6, stop_token_ids=tuple(range(3, 40)), **kw)
    b = HFRolloutEngine(model, tok).generate(PROMPTS, params)
    P, rm = b.prompt_length, b.response_mask[:, b.prompt_length:]
    lengths = rm.sum(1)
    assert len(set(lengths.tolist())) > 1 and len(seen) == rm.shape[1]
    assert (b.input_ids[:, P:][rm == 0] == tok.pad_token_id).all()
    with torch.no_grad():
        full = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                     position_ids=default_position_ids(b.attention_mask)).logits
    for s, logits in enumerate(seen):
        live = rm[:, s].bool()
        torch.testing.assert_close(logits[live], full[live, P + s - 1], rtol=0, atol=1e-4)
        processed = reference.process_logits(full[:, P + s - 1], **kw)
        lp = processed.gather(1, b.input_ids[:, P + s, None]).squeeze(1)
        torch.testing.assert_close(b.behaviour_logp[live, P + s], lp[live], rtol=0, atol=1e-4)


def test_generation_config_eos_ids_stop_like_hf_generate(tok):
    """A model whose generation_config lists several eos ids (Llama-3 / Qwen2.5 chat models)
    stops on each of them, as generate does — sampling, greedy and beam search — not only on
    the tokenizer's eos; ignore_eos ignores them all."""
    model = tiny_causal_lm(len(tok), seed=3)
    engine = HFRolloutEngine(model, tok)
    free = _responses(engine.greedy(PROMPTS, max_new_tokens=10))
    other = free[0][1]  # a token greedy decoding produces in the first row
    assert other != tok.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, other]
    g = engine.greedy(PROMPTS, max_new_tokens=10)
    assert _responses(g) == _hf_generate(model, tok, PROMPTS, do_sample=False, max_new_tokens=10)
    assert _responses(g)[0] == free[0][:2] and g.finish_reasons[0] == "stop"
    beams = engine.beam_search(PROMPTS, num_beams=3, max_new_tokens=10)
    exp = _hf_generate(model, tok, PROMPTS, do_sample=False, num_beams=3, max_new_tokens=10)
    assert _responses(beams) == exp
    s = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=10, n=4, seed=0))
    for r, reason in zip(_responses(s), s.finish_reasons):
        stops = [j for j, t in enumerate(r) if t in (tok.eos_token_id, other)]
        assert stops == ([len(r) - 1] if reason == "stop" else [])
    ign = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True))
    assert _responses(ign) == free and set(ign.finish_reasons) == {"length"}


@pytest.mark.parametrize("rope_type", ["dynamic", "linear"])
def test_scaled_rope_decode_logits_equal_hf_generate(tok, rope_type, monkeypatch):
    """Every step's logits are generate's on a RoPE-scaled Llama whose sequence outgrows its
    positions: "dynamic" NTK frequencies depend on the length so far (transformers recomputes
    them per forward), so such a model must not run on the decoder's precomputed table;
    "linear" ones do not, and keep the preallocated-KV decoder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlhf_fast import ops
    from rlhf_fast.rollout.llama_decode import _LlamaDecoder

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=32, pad_token_id=0, eos_token_id=1,
                      bos_token_id=2,
                      rope_parameters={"rope_type": rope_type, "factor": 4.0, "rope_theta": 10000.0})

    def build():
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
        with torch.no_grad():
            m.lm_head.weight.mul_(4)
        return m

    prompts = ["hello world the cat sat on the mat", "one"]
    model = build()
    assert _LlamaDecoder.supported(model) == (rope_type != "dynamic")
    seen, real = [], ops.sample
    monkeypatch.setattr(ops, "sample",
                        lambda logits, **kw: (seen.append(logits.clone()), real(logits, **kw))[1])
    # P + 30 > the 32 positions: the dynamic frequencies change during the call
    b = HFRolloutEngine(model, tok).greedy(prompts, max_new_tokens=30, ignore_eos=True)
    enc = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = build().generate(**enc, do_sample=False, max_new_tokens=30, pad_token_id=0, eos_token_id=None,
                               output_logits=True, return_dict_in_generate=True)
    assert b.response_ids.tolist() == out.sequences[:, enc["input_ids"].shape[1]:].tolist()
    assert len(seen) == len(out.logits) == 30
    for ours, theirs in zip(seen, out.logits):
        torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-4)
