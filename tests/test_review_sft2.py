"""Second review of the SFT trainer against TRL 1.16's SFTTrainer (the first is
tests/test_review_sft.py): a conversation that opens with an assistant turn trains it under
``assistant_only_loss`` (TRL does; we refused it), a text prompt that already starts with the bos
text keeps one bos as generation encodes it, records that are not SFT records (dicts, a
conversational completion) are refused by a clear error naming the record, a tokenizer without
an eos is refused for completions and texts (naming eos_token), and an eval set that max_len
leaves empty is refused as the training set is."""

import pytest

from rlhf_fast.feedback.formats import PairRecord, SFTRecord, prompt_token_ids
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, tokenize_sft
from rlhf_fast.trainers.sft_data import chat_tokens

from .test_sft_chat import CHATML_GEN, _hf_mask, _with_template, chat_tok, trl_template  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2"
# an assistant greets first (a common shape of chat logs): TRL's generation mask trains that turn
ASSISTANT_FIRST = [{"role": "assistant", "content": "red cat"}, {"role": "user", "content": "repeat: cat"},
                   {"role": "assistant", "content": "cat"}]


# ChatML whose assistant turn writes its reasoning before the content, both generated
REASONING_GEN = CHATML_GEN.replace("{% generation %}", "{% generation %}{% if m.reasoning_content %}"
                                   "(thinking: {{ m.reasoning_content }}) {% endif %}")


@pytest.mark.parametrize("template", ["chatml_gen", "llama3_training.jinja", "reasoning"])
def test_a_conversation_opening_with_an_assistant_turn_trains_it(chat_tok, template):  # noqa: F811
    """TRL (transformers' generation mask) trains every assistant turn, the first message's too;
    our per-turn mask rendered ``messages[:0]`` with the generation prompt, which transformers
    refuses ("Cannot apply chat template to an empty conversation"): a ValueError for valid data.
    The opening turn's reasoning, written before its content, trains as a later turn's does."""
    tok = _with_template(chat_tok, {"chatml_gen": CHATML_GEN, "reasoning": REASONING_GEN}.get(template)
                         or trl_template(template))
    msgs = [dict(m) for m in ASSISTANT_FIRST]
    if template == "reasoning":
        msgs[0]["reasoning_content"] = msgs[2]["reasoning_content"] = "copy the words"
    ids, mask = chat_tokens(tok, msgs, assistant_only=True)
    assert (ids, mask) == _hf_mask(tok, msgs)
    assert sum(mask[:len(_hf_mask(tok, msgs[:1])[0])]) > 0  # the first turn trains


def test_a_text_prompt_starting_with_bos_keeps_one_bos_as_generation_does():
    """A prompt pre-rendered elsewhere ("<bos>..."): the rollout engine encodes it with one bos
    (``prompt_token_ids``), and the SFT row's prompt must be those ids (tokenize_sft's
    docstring: "the prompt tokens are exactly those a rollout conditions on"); it had two."""
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    tok = train_tokenizer(sample_texts(32), 300, add_bos=True, padding_side="right")
    prompt = tok.bos_token + "the cat"
    gen = prompt_token_ids(tok, [prompt])[0]
    assert gen.count(tok.bos_token_id) == 1
    (row,), dropped = tokenize_sft([SFTRecord(prompt, " sat")], tok, 64)
    assert dropped == 0
    n_p = row["response_mask"].index(1)
    assert row["input_ids"][:n_p] == gen


@pytest.mark.parametrize("bad", ["dict", "pair", "messages completion"])
def test_records_that_are_not_sft_records_are_refused_by_name(tmp_path, chat_tok, bad):  # noqa: F811
    """``train_records`` takes SFTRecord / ChatRecord / TextRecord objects (rows as dicts go to
    ``data``); a dict, a preference pair, or TRL's conversational completion (a list of
    messages, which our files refuse by name) is a TypeError / ValueError naming the record,
    not ``'dict' object has no attribute 'prompt'`` from the tokenizer's training texts."""
    good = SFTRecord("repeat: red\n", "red")
    rec = {"dict": {"prompt": "repeat: red\n", "completion": "red"},
           "pair": PairRecord("repeat: red\n", "red", "blue"),
           "messages completion": SFTRecord([{"role": "user", "content": "repeat: red"}],
                                            [{"role": "assistant", "content": "red"}])}[bad]
    with pytest.raises((TypeError, ValueError), match=r"record 1\b"):
        tokenize_sft([good, rec], chat_tok, 64)
    cfg = SFTConfig(model=TINY, output_dir=str(tmp_path / "run"), max_steps=1, device="cpu", batch_size=2)
    with pytest.raises((TypeError, ValueError), match=r"train_records\[1\]"):
        SFTTrainer(cfg, train_records=[good, rec], eval_records=[])


@pytest.mark.parametrize("form", ["completion", "text"])
def test_a_tokenizer_without_eos_is_refused_naming_eos_token(form):
    """Completions and texts end on the eos the trainer appends, so the model learns to stop;
    a tokenizer without one made rows with no end (the model then never stops) and said nothing
    (TRL fails in its ``add_eos``). A ValueError names ``eos_token``, the key that sets one;
    conversations need none (the template ends each turn)."""
    import copy

    from rlhf_fast.feedback.formats import ChatRecord, TextRecord
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    tok = copy.deepcopy(train_tokenizer(sample_texts(32), 300, padding_side="right"))
    tok.eos_token = None
    assert tok.eos_token_id is None
    rec = SFTRecord("the cat", " sat") if form == "completion" else TextRecord("the cat sat")
    with pytest.raises(ValueError, match="eos_token"):
        tokenize_sft([rec], tok, 64)
    tok.chat_template = CHATML_GEN
    chat = ChatRecord([{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}])
    assert tokenize_sft([chat], tok, 64)[1] == 0


def test_an_eval_set_with_nothing_to_score_is_refused(tmp_path):
    """Eval records none of which keeps a token to score within max_len (prompts of max_len
    tokens or more) left the run without any evaluation and no word of it (no eval_loss ever
    logged, load_best_model_at_end then blaming an empty eval split); the training set's
    same case is a ValueError naming max_len: so is the eval set's."""
    from rlhf_fast.trainers.sft import synthetic_sft_records

    long_prompt = SFTRecord("repeat: red blue green cat dog sun moon one two three red blue green\n", "red")
    cfg = SFTConfig(model=TINY, output_dir=str(tmp_path / "run"), max_steps=1, device="cpu", batch_size=2,
                    max_len=12)
    with pytest.raises(ValueError, match=r"max_len \(12\).*eval"):
        SFTTrainer(cfg, train_records=synthetic_sft_records(8), eval_records=[long_prompt] * 2)
