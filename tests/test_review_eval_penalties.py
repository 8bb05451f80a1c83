"""Review of evaluation (``rlhf-fast eval``): answers that no reward source scored, empty
overlap inputs and a UTF-8 byte-order mark in a ``--references`` file."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import math  # noqa: E402

import pytest  # noqa: E402

from rlhf_fast.algorithms.rewards import CombinedReward  # noqa: E402
from rlhf_fast.trainers import evaluate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

PROMPTS = ["hello there", "how are you"]


@pytest.fixture(scope="module")
def tok():
    from rlhf_fast.models import sample_texts, train_tokenizer

    return train_tokenizer(sample_texts(), 256)


def _model(tok, seed):
    from rlhf_fast.models import tiny_causal_lm

    return tiny_causal_lm(len(tok), seed=seed)


def _scripted(*per_call):
    """A TRL-convention reward function returning ``per_call[k]`` on its k-th call (the
    policy's answers first, then the reference's); None = this answer is not scored."""
    calls = []

    def fn(completions, **kw):
        calls.append(1)
        return list(per_call[len(calls) - 1])

    return fn


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_win_rate_leaves_out_answers_no_source_scored(tok):
    """The reward mean skips unscored answers (TRL's nanmean); the win rate must too, not
    compare them as reward 0: here the only pair scored on both sides is a loss."""
    fn = _scripted([None, 0.0], [-1.0, 1.0])
    res = evaluate.evaluate_policy(_model(tok, 1), tok, PROMPTS, CombinedReward([fn], convention="trl"),
                                   reference=_model(tok, 2), max_new_tokens=3)
    assert res["reward/mean"] == 0.0
    assert res["win_rate"] == 0.0  # was 0.5: the unscored answer "won" against -1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_pass_at_k_never_counts_an_unscored_answer_correct(tok):
    """An answer no source scored is not correct, even at a threshold <= 0 (its total is a
    placeholder 0, not a reward)."""
    fn = _scripted([None] * 4)
    res = evaluate.evaluate_policy(_model(tok, 1), tok, PROMPTS, CombinedReward([fn], convention="trl"),
                                   max_new_tokens=3, n=2, temperature=1.0, pass_k=[1, 2],
                                   correct_threshold=0.0)
    assert math.isnan(res["reward/mean"])
    assert res["pass@1"] == 0.0 and res["pass@2"] == 0.0  # were 1.0


def test_overlap_metrics_refuse_empty_lists():
    """No hypotheses: a ValueError naming them, not sacrebleu's IndexError nor ROUGE 0."""
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    for f in (evaluate.corpus_bleu, evaluate.rouge_scores, evaluate.overlap_metrics):
        with pytest.raises(ValueError, match="hypotheses"):
            f([], [])


def test_read_references_drops_a_utf8_byte_order_mark(tmp_path):
    """A .txt saved with a BOM (Windows editors): the mark is no part of the first reference
    (it lowered BLEU of an exact answer from 100 to 76)."""
    path = tmp_path / "refs.txt"
    path.write_text("\ufeffthe cat sat on the mat\nok\n", encoding="utf-8")
    assert evaluate.read_references(str(path)) == [["the cat sat on the mat"], ["ok"]]


def test_read_references_names_a_file_that_is_not_utf8(tmp_path):
    """A UTF-16 file: one line naming --references and the file (the CLI's exit-2 line), not
    the bare codec message."""
    path = tmp_path / "refs.txt"
    path.write_bytes("the cat\n".encode("utf-16"))
    with pytest.raises(ValueError, match=r"--references .*refs\.txt.*not UTF-8"):
        evaluate.read_references(str(path))


def test_min_new_tokens_above_max_new_tokens_is_refused():
    """No answer could end before the cap (EOS suppressed throughout): refused, as vLLM's
    SamplingParams refuses min_tokens > max_tokens, in the sampling parameters and RL's rollout
    section alike."""
    from rlhf_fast.rollout.types import SamplingParams
    from rlhf_fast.trainers.rl_config import RolloutConfig

    with pytest.raises(ValueError, match=r"min_new_tokens \(9\) must be <= max_new_tokens \(8\)"):
        SamplingParams(max_new_tokens=8, min_new_tokens=9)
    with pytest.raises(ValueError, match=r"^rollout.min_new_tokens \(9\) must be <= max_new_tokens \(8\)"):
        RolloutConfig(max_new_tokens=8, min_new_tokens=9)
    assert SamplingParams(max_new_tokens=8, min_new_tokens=8).min_new_tokens == 8
    assert RolloutConfig(max_new_tokens=512, min_new_tokens=100).min_new_tokens == 100
