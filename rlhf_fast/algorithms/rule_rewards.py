"""Rule-based (verifiable) rewards for examples and tests: plain functions
``fn(prompts: list[str], completions: list[str]) -> list[float]`` usable as
``reward.functions: ["rlhf_fast.algorithms.rule_rewards:NAME"]``."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import List, Optional, Tuple


def letter_a_fraction(prompts: List[str], completions: List[str]) -> List[float]:
    """Share of the non-space characters of each completion that are the letter 'a' (0 if empty)."""
    out = []
    for c in completions:
        s = c.replace(" ", "")
        out.append(sum(ch == "a" for ch in s) / max(1, len(s)))
    return out


def ascending_digits(prompts: List[str], completions: List[str]) -> List[float]:
    """"Write digits in ascending order": the share of adjacent pairs among the completion's
    digits that strictly increase, times the share of characters that are digits (so a
    completion without digits scores 0)."""
    out = []
    for c in completions:
        s = c.replace(" ", "")
        d = [int(ch) for ch in s if ch.isdigit()]
        if len(d) < 2:
            out.append(0.0)
            continue
        asc = sum(b > a for a, b in zip(d, d[1:])) / (len(d) - 1)
        out.append(asc * len(d) / len(s))
    return out


# a comma only as a thousands separator ("1,000"): "x = 1,5" is the numbers 1 and 5, not 15
_NUMBER = re.compile(r"-?\d+(?:,\d{3}(?!\d))*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
# GSM8K's "#### 72 apples": a number ending at a space, the end or a final punctuation (not "3\sqrt{2}")
_LEADING_NUMBER = re.compile(r"(?:" + _NUMBER.pattern + r")(?=[.,;:!?)]*(?:\s|$))")
# a whole answer that is one LaTeX fraction: \frac{a}{b}, \dfrac / \tfrac, \frac12 (digit arguments)
_FRAC = re.compile(r"(-?)\s*\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")
# the opening of a box: \boxed{ or \fbox{ (MATH's solutions use both; verl's last_boxed_only_string
# reads both), a space allowed before the brace as in LaTeX
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
# \sqrt2 is \sqrt{2} (verl's strip_string _fix_sqrt; one character, LaTeX's argument)
_SQRT = re.compile(r"\\sqrt\s*([0-9A-Za-z])")
# LaTeX's digit-group separators between a digit and a group of three: "10{,}000" (a bare comma
# in maths mode adds a space) is the comma it stands for; a thin space "10\,000" (also in
# decimals, "3.141\,592") goes, as _SPACING drops it
_LATEX_THOUSANDS = re.compile(r"(?<=\d)(\{,\}|\\,)(?=\d{3}(?!\d))")


def _latex_thousands(s: str) -> str:
    """``s`` with :data:`_LATEX_THOUSANDS`' separators as plain text (``{,}``: a comma; ``\\,``: none)."""
    return _LATEX_THOUSANDS.sub(lambda m: "," if m.group(1) == "{,}" else "", s)


def _last_boxed(text: str) -> Optional[str]:
    r"""The content of the last ``\boxed{...}`` or ``\fbox{...}`` (nested braces kept), or None."""
    opens = list(_BOX.finditer(text))
    if not opens:
        return None
    i, depth = opens[-1].end(), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: no answer


def extract_answer(text: str) -> Optional[str]:
    r"""The final answer of a solution: the content of its last ``\boxed{...}`` (or
    ``\fbox{...}``), else what follows its ``####`` (GSM8K's marker: the number after the last
    one followed by a number, as verl's gsm8k scorer, else the last one's first line), else its
    last number; None if it has none of them. A Unicode minus (U+2212) is read as "-", LaTeX's
    thousands separators ``10{,}000`` / ``10\,000`` as ``10,000`` / ``10000``."""
    text = text.replace("\u2212", "-")  # else "−5" would read as 5
    text = _latex_thousands(text)  # else "10{,}000" / "10\,000" would read as 000
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        # the last marker followed by a number, as verl's strict findall (a later markdown
        # "#### Explanation" heading is no answer); none: the last one's first line
        tails = [t.strip() for t in text.split("####")[1:]]
        for tail in reversed(tails):
            num = _LEADING_NUMBER.match(tail.lstrip("$ "))  # "#### 72 apples" / "#### 72\nQuestion" -> 72
            if num:
                return num.group()
        return tails[-1].split("\n", 1)[0].strip()
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


