"""Review of evaluation (eval2): ``rlhf-fast eval``'s JSON results and the answer
normalisation of :mod:`rlhf_fast.algorithms.rule_rewards` (answer_match, maj@k's vote keys)."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import pytest  # noqa: E402

from rlhf_fast.algorithms import rule_rewards  # noqa: E402
from rlhf_fast.trainers import evaluate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _strict_json(text):
    """``json.loads`` as strict readers (jq, JavaScript's JSON.parse) read: no NaN / Infinity."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_eval_results_are_strict_json_when_a_metric_is_nan(tmp_path, capsys):
    """Every answer's reward dropped (``--on-bad-reward drop``): reward/mean and reward/std are
    NaN, which ``rlhf-fast eval`` wrote as bare ``NaN`` — not JSON (RFC 8259; jq and
    JSON.parse refuse the file). The run logs write a non-finite float as its text ("nan",
    :func:`rlhf_fast.trainers.common._jsonable`, "keep the line parseable by strict readers");
    the results now do the same, on stdout and in --out."""
    import math

    from rlhf_fast import cli
    from rlhf_fast.models import sample_texts, tiny_causal_lm, train_tokenizer

    tok = train_tokenizer(sample_texts(), 256)
    tiny_causal_lm(len(tok), seed=1).save_pretrained(str(tmp_path / "policy"))
    tok.save_pretrained(str(tmp_path / "policy"))
    (tmp_path / "prompts.txt").write_text("hello there\nhow are you\n")
    (tmp_path / "rw.py").write_text("def all_nan(prompts, completions):\n"
                                    "    return [float('nan')] * len(completions)\n")
    out = tmp_path / "res.json"
    argv = ["eval", "--policy", str(tmp_path / "policy"), "--prompts", str(tmp_path / "prompts.txt"),
            "--reward-fn", f"{tmp_path / 'rw.py'}:all_nan", "--max-new-tokens", "2",
            "--on-bad-reward", "drop", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for text in (out.read_text(), printed):
        res = _strict_json(text)
        assert math.isnan(float(res["reward/mean"])) and math.isnan(float(res["reward/std"]))
        assert res["num_prompts"] == 2  # the finite values stay numbers


@pytest.mark.parametrize("completion", [r"so \boxed{10{,}000}", "The total is 10{,}000 dollars.",
                                        r"so $10\,000$ in all", r"#### 10{,}000"])
def test_latex_thousands_separators_are_read_as_thousands(completion):
    r"""LaTeX writes a thousands comma as ``{,}`` (a bare comma in maths mode is followed by a
    space) or a thin space ``\,``: ``10{,}000`` is ten thousand, as ``10,000`` is (the
    documented "thousands commas ignored"). answer_match scored ``\boxed{10{,}000}`` against
    the reference 10000 as 0 (its text "10{,}000" no number), and the last-number fallback read
    ``10{,}000`` / ``10\,000`` as "000" (= 0). math-verify reads both as 10000."""
    assert rule_rewards.answer_match(["q"], [completion], ["10000"]) == [1.0]
    assert evaluate.vote_key(completion) == evaluate.vote_key("10,000") == "number:10000"


def test_latex_thousands_separator_in_a_reference():
    r"""A reference written ``\boxed{1{,}234{,}567}`` (MATH's style) is the number 1234567."""
    assert rule_rewards.answer_match(["q"], ["#### 1,234,567"], [r"\boxed{1{,}234{,}567}"]) == [1.0]
    assert rule_rewards.normal_answer(r"1{,}234{,}567") == "number:1234567"
    # a thin space grouping a decimal's digits stays out of the number, as before the fix
    assert rule_rewards.answer_match(["q"], [r"\boxed{3.141\,592}"], ["3.141592"]) == [1.0]
    assert rule_rewards.answer_match(["q"], [r"so $3.141\,592$"], ["3.141592"]) == [1.0]
    # a list stays a list: "{,}" between numbers that are no thousands groups is no thousands separator
    assert rule_rewards.normal_answer(r"1{,}2") != rule_rewards.normal_answer("12")
