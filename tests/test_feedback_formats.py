"""Feedback formats: every validation problem reported with file:line:field; dedup, filters,
rankings -> pairs, chat prompts, agreement statistics and the flip-rate estimate."""

import itertools
import json
import random

import pytest

from rlhf_fast.feedback import (PairRecord, RankingRecord, ScoreRecord, SFTRecord, agreement_stats, annotator_weights,
                                dedup_records, filter_by_length, load_records, rankings_to_pairs, render_prompt)
from rlhf_fast.feedback.formats import write_jsonl


def _jsonl(tmp_path, rows, name="data.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(p)


def test_valid_records_all_kinds(tmp_path):
    chat = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    assert load_records(_jsonl(tmp_path, [{"prompt": "p", "completion": "c"},
                                          {"prompt": chat, "completion": "c2", "annotator": "ann"}]), "sft") == [
        SFTRecord("p", "c"), SFTRecord(chat, "c2", "ann")]
    assert load_records([{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2}], "pairs") == [
        PairRecord("p", "a", "b", 2.0)]
    assert load_records([{"prompt": "p", "responses": ["x", "y", "z"], "ranking": [2, 0, 1]}], "rankings") == [
        RankingRecord("p", ["x", "y", "z"], [2, 0, 1])]
    assert load_records([{"prompt": "p", "response": "x", "score": 3}], "scores") == [ScoreRecord("p", "x", 3.0)]


@pytest.mark.parametrize("kind,row,field,needle", [
    ("sft", {"completion": "c"}, "prompt", "missing field"),
    ("sft", {"prompt": "p", "completion": "  "}, "completion", "empty text"),
    ("sft", {"prompt": [], "completion": "c"}, "prompt", "empty chat"),
    ("sft", {"prompt": [{"role": "user"}], "completion": "c"}, "prompt[0]", "chat message"),
    ("sft", {"prompt": 5, "completion": "c"}, "prompt", "expected text"),
    ("pairs", {"prompt": "p", "chosen": "a"}, "rejected", "missing field"),
    ("pairs", {"prompt": "p", "chosen": "a", "rejected": "a"}, "rejected", "identical"),
    ("pairs", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "number"),
    ("pairs", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": -1}, "margin", ">= 0"),
    ("rankings", {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}, "ranking", "not a permutation"),
    ("rankings", {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1, 2]}, "ranking", "not a permutation"),
    ("rankings", {"prompt": "p", "responses": ["a"], "ranking": [0]}, "responses", "at least 2"),
    ("rankings", {"prompt": "p", "responses": ["a", ""], "ranking": [0, 1]}, "responses[1]", "empty text"),
    ("scores", {"prompt": "p", "response": "r", "score": "high"}, "score", "not a number"),
    ("scores", {"prompt": "p", "response": "r", "score": float("nan")}, "score", "not a number"),
    ("scores", {"prompt": "p", "response": "r"}, "score", "missing field"),
    # an int beyond float range made float() raise OverflowError (a traceback); shown cut short
    ("scores", {"prompt": "p", "response": "r", "score": 10**400}, "score", "not a number: 10000000000"),
    ("pairs", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": -10**400}, "margin", "number, got -1000"),
    ("scores", {"prompt": "p", "response": "r", "score": 1, "annotator": ""}, "annotator", "non-empty"),
    # conversational sft rows ({"messages"}, TRL's conversational language-modeling format)
    ("sft", {"messages": []}, "messages", "non-empty list of chat messages, got an empty list"),
    ("sft", {"messages": "hi"}, "messages", "non-empty list of chat messages, got str"),
    ("sft", {"messages": [{"role": "user", "content": "hi"}, {"content": "x"}]}, "messages[1]", "chat message"),
    ("sft", {"messages": [{"role": "user", "content": " "}]}, "messages[0].content", "empty text"),
    ("sft", {"messages": [{"role": "", "content": "hi"}]}, "messages[0].role", "empty text"),
    ("sft", {"messages": [{"role": "user", "content": "hi"}], "completion": "c"}, "messages",
     "cannot also have completion"),
    ("sft", {"messages": [{"role": "user", "content": "hi"}], "annotator": ""}, "annotator", "non-empty"),
])
def test_each_problem_names_file_line_field(tmp_path, kind, row, field, needle):
    good = {"sft": {"prompt": "p", "completion": "c"},
            "pairs": {"prompt": "p", "chosen": "a", "rejected": "b"},
            "rankings": {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]},
            "scores": {"prompt": "p", "response": "r", "score": 1}}[kind]
    path = _jsonl(tmp_path, [good, row])
    with pytest.raises(ValueError) as e:
        load_records(path, kind)
    lines = str(e.value).splitlines()
    assert "1 problem" in lines[0] and f"(first: line 2: {field}: " in lines[0] and needle in lines[0]  # what a CLI prints
    assert lines[1].startswith(f"{path}:2: {field}: ") and needle in lines[1], lines[1]
    assert len(lines[0]) - len(path) < 150  # a huge value is cut, not printed whole


def test_conversational_sft_records(tmp_path):
    """{"messages"} rows load as ChatRecord (extra message keys kept), beside prompt/completion
    rows, deduplicated like them; other kinds never read messages."""
    from rlhf_fast.feedback.formats import ChatRecord, record_texts

    conv = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "name": "bot"}]
    path = _jsonl(tmp_path, [{"messages": conv}, {"prompt": "p", "completion": "c"}, {"messages": conv},
                             {"messages": conv, "annotator": 7}])
    recs = load_records(path, "sft", dedup=True)
    assert recs == [ChatRecord(conv), SFTRecord("p", "c"), ChatRecord(conv, "7")]
    assert record_texts(recs[0]) == ["hello"]
    with pytest.raises(ValueError, match=r"line 3: <record>: duplicate record \(same as line 1\)"):
        load_records(path, "sft")
    with pytest.raises(ValueError, match="prompt: missing field"):
        load_records([{"messages": conv, "chosen": "a", "rejected": "b"}], "pairs")


