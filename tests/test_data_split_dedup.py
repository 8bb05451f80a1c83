"""The reward / DPO data path: the eval split holds out whole items (every label of a pair, a
ranking's pairs) and is the record-level split of before when no item repeats; ``dedup``'s three
ways with repeated records; the reward options that apply to pairwise labels only; a labels
file of ties. No model is built here."""

import json
import random
import types

import pytest

from rlhf_fast.feedback.formats import (PairRecord, RankingRecord, ScoreRecord, SFTRecord, load_records,
                                        record_item_key)
from rlhf_fast.trainers.common import load_split_records, split_records
from rlhf_fast.trainers.reward import RewardConfig, synthetic_preference_records


def _record_split(records, eval_fraction, seed):
    """The split before items were kept together (common.split_records as it was): a seeded
    shuffle of the record indices."""
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n_eval = int(round(len(records) * eval_fraction))
    if eval_fraction > 0 and len(records) >= 2:
        n_eval = max(1, n_eval)
    ev = set(idx[:n_eval])
    return [r for i, r in enumerate(records) if i not in ev], [r for i, r in enumerate(records) if i in ev]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("n,eval_fraction,seed", [(6, 0.5, 0), (42, 0.1, 3), (123, 0.2, 7), (431, 0.05, 1)])
def test_split_without_repeated_items_is_the_record_split(n, eval_fraction, seed):
    pairs = synthetic_preference_records(n, seed=seed)
    assert len({record_item_key(r) for r in pairs}) == n  # (no item repeats)
    assert split_records(pairs, eval_fraction, seed) == _record_split(pairs, eval_fraction, seed)
    sft = [SFTRecord("p", "same")] * n  # records of no known item: each its own, repeats or not
    assert split_records(sft, eval_fraction, seed) == _record_split(sft, eval_fraction, seed)


def test_split_keeps_every_label_of_an_item_on_one_side():
    chat = [{"role": "user", "content": "hi"}]
    items = [(f"p{i}" if i % 3 else chat, f"good {i}", f"bad {i}") for i in range(30)]
    recs = []
    for k, ann in enumerate(("alice", "bob", "carol")):
        for p, good, bad in items:  # carol shows the pair reversed; labels interleaved across the file
            recs.append(PairRecord(p, bad, good, 0.0, ann) if ann == "carol" else PairRecord(p, good, bad, 0.0, ann))
    recs.append(RankingRecord("q", ["x", "y"], [0, 1], "a"))
    recs.append(RankingRecord("q", ["y", "x"], [1, 0], "b"))
    recs.append(ScoreRecord("q", "x", 1.0, "a"))
    recs.append(ScoreRecord("q", "x", 3.0, "b"))
    train, ev = split_records(recs, 0.2, 0)
    assert sorted(map(repr, train + ev)) == sorted(map(repr, recs))
    assert not {record_item_key(r) for r in train} & {record_item_key(r) for r in ev}
    assert len({record_item_key(r) for r in ev}) == round(0.2 * 32)  # the fraction counts items
    assert [r for r in recs if r in ev] == ev  # file order kept


def _cfg(**kw):
    base = dict(data=None, eval_data=None, eval_fraction=0.25, seed=3)
    return types.SimpleNamespace(**{**base, **kw})


def test_dpo_rankings_are_split_then_expanded(tmp_path):
    from rlhf_fast.trainers.dpo import _load_pairs, _ranking_pairs

    rows = [{"prompt": f"p{i}", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]} for i in range(8)]
    data = _jsonl(tmp_path / "r.jsonl", rows)
    held = _jsonl(tmp_path / "e.jsonl", rows[:2])
    load = lambda path: _load_pairs(path, "rankings", True)  # noqa: E731
    train, ev = load_split_records(_cfg(data=data), load, list, expand=_ranking_pairs)
    assert all(isinstance(r, PairRecord) for r in train + ev) and len(train) == 6 * 3 and len(ev) == 2 * 3
    assert not {r.prompt for r in train} & {r.prompt for r in ev}
    assert PairRecord("p0", "c", "a") in train + ev  # ranking [2, 0, 1]: c > a > b
    train, ev = load_split_records(_cfg(data=data, eval_data=held), load, list, expand=_ranking_pairs)
    assert len(train) == 8 * 3 and len(ev) == 2 * 3 and all(isinstance(r, PairRecord) for r in train + ev)
    mixed = [PairRecord("p", "a", "b"), RankingRecord("q", ["x", "y"], [1, 0])]
    assert _ranking_pairs(mixed) == [PairRecord("p", "a", "b"), PairRecord("q", "y", "x")]


@pytest.mark.parametrize("kind,row", [("pairs", {"prompt": "p", "chosen": "a", "rejected": "b"}),
                                      ("rankings", {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]}),
                                      ("scores", {"prompt": "p", "response": "a", "score": 2.0})])
def test_dedup_refuses_drops_or_keeps_repeats(tmp_path, kind, row):
    other = {**row, "annotator": "bob"}  # not a repeat: another annotator's label
    path = _jsonl(tmp_path / "x.jsonl", [row, other, row])
    with pytest.raises(ValueError, match=r":3: <record>: duplicate .* \(same as line 1\)"):
        load_records(path, kind)  # the default (rlhf-fast validate): a problem
    assert len(load_records(path, kind, dedup=True)) == 2
    kept = load_records(path, kind, dedup=False)
    assert len(kept) == 3 and kept[0] == kept[2]


def test_pairwise_options_refused_where_nothing_is_pairwise():
    for kw, needles in ((dict(data_kind="rankings", label_smoothing=0.1), ("label_smoothing", "'rankings'")),
                        (dict(data_kind="scores", label_smoothing=0.1), ("label_smoothing", "'scores'")),
                        (dict(data_kind="scores", auto_annotator_weights=True), ("auto_annotator_weights", "'scores'"))):
        with pytest.raises(ValueError) as e:
            RewardConfig(**kw)
        assert all(n in str(e.value) for n in needles), str(e.value)
    # pairs, and rankings trained as their pairs, take both
    for kind, as_pairs in (("pairs", False), ("labels", False), ("rankings", True)):
        RewardConfig(data_kind=kind, rankings_as_pairs=as_pairs, label_smoothing=0.1, auto_annotator_weights=True)
    RewardConfig(data_kind="rankings", auto_annotator_weights=True)


def test_labels_file_of_ties_named_as_such(tmp_path):
    from rlhf_fast.trainers.dpo import _load_pairs

    rows = [{"item": i, "key": f"k{i}", "prompt": "p", "a": "x", "b": "y", "label": lab, "annotator": "me"}
            for i, lab in enumerate(("tie", "skip", "tie"))]
    path = _jsonl(tmp_path / "labels.jsonl", rows)
    with pytest.raises(ValueError, match=r"labels.jsonl holds no A/B labels \(3 ties / skips carry no preference\)"):
        _load_pairs(path, "labels", True)
    empty = _jsonl(tmp_path / "empty.jsonl", [])
    assert _load_pairs(empty, "labels", True) == []  # (the trainer calls an empty file empty)
