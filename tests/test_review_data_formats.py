"""Review of how the commands read their data files, against TRL 1.16's dataset formats and the
files a TRL user brings (``Dataset.to_json``'s .json, a JSON array, .csv, ``save_to_disk``)."""

import json

import pytest

from rlhf_fast.feedback.formats import ChatRecord, PairRecord, load_records
from rlhf_fast.trainers.rl import read_prompt_records

SYSTEM_CHAT = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "3+3?"}]
ROWS = [{"prompt": "What is 2+2?", "answer": "4"}, {"prompt": SYSTEM_CHAT, "answer": "6"}]


def test_json_prompts_file_is_read_as_records(tmp_path):
    """``Dataset.to_json("p.json")`` writes JSON lines; ``to_json(lines=False)`` / ``json.dump`` a
    JSON array: datasets' json loader reads both, so must ``data.prompts_file`` / ``--prompts``."""
    lines, array = tmp_path / "lines.json", tmp_path / "array.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    array.write_text(json.dumps(ROWS, indent=1))
    want = [(r["prompt"], {"answer": r["answer"]}) for r in ROWS]
    assert read_prompt_records(str(lines)) == want
    assert read_prompt_records(str(array)) == want


def test_csv_is_refused_naming_the_file(tmp_path):
    """No CSV reader here: a .csv is refused with one line naming the file and what to use,
    never read as text lines (prompts) or as JSON lines (one 'invalid JSON' per row)."""
    p = tmp_path / "p.csv"
    p.write_text("prompt,answer\nWhat is 2+2?,4\n")
    for read in (lambda: read_prompt_records(str(p), name="data.prompts_file"),
                 lambda: load_records(str(p), "sft")):
        with pytest.raises(ValueError, match=r"p\.csv.*CSV.*\.jsonl"):
            read()


def test_json_array_records_file(tmp_path):
    """A pairs / sft file that is one JSON array (``json.dump(rows)``, pretty-printed) reads as its
    items; a bad item is named by its index (1-based, as Parquet rows)."""
    pairs = [{"prompt": "Q: sky?", "chosen": "blue", "rejected": "green"},
             {"chosen": "Q: sun? A: hot", "rejected": "Q: sun? A: cold"}]
    p = tmp_path / "pairs.json"
    p.write_text(json.dumps(pairs, indent=2))
    assert load_records(str(p), "pairs") == [PairRecord("Q: sky?", "blue", "green"),
                                             PairRecord("Q: sun? A:", " hot", " cold")]
    p.write_text(json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], indent=2))
    with pytest.raises(ValueError, match=r"pairs\.json:2: completion: missing field"):
        load_records(str(p), "sft")


def test_empty_prompt_in_prompts_file_is_refused_with_its_line(tmp_path):
    """``data.prompts`` refuses an empty prompt when the config loads; a file's must be refused
    as it is read, naming the line (not 'every prompt must have at least one token' later)."""
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": ""}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl, line 2: .*empty"):
        read_prompt_records(str(p), name="data.prompts_file")
    from rlhf_fast.trainers.rl import prompt_record  # RLTrainer(prompts=[...]) / eval_prompts=[...]

    assert prompt_record({"prompt": "hi", "answer": 1}, where="prompts[0]") == ("hi", {"answer": 1})
    for item in ("", {"prompt": ""}):
        with pytest.raises(ValueError, match=r"prompts\[1\]: empty text"):
            prompt_record(item, where="prompts[1]")


def test_non_utf8_records_file_names_the_file(tmp_path):
    """A gzipped (or other binary) file is refused naming it, not with a bare UnicodeDecodeError."""
    p = tmp_path / "pairs.jsonl.gz"
    p.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe")
    with pytest.raises(ValueError, match=r"pairs\.jsonl\.gz: not UTF-8"):
        load_records(str(p), "pairs")


