"""Review of the SFT trainer against TRL 1.16 / transformers: a prompt–completion row's completion
is tokenized as the continuation of its prompt (a SentencePiece tokenizer's prefix space does
not land before every completion), the logged ``epoch`` is transformers' count of epochs done,
``tokens`` counts the trained tokens (0 when a step has none), and a row the chat template
refuses is a ValueError naming it."""

import pytest

from rlhf_fast.feedback.formats import ChatRecord, SFTRecord
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records, tokenize_sft

from .test_sft import TINY, tok  # noqa: F401  (the SFT tests' tiny model spec and tokenizer fixture)
from .test_sft_chat import CHATML_GEN, _with_template, chat_tok  # noqa: F401  (the chat tests' ChatML tokenizer)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

SP_TEXTS = ["repeat: red blue\nred blue", "say: cat dog\ncat dog", "the cat sat on the mat"] * 20


@pytest.fixture(scope="module")
def sp_tok():
    """A SentencePiece-like tokenizer (Llama-2 / Mistral-v0.1 / Phi-3 style): a prefix space
    ("▁") before the first word of every encoded text, the newline its own token, bos prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")])
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tk.train_from_iterator(SP_TEXTS, trainers.BpeTrainer(vocab_size=120,
                                                         special_tokens=["<pad>", "</s>", "<s>", "<unk>"]))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right")


@pytest.mark.parametrize("completion_only", [True, False])
def test_completion_is_tokenized_as_the_continuation_of_its_prompt(sp_tok, completion_only):
    """TRL tokenizes prompt + completion together and the completion starts after the prompt's
    tokens; alone, "red blue" encodes as "▁red ▁blue" — a space the data does not have, which
    the model would learn to write after every prompt."""
    rec = SFTRecord("repeat: red blue\n", "red blue")
    p = sp_tok(rec.prompt)["input_ids"]
    full = sp_tok(rec.prompt + rec.completion)["input_ids"]
    assert full[:len(p)] == p  # the prompt is a token prefix of prompt + completion
    rows, dropped = tokenize_sft([rec], sp_tok, 64, completion_only_loss=completion_only)
    assert dropped == 0
    assert rows[0]["input_ids"] == full + [sp_tok.eos_token_id]
    n_c = len(full) - len(p) + 1
    assert rows[0]["response_mask"] == ([0] * len(p) + [1] * n_c if completion_only else [1] * (len(p) + n_c))
    assert sp_tok.decode(rows[0]["input_ids"], skip_special_tokens=True) == rec.prompt + rec.completion


def _trainer(tmp_path, tok, recs, **kw):  # noqa: F811
    base = dict(model=TINY, output_dir=str(tmp_path / "run"), max_steps=4, batch_size=4, lr=1e-3, warmup_steps=0,
                eval_every=0, log_every=1, max_len=48, device="cpu")
    base.update(kw)
    return SFTTrainer(SFTConfig(**base), train_records=recs, eval_records=[], tokenizer=tok)


def test_logged_epoch_counts_the_epochs_done(tmp_path, tok):  # noqa: F811
    """transformers logs ``epoch`` = epochs done (epoch + micro-batches taken / micro-batches per
    epoch): 8 rows in batches of 4 give 0.5, 1.0, 1.5; after the whole epoch, 1.0, not 0."""
    tr = _trainer(tmp_path, tok, synthetic_sft_records(8, seed=5))
    assert len(tr.train_rows) == 8
    assert [tr.train_step()["epoch"] for _ in range(3)] == [0.5, 1.0, 1.5]


def test_tokens_is_zero_for_a_step_with_nothing_to_train(tmp_path, tok):  # noqa: F811
    """Wrapped packing cuts chunks that hold prompt tokens only; a step of such a chunk trains
    nothing (loss 0, as TRL's clamped count) and its ``tokens`` is 0, not the clamp's 1."""
    recs = [SFTRecord("repeat: red blue green cat dog sun moon\n", "red")] * 3
    tr = _trainer(tmp_path, tok, recs, packing=True, packing_strategy="wrapped", max_len=4, batch_size=1)
    empty = [i for i, r in enumerate(tr.train_rows) if not any(r["response_mask"][1:])]
    assert empty
    tr.batches.next = lambda: [empty[0]]
    m = tr.train_step()
    assert m["loss"] == 0.0 and m["tokens"] == 0


# ChatML that refuses a system message, as Gemma's template does (transformers' raise_exception)
NO_SYSTEM = ("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
             + CHATML_GEN)


@pytest.mark.parametrize("form", ["messages", "messages assistant_only", "chat prompt"])
def test_a_row_the_chat_template_refuses_is_a_value_error_naming_it(chat_tok, form):  # noqa: F811
    """A conversation the template refuses (Gemma: no system role; Mistral: roles must
    alternate) is bad input: a ValueError naming the record and the template's message (the
    CLI's exit 2, one line), not jinja's TemplateError with a traceback."""
    tok = _with_template(chat_tok, NO_SYSTEM)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "repeat: red"},
            {"role": "assistant", "content": "red"}]
    ok = ChatRecord(msgs[1:])
    bad = SFTRecord(msgs[:2], "red") if form == "chat prompt" else ChatRecord(msgs)
    with pytest.raises(ValueError, match=r"record 1\b.*System role not supported"):
        tokenize_sft([ok, bad], tok, 64, assistant_only_loss=form.endswith("assistant_only"))
