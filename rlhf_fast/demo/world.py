"""The demo's synthetic world: a corpus of short descriptions, a hidden preference that
simulated annotators follow (noisily, with a length bias), and an arithmetic task with a
verifiable answer. Everything is generated from a seed; nothing is downloaded.

The hidden preference is deliberately simple and checkable: a response's true utility is
(# warm adjectives − # cold adjectives). The SFT corpus uses all adjectives evenly, so the
SFT policy is indifferent, and RL has room to move towards what the annotators like.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Sequence, Tuple

SUBJECTS = ["cat", "dog", "fox", "owl", "bear", "wolf", "horse", "bird", "fish", "frog", "deer", "lion"]
WARM = ["kind", "bright", "warm", "calm", "happy", "gentle", "brave", "clever"]
COLD = ["cold", "dull", "rude", "sad", "angry", "lazy", "grim", "harsh"]
NEUTRAL = ["big", "small", "old", "young"]
ADJECTIVES = WARM + COLD + NEUTRAL
PROMPT_TEMPLATES = ["Tell me about the {s}.", "Describe the {s}.", "What is the {s} like?"]


def make_prompt(rng: random.Random) -> str:
    return rng.choice(PROMPT_TEMPLATES).format(s=rng.choice(SUBJECTS))


def subject_of(prompt: str) -> str:
    for s in SUBJECTS:
        if f" {s}" in prompt:
            return s
    return "it"


def make_response(prompt: str, rng: random.Random) -> str:
    """1–3 short sentences about the prompt's subject with uniformly drawn adjectives."""
    s = subject_of(prompt)
    sentences = [f"The {s} is {rng.choice(ADJECTIVES)}."]
    for _ in range(rng.randint(0, 2)):
        sentences.append(f"It is {rng.choice(ADJECTIVES)} and {rng.choice(ADJECTIVES)}.")
    return " ".join(sentences)


def sft_corpus(n: int, seed: int = 0) -> List[Tuple[str, str]]:
    """``n`` (prompt, response) pairs for supervised fine-tuning."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = make_prompt(rng)
        out.append((p, make_response(p, rng)))
    return out


def prompts(n: int, seed: int = 1) -> List[str]:
    rng = random.Random(seed)
    return [make_prompt(rng) for _ in range(n)]


def on_topic(prompt: str, response: str) -> bool:
    """The response talks about the prompt's subject (and no other one)."""
    words = {w.strip(".,!?").lower() for w in response.split()}
    named = {s for s in SUBJECTS if s in words}
    return named == {subject_of(prompt)}


def true_utility(response: str) -> float:
    """The hidden preference: warm adjectives count +1, cold ones −1."""
    words = [w.strip(".,!?").lower() for w in response.split()]
    return float(sum(w in WARM for w in words) - sum(w in COLD for w in words))


@dataclass
class SimulatedAnnotator:
    """Labels pairs by the hidden utility, plus a bias towards longer responses
    (``length_bias`` utility per word), and flips a fraction ``noise`` of its labels."""

    name: str = "sim-0"
    noise: float = 0.1
    length_bias: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.noise <= 0.5:
            raise ValueError(f"noise must be in [0, 0.5], got {self.noise}")
        self._rng = random.Random(self.seed)

    def prefers_first(self, a: str, b: str) -> bool:
        ua = true_utility(a) + self.length_bias * len(a.split())
        ub = true_utility(b) + self.length_bias * len(b.split())
        first = ua > ub if ua != ub else self._rng.random() < 0.5
        return (not first) if self._rng.random() < self.noise else first


def win_rate(utilities_a: Sequence[float], utilities_b: Sequence[float]) -> float:
    """Fraction of paired comparisons a wins by the hidden utility (ties count half)."""
    if len(utilities_a) != len(utilities_b) or not utilities_a:
        raise ValueError("win_rate needs two equal, non-empty lists")
    score = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(utilities_a, utilities_b))
    return score / len(utilities_a)


# ----------------------------------------------------------------------------- arithmetic


def arithmetic_problems(n: int, seed: int = 0, max_operand: int = 9) -> List[Tuple[str, str]]:
    """(prompt, answer) pairs such as ("3+4=", "7")."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        out.append((f"{a}+{b}=", str(a + b)))
    return out


def arithmetic_reward(prompts: List[str], completions: List[str]) -> List[float]:
    """Verifiable reward: 1 when the completion starts with the exact sum, else 0."""
    out = []
    for p, c in zip(prompts, completions):
        a, b = p.rstrip("=").split("+")
        answer = str(int(a) + int(b))
        got = c.strip().split()[0] if c.strip() else ""
        out.append(1.0 if got == answer else 0.0)
    return out