# what verl's strip_string drops around a number: a degree sign, a trailing unit in \text{} /
# \mbox{} after a number, LaTeX spacing and \left / \right, a leading "x =" (one letter)
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?")
_UNIT = re.compile(r"(?<=[\d}.])\s*\\(?:text|mbox)\s*\{[^{}]*\}\s*$")
_SPACING = re.compile(r"\\[,!;: ]|\\(?:left|right)\b")
_ASSIGNMENT = re.compile(r"^\s*[A-Za-z]\s*=\s*(?=\S)")


def _plain(s: str) -> str:
    r"""An answer's LaTeX number forms as plain text: ``\$`` as ``$``, ``\dfrac`` / ``\tfrac`` as
    ``\frac``, a whole answer ``\frac{a}{b}`` (``\frac12``, a leading ``-``) with numeric a and b
    as ``a/b``, LaTeX's thousands separators (``1{,}000``, ``1\,000``) as ``1,000`` / ``1000``;
    without a degree sign (``90^\circ``), a trailing unit (``5\text{ cm}``), LaTeX
    spacing / ``\left`` / ``\right`` or a leading one-letter ``x =``; ``\sqrt2`` as ``\sqrt{2}``
    (verl's ``strip_string`` normalises the same forms)."""
    s = _latex_thousands(s)  # 10{,}000 as 10,000, 10\,000 as 10000
    s = s.replace("\u2212", "-").replace("\\$", "$").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SQRT.sub(r"\\sqrt{\1}", s)
    s = _ASSIGNMENT.sub("", _UNIT.sub("", _SPACING.sub("", _DEGREES.sub("", s))))
    m = _FRAC.fullmatch(s.strip())
    if m is None:
        return s
    sign, a, b = m.group(1), (m.group(2) or m.group(3)).strip(), (m.group(4) or m.group(5)).strip()
    if _as_number(a) is None or _as_number(b) is None or "/" in a + b:
        return s  # a symbolic fraction stays text
    return f"{sign}{a}/{b}"


def _as_number(s: str) -> Optional[Fraction]:
    """``s`` as an exact number (``$``, ``%`` and thousands commas ignored; ``a/b``), or None:
    for text, a comma that is not a thousands separator ("2,3": a list) and inf / nan (text)."""
    t = s.strip().replace("$", "").replace("\\%", "").rstrip("%").rstrip(".").strip()
    try:
        parts = [_exact(p) for p in t.split("/", 1)]
        return parts[0] / parts[1] if len(parts) == 2 else parts[0]
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def _exact(t: str) -> Fraction:
    """A decimal literal as a Fraction (ValueError if it is not one, or not finite)."""
    t = t.strip()
    if "," in t:
        if not _THOUSANDS.fullmatch(t):
            raise ValueError(t)
        t = t.replace(",", "")
    if "e" in t.lower():  # 1e5; through float, so a huge exponent cannot build a huge integer
        v = float(t)
        if not math.isfinite(v):
            raise ValueError(t)
        return Fraction(v)
    return Fraction(t)  # ValueError for text, inf and nan


def _normal_text(s: str) -> str:
    return "".join(s.replace("$", "").split()).rstrip(".").lower()


def _answer_forms(answer: str) -> Optional[Tuple[Optional[Fraction], str]]:
    """An extracted answer as (its exact number or None, its normalised text), both of its
    :func:`_plain` form; None when that text is empty (blank, an empty ``\\boxed{}``): the one
    normalisation behind :func:`normal_answer` and :func:`answer_match`."""
    plain = _plain(answer)
    text = _normal_text(plain)
    return None if not text else (_as_number(plain), text)


