"""Second review of feedback ingestion (rlhf_fast/feedback/formats.py, label.py): file kinds by
their suffix, length filters over conversations, and the labelling tool's items and labels files."""

import json

import pytest

from rlhf_fast.feedback.formats import PairRecord, filter_by_length, load_records
from rlhf_fast.feedback.label import label_pairs, load_items, read_labels

TOOL_CALL = [{"type": "function", "function": {"name": "add", "arguments": {"a": 40, "b": 2}}}]


def test_parquet_suffix_is_read_whatever_its_case(tmp_path):
    """``.JSON`` and ``.CSV`` are told by their suffix in any case; a ``.PARQUET`` file was read as
    JSON lines and refused as 'not UTF-8 text'."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    path = tmp_path / "pairs.PARQUET"
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    assert load_records(str(path), "pairs") == [PairRecord("p", "a", "b")]


def test_length_filter_reads_a_tool_calling_conversation_by_its_answers():
    """An assistant turn that only calls tools (content None, as TRL passes it) has no text of its
    own: the conversation's answer is 'It is 42.' (9 characters ≥ the default minimum of 1), so it
    is kept — it was dropped as a response of 0 characters."""
    msgs = [{"role": "user", "content": "40+2?"},
            {"role": "assistant", "content": None, "tool_calls": TOOL_CALL},
            {"role": "tool", "content": "42"},
            {"role": "assistant", "content": "It is 42."}]
    recs = load_records([{"messages": msgs}], "sft")
    assert filter_by_length(recs) == recs
    assert filter_by_length(recs, max_response_len=9) == recs
    assert filter_by_length(recs, max_response_len=8) == []  # the answer itself still counts


def test_length_filter_of_a_conversation_without_an_answer_does_not_crash():
    """An sft conversation with no assistant turn loads (TRL's SFT reads it); filtering it raised
    'max() arg is an empty sequence'. No response: every response fits, as the docstring says."""
    recs = load_records([{"messages": [{"role": "user", "content": "hi"}]}], "sft")
    assert filter_by_length(recs, max_response_len=5, max_prompt_len=5) == recs


class _Quiet:
    def print(self, *a, **k):
        pass

    def rule(self, *a, **k):
        pass


@pytest.mark.parametrize("prompt", [[], [1, 2], [{"role": "user"}]])
def test_label_items_refuse_a_prompt_that_is_no_chat(tmp_path, prompt):
    """A list prompt must be chat messages: ``[]`` passed, was labelled, and the labels file then
    failed to read (resume and training refused it); ``[1, 2]`` crashed the session mid-way with
    TypeError. Refused when the items load, naming the line and field."""
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"prompt": "ok", "a": "x", "b": "y"}) + "\n"
                     + json.dumps({"prompt": prompt, "a": "x", "b": "y"}) + "\n")
    with pytest.raises(ValueError) as e:
        load_items(str(items))
    assert ":2: prompt" in str(e.value), str(e.value)


def test_label_items_with_a_chat_prompt_round_trip(tmp_path):
    """A valid chat prompt is labelled and read back (the check above refuses only bad lists)."""
    chat = [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"prompt": chat, "a": "x", "b": "y"}) + "\n")
    out = tmp_path / "labels.jsonl"
    answers = iter(["a\n", ""])
    label_pairs(load_items(str(items)), str(out), "me", read_line=lambda: next(answers), console=_Quiet())
    (rec,) = read_labels(str(out))
    assert rec["prompt"] == chat and rec["label"] == "A"


def test_labels_file_with_a_raw_line_separator_in_a_text_reads(tmp_path):
    """JSON allows a raw U+2028 / U+0085 inside a string (``json.dumps(ensure_ascii=False)``
    writes them): str.splitlines cut such a record in two and the file was refused as 'not a
    labels file'; JSON lines split at "\\n" only (as :func:`json_rows` reads them)."""
    rec = {"key": "k", "prompt": "p\u2028q\x85r", "a": "x", "b": "y", "label": "A", "annotator": "me"}
    out = tmp_path / "labels.jsonl"
    out.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_labels(str(out)) == [rec]
