"""Rollout records and the engine interface: SamplingParams, RolloutBatch, RolloutEngine.

An engine turns prompts into a :class:`RolloutBatch` whose tensors are laid out the way the
trainers consume them (every ``[B, P+R]`` tensor aligned to ``input_ids`` positions, the
convention of :func:`rlhf_fast.models.sequence_logprobs`).
"""

from __future__ import annotations

import abc
import numbers
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

Prompts = Union[Sequence[str], Sequence[Sequence[int]]]


def _as_int(v):
    """An integral scalar (numpy's included) as an int; anything else (a bool too) as it is, for
    the checks to refuse."""
    return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v


def _as_float(v):
    """A real scalar (numpy's included) as a float; anything else (a bool too) as it is."""
    return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v


@dataclass
class SamplingParams:
    """How to sample responses.

    temperature: 0 is greedy; top_k 0 = off; top_p 1 = off; min_p 0 = off. The filters apply
    in the order of :func:`rlhf_fast.ops.sample` — temperature, top-k, top-p, min-p, each on
    the renormalised result of the one before — which is the order of transformers'
    ``generate`` (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    MinPLogitsWarper), so the processed distribution (and ``behaviour_logp``) is the one
    ``generate(do_sample=True, temperature=..., top_k=..., top_p=..., min_p=...)`` samples
    from. Differences from ``generate``, by design: the defaults here are the plain
    distribution (``generate`` applies ``top_k=50`` unless told otherwise), the model's
    ``generation_config`` sampling values (temperature, top_p, repetition_penalty, ...) are
    not read, and top-k keeps exactly k tokens on ties at the k-th value (the first indices)
    where transformers keeps every tied token. n: samples per prompt (one shared prefill),
    consecutive rows.

    Penalties (:class:`rlhf_fast.rollout.penalties.Penalties`), applied to the raw logits
    before temperature / top-k / top-p / min-p, in this order: repetition_penalty (1 = off;
    > 0; transformers' RepetitionPenaltyLogitsProcessor: the logit of a token already in the
    prompt or the response is divided by it when positive, multiplied when negative; the
    prompt's left padding does not count), frequency_penalty then presence_penalty (0 = off;
    in [-2, 2] as vLLM / OpenAI: subtracted once per occurrence / once per token, over the
    generated tokens only, the prompt not counted), no_repeat_ngram_size (0 = off;
    NoRepeatNGramLogitsProcessor: a token that would repeat an n-gram of prompt + response
    gets -inf; n-grams through the left padding are not counted, where transformers counts
    them — a difference only for a row that generates the pad id), min_new_tokens (0 = off;
    MinNewTokensLengthLogitsProcessor: the eos and stop_token_ids get -inf for a row's first
    min_new_tokens tokens; stop_strings still stop it). With all at their defaults nothing is
    computed. ``behaviour_logp`` is the log-prob under this penalised, filtered distribution,
    so RL rollouts sampled with penalties are off-policy with respect to the plain policy
    (as with TRL's generation kwargs / vLLM sampling params): the trainer's importance ratio
    then compares the policy with the penalised sampler. Greedy decoding with
    repetition_penalty / no_repeat_ngram_size / min_new_tokens is ``generate``'s
    (``do_sample=False`` with the same arguments) token for token. Beam search
    (:meth:`HFRolloutEngine.beam_search`) takes none of them.
    stop_token_ids: extra stop tokens (None: none, as vLLM's); the eos ids always stop unless
    ignore_eos (a bool): the tokenizer's eos and every id of the model's
    ``generation_config.eos_token_id`` (a list for many chat models), as ``generate`` stops on
    them. The stop token stays in the response (``response_mask`` 1, dropped from
    ``response_texts`` when it is a special token).
    stop_strings (None: none): generation of a row stops at the token that completes one of them; that
    token, the string and any text after it inside that token stay in the response (as
    transformers' StopStringCriteria; vLLM instead cuts the text at the string). Only the
    generated text is matched: a string begun in the prompt and completed by the response
    does not stop it (transformers' criterion would). seed: seeds the sampling generator (one for
    the whole batch). sample_seeds: one seed per response row (``len(prompts) × n``, in the
    batch's row order; overrides ``seed``): each row draws from its own generator, so its
    tokens depend only on its prompt and its seed, not on which other rows share the batch
    (up to float rounding of the logits under another left padding, which can flip a draw
    that lands on a boundary of the inverse CDF) — how the RL trainer makes a run
    independent of the number of ranks. Slower: one host-side uniform per row and step (each
    row's CPU generator), still one batched sampler call per step (the inverse CDF).
    Every number may also be a numpy scalar (``np.float32(0.7)``, ``np.int64(5)``): it is
    stored as the Python int / float.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_new_tokens: int = 32
    n: int = 1
    stop_token_ids: Tuple[int, ...] = ()
    stop_strings: Tuple[str, ...] = ()
    seed: Optional[int] = None
    ignore_eos: bool = False
    sample_seeds: Optional[Tuple[int, ...]] = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0

    _INTS = ("top_k", "max_new_tokens", "n", "seed", "no_repeat_ngram_size", "min_new_tokens")
    _FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")

    def __post_init__(self):
        # numpy scalars (a value read from an array, a config computed with numpy) as Python
        # numbers, as ops.sample takes them
        for name in self._INTS:
            setattr(self, name, _as_int(getattr(self, name)))
        for name in self._FLOATS:
            setattr(self, name, _as_float(getattr(self, name)))
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.min_p, bool) or not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        for name in ("stop_token_ids", "stop_strings"):
            v = getattr(self, name)
            if v is None:  # no stop, as vLLM's stop / stop_token_ids None
                setattr(self, name, ())
            elif isinstance(v, (numbers.Number, str, bytes)) or not hasattr(v, "__iter__"):
                raise TypeError(f"{name} must be a sequence (e.g. a tuple) or None, not a single "
                                f"{type(v).__name__} ({v!r})")
        if isinstance(self.ignore_eos, np.bool_):  # numpy's bool, as the numbers above
            self.ignore_eos = bool(self.ignore_eos)
        if not isinstance(self.ignore_eos, bool):
            # a string such as "false" would be truthy and silently generate past every eos
            raise TypeError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        self.stop_token_ids = tuple(_as_int(t) for t in self.stop_token_ids)
        self.stop_strings = tuple(self.stop_strings)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be ints >= 0, got {self.stop_token_ids!r}")
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2**63 <= self.seed < 2**64):
            raise ValueError(f"seed must be an int in [-2**63, 2**64) or None, got {self.seed!r}")
        rp = self.repetition_penalty
        if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not 0 < rp < float("inf"):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {rp!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2] (0 = off), got {v!r}")
        for name in ("no_repeat_ngram_size", "min_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0 (0 = off), got {v!r}")
        if self.min_new_tokens > self.max_new_tokens:  # (vLLM refuses it too: no answer could end before the cap)
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens "
                             f"({self.max_new_tokens})")
        if self.sample_seeds is not None:
            if isinstance(self.sample_seeds, (int, str, torch.Tensor)):
                raise TypeError("sample_seeds must be a sequence of ints (one per response row) or None")
            self.sample_seeds = tuple(_as_int(v) for v in self.sample_seeds)
            ok = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63
                     for v in self.sample_seeds)
            if not self.sample_seeds or not ok:
                raise ValueError(f"sample_seeds must be a non-empty sequence of ints in [0, 2**63), "
                                 f"got {self.sample_seeds!r}")


@dataclass
class RolloutBatch:
    """One batch of rollouts, B = number of prompts × n.

    input_ids: ``[B, P+R]`` int64 — left-padded prompts (width P) followed by right-padded
    responses (width R, the longest response).
    attention_mask: ``[B, P+R]`` int64 — 1 on real prompt and response tokens.
    response_mask: ``[B, P+R]`` int64 — 1 on generated tokens, the stop token included; with
    tool calls (:func:`rlhf_fast.rollout.tools.tool_rollout`) 0 on the tool results' tokens
    inside a response (attention_mask 1 there): holes that every loss, KL and advantage skips.
    behaviour_logp: ``[B, P+R]`` float32 — log-prob of each generated token under the
    processed sampling distribution when it was drawn (penalties, then filters), at its
    position; 0 elsewhere, tool-result tokens included (and 0 for greedy decoding).
    prompt_texts / response_texts: ``list[str]`` of length B (each prompt repeated n times
    consecutively; responses decoded without special tokens).
    group_index: ``[B]`` int64 — which prompt each row answers.
    num_generated_tokens: response tokens in the batch; tokens_per_second: that over the
    wall time of the generate call. prompt_length: P. finish_reasons: per row "stop"
    (eos / stop token / stop string) or "length".
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    behaviour_logp: torch.Tensor
    prompt_texts: List[str]
    response_texts: List[str]
    group_index: torch.Tensor
    num_generated_tokens: int
    tokens_per_second: float
    prompt_length: int = 0
    finish_reasons: List[str] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_ids(self) -> torch.Tensor:
        """``[B, R]`` the response part of input_ids (padded with the pad id)."""
        return self.input_ids[:, self.prompt_length:]

    @staticmethod
    def concat(batches: Sequence["RolloutBatch"], pad_id: int, rows: Optional[torch.Tensor] = None) -> "RolloutBatch":
        """Several batches as one, then the rows ``rows`` (``[b]`` int64 into the concatenation;
        None: all): prompts re-padded on the left to the widest prompt, responses on the right
        to the longest response (``pad_id``, attention 0); ``group_index`` numbered on across
        the batches. tokens_per_second is of all of them together. ValueError for no ``batches``."""
        if len(batches) == 0:  # (max() would fail naming nothing)
            raise ValueError("batches must hold at least one RolloutBatch to concatenate, got none")
        P = max(b.prompt_length for b in batches)
        R = max(b.input_ids.shape[1] - b.prompt_length for b in batches)

        def widen(t, b, fill):
            left, right = P - b.prompt_length, R - (t.shape[1] - b.prompt_length)
            return torch.cat([t.new_full((t.shape[0], left), fill), t, t.new_full((t.shape[0], right), fill)], 1)

        def take(x):
            return x if rows is None else x[rows.to(x.device)]

        def pick(items):
            return items if rows is None else [items[i] for i in rows.tolist()]

        groups, first = [], 0
        for b in batches:
            groups.append(b.group_index + first)
            first += int(b.group_index.max()) + 1 if b.group_index.numel() else 0
        tokens = sum(b.num_generated_tokens for b in batches)
        secs = sum(b.num_generated_tokens / b.tokens_per_second for b in batches if b.tokens_per_second > 0)
        ids = take(torch.cat([widen(b.input_ids, b, pad_id) for b in batches]))
        resp = take(torch.cat([widen(b.response_mask, b, 0) for b in batches]))
        return RolloutBatch(
            input_ids=ids, attention_mask=take(torch.cat([widen(b.attention_mask, b, 0) for b in batches])),
            response_mask=resp, behaviour_logp=take(torch.cat([widen(b.behaviour_logp, b, 0.0) for b in batches])),
            prompt_texts=pick([t for b in batches for t in b.prompt_texts]),
            response_texts=pick([t for b in batches for t in b.response_texts]),
            group_index=take(torch.cat(groups)), num_generated_tokens=int(resp.sum()) if rows is not None else tokens,
            tokens_per_second=tokens / secs if secs > 0 else 0.0, prompt_length=P,
            finish_reasons=pick([r for b in batches for r in b.finish_reasons])
            if all(len(b.finish_reasons) == b.batch_size for b in batches) else [],
        )

    def to(self, device) -> "RolloutBatch":
        """A copy with every tensor moved to ``device``."""
        kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return RolloutBatch(**kw)