def test_sharegpt_conversations_read_as_messages():
    """TRL's SFTTrainer converts a ``conversations`` column of ``{from, value}`` messages to
    ``messages`` of ``{role, content}`` (``maybe_convert_to_chatml``: keys renamed, roles kept)."""
    row = {"conversations": [{"from": "system", "value": "Be terse."}, {"from": "user", "value": "hi"},
                             {"from": "assistant", "value": "yo"}]}
    want = ChatRecord([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "yo"}])
    assert load_records([row], "sft") == [want]
    gpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "id": "x1"}
    assert load_records([gpt], "sft")[0].messages == [{"role": "human", "content": "hi"},
                                                      {"role": "gpt", "content": "yo"}]  # TRL keeps the roles


def test_json_references_file(tmp_path):
    """`rlhf-fast eval --references refs.json` reads records, as the prompts beside them (a JSON
    array or JSON lines), not each line's raw JSON as a reference text scored by BLEU / ROUGE."""
    from rlhf_fast.trainers.evaluate import read_references

    p = tmp_path / "refs.json"
    p.write_text(json.dumps([{"reference": "four"}, {"references": ["six", "6"]}]))
    assert read_references(str(p)) == [["four"], ["six", "6"]]
    p.write_text(json.dumps({"reference": "four"}) + "\n" + json.dumps({"answer": "6"}) + "\n")
    with pytest.raises(ValueError, match=r"refs\.json, line 2: expected 'reference'"):
        read_references(str(p))


CHAT = [{"role": "user", "content": "weather?"}]
TOOL = {"type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
SUNNY, RAIN = [{"role": "assistant", "content": "sunny"}], [{"role": "assistant", "content": "rain"}]


@pytest.mark.parametrize("kind,row,field", [
    ("sft", {"messages": CHAT + SUNNY, "images": ["sky.png"]}, "images"),
    ("sft", {"messages": CHAT + SUNNY, "tools": [TOOL]}, "tools"),
    ("sft", {"prompt": CHAT, "completion": "sunny", "chat_template_kwargs": {"enable_thinking": False}},
     "chat_template_kwargs"),
    ("pairs", {"prompt": CHAT, "chosen": SUNNY, "rejected": RAIN,
               "chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs"),
    ("pairs", {"prompt": CHAT, "chosen": SUNNY, "rejected": RAIN, "tools": json.dumps([TOOL])}, "tools"),
    ("pairs", {"prompt": "What is shown?", "chosen": "a cat", "rejected": "a dog", "images": ["cat.png"]},
     "images"),
    ("binary", {"prompt": "What is shown?", "completion": "a cat", "label": True, "image": "cat.png"},
     "image"),
])
def test_row_fields_trl_renders_are_refused(kind, row, field):
    """TRL's SFT / DPO / reward trainers pass a row's ``tools`` and ``chat_template_kwargs`` to the
    chat template (the tool schemas in the rendered prompt) and feed ``images`` / ``image`` to a
    vision processor. The text-only loaders here would train on other tokens without a word:
    such a row is refused, naming the field (a text row's tools, unused by TRL too, are kept)."""
    from rlhf_fast.trainers.kto import load_binary_records

    with pytest.raises(ValueError, match=rf"<list>:1: {field}: "):
        load_binary_records([row]) if kind == "binary" else load_records([row], kind)
    text_row = {"prompt": "p", "completion": "c", "tools": [TOOL]}  # TRL renders no template here
    assert load_records([text_row], "sft")[0].completion == "c"


def test_label_items_problem_messages(tmp_path):
    """`rlhf-fast label` / `judge` read text pairs only: a conversational pair is refused saying so
    (not 'empty text'), a line that is not JSON with the parser's message."""
    from rlhf_fast.feedback.label import load_items

    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"prompt": CHAT, "chosen": [{"role": "assistant", "content": "sunny"}],
                             "rejected": [{"role": "assistant", "content": "rain"}]}) + "\n{bad\n")
    with pytest.raises(ValueError) as e:
        load_items(str(p))
    msg = str(e.value)
    assert "empty text" not in msg and "pairs.jsonl:1: chosen: expected text" in msg
    assert "pairs.jsonl:2: <line>: invalid JSON" in msg


