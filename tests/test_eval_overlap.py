"""BLEU / ROUGE of ``rlhf-fast eval`` (sacrebleu and rouge-score underneath) against numbers
recorded from sacrebleu 2.6.0 (corpus_bleu with its defaults) and rouge-score 0.1.2
(RougeScorer(["rouge1", "rouge2", "rougeL"]), no stemming, score_multi): the references of each
answer, one or several, reach the libraries as they should."""

import json

import pytest

from rlhf_fast.trainers.evaluate import corpus_bleu, overlap_metrics, read_references, rouge_scores

H = ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog!", "It costs 3.50 dollars, well-known fact."]
R = ["The cat is sitting on the mat.", "The quick brown fox jumped over a lazy dog.", "It costs 3.50 dollars; a well known fact."]

# (hypotheses, references, sacrebleu score, rouge1, rouge2, rougeL) — values from the libraries
CASES = [
    (H, R, 29.257815132335722, 0.866432042902631, 0.5734848484848484, 0.7923579688285569),
    (["the cat sat on a red mat today"], ["the cat sat on the mat"], 36.55552228545123,  # exp smoothing (no 4-gram)
     0.7142857142857143, 0.5, 0.7142857142857143),
    (["the cat sat on"], ["the cat sat on the mat"], 60.653065971263366, None, None, None),  # brevity penalty
    (["the cat sat"], ["the cat sat on the mat"], 0.0, 0.6666666666666666, 0.5714285714285715, 0.6666666666666666),
    (["Hello, world! It's 3.5-4 km (approx.)"], ["Hello , world ! It 's 3.5 - 4 km ( approx . )"],  # 13a rules
     70.4805090506219, 1.0, 1.0, 1.0),
    ([""], ["the cat"], 0.0, 0.0, 0.0, 0.0),
    (["the fast brown fox", "a dog barked loudly at night"],  # several references per hypothesis
     [["the quick brown fox", "a fast brown fox"], ["the dog barked at night", "dogs bark"]],
     30.213753973567677, 0.7386363636363635, 0.5555555555555556, 0.7386363636363635),
    (H, [[r, r.upper()] for r in R], 29.655972167002666, None, None, None),  # case-sensitive BLEU
]


@pytest.mark.parametrize("hyps,refs,bleu,r1,r2,rl", CASES)
def test_against_recorded_library_values(hyps, refs, bleu, r1, r2, rl):
    assert corpus_bleu(hyps, refs) == pytest.approx(bleu, rel=1e-12, abs=1e-12)
    if r1 is not None:
        assert rouge_scores(hyps, refs) == pytest.approx({"rouge1": r1, "rouge2": r2, "rougeL": rl}, rel=1e-12)


def test_overlap_metrics_and_errors():
    m = overlap_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert m == {"bleu": pytest.approx(100.0), "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    with pytest.raises(ValueError, match="one reference"):
        corpus_bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="references\\[0\\]"):
        rouge_scores(["a"], [[]])
    with pytest.raises(TypeError):
        corpus_bleu("a b", "a b")


def test_read_references(tmp_path):
    p = tmp_path / "refs.jsonl"
    p.write_text(json.dumps({"prompt": "x", "reference": "a"}) + "\n\n" + json.dumps({"references": ["b", "c"]}) + "\n")
    assert read_references(str(p)) == [["a"], ["b", "c"]]
    t = tmp_path / "refs.txt"
    t.write_text("one\n\ntwo\n")
    assert read_references(str(t)) == [["one"], ["two"]]
    p.write_text(json.dumps({"reference": 3}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        read_references(str(p))
