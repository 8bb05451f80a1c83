"""Review of the KL controllers, reward shaping and the rule-based rewards against their peers
(TRL, verl's reward_score math / gsm8k, OpenRLHF): one test per defect found."""

import math

import pytest

from rlhf_fast.algorithms.rule_rewards import answer_match, extract_answer


def _score(completion, ref) -> float:
    return answer_match(["p"], [completion], [ref])[0]


def test_answer_match_comma_is_a_thousands_separator_only():
    r"""Commas were dropped anywhere before parsing a number: the list ``\boxed{2,3}`` scored 1
    against the reference 23 (and ``\boxed{-21}`` against "-2,1"), and the last-number
    fallback read "x = 1,5" as 15. verl's math ``strip_string`` keeps such commas (no match);
    its gsm8k scorer only reads ``1,000``-style numbers after ``####``."""
    assert _score(r"so \boxed{2,3}", "23") == 0.0
    assert _score(r"so \boxed{-21}", "-2,1") == 0.0
    assert _score("so x = 1,5", "15") == 0.0
    assert _score("so x = 1,5", "5") == 1.0  # the last number is 5
    # thousands separators still read as numbers
    assert _score(r"\boxed{12,345}", "12345") == 1.0
    assert _score("the total is 1,234,567.", "1234567") == 1.0
    assert _score("#### 1,000", "1000") == 1.0
    assert _score("it is 7, as shown", "7") == 1.0


def test_answer_match_reads_fbox_and_spaced_boxed():
    r"""verl's ``last_boxed_only_string`` (and lm-eval's MATH scorer it comes from) reads the
    last ``\fbox{...}`` where there is no ``\boxed``; MATH's own solutions use it. Ours fell back
    to the last number (step 2's "2"), and a MATH solution given as the reference was compared
    as a whole text. ``\boxed {7}`` (LaTeX allows the space) was missed the same way."""
    assert extract_answer(r"\fbox{7} is it (see step 2)") == "7"
    assert extract_answer(r"so \boxed {7} by step 2") == "7"
    assert _score(r"\fbox{7} is it (see step 2)", "7") == 1.0
    assert _score("the answer is 7", r"Adding, we get $\fbox{7}$.") == 1.0
    assert extract_answer(r"\fbox{1} then \boxed{2}") == "2"


def test_answer_match_identical_infinite_answers_match():
    r"""``float()`` parses "inf" / "infinity" / "nan": both sides then "parse as numbers" and
    |inf − inf| is NaN, so the very answer of the reference scored 0. Non-finite values are not
    numbers to compare; they compare as text (verl's strip_string maps them to ``\infty``)."""
    assert _score(r"\boxed{inf}", "inf") == 1.0
    assert _score(r"\boxed{-inf}", "inf") == 0.0
    assert _score(r"\boxed{5}", "inf") == 0.0


def test_answer_match_refuses_a_blank_reference():
    r"""A reference of "" (a data row whose answer is blank) or a float NaN (pandas' missing
    value) was silently used: an empty ``\boxed{}`` or a bare ``####`` scored 1 against "",
    and "nan" against NaN. A missing answer (None) is a ValueError naming the field; these
    are the same data error (TRL's accuracy_reward skips an unparseable gold, never scores it
    correct)."""
    for ref in ("", "  ", float("nan"), r"\boxed{}", "#### "):
        with pytest.raises(ValueError, match="'answer'"):
            answer_match(["p"], [r"\boxed{}"], [ref])
    assert _score(r"\boxed{}", "5") == 0.0
    assert not math.isnan(_score("5", "5"))


def test_answer_match_sqrt_without_braces():
    r"""verl's ``strip_string`` rewrites ``\sqrt2`` as ``\sqrt{2}`` (``_fix_sqrt``), as it
    rewrites ``\frac12`` (which ours reads); ``\boxed{3\sqrt2}`` scored 0 against
    ``3\sqrt{2}``."""
    assert _score(r"\boxed{3\sqrt2}", r"3\sqrt{2}") == 1.0
    assert _score(r"\boxed{\sqrt{2}}", r"\sqrt2") == 1.0
    assert _score(r"\boxed{\sqrt{3}}", r"\sqrt2") == 0.0


def test_answer_match_integers_compare_exactly():
    r"""Numbers were equal within 1e-6 relative, so from a million on an off-by-one integer
    scored 1 (``\boxed{1000000}`` against 1000001, "2000001" against "2,000,000"), and past 2^53
    floats could not tell integers apart at all. verl's gsm8k / math scorers compare the
    strings, math-verify compares integers exactly; the tolerance is for decimals such as
    0.333333 against 1/3."""
    assert _score(r"\boxed{1000000}", "1000001") == 0.0
    assert _score("so 2000001", "2,000,000") == 0.0
    assert _score(r"\boxed{123456789012345678}", "123456789012345679") == 0.0
    assert _score(r"\boxed{1000000.0}", "1000000") == 1.0
    assert _score(r"\boxed{1000000.5}", "1000001") == 0.0  # an integer reference: exactly
    assert _score(r"\boxed{0.333333}", r"\frac{1}{3}") == 1.0  # the decimal tolerance stays
    assert _score(r"\boxed{0.1}", "1/10") == 1.0


def test_gsm8k_marker_is_the_last_one_with_a_number():
    """verl's gsm8k scorer (strict) takes the last ``#### <number>`` of the text; ours read what
    follows the very last ``####``, so an answer followed by a markdown heading ("#### 42" then
    "#### Explanation") scored 0: the answer read was "Explanation"."""
    text = "so 40 + 2 = 42.\n#### 42\n\n#### Explanation\nWe added 40 and 2."
    assert extract_answer(text) == "42"
    assert _score(text, "42") == 1.0
    assert extract_answer("#### 41\n#### Check\nfine\n#### 42 apples\n#### Notes") == "42"
    assert extract_answer("#### 5\n#### 6") == "6"
    assert extract_answer("#### B") == "B"  # no number after any marker: the last one's text
