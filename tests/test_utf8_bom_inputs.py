"""Input files saved with a UTF-8 byte-order mark (as Windows editors save them) read as without
it: the mark is no part of the first record, prompt or label (json.loads refused line 1, and a
.txt prompt kept the mark as its first character)."""

import json

BOM = "\ufeff"


def _write(path, text):
    path.write_text(BOM + text, encoding="utf-8")
    return str(path)


def test_feedback_records_with_a_byte_order_mark(tmp_path):
    from rlhf_fast.feedback.formats import load_records

    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"}, {"prompt": "q", "chosen": "x", "rejected": "y"}]
    path = _write(tmp_path / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    recs = load_records(path, "pairs")
    assert [r.prompt for r in recs] == ["p", "q"]


def test_prompt_files_with_a_byte_order_mark(tmp_path):
    from rlhf_fast.trainers.rl import read_prompt_records

    txt = _write(tmp_path / "prompts.txt", "first prompt\nsecond\n")
    assert [p for p, _ in read_prompt_records(txt)] == ["first prompt", "second"]
    jsonl = _write(tmp_path / "prompts.jsonl", json.dumps({"prompt": "a", "answer": "1"}) + "\n")
    assert read_prompt_records(jsonl) == [("a", {"answer": "1"})]


def test_labels_file_with_a_byte_order_mark(tmp_path):
    from rlhf_fast.feedback.label import read_labels

    rec = {"key": "k", "prompt": "p", "a": "one", "b": "two", "label": "A"}
    path = _write(tmp_path / "labels.jsonl", json.dumps(rec) + "\n")
    assert read_labels(path) == [rec]