def test_problems_collected_and_returned(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"},
            "{not json",
            {"prompt": "", "chosen": "a"},
            {"prompt": "p", "chosen": "a", "rejected": "b"},  # duplicate of line 1
            [1, 2],
            {"prompt": "q", "chosen": "a", "rejected": "b", "annotator": "x"}]
    path = _jsonl(tmp_path, rows)
    with pytest.raises(ValueError) as e:
        load_records(path, "pairs")
    msg = str(e.value)
    assert "5 problem(s)" in msg
    for needle in (f"{path}:2: <line>: invalid JSON", f"{path}:3: prompt: empty text", f"{path}:3: rejected: missing",
                   f"{path}:4: <record>: duplicate pair (same as line 1)", f"{path}:5: <line>: expected a JSON object"):
        assert needle in msg
    recs, problems = load_records(path, "pairs", strict=False)
    assert len(recs) == 2 and len(problems) == 5 and problems[0].line == 2
    recs, problems = load_records(path, "pairs", strict=False, dedup=True)
    assert len(problems) == 4
    with pytest.raises(FileNotFoundError):
        load_records(str(tmp_path / "missing.jsonl"), "pairs")
    with pytest.raises(ValueError):
        load_records(path, "votes")


def test_parquet_if_available(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = str(tmp_path / "x.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "response": "r", "score": 1.5},
                                         {"prompt": "p", "response": "r2", "score": None}]), p)
    with pytest.raises(ValueError, match=r"x.parquet:2: score: missing field"):
        load_records(p, "scores")


