"""SFT on ``{"text": ...}`` records (TRL's language-modeling format, ``dataset_text_field``
"text"): the rows against TRL's own SFTTrainer-prepared dataset (bos from the tokenizer, eos
appended once, keep-start truncation, every token trained), the refusal to mix text with other
sft records (in a file: a problem at its line; in code: a ValueError), and a short run."""

import pytest

from rlhf_fast.feedback.formats import SFTRecord, TextRecord, load_records
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer, tokenize_sft

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TEXTS = ["the cat sat on the mat", "red blue green", "one two three four five six seven eight nine ten",
         "sun", "moon and sun"]
MAX_LEN = 16  # short enough that the long text is cut


@pytest.fixture(scope="module")
def tok():
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    return train_tokenizer(sample_texts(64) + TEXTS, 300, padding_side="right", add_bos=True)


def test_rows_equal_trls_sft_trainer_on_a_text_dataset(tok, tmp_path):
    pytest.importorskip("datasets")
    from datasets import Dataset
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer as TRLTrainer

    from rlhf_fast.models.tiny import tiny_causal_lm

    texts = TEXTS + ["moon" + tok.eos_token]
    args = TRLConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, max_length=MAX_LEN)
    trl = TRLTrainer(model=tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2), args=args,
                     train_dataset=Dataset.from_list([{"text": t} for t in texts]), processing_class=tok)
    ref = trl.train_dataset
    rows, dropped = tokenize_sft(load_records([{"text": t} for t in texts], "sft"), tok, MAX_LEN)
    assert dropped == 0 and len(ref) == len(rows)
    assert [r["input_ids"] for r in rows] == [list(x) for x in ref["input_ids"]]
    assert all(r["response_mask"] == [1] * len(r["input_ids"]) for r in rows)
    assert rows[3]["input_ids"][0] == tok.bos_token_id and rows[3]["input_ids"][-1] == tok.eos_token_id  # "sun"
    assert rows[-1]["input_ids"].count(tok.eos_token_id) == 1  # an eos already there is not doubled
    assert len(rows[2]["input_ids"]) == MAX_LEN  # keep-start: the long text loses its tail


def test_text_too_short_is_dropped(tok):
    rows, dropped = tokenize_sft([TextRecord("sun")], tok, 1)
    assert (rows, dropped) == ([], 1)


def test_text_mixed_with_other_sft_records_is_a_problem(tmp_path):
    path = tmp_path / "mix.jsonl"
    path.write_text('{"text": "a b"}\n{"prompt": "p", "completion": "c"}\n{"text": "c d"}\n'
                    '{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ValueError) as e:
        load_records(str(path), "sft")
    lines = str(e.value).splitlines()
    assert "2 problem(s)" in lines[0]
    assert lines[1].startswith(f"{path}:2: <record>: a prompt/completion or messages record in a file whose line 1 "
                               'is a {"text"} record')
    assert lines[2].startswith(f"{path}:4: <record>:")
    path.write_text('{"prompt": "p", "completion": "c"}\n{"text": "a b"}\n')
    with pytest.raises(ValueError, match=r"mix.jsonl:2: text: a \{\"text\"\} record in a file whose line 1"):
        load_records(str(path), "sft")


@pytest.mark.parametrize("row,field,needle", [
    ({"text": "a", "prompt": "p"}, "text", "cannot also have prompt"),
    ({"text": "  "}, "text", "empty text"),
    ({"text": 3}, "text", "expected text"),
])
def test_text_record_problems(row, field, needle):
    with pytest.raises(ValueError) as e:
        load_records([{"text": "ok"}, row], "sft")
    line = str(e.value).splitlines()[1]
    assert line.startswith(f"<list>:2: {field}: ") and needle in line, line


def test_tokenize_sft_refuses_mixed_records(tok):
    with pytest.raises(ValueError, match=r"mix \{'text'\} records \(1\) with prompt/completion"):
        tokenize_sft([SFTRecord("p", "c"), TextRecord("a b")], tok, 16)


def test_sft_trainer_trains_on_text_records(tok, tmp_path):
    recs = [TextRecord(t) for t in TEXTS * 4]
    cfg = SFTConfig(model="tiny:llama:hidden_size=32,num_layers=1,num_heads=2", output_dir=str(tmp_path / "run"),
                    batch_size=4, max_steps=3, eval_every=0, log_every=1, max_len=16, device="cpu")
    tr = SFTTrainer(cfg, train_records=recs, eval_records=[], tokenizer=tok)
    assert tr.train_rows[0]["response_mask"] == [1] * len(tr.train_rows[0]["input_ids"])
    out = tr.train()
    assert out["loss"] == out["loss"]  # finite (not NaN)
