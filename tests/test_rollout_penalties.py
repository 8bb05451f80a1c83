"""Sampling penalties (repetition / presence / frequency / no-repeat-n-gram / min_new_tokens)
against transformers' own logits processors and ``generate``, and vLLM's formula for the
presence / frequency penalties (which transformers does not have)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

from collections import Counter  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast import ops  # noqa: E402
from rlhf_fast.models import sample_texts, tiny_causal_lm, train_tokenizer  # noqa: E402
from rlhf_fast.models.logprobs import default_position_ids  # noqa: E402
from rlhf_fast.rollout import HFRolloutEngine, SamplingParams  # noqa: E402
from rlhf_fast.rollout.penalties import Penalties  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# the parity tests' prompts (left padding, one past the C++ op's prefill limit) and helpers
from tests.test_rollout_hf_parity import PROMPTS, _hf_generate, _responses  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(sample_texts(), 256)


def _eos_prone(tok, family, **kw):
    """A tiny model whose generation_config also ends on a token greedy decoding emits early
    in the first row, so min_new_tokens has eos ids to hold back."""
    model = tiny_causal_lm(len(tok), family=family, seed=3, **kw)
    free = _responses(HFRolloutEngine(model, tok).greedy(PROMPTS, max_new_tokens=6))
    model.generation_config.eos_token_id = [tok.eos_token_id, free[0][2]]
    return model


COMBOS = [dict(repetition_penalty=1.6), dict(repetition_penalty=0.6), dict(no_repeat_ngram_size=2),
          dict(no_repeat_ngram_size=1), dict(min_new_tokens=6),
          dict(repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=4)]


# the preallocated-KV decoder (C++ op), its static steps run eagerly, and the generic path
@pytest.mark.parametrize("family,static", [("llama", False), ("qwen3", True), ("gpt2", False)])
def test_greedy_with_penalties_equals_hf_generate(tok, family, static, monkeypatch):
    """Greedy decoding with each penalty, and a combination, is transformers'
    ``generate(do_sample=False, repetition_penalty=..., no_repeat_ngram_size=...,
    min_new_tokens=...)`` token for token on left-padded prompts; each setting changes the
    plain greedy answer (so the comparison is not vacuous) but the tiny GPT-2's bigram ban."""
    model = _eos_prone(tok, family, num_kv_heads=2 if static else None)
    if static:
        monkeypatch.setattr(HFRolloutEngine, "_decode_plan", lambda self, gathered: (True, False))
    engine = HFRolloutEngine(model, tok)
    plain = _responses(engine.greedy(PROMPTS, max_new_tokens=16))
    for kw in COMBOS:
        b = engine.greedy(PROMPTS, max_new_tokens=16, **kw)
        got = _responses(b)
        assert got == _hf_generate(model, tok, PROMPTS, do_sample=False, max_new_tokens=16, **kw), kw
        if not (family == "gpt2" and kw == {"no_repeat_ngram_size": 2}):  # its greedy text repeats no bigram
            assert got != plain, kw
        assert (b.behaviour_logp == 0).all()