def test_dedup_filter_and_round_trip(tmp_path):
    recs = [PairRecord("p", "a", "b", annotator="u"), PairRecord("p", "a", "b", annotator="v"),
            PairRecord("p", "a", "b", annotator="u"), PairRecord("q", "long answer here", "b")]
    assert len(dedup_records(recs)) == 3 and len(dedup_records(recs, ignore_annotator=True)) == 2
    assert filter_by_length(recs, max_response_len=5) == recs[:3]
    assert filter_by_length(recs, max_prompt_len=0) == []
    path = str(tmp_path / "out.jsonl")
    write_jsonl(recs, path)
    assert load_records(path, "pairs", dedup=True) == dedup_records(recs)


def test_filter_by_tokens_and_chat_rendering():
    from rlhf_fast.models.tiny import sample_texts, train_tokenizer

    tok = train_tokenizer(sample_texts(32), 300)
    chat = [{"role": "user", "content": "hello"}]
    assert render_prompt(chat, tok) == tok.bos_token + "user: hello\nassistant: "
    assert render_prompt(chat) == "user: hello\nassistant: "
    assert render_prompt("plain", tok) == "plain"
    recs = [SFTRecord(chat, "the cat sat"), SFTRecord("p", " ".join(["dog"] * 40))]
    n = len(tok("the cat sat", add_special_tokens=False)["input_ids"])
    assert filter_by_length(recs, tokenizer=tok, max_response_len=n) == recs[:1]


def test_rankings_to_pairs_matches_brute_force():
    r = RankingRecord("p", ["a", "b", "c", "d"], [2, 0, 3, 1], annotator="z")
    pairs = rankings_to_pairs([r])
    rank_of = {r.responses[i]: pos for pos, i in enumerate(r.ranking)}
    expected = {(x, y) for x, y in itertools.permutations(r.responses, 2) if rank_of[x] < rank_of[y]}
    assert {(p.chosen, p.rejected) for p in pairs} == expected and len(pairs) == 6
    assert all(p.annotator == "z" for p in pairs)
    assert [(p.chosen, p.rejected) for p in rankings_to_pairs([r], adjacent_only=True)] == [("c", "a"), ("a", "d"), ("d", "b")]


def test_agreement_and_flip_rate():
    rng = random.Random(0)
    eps, recs = 0.2, []
    for i in range(3000):
        for ann in ("u", "v"):
            good, bad = f"good{i}", f"bad{i}"
            flip = rng.random() < eps
            recs.append(PairRecord(f"p{i}", bad if flip else good, good if flip else bad, annotator=ann))
    s = agreement_stats(recs)
    assert s.n_items == 3000 and s.n_multi == 3000 and s.n_label_pairs == 3000
    assert s.agreement == pytest.approx(1 - 2 * eps * (1 - eps), abs=0.03)
    assert s.flip_rate == pytest.approx(eps, abs=0.03)
    # a perfect annotator agrees with a majority of two noisy ones more often than they do
    recs3 = []
    for i in range(600):
        for ann, e in (("perfect", 0.0), ("n1", 0.3), ("n2", 0.3)):
            flip = rng.random() < e
            recs3.append(PairRecord(f"p{i}", "b" if flip else "a", "a" if flip else "b", annotator=ann))
    s3 = agreement_stats(recs3)
    assert s3.per_annotator["perfect"]["agreement"] > s3.per_annotator["n1"]["agreement"]
    w = annotator_weights(s3)
    assert w["perfect"] > w["n1"] and w["perfect"] > w["n2"]
    single = agreement_stats([PairRecord("p", "a", "b", annotator="u")])
    assert single.agreement is None and single.flip_rate is None and single.n_multi == 0


def test_dataset_like_source():
    class FakeDataset:  # the part of datasets.Dataset that is used: column_names and iteration
        column_names = ["prompt", "completion"]

        def __iter__(self):
            return iter([{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""}])

    recs, problems = load_records(FakeDataset(), "sft", strict=False)
    assert recs == [SFTRecord("p", "c")] and str(problems[0]) == "<dataset>:2: completion: empty text"
    with pytest.raises(TypeError, match="source must be"):
        load_records(42, "sft")
