"""Second review of generation (rlhf_fast/rollout/hf_engine.py, llama_decode.py, penalties.py,
generate_cli.py, the ``sample`` op) against transformers' ``generate``: one test per defect found.

Checked and found right, not re-tested here (see the report): greedy and beam search on ~40
attention / state-space / hybrid families with left padding (biases, head_dim, llama3 / yarn /
linear RoPE, tied embeddings, bf16, static steps, the C++ op beyond its stacking size), beam
search with several eos ids, length penalties of both signs and every early_stopping, stop
strings against the decoded text, the cpp and torch samplers on ties, tiny / huge temperatures
and -inf rows."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast.models import hidden_states, sample_texts, tiny_causal_lm, train_tokenizer  # noqa: E402
from rlhf_fast.rollout import HFRolloutEngine, RolloutBatch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["hello world", "the cat sat on the", "one", "what is two and three"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(sample_texts(), 256)


def _responses(batch: RolloutBatch):
    masks = batch.response_mask[:, batch.prompt_length:]
    return [r[m.bool()].tolist() for r, m in zip(batch.response_ids, masks)]


def _hf_generate(model, tok, prompts, eos_ids, **kw):
    """transformers' generate on the same left-padded batch, each response cut after its first
    eos (any of ``eos_ids``)."""
    enc = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        seqs = model.generate(**enc, pad_token_id=tok.pad_token_id, **kw)
    out = []
    for row in seqs[:, enc["input_ids"].shape[1]:].tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
        out.append(row[:cut])
    return out


def _eos_prone(tok, seed, scale):
    """A tiny Llama whose eos logit is near the top for typical states (some greedy answers
    end early, others do not)."""
    m = tiny_causal_lm(len(tok), seed=seed)
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = hidden_states(m, enc["input_ids"], enc["attention_mask"])
        d = h[enc["attention_mask"].bool()].mean(0)
        m.lm_head.weight[tok.eos_token_id] = d / d.norm() ** 2 * scale
    return m


# ------------------------------------------------------------------ beam search


@pytest.mark.parametrize("seed,scale", [(1, 1.5), (4, 1.0)])
def test_one_beam_is_generates_greedy_search(tok, seed, scale):
    """``generate(num_beams=1)`` is greedy search whatever early_stopping / length_penalty say
    (they are beam-search options); beam_search(num_beams=1) with early_stopping="never" kept
    its one beam going past an eos that greedy stops at, and returned a longer answer."""
    model = _eos_prone(tok, seed, scale)
    engine = HFRolloutEngine(model, tok)
    for kw in ({"early_stopping": "never", "length_penalty": 1.0},
               {"early_stopping": True, "length_penalty": 2.0},
               {"early_stopping": False, "length_penalty": -1.0}):
        got = _responses(engine.beam_search(PROMPTS, num_beams=1, max_new_tokens=10, **kw))
        exp = _hf_generate(model, tok, PROMPTS, [tok.eos_token_id], do_sample=False, num_beams=1,
                           max_new_tokens=10, eos_token_id=tok.eos_token_id, **kw)
        assert got == exp, kw
        assert got == _responses(engine.greedy(PROMPTS, max_new_tokens=10)), kw


def test_early_stopping_numpy_bool_is_a_bool_and_other_values_are_refused(tok):
    """``early_stopping`` is compared with ``is True``, so a numpy bool (a value read from an
    array or a config computed with numpy, which the engine's other arguments accept) passed
    the check (``np.True_ in (True, False, "never")``) and silently ran as False; so did 1.
    A numpy bool is read as the bool, anything but True / False / "never" is refused."""
    np = pytest.importorskip("numpy")
    engine = HFRolloutEngine(_eos_prone(tok, 1, 1.0), tok)
    kw = dict(num_beams=2, max_new_tokens=10, length_penalty=2.0)
    on = _responses(engine.beam_search(PROMPTS, early_stopping=True, **kw))
    assert on != _responses(engine.beam_search(PROMPTS, early_stopping=False, **kw))  # the flag matters here
    assert _responses(engine.beam_search(PROMPTS, early_stopping=np.bool_(True), **kw)) == on
    for bad in (1, 0, 1.0, "true", None):
        with pytest.raises(ValueError, match="early_stopping"):
            engine.beam_search(PROMPTS, early_stopping=bad, **kw)


# ------------------------------------------------------------------ the preallocated-KV decoder


class LlamaForCausalLM(__import__("transformers").LlamaForCausalLM):
    """A same-named class outside transformers (as remote code defines one) whose forward
    computes something else."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = -out.logits
        return out


def _replace_forward(module, wrap):
    """Set ``module.forward`` on the instance (as SelfExtend / attention-sink style patches do):
    ``wrap(class_forward, self, *args, **kwargs)``."""
    import types

    cls_forward = type(module).forward
    module.forward = types.MethodType(lambda self, *a, **kw: wrap(cls_forward, self, *a, **kw), module)


def _scaled_attention(f, self, *a, **kw):
    out, weights = f(self, *a, **kw)
    return out * 4.0, weights


def _flipped_backbone(f, self, *a, **kw):
    out = f(self, *a, **kw)
    out.last_hidden_state = out.last_hidden_state.flip(-1)
    return out


def _negated_logits(f, self, *a, **kw):
    out = f(self, *a, **kw)
    out.logits = -out.logits
    return out


@pytest.mark.parametrize("where", ["attention", "decoder_layer", "v_proj", "embed_tokens", "lm_head",
                                   "backbone", "causal_lm", "same_named_class"])
def test_replaced_forwards_are_honoured(tok, where):
    """A forward replaced on a module instance (attention patches such as SelfExtend, steering
    by method patching), or a same-named LlamaForCausalLM that is not transformers' (remote
    code), changes what ``generate`` produces; the preallocated-KV decoder, which computes the
    layers from their weights, ignored them (the training forward, models/llama_forward.py,
    already refuses such modules): the engine must give generate's tokens."""
    model = tiny_causal_lm(len(tok), seed=3)
    plain = _hf_generate(model, tok, PROMPTS, (), do_sample=False, max_new_tokens=5, eos_token_id=None)
    layer = model.model.layers[0]
    if where == "attention":
        _replace_forward(layer.self_attn, _scaled_attention)
    elif where == "decoder_layer":
        _replace_forward(layer, lambda f, self, h, *a, **kw: f(self, h * 3.0, *a, **kw))
    elif where == "v_proj":
        _replace_forward(layer.self_attn.v_proj, lambda f, self, x: f(self, x).flip(-1) * 3.0)
    elif where == "embed_tokens":
        _replace_forward(model.model.embed_tokens, lambda f, self, ids: f(self, ids).flip(-1))
    elif where == "lm_head":
        _replace_forward(model.lm_head, lambda f, self, x: -f(self, x))
    elif where == "backbone":
        _replace_forward(model.model, _flipped_backbone)
    elif where == "causal_lm":
        _replace_forward(model, _negated_logits)
    else:
        model.__class__ = LlamaForCausalLM
    expected = _hf_generate(model, tok, PROMPTS, (), do_sample=False, max_new_tokens=5, eos_token_id=None)
    assert expected != plain  # the replacement matters
    got = HFRolloutEngine(model, tok).greedy(PROMPTS, max_new_tokens=5, ignore_eos=True)
    assert got.response_ids.tolist() == expected


def _decoder_steps(engine, prompts):
    """(greedy token lists, decode steps the preallocated-KV decoder ran)."""
    from rlhf_fast.rollout.llama_decode import _LlamaDecoder

    steps, step = [0], _LlamaDecoder.step
    _LlamaDecoder.step = lambda self, *a: (steps.__setitem__(0, steps[0] + 1), step(self, *a))[1]
    try:
        b = engine.greedy(prompts, max_new_tokens=5, ignore_eos=True)
    finally:
        _LlamaDecoder.step = step
    return b.response_ids.tolist(), steps[0]


def test_plain_and_compiled_backbones_keep_the_decoder(tok):
    """The check above refuses only replaced forwards: a plain model, and one whose backbone the
    trainers' ``torch_compile`` compiled in place (an instance-level forward that is the class's
    own, compiled), still decode on the preallocated-KV decoder, with the same tokens."""
    from rlhf_fast.trainers.compile import compile_module

    model = tiny_causal_lm(len(tok), seed=3)
    plain, steps = _decoder_steps(HFRolloutEngine(model, tok), PROMPTS)
    assert steps > 0
    compile_module(model.model, backend="eager")
    assert "forward" in model.model.__dict__
    got, steps = _decoder_steps(HFRolloutEngine(model, tok), PROMPTS)
    assert steps > 0 and got == plain


def test_training_forward_honours_forwards_replaced_on_linears_and_the_embedding():
    """The training forward (models/llama_forward) computes linears and the embedding from their
    weights, as the decoder does: one whose ``forward`` was replaced on the instance sends the
    caller to transformers' forward (which calls it), as a replaced layer or attention forward
    already did."""
    from rlhf_fast.models import llama_forward
    from rlhf_fast.models.tiny import tiny_causal_lm

    m = tiny_causal_lm(61, family="llama", hidden_size=32, num_layers=1, num_heads=4, intermediate_size=48)
    base = m.model
    assert llama_forward.supported(base, 8)
    lin = base.layers[0].self_attn.v_proj
    lin.forward = lambda x: torch.nn.functional.linear(x, lin.weight) * 2
    assert not llama_forward.supported(base, 8)
    del lin.forward
    assert llama_forward.supported(base, 8)
    emb = base.embed_tokens
    emb.forward = lambda ids: torch.nn.Embedding.forward(emb, ids) * 2
    assert not llama_forward.supported(base, 8)