def _hf_processors(enc_mask, P, stop_ids, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0):
    """The processors generate builds for these values, in its order
    (GenerationMixin._get_logits_processor), the repetition penalty skipping the left padding
    as generate tells it to."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor,
                                                        NoRepeatNGramLogitsProcessor,
                                                        RepetitionPenaltyLogitsProcessor)

    procs = LogitsProcessorList()
    if repetition_penalty != 1.0:
        pad_lengths = (enc_mask != 0).int().argmax(dim=1)
        procs.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty), prompt_ignore_length=pad_lengths))
    if no_repeat_ngram_size:
        procs.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
    if min_new_tokens:
        procs.append(MinNewTokensLengthLogitsProcessor(P, min_new_tokens, stop_ids))
    return procs


def _run_spied(model, tok, params, monkeypatch):
    """Generate, recording the logits the sampler is given at each step; returns the batch,
    the recorded logits and a full forward's logits over the batch's sequences."""
    seen, real = [], ops.sample
    monkeypatch.setattr(ops, "sample", lambda logits, **kw: (seen.append(logits.clone()), real(logits, **kw))[1])
    b = HFRolloutEngine(model, tok).generate(PROMPTS, params)
    with torch.no_grad():
        full = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                     position_ids=default_position_ids(b.attention_mask)).logits
    assert len(seen) == b.input_ids.shape[1] - b.prompt_length
    return b, seen, full


@pytest.mark.parametrize("pen", [dict(repetition_penalty=1.4), dict(no_repeat_ngram_size=2),
                                 dict(repetition_penalty=0.8, no_repeat_ngram_size=3, min_new_tokens=5)])
def test_processed_distribution_equals_hf_logits_processors(tok, pen, monkeypatch):
    """At every step of a sampled run (n = 2, left padding, stop tokens ending rows at
    different steps), the logits handed to the sampler are transformers' processors applied to
    the full forward's logits of the sequence so far, and behaviour_logp is the drawn token's
    log-prob after the warpers on top: the processed distribution ``generate(do_sample=True,
    ...)`` samples from."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    model = tiny_causal_lm(len(tok), seed=4)
    stop = tuple(range(3, 30))
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, max_new_tokens=10, n=2, seed=1,
                            stop_token_ids=stop, **pen)
    b, seen, full = _run_spied(model, tok, params, monkeypatch)
    P, rm = b.prompt_length, b.response_mask[:, b.prompt_length:]
    assert len(set(rm.sum(1).tolist())) > 1  # rows stopped at different steps
    stop_ids = torch.tensor(sorted(set(stop) | {tok.eos_token_id}))
    procs = _hf_processors(b.attention_mask[:, :P], P, stop_ids, **pen)
    warp = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(40), TopPLogitsWarper(0.95)])
    for s, logits in enumerate(seen):
        live = rm[:, s].bool()
        hf = procs(b.input_ids[:, :P + s], full[:, P + s - 1].clone())
        assert torch.equal(torch.isinf(logits[live]), torch.isinf(hf[live])), s
        fin = ~torch.isinf(hf[live])
        torch.testing.assert_close(logits[live][fin], hf[live][fin], rtol=0, atol=1e-4)
        lp = torch.log_softmax(warp(None, hf.clone()), -1).gather(1, b.input_ids[:, P + s, None]).squeeze(1)
        torch.testing.assert_close(b.behaviour_logp[live, P + s], lp[live], rtol=0, atol=1e-4)


def test_presence_frequency_penalties_follow_the_formula(tok, monkeypatch):
    """presence / frequency (vLLM / OpenAI: logit − frequency·count − presence·[count > 0] over
    the generated tokens only) with the repetition penalty (prompt + response, padding not
    counted) first, against the formula on a full forward, row by row."""
    model = tiny_causal_lm(len(tok), seed=5)
    # a negative frequency penalty makes repeats likely, so counts above 1 are exercised
    rep, freq, pres = 1.2, -1.5, 0.5
    params = SamplingParams(temperature=1.0, max_new_tokens=12, n=2, seed=3, repetition_penalty=rep,
                            frequency_penalty=freq, presence_penalty=pres)
    b, seen, full = _run_spied(model, tok, params, monkeypatch)
    P, rm = b.prompt_length, b.response_mask[:, b.prompt_length:]
    V = full.shape[-1]
    for i in range(b.batch_size):
        prompt = b.input_ids[i, :P][b.attention_mask[i, :P].bool()].tolist()
        for s in range(int(rm[i].sum())):
            gen = b.input_ids[i, P:P + s].tolist()
            counts = Counter(gen)
            want = full[i, P + s - 1].clone()
            for t in range(V):
                if t in counts or t in prompt:
                    want[t] = want[t] * rep if want[t] < 0 else want[t] / rep
                want[t] -= freq * counts.get(t, 0) + pres * (t in counts)
            torch.testing.assert_close(seen[s][i], want, rtol=0, atol=1e-4)
    # a token repeated in the responses: the count, not only the presence, was exercised
    assert any(max(Counter(r).values()) > 1 for r in _responses(b))


def test_penalties_off_allocate_nothing_and_change_nothing(tok, monkeypatch):
    """With every penalty at its default no state is built (the sampler gets the model's
    logits as before); defaults given explicitly are the same call."""
    model = tiny_causal_lm(len(tok), seed=6)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, n=2, seed=2)
    a = HFRolloutEngine(model, tok).generate(PROMPTS, params)

    def boom(*a, **k):
        raise AssertionError("penalty state built with every penalty off")

    monkeypatch.setattr(Penalties, "__init__", boom)
    explicit = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, n=2, seed=2, repetition_penalty=1.0,
                              presence_penalty=0.0, frequency_penalty=0.0, no_repeat_ngram_size=0, min_new_tokens=0)
    c = HFRolloutEngine(model, tok).generate(PROMPTS, explicit)
    assert torch.equal(a.input_ids, c.input_ids) and torch.equal(a.behaviour_logp, c.behaviour_logp)
    assert not Penalties.active(explicit)


