"""Agreement statistics against hand counts, and rankings -> pairs with repeated texts."""

import pytest

from rlhf_fast.feedback import PairRecord, RankingRecord, agreement_stats, annotator_weights, load_records, rankings_to_pairs


def test_per_annotator_agreement_is_with_the_others_only():
    # x labels item 1 twice (consistently, e.g. shown in both orders); on item 2 x and y disagree
    recs = [PairRecord("p1", "a", "b", annotator="x"), PairRecord("p1", "a", "b", annotator="x", margin=1.0),
            PairRecord("p2", "c", "d", annotator="x"), PairRecord("p2", "d", "c", annotator="y")]
    s = agreement_stats(recs)
    # pooled over every pair of labels of an item (a repeat is a second independent label)
    assert s.n_items == 2 and s.n_multi == 2 and s.n_label_pairs == 2 and s.agreement == 0.5
    # x has one comparison with another annotator, and it disagrees; the self-repeat is not agreement
    assert s.per_annotator["x"]["compared"] == 1 and s.per_annotator["x"]["agreement"] == 0.0
    assert s.per_annotator["y"] == {"labels": 1, "compared": 1, "agreement": 0.0, "majority_agreement": None}
    assert annotator_weights(s)["x"] == pytest.approx(0.05)  # the floor: no better than chance


def test_majority_agreement_counts_other_annotators_only():
    # item: x, x, y, z label; x agrees with itself, y and z both disagree with x
    recs = [PairRecord("p", "a", "b", annotator="x"), PairRecord("p", "a", "b", annotator="x", margin=1.0),
            PairRecord("p", "b", "a", annotator="y"), PairRecord("p", "b", "a", annotator="z")]
    s = agreement_stats(recs)
    x, y = s.per_annotator["x"], s.per_annotator["y"]
    # x against the others' majority (y, z: both "b"): wrong, twice (two labels); x's pairs with others: 4, none agree
    assert (x["compared"], x["agreement"], x["majority_agreement"]) == (4, 0.0, 0.0)
    # y against x, x, z: the majority (x, x) says "a": y disagrees; y's pairs: with x twice (no), with z (yes)
    assert (y["compared"], y["agreement"], y["majority_agreement"]) == (3, pytest.approx(1 / 3), 0.0)
    # all 6 label pairs: agreeing (x, x) and (y, z)
    assert s.n_label_pairs == 6 and s.agreement == pytest.approx(2 / 6)


def test_rankings_with_a_repeated_text():
    r = RankingRecord("p", ["a", "b", "a"], [0, 1, 2])  # "a" > "b" > "a": the a-a pair says nothing
    pairs = rankings_to_pairs([r])
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b"), ("b", "a")]
    assert all(p.chosen != p.rejected for p in rankings_to_pairs([r], adjacent_only=True))
    recs, problems = load_records([{"prompt": "p", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]}], "rankings",
                                  strict=False)
    assert recs == [] and [str(p) for p in problems] == ["<list>:1: responses[2]: identical to responses[0]"]
