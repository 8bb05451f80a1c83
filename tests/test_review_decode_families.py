"""Generation on model families beyond the Llama-style ones, against transformers' ``generate``.

Tiny random models of the state-space / hybrid / own-cache families transformers 5.25 ships
(Mamba, FalconMamba, LFM2, Falcon-H1, MiniMax, RWKV): greedy tokens and every decode step's
logits equal ``generate``'s, ``n`` samples per prompt and beam search run (their caches hold
linear-attention states as well as, or instead of, keys and values), and a model whose forward
returns no transformers cache is refused with an error that says so. Also: a stop string with a
leading space on a SentencePiece-style tokenizer, and one bos for a rendered chat prompt. (A
survey of ~45 attention families — Gemma 1/2/3, Phi3, OLMo2, GPT-NeoX, OPT, Falcon, Cohere,
Granite, SmolLM3, MoE, sliding windows, bf16 — gave identical tokens and log-probs; those are
not repeated here.)
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast import ops  # noqa: E402
from rlhf_fast.models import sample_texts, train_tokenizer  # noqa: E402
from rlhf_fast.models.logprobs import default_position_ids  # noqa: E402
from rlhf_fast.ops import reference  # noqa: E402
from rlhf_fast.rollout import HFRolloutEngine, RolloutBatch, SamplingParams  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

# different lengths: the batch is left-padded
PROMPTS = ["hello world", "the cat sat on the mat and then", "one"]

# tiny configs (hidden 32-64, 2 layers) of families whose caches are not plain key / value layers
_CONFIGS = {
    "mamba": dict(hidden_size=32, num_hidden_layers=2, state_size=8),
    "falcon_mamba": dict(hidden_size=32, num_hidden_layers=2, state_size=8),
    "lfm2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, layer_types=["conv", "full_attention"]),
    # every layer is attention + mamba side by side: transformers' "hybrid" cache layer
    "falcon_h1": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                      mamba_n_groups=1),
    "minimax": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, block_size=4,
                    layer_types=["linear_attention", "full_attention"]),
    "rwkv": dict(hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, context_length=64),
}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(sample_texts(), 256)


def _model(tok, family):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, vocab_size=len(tok), max_position_embeddings=64, pad_token_id=0,
                               eos_token_id=1, bos_token_id=2, **_CONFIGS[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # sharper distributions: greedy tokens that differ show up
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


def _responses(batch: RolloutBatch):
    masks = batch.response_mask[:, batch.prompt_length:]
    return [r[m.bool()].tolist() for r, m in zip(batch.response_ids, masks)]


def _spy_sample(monkeypatch):
    """The logits every ops.sample call is given."""
    seen, real = [], ops.sample
    monkeypatch.setattr(ops, "sample", lambda logits, **kw: (seen.append(logits.clone()), real(logits, **kw))[1])
    return seen


@pytest.mark.parametrize("family", ["mamba", "falcon_mamba"])
def test_state_space_greedy_equals_hf_generate(tok, family, monkeypatch):
    """Mamba-style models: greedy tokens and each step's logits are generate's. generate passes
    no attention mask to their decode steps (prepare_inputs_for_generation drops it): their
    mixer multiplies the one new token's states by the whole [B, K] mask, which broadcasts to K
    tokens instead of failing."""
    model = _model(tok, family)
    seen = _spy_sample(monkeypatch)
    b = HFRolloutEngine(model, tok).greedy(PROMPTS, max_new_tokens=6, ignore_eos=True)
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=None,
                             output_logits=True, return_dict_in_generate=True)
    assert _responses(b) == out.sequences[:, enc["input_ids"].shape[1]:].tolist()
    assert len(seen) == len(out.logits) == 6
    for ours, theirs in zip(seen, out.logits):
        torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["lfm2", "falcon_h1", "mamba"])
def test_n_samples_and_beams_on_linear_attention_caches(tok, family, monkeypatch):
    """n samples per prompt (GRPO's group) and beam search on models whose cache holds
    linear-attention / conv / SSM states (transformers' LinearAttentionLayer has no
    batch_repeat_interleave; its "hybrid" layer inherits the key / value one, which leaves the
    states at the prompt count): each live row's step logits are a full forward's, and the
    best beam is generate's."""
    model = _model(tok, family)
    engine = HFRolloutEngine(model, tok)
    seen = _spy_sample(monkeypatch)
    kw = dict(temperature=0.9, top_k=30, top_p=0.95)
    b = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, n=2, seed=3, stop_token_ids=tuple(range(3, 30)),
                                                **kw))
    P, rm = b.prompt_length, b.response_mask[:, b.prompt_length:]
    with torch.no_grad():
        full = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                     position_ids=default_position_ids(b.attention_mask)).logits.float()
    for s, logits in enumerate(seen):
        live = rm[:, s].bool()
        torch.testing.assert_close(logits[live], full[live, P + s - 1], rtol=0, atol=1e-4)
        lp = reference.process_logits(full[:, P + s - 1], **kw).gather(1, b.input_ids[:, P + s, None]).squeeze(1)
        torch.testing.assert_close(b.behaviour_logp[live, P + s], lp[live], rtol=0, atol=1e-4)
    beams = engine.beam_search(PROMPTS, num_beams=2, max_new_tokens=4)
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, num_beams=2, max_new_tokens=4, pad_token_id=0)
    exp = [r[:next((j + 1 for j, t in enumerate(r) if t == 1), len(r))]
           for r in out[:, enc["input_ids"].shape[1]:].tolist()]
    assert _responses(beams) == exp