def test_dataset_dict_is_refused_naming_its_splits():
    """``load_dataset(...)`` returns a DatasetDict, which iterates its split names: refused naming
    them (it crashed in ``dict("train")``), while one split reads as its rows."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}])
    assert load_records(ds, "sft")[0].completion == "b"
    with pytest.raises(TypeError, match=r"DatasetDict of the splits \['test', 'train'\]: pass one split"):
        load_records(datasets.DatasetDict({"train": ds, "test": ds}), "sft")


def test_save_to_disk_folder(tmp_path):
    """A ``Dataset.save_to_disk`` folder (what a TRL user keeps after ``map``) reads as its rows for
    the offline trainers' ``data`` and the RL prompts; a DatasetDict's folder is refused naming
    its splits; any other folder stays 'expected a file'."""
    datasets = pytest.importorskip("datasets")
    from rlhf_fast.trainers.common import _check_data_source

    rows = [{"prompt": SYSTEM_CHAT, "answer": "6"}, {"prompt": CHAT, "answer": "sunny"}]  # (one column type)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "prompts"))
    assert read_prompt_records(str(tmp_path / "prompts"), name="data.prompts_file") == \
        [(r["prompt"], {"answer": r["answer"]}) for r in rows]
    pairs = datasets.Dataset.from_list([{"prompt": "Q", "chosen": "yes", "rejected": "no", "note": None}])
    pairs.save_to_disk(str(tmp_path / "pairs"))
    _check_data_source(str(tmp_path / "pairs"), "data")
    assert load_records(str(tmp_path / "pairs"), "pairs", key="data") == [PairRecord("Q", "yes", "no")]
    datasets.DatasetDict({"train": pairs, "test": pairs}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"dd: a DatasetDict folder \(splits \['test', 'train'\]\): give"):
        load_records(str(tmp_path / "dd"), "pairs", key="data")
    with pytest.raises(IsADirectoryError, match=r"data .*empty: expected a file, found a folder$"):
        (tmp_path / "empty").mkdir()
        load_records(str(tmp_path / "empty"), "pairs", key="data")


def test_empty_system_message_is_kept():
    """Datasets often carry ``{"role": "system", "content": ""}`` (ShareGPT exports): TRL renders it
    with the chat template as it is, so it is read, in a conversation and in a chat prompt; an
    empty user or assistant turn stays a problem."""
    empty = {"role": "system", "content": ""}
    assert load_records([{"messages": [empty] + CHAT + SUNNY}], "sft")[0].messages[0] == empty
    pair = {"prompt": [empty] + CHAT, "chosen": "a", "rejected": "b"}
    assert load_records([pair], "pairs")[0].prompt[0] == empty
    with pytest.raises(ValueError, match=r"messages\[1\]\.content: empty text"):
        load_records([{"messages": [empty, {"role": "user", "content": " "}] + SUNNY}], "sft")


def test_judge_scores_input_reads_as_the_pairs_input(tmp_path):
    """`rlhf-fast judge --mode scores` reads its INPUT as every data file is read (a .json array,
    Parquet), as its pairs mode does; a bad line is still named with the parser's message."""
    from types import SimpleNamespace

    from rlhf_fast.feedback.judge import _judge_file

    class Judge:
        def score(self, prompt, response):
            return float(len(response))

    p = tmp_path / "s.json"
    p.write_text(json.dumps([{"prompt": "q", "response": "good"}, {"prompt": "q", "response": "bad"}]))
    cfg, args = SimpleNamespace(model="m"), SimpleNamespace(mode="scores", input=str(p))
    out, done = _judge_file(Judge(), cfg, args, [])
    assert [r["score"] for r in out] == [4.0, 3.0] and done == 0
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"prompt": "q", "response": "good"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"s\.jsonl:2: invalid JSON"):
        _judge_file(Judge(), cfg, SimpleNamespace(mode="scores", input=str(p)), [])


def test_labels_data_kind_names_a_saved_folder(tmp_path):
    """``data_kind: labels`` reads `rlhf-fast label`'s JSONL only: a save_to_disk folder (which the
    data check lets through for the other kinds) is refused as a folder, not 'not found'."""
    datasets = pytest.importorskip("datasets")
    from rlhf_fast.trainers.reward import _load_label_file

    datasets.Dataset.from_list([{"prompt": "q", "a": "x", "b": "y"}]).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(IsADirectoryError, match=r"labels file .*saved is a folder"):
        _load_label_file(str(tmp_path / "saved"), "pairs")
