"""SFT ``truncation_mode: keep_end`` against TRL's own SFTTrainer (``truncation_mode="keep_end"``)
on the same data and tokenizer, for each record form: prompt–completion (completion-only and
whole-row loss), conversations (every token, assistant turns only) and text — the ids, the
trained-token mask (TRL's labels != -100, so the mask stays aligned after the cut) and the
dropped rows; the default stays keep_start; a step trains on keep_end rows; bad values are
refused."""

import pytest

from rlhf_fast.feedback.formats import TextRecord
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, synthetic_sft_records, tokenize_sft
from tests.test_sft_chat import chat_records
from tests.test_sft_chat import chat_tok  # noqa: F401  (fixture: a ChatML tokenizer with generation markers)
from tests.test_sft_losses import tok  # noqa: F401  (fixture: the tokenizer of the synthetic task)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2"
TEXTS = ["the cat sat on the mat and the dog sat on the red mat", "red blue green", "sun",
         "one two three four five six seven eight nine ten", "moon and sun"]


def _trl_dataset(tokenizer, rows, tmp_path_factory, max_length, **kw):
    """TRL SFTTrainer's prepared train dataset of ``rows`` with truncation_mode="keep_end"."""
    from datasets import Dataset
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer as TRLTrainer

    from rlhf_fast.models.tiny import tiny_causal_lm

    with pytest.warns(FutureWarning, match="keep_end"):  # TRL deprecates it, but 1.16 still applies it
        args = TRLConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to="none", use_cpu=True,
                         max_length=max_length, truncation_mode="keep_end", **kw)
    model = tiny_causal_lm(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2)
    return TRLTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer).train_dataset


def _assert_rows_equal(rows, dropped, ref, n):
    assert dropped == n - len(ref)
    assert [r["input_ids"] for r in rows] == [list(x) for x in ref["input_ids"]]
    assert [r["response_mask"] for r in rows] == [[int(t != -100) for t in x] for x in ref["labels"]]


@pytest.mark.parametrize("completion_only", [True, False])
def test_prompt_completion_rows_equal_trls(tok, tmp_path_factory, completion_only):
    recs = synthetic_sft_records(12)
    ref = _trl_dataset(tok, [{"prompt": r.prompt, "completion": r.completion} for r in recs], tmp_path_factory, 7,
                       completion_only_loss=completion_only)
    rows, dropped = tokenize_sft(recs, tok, 7, completion_only_loss=completion_only, truncation_mode="keep_end")
    _assert_rows_equal(rows, dropped, ref, len(recs))
    assert all(r["input_ids"][-1] == tok.eos_token_id for r in rows)  # the completion's end survives
    if completion_only:  # the cut really went into the prompt, and the mask followed it
        assert any(0 < r["response_mask"].index(1) < len(tok(recs[0].prompt)["input_ids"]) for r in rows)


@pytest.mark.parametrize("assistant_only", [True, False])
def test_conversation_rows_equal_trls(chat_tok, tmp_path_factory, assistant_only):
    recs = chat_records(10, seed=3)
    ref = _trl_dataset(chat_tok, [{"messages": r.messages} for r in recs], tmp_path_factory, 24,
                       assistant_only_loss=assistant_only)
    rows, dropped = tokenize_sft(recs, chat_tok, 24, assistant_only_loss=assistant_only, truncation_mode="keep_end")
    _assert_rows_equal(rows, dropped, ref, len(recs))
    assert any(len(r["input_ids"]) == 24 for r in rows)


def test_text_rows_equal_trls(tmp_path_factory):
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    t = train_tokenizer(sample_texts(64) + TEXTS, 300, padding_side="right", add_bos=True)
    ref = _trl_dataset(t, [{"text": x} for x in TEXTS], tmp_path_factory, 6)
    rows, dropped = tokenize_sft([TextRecord(x) for x in TEXTS], t, 6, truncation_mode="keep_end")
    _assert_rows_equal(rows, dropped, ref, len(TEXTS))
    assert rows[0]["input_ids"][0] != t.bos_token_id and rows[0]["input_ids"][-1] == t.eos_token_id


def test_default_is_keep_start(tok):
    recs = synthetic_sft_records(12)
    assert SFTConfig().truncation_mode == "keep_start"
    assert tokenize_sft(recs, tok, 9) == tokenize_sft(recs, tok, 9, truncation_mode="keep_start")
    start, _ = tokenize_sft(recs, tok, 9)
    end, _ = tokenize_sft(recs, tok, 9, truncation_mode="keep_end")
    assert start != end


def test_trainer_uses_keep_end(tmp_path, tok):
    cfg = SFTConfig(model=TINY, output_dir=str(tmp_path / "run"), max_len=7, truncation_mode="keep_end",
                    batch_size=4, max_steps=1, warmup_steps=0, eval_every=0, log_every=1, device="cpu")
    recs = synthetic_sft_records(12)
    tr = SFTTrainer(cfg, train_records=recs, eval_records=[], tokenizer=tok,
                    model=__import__("rlhf_fast.models.tiny", fromlist=["x"]).tiny_causal_lm(
                        len(tok), hidden_size=32, num_layers=1, num_heads=2))
    assert tr.train_rows == tokenize_sft(recs, tok, 7, truncation_mode="keep_end")[0]
    m = tr.train_step()
    assert m["loss"] > 0 and m["grad_norm"] > 0


def test_bad_truncation_mode_is_refused(tok):
    with pytest.raises(ValueError, match="truncation_mode must be one of"):
        SFTConfig(truncation_mode="left")
    with pytest.raises(ValueError, match="truncation_mode must be one of"):
        tokenize_sft(synthetic_sft_records(2), tok, 8, truncation_mode="middle")
