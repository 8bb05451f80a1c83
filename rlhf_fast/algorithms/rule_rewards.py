"""Rule-based (verifiable) rewards for examples and tests: plain functions
``fn(prompts: list[str], completions: list[str]) -> list[float]`` usable as
``reward.functions: ["rlhf_fast.algorithms.rule_rewards:NAME"]``."""

from __future__ import annotations

import re
from typing import List, Optional


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


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _last_boxed(text: str) -> Optional[str]:
    r"""The content of the last ``\boxed{...}`` (nested braces kept), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: no answer


def extract_answer(text: str) -> Optional[str]:
    r"""The final answer of a solution: the content of its last ``\boxed{...}``, else what follows
    its last ``####`` (GSM8K's marker), else its last number; None if it has none of them."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


def _as_number(s: str) -> Optional[float]:
    t = s.strip().replace(",", "").replace("$", "").replace("\\%", "").rstrip("%").rstrip(".").strip()
    try:
        if "/" in t:
            a, b = t.split("/", 1)
            return float(a) / float(b)
        return float(t)
    except (ValueError, ZeroDivisionError):
        return None


def _normal_text(s: str) -> str:
    return "".join(s.replace("$", "").split()).rstrip(".").lower()


def answer_match(prompts: List[str], completions: List[str], answer: List) -> List[float]:
    r"""Verifiable correctness: 1.0 where a completion's final answer (:func:`extract_answer`)
    equals the prompt's reference ``answer`` field, else 0.0. A reference holding ``\boxed{}`` or
    ``####`` is reduced the same way. Compared as numbers when both parse (commas, ``$`` and
    ``%`` ignored, ``a/b`` a fraction; equal within 1e-6 relative), else as text without spaces,
    ``$``, case or a final period. Give the prompts as records ``{"prompt": ..., "answer": ...}``
    (a JSONL ``data.prompts_file``); for symbolic maths use a checker such as math-verify in a
    reward function of your own, which receives ``answer`` the same way."""
    out = []
    for c, ref in zip(completions, answer):
        if ref is None:
            raise ValueError("answer_match: a prompt has no 'answer' field")
        ref = str(ref)
        want = extract_answer(ref) if ("\\boxed{" in ref or "####" in ref) else ref.strip()
        got = extract_answer(c)
        if got is None or want is None:
            out.append(0.0)
            continue
        a, b = _as_number(got), _as_number(want)
        if a is not None and b is not None:
            out.append(float(abs(a - b) <= 1e-6 * max(1.0, abs(b))))
        else:
            out.append(float(_normal_text(got) == _normal_text(want)))
    return out
