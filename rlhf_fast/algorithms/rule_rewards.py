"""Rule-based (verifiable) rewards for examples and tests: plain functions
``fn(prompts: list[str], completions: list[str]) -> list[float]`` usable as
``reward.functions: ["rlhf_fast.algorithms.rule_rewards:NAME"]``."""

from __future__ import annotations

from typing import List


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