def normal_answer(answer: str) -> Optional[str]:
    r"""The normalised form of a final answer (:func:`extract_answer`'s text), the key
    :func:`answer_match` compares and majority votes group by
    (:func:`rlhf_fast.trainers.evaluate.vote_key`): ``"number:<exact value>"`` when it reads as
    a number (``1,000`` = ``1000.`` = ``\frac{2000}{2}`` → ``number:1000``; ``$``, ``%`` and
    thousands commas ignored; ``a/b`` as a fraction in lowest terms), else ``"text:<text>"``
    without spaces, ``$``, case or a final period (``\dfrac`` / ``\tfrac`` read as ``\frac``,
    ``\sqrt2`` as ``\sqrt{2}``); None when nothing is left (blank, an empty ``\boxed{}``).
    answer_match scores two answers with equal keys 1.0; it also accepts numbers within 1e-6
    relative of a non-integer reference, and a number against a text of equal normalised text."""
    if not isinstance(answer, str):
        raise TypeError(f"normal_answer: answer must be text (a final answer), got {type(answer).__name__}")
    forms = _answer_forms(answer)
    if forms is None:
        return None
    num, text = forms
    return f"number:{num}" if num is not None else f"text:{text}"


def _completion_text(c) -> str:
    """A completion as text: a string as it is; TRL's messages (``reward.calling_convention:
    trl`` with chat prompts, tool turns included) as their assistant turns' contents."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(m, dict) for m in c):
        return "\n".join(str(m.get("content") or "") for m in c if m.get("role") == "assistant")
    raise TypeError(f"answer_match: each completion must be text or a list of chat messages, "
                    f"got {type(c).__name__}")


def answer_match(prompts: List[str], completions: List, answer: List) -> List[float]:
    r"""Verifiable correctness: 1.0 where a completion's final answer (:func:`extract_answer`)
    equals the prompt's reference ``answer`` field, else 0.0. A reference holding ``\boxed{}`` or
    ``####`` is reduced the same way. Compared as numbers when both parse (commas, ``$`` /
    ``\$`` and ``%`` ignored, a comma only as a thousands separator, ``a/b`` and a whole
    ``\frac{a}{b}`` / ``\dfrac`` / ``\frac12`` fractions; an integer reference exactly, any
    other within 1e-6 relative), else as text without spaces, ``$``, case or a final period
    (``\dfrac`` / ``\tfrac`` read as ``\frac``, ``\sqrt2`` as ``\sqrt{2}``). An empty answer
    scores 0; a reference that is missing (None, NaN) or holds no answer (blank, an empty box)
    is a ValueError. Give the prompts as records
    ``{"prompt": ..., "answer": ...}`` (a JSONL ``data.prompts_file``); for symbolic maths use a
    checker such as math-verify in a reward function of your own, which receives ``answer`` the
    same way. A completion may also be TRL's messages (``reward.calling_convention: trl``): the
    assistant turns' text is read."""
    out = []
    for c, ref in zip(completions, answer):
        if ref is None or (isinstance(ref, float) and math.isnan(ref)):  # (NaN: pandas' missing value)
            raise ValueError("answer_match: a prompt has no 'answer' field")
        ref = str(ref)
        want = extract_answer(ref) if (_BOX.search(ref) or "####" in ref) else ref.strip()
        wanted = None if want is None else _answer_forms(want)
        if wanted is None:  # else an empty \boxed{} would match it
            raise ValueError(f"answer_match: a prompt's 'answer' field holds no answer: {ref[:60]!r}")
        got = extract_answer(_completion_text(c))
        given = None if got is None else _answer_forms(got)
        if given is None:
            out.append(0.0)
            continue
        (a, got_text), (b, want_text) = given, wanted
        if a is not None and b is not None:
            # an integer exactly (1000000 is not 1000001); else within 1e-6 relative (0.333333 ~ 1/3)
            close = a == b if b.denominator == 1 else abs(a - b) <= Fraction(1, 10**6) * max(1, abs(b))
            out.append(float(close))
        else:
            out.append(float(got_text == want_text))
    return out