def test_per_sample_seeds_with_penalties_independent_of_the_batch(tok):
    """Per-row penalty state: a row seeded with s draws the same penalised response alone, with
    other prompts (other padding) or in another order; n > 1 rows of a prompt differ."""
    model = tiny_causal_lm(len(tok), seed=7)
    engine = HFRolloutEngine(model, tok)
    kw = dict(temperature=1.0, max_new_tokens=8, n=2, repetition_penalty=1.5, frequency_penalty=0.5,
              no_repeat_ngram_size=2, min_new_tokens=3)
    seeds = {p: (10 + 2 * i, 11 + 2 * i) for i, p in enumerate(PROMPTS)}

    def run(prompts):
        b = engine.generate(prompts, SamplingParams(sample_seeds=[s for p in prompts for s in seeds[p]], **kw))
        keys = [(p, k) for p in prompts for k in range(2)]
        return dict(zip(keys, zip(_responses(b), b.behaviour_logp[:, b.prompt_length:].unbind(0))))

    full = run(PROMPTS)
    parts = {**run(PROMPTS[:1]), **run(PROMPTS[3:0:-1])}
    for key in full:
        assert full[key][0] == parts[key][0], key
        n = len(full[key][0])
        torch.testing.assert_close(full[key][1][:n], parts[key][1][:n], rtol=0, atol=1e-5)
    assert any(full[(p, 0)][0] != full[(p, 1)][0] for p in PROMPTS)


def test_min_new_tokens_holds_back_stop_ids(tok):
    """No row ends on an eos / stop id before min_new_tokens tokens, even when the stop ids are
    most of the vocabulary; ignore_eos with no stop ids leaves nothing to hold back."""
    model = tiny_causal_lm(len(tok), seed=8)
    engine = HFRolloutEngine(model, tok)
    stop = tuple(range(3, 150))
    short = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, n=2, seed=0, stop_token_ids=stop))
    assert min(len(r) for r in _responses(short)) < 4
    held = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, n=2, seed=0, stop_token_ids=stop,
                                                   min_new_tokens=4))
    for r in _responses(held):
        assert len(r) >= 5 and not set(r[:4]) & (set(stop) | {tok.eos_token_id})
    assert set(held.finish_reasons) == {"stop"}


def test_no_repeat_ngram_never_repeats_and_ignores_padding(tok):
    """Sampled responses hold no n-gram twice in prompt + response; with n = 1 the pad id of a
    left-padded prompt is not banned (transformers bans it: its padding counts as tokens)."""
    model = tiny_causal_lm(len(tok), seed=9)
    engine = HFRolloutEngine(model, tok)
    b = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, n=3, seed=4, no_repeat_ngram_size=2,
                                                ignore_eos=True))
    P = b.prompt_length
    for i in range(b.batch_size):
        seq = b.input_ids[i][b.attention_mask[i].bool()].tolist()
        first = int(b.attention_mask[i, :P].sum())  # where the response starts in seq
        for j in range(first, len(seq)):  # no generated token completes a bigram seen before it
            assert (seq[j - 1], seq[j]) not in set(zip(seq[:j - 1], seq[1:j])), (i, j)
    # the padding of the short prompts: not seen tokens for the penalty state
    pen = Penalties.build(SamplingParams(no_repeat_ngram_size=1, repetition_penalty=2.0), b.input_ids[:4, :P],
                          b.attention_mask[:4, :P], 2, 200, torch.tensor([1]))
    x = pen.apply(torch.ones(4, 200), 0)
    padded = ~b.attention_mask[:4, :P].bool().all(1)
    assert padded.any() and (x[padded, tok.pad_token_id] == 1).all()


def test_sampling_params_validate_penalties():
    for key, bad in (("repetition_penalty", 0.0), ("repetition_penalty", float("inf")), ("repetition_penalty", True),
                     ("presence_penalty", 2.5), ("frequency_penalty", float("nan")), ("frequency_penalty", "1"),
                     ("no_repeat_ngram_size", -1), ("no_repeat_ngram_size", 2.0), ("min_new_tokens", -3),
                     ("min_new_tokens", False)):
        with pytest.raises(ValueError, match=key):
            SamplingParams(**{key: bad})
    p = SamplingParams(repetition_penalty=1.1, presence_penalty=-2, frequency_penalty=2.0, no_repeat_ngram_size=3,
                       min_new_tokens=4)
    assert Penalties.active(p) and not Penalties.active(SamplingParams())