class RolloutEngine(abc.ABC):
    """Turns prompts into a :class:`RolloutBatch`. Backends: :class:`HFRolloutEngine`
    (transformers + rlhf_fast.ops.sample); a vLLM engine can implement the same interface."""

    @abc.abstractmethod
    def generate(self, prompts: Prompts, params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` responses for each prompt (texts, or lists of token ids)."""

    def greedy(self, prompts: Prompts, max_new_tokens: int = 32, **kwargs) -> RolloutBatch:
        """Greedy decoding (temperature 0), one response per prompt."""
        return self.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, **kwargs))

    def update_weights(self, model) -> None:  # pragma: no cover - engines sharing the module need nothing
        """Called by trainers after an optimiser step; engines holding a copy resync here."""


def logprob_gap(behaviour_logp: torch.Tensor, recomputed_logp: torch.Tensor, response_mask: torch.Tensor) -> dict:
    """How far the trainer's recomputed log-probs drift from the sampler's.

    All ``[B, T]``. Returns ``{"mean": mean |Δ|, "max": max |Δ|}`` over response tokens as
    0-dim float32 tensors (no host sync); 0 when the mask is empty. Values outside the mask
    (-inf / NaN included) are ignored.
    """
    for name, t in (("behaviour_logp", behaviour_logp), ("recomputed_logp", recomputed_logp),
                    ("response_mask", response_mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(behaviour_logp.shape):
            raise ValueError(f"{name} must have shape {tuple(behaviour_logp.shape)}, got {tuple(t.shape)}")
    m = response_mask.bool()
    # where, not `* m`: a -inf / NaN at a masked position (a pad scored under a filtered
    # distribution) would make inf * 0 = NaN of both numbers
    d = torch.where(m, (behaviour_logp.float() - recomputed_logp.float()).abs(), 0.0)
    count = m.sum().clamp(min=1)
    return {"mean": d.sum() / count, "max": d.max() if d.numel() else d.new_zeros(())}


__all__ = ["SamplingParams", "RolloutBatch", "RolloutEngine", "logprob_gap", "Prompts"]