def test_model_with_its_own_cache_class_generates(tok):
    """MiniMax builds its own cache class and refuses a DynamicCache (as generate knows:
    _supports_default_dynamic_cache): the prefill lets it make its own."""
    model = _model(tok, "minimax")
    b = HFRolloutEngine(model, tok).greedy(PROMPTS, max_new_tokens=5, ignore_eos=True)
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=5, pad_token_id=0, eos_token_id=None)
    assert _responses(b) == out[:, enc["input_ids"].shape[1]:].tolist()


def test_model_whose_forward_returns_no_cache_is_refused_clearly(tok):
    """RWKV keeps its recurrent state in a ``state`` output, not a transformers cache: a
    TypeError naming the model and the missing cache, not an AttributeError from inside the
    decode loop."""
    model = _model(tok, "rwkv")
    with pytest.raises(TypeError, match="RwkvForCausalLM.*cache"):
        HFRolloutEngine(model, tok).greedy(PROMPTS, max_new_tokens=3)


def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Llama-2, Mistral v1, Gemma): "▁" marks a word's leading
    space, and decoding drops it from the first token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    t.train_from_iterator(sample_texts(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", padding_side="left")


def test_stop_string_with_a_leading_space_on_the_first_response_token():
    """A stop string that begins with a space ends the row at the response's first token, as
    transformers' StopStringCriteria does, when that token carries the space ("▁blu"): the
    tail decoded on its own loses a first token's "▁" with a SentencePiece-style decoder."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    from rlhf_fast.models import tiny_causal_lm

    mtok = _metaspace_tokenizer()
    model = tiny_causal_lm(len(mtok), seed=3)
    engine = HFRolloutEngine(model, mtok)
    prompts = ["hello the cat", "one two", "the mat"]
    free = engine.greedy(prompts, max_new_tokens=4, ignore_eos=True)
    first = free.response_ids[:, 0].tolist()
    row = next(i for i, t in enumerate(first) if mtok.convert_ids_to_tokens(t).startswith("▁"))
    stop = " " + mtok.decode([first[row]])
    P = free.prompt_length
    assert StopStringCriteria(mtok, [stop])(free.input_ids[row:row + 1, :P + 1], None).item()  # generate stops
    b = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True,
                                                stop_strings=(stop,)))
    assert b.finish_reasons[row] == "stop"
    assert _responses(b)[row] == [first[row]]


def test_rendered_chat_prompt_keeps_one_bos():
    """A chat rendered by a template that writes the bos (Llama-3, Gemma) and a tokenizer that
    adds one (add_bos): the prompt holds one bos, as the SFT / DPO trainers and TRL's GRPO
    encode rendered chats (add_special_tokens=False) and apply_chat_template(tokenize=True)
    gives, not two; a plain-text prompt keeps the tokenizer's bos."""
    from rlhf_fast.feedback.formats import render_prompt
    from rlhf_fast.models import tiny_causal_lm
    from rlhf_fast.models.tiny import CHAT_TEMPLATE

    btok = train_tokenizer(sample_texts(), 256, add_bos=True)
    btok.chat_template = CHAT_TEMPLATE
    chat = render_prompt([{"role": "user", "content": "hello world"}], btok)
    assert chat.startswith(btok.bos_token)
    b = HFRolloutEngine(tiny_causal_lm(len(btok), seed=0), btok).greedy([chat, "the cat sat"], max_new_tokens=2)
    prompts = [r[m.bool()].tolist() for r, m in zip(b.input_ids[:, :b.prompt_length],
                                                    b.attention_mask[:, :b.prompt_length])]
    assert prompts[0] == btok(chat, add_special_tokens=False)["input_ids"]
    assert prompts[0].count(btok.bos_token_id) == 1
    assert prompts[1] == btok("the cat sat")["input_ids"] and prompts[1][0] == btok.bos_token_id
