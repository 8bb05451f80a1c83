"""Reward sources and their weighted combination.

A source maps ``(prompts, completions)`` (two lists of B strings, plus optional token ids) to
B floats: a reward model, a plain Python callable ``fn(prompts, completions) -> list[float]``
(rule-based / verifiable rewards), the AI judge, a length penalty, a repetition penalty.
:class:`CombinedReward` sums them with weights, keeps each one for logging, and never lets a
NaN/inf or an exception through silently: it raises :class:`RewardError` naming the source,
or with ``on_bad_reward="drop"`` marks the sample invalid and counts it.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from rlhf_fast.ops._validate import finite

ON_BAD_REWARD = ("raise", "drop")
# how reward functions are called: "ours" fn(prompt texts, completion texts, **fields); "trl" as
# TRL's GRPO/RLOO _calculate_rewards (messages, completion_ids, trainer_state, log_*, None = NaN)
CALLING_CONVENTIONS = ("ours", "trl")
# what TRL keeps out of the dataset columns it passes (and our tool rollout's own field)
_TRL_NOT_COLUMNS = ("prompt", "completion", "completion_ids", "completion_messages")
# the fields of a samples.jsonl row, which a log_extra column may not replace
_SAMPLE_KEYS = ("step", "prompt", "completion", "reward")
# how several reward models combine: "sum" keeps each one a source of its own (each weighted);
# the others make one source of the K models' scores (:class:`RewardModelEnsemble`)
ENSEMBLE_MODES = ("sum", "mean", "min", "mean_minus_std", "mean_minus_var")


def _reward_value(v) -> float:
    """One reward as a float: a number (bools count as 0 / 1, as verifiable rewards return them);
    text such as "1" is refused, since float() would quietly accept it."""
    if isinstance(v, (str, bytes)):
        raise TypeError(f"a reward must be a number, got text {v[:20]!r}")
    return float(v)


class RewardError(ValueError):
    """A reward source failed or returned a non-finite value."""


@dataclass
class RewardContext:
    """What a source may use besides the texts. input_ids / attention_mask ``[B, L]`` of the
    whole prompt+response rollout (left-padded prompt), response_lengths ``[B]`` tokens;
    fields: the prompt data's other fields (a reference answer, a test case…), name → list of
    B values (None where a row's prompt lacks it); prompts: each row's prompt as the data gives
    it (text or chat messages, before the policy's template renders it); chat_template_kwargs:
    the extra variables the run gives chat templates (``data.chat_template_kwargs``), for a
    source that renders those prompts with its own template."""

    input_ids: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None
    response_lengths: Optional[List[int]] = None
    fields: Optional[Dict[str, List]] = None
    trl: Optional["TRLRewardInputs"] = None
    prompts: Optional[List[Any]] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None

    def row(self, i: int) -> "RewardContext":
        """The context of row ``i`` alone."""
        return RewardContext(
            input_ids=None if self.input_ids is None else self.input_ids[i:i + 1],
            attention_mask=None if self.attention_mask is None else self.attention_mask[i:i + 1],
            response_lengths=None if self.response_lengths is None else self.response_lengths[i:i + 1],
            fields=None if self.fields is None else {k: v[i:i + 1] for k, v in self.fields.items()},
            trl=None if self.trl is None else self.trl.row(i),
            prompts=None if self.prompts is None else self.prompts[i:i + 1],
            chat_template_kwargs=self.chat_template_kwargs)


class RewardLog:
    """What reward functions log through TRL's ``log_metric(name, value)`` (scalars, averaged
    over the calls of a step, as TRL's ``_log_metric``) and ``log_extra(column, values)`` (one
    value per completion of the batch, a column of the samples table, as TRL's
    ``_log_completion_extra``)."""

    def __init__(self):
        self.metrics: Dict[str, List[float]] = {}
        self.extra: Dict[str, list] = {}

    def log_metric(self, name: str, value: float) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"log_metric(name, value): name must be a non-empty string, got {name!r}")
        self.metrics.setdefault(name, []).append(_reward_value(value))

    def log_extra(self, column: str, values: list) -> None:
        if not isinstance(column, str) or not column:
            raise TypeError(f"log_extra(column, values): column must be a non-empty string, got {column!r}")
        if column in _SAMPLE_KEYS:
            raise ValueError(f"log_extra: the column {column!r} is one of the samples table's own {_SAMPLE_KEYS}; "
                             "pick another name")
        if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
            raise TypeError(f"log_extra({column!r}, values): values must be a list (one per completion), "
                            f"got {type(values).__name__}")
        self.extra.setdefault(column, []).extend(values)

    def pop_metrics(self) -> Dict[str, tuple]:
        """``{name: (sum, count)}`` of the metrics logged since the last pop (then cleared)."""
        out = {k: (float(sum(v)), float(len(v))) for k, v in self.metrics.items()}
        self.metrics = {}
        return out

    def pop_extra(self, n: int) -> Dict[str, list]:
        """The columns logged since the last pop (then cleared), each checked to hold ``n``
        values, one per completion scored."""
        out, self.extra = self.extra, {}
        for k, v in out.items():
            if len(v) != n:
                raise RewardError(f"log_extra({k!r}, values) got {len(v)} values for {n} completions: give one "
                                  f"value per completion, once per call")
        return out


@dataclass
class TRLRewardInputs:
    """What TRL's ``_calculate_rewards`` passes a reward function besides the dataset columns
    (``reward.calling_convention: trl``): prompts, B prompts as the data gives them (text, or a
    list of ``{role, content}`` messages); completions, B answers (text for a text prompt, else
    a list of messages: ``[{"role": "assistant", "content": ...}]``, with the tool turns when
    tools run); completion_ids, B lists of int (the tokens after the prompt, tool results
    included, no padding); trainer_state (a ``transformers.TrainerState``); log (its
    ``log_extra`` / ``log_metric``)."""

    prompts: list
    completions: list
    completion_ids: List[List[int]]
    trainer_state: object = None
    log: RewardLog = field(default_factory=RewardLog)

    def row(self, i: int) -> "TRLRewardInputs":
        return TRLRewardInputs(self.prompts[i:i + 1], self.completions[i:i + 1], self.completion_ids[i:i + 1],
                               self.trainer_state, self.log)


def trl_completions(prompts: Sequence, texts: Sequence[str], messages: Optional[Sequence] = None) -> list:
    """TRL's ``completions`` of B answers: the decoded text where the prompt is text, else
    ``messages[i]`` (an answer's turns with tools) or ``[{"role": "assistant", "content":
    text}]`` (TRL's ``_generate`` without a response parser)."""
    out = []
    for i, (p, t) in enumerate(zip(prompts, texts)):
        if isinstance(p, str):
            out.append(t)
        elif messages is not None and messages[i] is not None:
            out.append([dict(m) for m in messages[i]])
        else:
            out.append([{"role": "assistant", "content": t}])
    return out


def fields_per_row(fields: Optional[Sequence[dict]], prompt_index: Sequence[int]) -> Optional[Dict[str, List]]:
    """:attr:`RewardContext.fields` of a batch: ``fields`` holds one dict per prompt,
    ``prompt_index`` which prompt each row answers; name → one value per row (None where that
    row's prompt lacks the field). None when no prompt has a field."""
    names = sorted({k for f in fields or () for k in f})
    return {k: [fields[g].get(k) for g in prompt_index] for k in names} or None


class RewardSource:
    """Base class: ``name`` for logs; ``__call__(prompts, completions, ctx) -> list[float]`` (B)."""

    name = "reward"

    def __call__(self, prompts: List[str], completions: List[str], ctx: RewardContext) -> Sequence[float]:
        raise NotImplementedError


class CallableReward(RewardSource):
    """A plain function ``fn(prompts: list[str], completions: list[str], **fields) -> list[float]``.

    Fields of the prompt data (``RewardContext.fields``, one list of B values each) are passed
    as keyword arguments: all of them to a function taking ``**kwargs`` (as TRL passes dataset
    columns), else those its signature names. A field the function requires that the prompts
    do not have is a RewardError naming it (raised whatever ``on_bad_reward`` says).

    With ``convention="trl"`` the function is called as TRL's ``_calculate_rewards`` calls it,
    every argument by keyword: ``fn(prompts=, completions=, completion_ids=, trainer_state=,
    log_extra=, log_metric=, **columns)`` (columns: the prompt fields, and ``environments``
    with environments), from ``ctx.trl`` (:class:`TRLRewardInputs`); a function without
    ``**kwargs`` gets the names it lists (TRL would raise TypeError); a None reward is NaN,
    "does not apply to this completion" (:class:`CombinedReward` with ``convention="trl"``); an
    ``async def`` function is awaited (TRL gathers them on an event loop; so it is under
    ``convention="ours"``). A ``trl.rewards``
    function with ``convention="ours"`` is refused (ValueError naming ``calling_convention``)."""

    def __init__(self, fn: Callable, name: Optional[str] = None, convention: str = "ours"):
        if not callable(fn):
            raise TypeError(f"fn must be callable (prompts, completions) -> list[float], got {type(fn).__name__}")
        if convention not in CALLING_CONVENTIONS:
            raise ValueError(f"convention must be one of {CALLING_CONVENTIONS}, got {convention!r}")
        if convention == "ours" and _is_trl_reward(fn):
            # TRL's functions take TRL's keyword arguments (completions as messages, completion_ids):
            # called as ours (prompt texts, completion texts) they would fail at the first step
            raise ValueError(f"reward function {getattr(fn, '__name__', fn)!r} is TRL's (trl.rewards): "
                             "it needs reward.calling_convention: trl (RewardConfig(calling_convention='trl'))")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")
        self.convention = convention
        self._all, self._named, self._required = _keyword_params(fn, skip=2 if convention == "ours" else 0)

    def __call__(self, prompts, completions, ctx):
        if self.convention == "trl":
            return self._call_trl(ctx)
        fields = (ctx.fields if ctx is not None else None) or {}
        missing = [k for k in self._required if k not in fields]
        if missing:
            raise RewardError(f"reward function {self.name!r} needs the prompt field(s) {missing}; the prompts "
                             f"have {sorted(fields) or 'none'} (give them in the prompts' JSONL records)")
        kw = dict(fields) if self._all else {k: v for k, v in fields.items() if k in self._named}
        out = self.fn(list(prompts), list(completions), **kw)
        return _await(out) if inspect.isawaitable(out) else out

    def _call_trl(self, ctx):
        t = ctx.trl if ctx is not None else None
        if t is None:
            raise RewardError(f"reward function {self.name!r} uses TRL's calling convention, but the caller gave "
                              "no TRL inputs (RewardContext.trl)")
        kw = {k: v for k, v in ((ctx.fields or {}).items()) if k not in _TRL_NOT_COLUMNS}
        kw.update(prompts=list(t.prompts), completions=list(t.completions),
                  completion_ids=[list(c) for c in t.completion_ids], trainer_state=t.trainer_state,
                  log_extra=t.log.log_extra, log_metric=t.log.log_metric)
        missing = [k for k in self._required if k not in kw]
        if missing:
            raise RewardError(f"reward function {self.name!r} needs the argument(s) {missing}; TRL's convention "
                              f"gives {sorted(kw)} (prompt fields come from the prompts' JSONL records)")
        if not self._all:
            kw = {k: v for k, v in kw.items() if k in self._named}
        out = self.fn(**kw)
        if inspect.isawaitable(out):  # TRL also takes ``async def`` reward functions
            out = _await(out)
        # TRL: "Convert None values to NaN" (this function does not score that completion)
        out = out.tolist() if isinstance(out, torch.Tensor) else out
        return [float("nan") if r is None else r for r in out]


def _await(awaitable):
    """The result of an async reward function's call: run on a fresh event loop (in a thread of
    its own when the caller already runs one, e.g. a notebook), as TRL runs them on a loop."""
    import asyncio

    async def wait():
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, wait()).result()


def _is_trl_reward(fn: Callable) -> bool:
    """Whether ``fn`` is one of TRL's ``trl.rewards`` functions (a function, or the callable
    object a ``get_*`` factory returns)."""
    mod = getattr(fn, "__module__", None) or ""
    if not isinstance(mod, str) or not mod.startswith("trl."):
        mod = type(fn).__module__ or ""
    return mod == "trl.rewards" or mod.startswith("trl.rewards.")


def _keyword_params(fn: Callable, skip: int = 2):
    """(takes **kwargs, names it accepts after the first ``skip``, names it requires after them)."""
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: (prompts, completions) only
        return False, set(), []
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    rest = positional[skip:] + [p for p in params if p.kind is p.KEYWORD_ONLY]
    named = {p.name for p in rest if p.kind is not p.POSITIONAL_ONLY}
    required = [p.name for p in rest if p.default is p.empty and p.kind is not p.POSITIONAL_ONLY]
    return takes_all, named, required


def _reward_format(model) -> Optional[str]:
    """The response format a reward model's config records (``rlhf_fast_reward_format``:
    "text", "conversational", "mixed"), None where it has no config or no such attribute."""
    from rlhf_fast.feedback.formats import REWARD_FORMAT_ATTR
    from rlhf_fast.models.logprobs import unwrap

    return getattr(getattr(unwrap(model), "config", None), REWARD_FORMAT_ATTR, None)


def _reward_template_kwargs(model) -> Optional[Dict[str, Any]]:
    """The ``chat_template_kwargs`` a reward model's config records it was trained with
    (``rlhf_fast_reward_chat_template_kwargs``, {} for none), None where it records none
    (older folders, TRL's or hand-built models). TypeError where it is not a mapping."""
    from rlhf_fast.feedback.formats import REWARD_TEMPLATE_KWARGS_ATTR
    from rlhf_fast.models.logprobs import unwrap

    kw = getattr(getattr(unwrap(model), "config", None), REWARD_TEMPLATE_KWARGS_ATTR, None)
    if kw is not None and not isinstance(kw, dict):
        raise TypeError(f"the reward model's config.{REWARD_TEMPLATE_KWARGS_ATTR} must be a mapping of "
                        f"template variables, got {type(kw).__name__}")
    return kw


class RewardModelReward(RewardSource):
    """A scalar reward model scored with :func:`rlhf_fast.models.loading.reward_scores`.

    With ``tokenizer`` the texts are re-tokenised as :class:`rlhf_fast.trainers.reward.RewardTrainer`
    encodes its pairs (:func:`rlhf_fast.feedback.formats.reward_input_ids`: prompt, response, eos;
    the last ``max_length`` tokens), the prompt as the data gives it (``ctx.prompts``) where the
    caller passes it: a chat is then rendered with THIS tokenizer's template, as in training, not
    the policy's; without a tokenizer, the rollout's own ``input_ids`` / ``attention_mask`` are
    used (same vocabulary). A model whose config says it was trained on conversational pairs
    (``config.rlhf_fast_reward_format == "conversational"``, which the reward trainer saves)
    scores a text answer to a chat prompt as an assistant message after it (the template's turn,
    then eos: the ids it trained on, as TRL's GRPO renders the completion for a reward model);
    any other model (text-trained, "mixed", or without the attribute: older folders, TRL's or
    hand-built models, which may set it) reads the answer text after the rendered prompt.
    Chats are rendered with the template variables the model's config records it was trained
    with (``rlhf_fast_reward_chat_template_kwargs``, which the reward trainer saves from its
    ``chat_template_kwargs``; {} included), so scoring reads the ids training read whatever the
    policy's template variables are; only a model that records none takes the run's
    ``ctx.chat_template_kwargs`` (``data.chat_template_kwargs``, as TRL's GRPO passes them)."""

    def __init__(self, model, tokenizer=None, name: str = "reward_model", max_length: int = 1024):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a reward model (torch.nn.Module), got {type(model).__name__}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
        self.model, self.tokenizer, self.name, self.max_length = model, tokenizer, name, max_length
        self.conversational = _reward_format(model) == "conversational"
        self.trained_template_kwargs = _reward_template_kwargs(model)

    @torch.no_grad()
    def __call__(self, prompts, completions, ctx):
        from rlhf_fast.models.loading import reward_scores

        device = next(self.model.parameters()).device
        if ctx is not None and ctx.prompts is not None:  # the data's prompts, one per completion
            prompts = ctx.prompts
        if len(prompts) != len(completions):  # (zip would score the first rows and drop the rest)
            raise ValueError(f"prompts and completions must have the same length, got {len(prompts)} and "
                             f"{len(completions)}")
        if self.tokenizer is None:
            if ctx is None or ctx.input_ids is None:
                raise ValueError(f"reward source {self.name!r} needs a tokenizer or the rollout's input_ids")
            am = ctx.attention_mask if ctx.attention_mask is not None else torch.ones_like(ctx.input_ids)
            ids, am = ctx.input_ids.to(device), am.to(device)
        else:
            from rlhf_fast.feedback.formats import pad_right, reward_input_ids

            # as the reward trainer encoded its pairs (prompt, response, eos; the end kept): the
            # head learned the score at that eos, and the joint text without it reads another token
            tok = self.tokenizer
            kw = self.trained_template_kwargs  # the variables it trained under, where it saved them
            if kw is None:
                kw = ctx.chat_template_kwargs if ctx is not None else None
            if self.conversational:  # a chat prompt's answer as the assistant turn it was trained on
                completions = [[{"role": "assistant", "content": c}]
                               if isinstance(p, list) and isinstance(c, str) else c
                               for p, c in zip(prompts, completions)]
            seqs = [reward_input_ids(tok, p, c, self.max_length, chat_template_kwargs=kw)
                    for p, c in zip(prompts, completions)]
            if not seqs:
                return []
            pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
            ids, am = pad_right(seqs, pad)
            ids, am = ids.to(device), am.to(device)
        return reward_scores(self.model, ids, am).float().cpu().tolist()


class RewardModelEnsemble(RewardSource):
    """K >= 2 reward sources (usually :class:`RewardModelReward` s of reward models trained with
    different seeds) combined per completion into ONE reward, against reward over-optimisation
    (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization"; Eisenstein et
    al. 2023, "Helping or Herding?"). With s ``[K, B]`` float32 the members' scores:

    - ``mean``: mean_k s;
    - ``min``: min_k s (worst-case optimisation, Coste's WCO);
    - ``mean_minus_std``: mean_k s − ``coef`` · std_k s, std the POPULATION std
      sqrt(1/K · Σ_k (s_k − mean)²) (the penalty in reward units, so it scales with the
      rewards, as Eisenstein et al.'s mean-minus-std aggregation);
    - ``mean_minus_var``: mean_k s − ``coef`` · var_k s, var = 1/K · Σ_k (s_k − mean)²: Coste
      et al.'s uncertainty-weighted optimisation (UWO) exactly, λ = ``coef``.

    A completion that any member scores NaN / ±inf gets NaN (even under ``min``, where +inf
    would otherwise hide), so :class:`CombinedReward`'s ``on_bad_reward`` raises or drops it.
    :meth:`score_with_extras` also returns, for logging, each member's scores (``rm0`` …
    ``rm{K-1}``) and their population std (``rm_std``, the ensemble's disagreement, a standard
    over-optimisation signal), ``[B]`` float32 each."""

    def __init__(self, members: Sequence[RewardSource], mode: str = "mean", coef: float = 1.0,
                 name: str = "reward_model"):
        if mode not in ENSEMBLE_MODES or mode == "sum":
            raise ValueError(f"mode must be one of {ENSEMBLE_MODES[1:]} (\"sum\" keeps the models separate "
                             f"sources), got {mode!r}")
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 reward models, got {len(members)}")
        for i, m in enumerate(members):
            if not isinstance(m, RewardSource):
                raise TypeError(f"members[{i}] must be a RewardSource, got {type(m).__name__}")
        coef = finite("coef", coef, ">= 0")
        self.members, self.mode, self.coef, self.name = members, mode, coef, name
        self.extra_names = [f"rm{k}" for k in range(len(members))] + ["rm_std"]

    def score_with_extras(self, prompts, completions, ctx):
        """(the ensemble's B rewards, {extra name: ``[B]`` float32}); see the class docstring.
        A member that raises makes the whole call raise (CombinedReward then isolates rows)."""
        B = len(completions)
        rows = []
        for k, m in enumerate(self.members):
            out = m(prompts, completions, ctx)
            v = [_reward_value(x) for x in (out.tolist() if isinstance(out, torch.Tensor) else out)]
            if len(v) != B:
                raise RewardError(f"ensemble member rm{k} returned {len(v)} rewards for {B} completions")
            rows.append(v)
        s = torch.tensor(rows, dtype=torch.float32).view(len(self.members), B)  # [K, B]
        ok = torch.isfinite(s).all(dim=0)  # [B]
        safe = torch.where(ok, s, torch.zeros_like(s))  # keeps inf - inf out of the std
        mean = safe.mean(dim=0)
        std = safe.std(dim=0, unbiased=False)  # population: 1/K, as Coste's intra-ensemble variance
        if self.mode == "mean":
            r = mean
        elif self.mode == "min":
            r = safe.min(dim=0).values
        elif self.mode == "mean_minus_std":
            r = mean - self.coef * std
        else:  # mean_minus_var
            r = mean - self.coef * std * std
        nan = torch.full_like(r, float("nan"))
        extras = {f"rm{k}": s[k] for k in range(len(self.members))}
        extras["rm_std"] = torch.where(ok, std, nan)
        return torch.where(ok, r, nan).tolist(), extras

    def __call__(self, prompts, completions, ctx):
        return self.score_with_extras(prompts, completions, ctx)[0]


class JudgeReward(RewardSource):
    """The AI judge: a :class:`rlhf_fast.feedback.judge.Judge` (``score(prompt, response) ->
    float``, called per sample and cached by the judge), or any object with a batched
    ``score(prompts, responses) -> list[float]``, or a callable of that signature."""

    def __init__(self, judge, name: str = "judge"):
        if not (hasattr(judge, "score") or callable(judge)):
            raise TypeError("judge must have a score method or be callable (prompts, responses) -> list[float]")
        self.judge, self.name = judge, name
        # the feedback Judge scores one (prompt, response) at a time; it also has compare()
        self.per_sample = hasattr(judge, "score") and hasattr(judge, "compare")

    def __call__(self, prompts, completions, ctx):
        if self.per_sample:
            return [self.judge.score(p, c) for p, c in zip(prompts, completions)]
        fn = self.judge.score if hasattr(self.judge, "score") else self.judge
        return fn(list(prompts), list(completions))


class LengthPenalty(RewardSource):
    """−|length − target| (or −length without a target), in response tokens when the rollout
    gives them, else characters. Combine with a (small) positive weight."""

    def __init__(self, target: Optional[int] = None, name: str = "length_penalty"):
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                                   or not 0 <= target < math.inf):
            raise ValueError(f"target must be a finite number >= 0 or None, got {target!r}")
        self.target, self.name = target, name

    def __call__(self, prompts, completions, ctx):
        lengths = ctx.response_lengths if ctx.response_lengths is not None else [len(c) for c in completions]
        if self.target is None:
            return [-float(n) for n in lengths]
        return [-abs(float(n) - self.target) for n in lengths]


class OverlongPenalty(RewardSource):
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13; TRL's
    ``get_soft_overlong_punishment``, verl's ``overlong_buffer``): with L = ``max_len`` (the
    generation budget) and c = ``buffer``, an answer of n tokens gets 0 when n ≤ L − c,
    (L − c − n) / c when L − c < n ≤ L, and −1 beyond L. In [−1, 0]; lengths in response
    tokens when the rollout gives them, else characters."""

    def __init__(self, max_len: int, buffer: int, name: str = "overlong_penalty"):
        for arg, v in (("max_len", max_len), ("buffer", buffer)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg} must be an int >= 1, got {v!r}")
        if buffer > max_len:
            raise ValueError(f"buffer must be at most max_len ({max_len}), got {buffer}")
        self.max_len, self.buffer, self.name = max_len, buffer, name

    def __call__(self, prompts, completions, ctx):
        lengths = ctx.response_lengths if ctx.response_lengths is not None else [len(c) for c in completions]
        start = self.max_len - self.buffer
        return [0.0 if n <= start else max(-1.0, (start - float(n)) / self.buffer) for n in lengths]


class RepetitionPenalty(RewardSource):
    """−(fraction of repeated n-grams) of each completion, over whitespace words when there are
    more than n of them, else over characters. In [−1, 0]."""

    def __init__(self, n: int = 3, name: str = "repetition_penalty"):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        self.n, self.name = n, name

    def _frac(self, text: str) -> float:
        units = text.split()
        if len(units) <= self.n:
            units = list(text)
        grams = [tuple(units[i:i + self.n]) for i in range(len(units) - self.n + 1)]
        if not grams:
            return 0.0
        return 1.0 - len(set(grams)) / len(grams)

    def __call__(self, prompts, completions, ctx):
        return [-self._frac(c) for c in completions]


@dataclass
class RewardOutput:
    """total ``[B]`` float32 (weighted sum; 0 where invalid); per_source name → ``[B]`` float32
    unweighted (NaN where that source failed), plus the per-sample diagnostics a source such as
    :class:`RewardModelEnsemble` gives (its members' scores ``rm{k}``, their spread ``rm_std``:
    logged as ``reward/NAME`` like the sources, never part of the total); valid ``[B]`` bool;
    dropped: per-source count of samples dropped; columns: what TRL-convention reward
    functions logged with ``log_extra``, name → B values (columns of the samples table);
    unscored ``[B]`` bool or None (none): the answers no source scored under the TRL
    convention (every one returned None), otherwise sound — ``valid`` False and ``total`` 0
    for them, so that a reader of ``valid`` leaves them out of reward statistics (TRL's
    nanmean), while the RL trainer keeps them with advantage 0, as TRL.

    With a dense source (``dense`` True: ``reward.process_aggregation: steps``) also ``steps``,
    per row the ``(character end in the completion, weighted reward)`` of each step (empty where
    invalid), and ``scalar`` ``[B]`` float32, the part of ``total`` that is not the steps' (the
    other sources' weighted sum: the last token's reward); ``total`` holds each answer's sum of
    its step rewards too. Both None without a dense source."""

    total: torch.Tensor
    per_source: Dict[str, torch.Tensor]
    valid: torch.Tensor
    dropped: Dict[str, int] = field(default_factory=dict)
    columns: Dict[str, list] = field(default_factory=dict)
    unscored: Optional[torch.Tensor] = None
    steps: Optional[List[List[tuple]]] = None
    scalar: Optional[torch.Tensor] = None

    def unscored_rows(self) -> torch.Tensor:
        """:attr:`unscored` as a ``[B]`` bool tensor (all False when None)."""
        return self.unscored if self.unscored is not None else torch.zeros_like(self.valid, dtype=torch.bool)

    @staticmethod
    def concat(outs: Sequence["RewardOutput"], rows: Optional[torch.Tensor] = None) -> "RewardOutput":
        """The outputs of several batches, one after the other, then the rows ``rows`` (``[b]``
        int64 into the concatenation; None: all). ``dropped`` counts the failures (NaN) of each
        source among those rows."""
        cat = lambda ts: torch.cat(list(ts)) if rows is None else torch.cat(list(ts))[rows]  # noqa: E731
        per_source = {k: cat(o.per_source[k] for o in outs) for k in outs[0].per_source}
        columns = {}
        for k in sorted({c for o in outs for c in o.columns}):  # None where a batch did not log it
            vals = [v for o in outs for v in o.columns.get(k, [None] * len(o.total))]
            columns[k] = vals if rows is None else [vals[i] for i in rows.tolist()]
        unscored = steps = scalar = None
        if any(o.unscored is not None for o in outs):
            unscored = cat(o.unscored_rows().to(o.valid.device) for o in outs)
        if any(o.steps is not None for o in outs):
            steps = [r for o in outs for r in (o.steps if o.steps is not None else [[] for _ in o.total])]
            steps = steps if rows is None else [steps[i] for i in rows.tolist()]
            scalar = cat(o.total if o.scalar is None else o.scalar for o in outs)
        return RewardOutput(total=cat(o.total for o in outs), per_source=per_source,
                            valid=cat(o.valid for o in outs),
                            dropped={k: int((~torch.isfinite(v)).sum()) for k, v in per_source.items()},
                            columns=columns, unscored=unscored, steps=steps, scalar=scalar)


class CombinedReward:
    """Weighted sum of reward sources. ``sources``: list of RewardSource (or ``(source, weight)``
    pairs; plain callables are wrapped in :class:`CallableReward`). ``on_bad_reward``:
    "raise" (default) or "drop".

    ``convention="trl"`` combines as TRL's GRPO/RLOO trainers: a NaN reward (a function's None)
    means "this source does not apply to this completion", not a bad reward; the total is
    ``nansum_k(w_k · r_k)`` (TRL's ``(rewards_per_func * reward_weights).nansum(dim=1)``); a
    completion that no source scored (all NaN) is ``unscored`` (not ``valid``, total 0; TRL:
    reward NaN, outside the group statistics, advantage 0), with a warning as TRL's. ±inf and
    exceptions still follow ``on_bad_reward``. Plain callables are then wrapped with TRL's
    calling convention."""

    def __init__(self, sources, weights: Optional[Sequence[float]] = None, on_bad_reward: str = "raise",
                 convention: str = "ours"):
        if on_bad_reward not in ON_BAD_REWARD:
            raise ValueError(f"on_bad_reward must be one of {ON_BAD_REWARD}, got {on_bad_reward!r}")
        if convention not in CALLING_CONVENTIONS:
            raise ValueError(f"convention must be one of {CALLING_CONVENTIONS}, got {convention!r}")
        if isinstance(sources, (RewardSource, str)) or callable(sources) or not isinstance(sources, (list, tuple)):
            raise TypeError(f"sources must be a list of reward sources (or (source, weight) pairs), "
                            f"got {type(sources).__name__}")
        if weights is not None:
            if not isinstance(weights, (list, tuple)) or len(weights) != len(sources):
                raise ValueError(f"weights must be a list with one entry per source ({len(sources)}), got {weights!r}")
        items = []
        for i, s in enumerate(sources):
            w = 1.0
            if isinstance(s, tuple):
                if len(s) != 2:
                    raise ValueError(f"sources[{i}] must be a source or a (source, weight) pair, got a {len(s)}-tuple")
                s, w = s
            if not isinstance(s, RewardSource):
                s = CallableReward(s, convention=convention)
            w = w if weights is None else weights[i]
            items.append((s, finite(f"the weight of reward source {s.name!r}", w)))
        if not items:
            raise ValueError("sources must hold at least one reward source (reward model, callable or judge)")
        # Duplicate names would overwrite each other in the logs (per_source, dropped): give each
        # source a unique log name (NAME_k for the k-th of a repeated NAME, skipping names already
        # taken), without renaming the source objects, which may be shared (the same instance
        # twice, or reused in another CombinedReward).
        base = [s.name for s, _ in items]
        taken, seen, names = set(base), {}, []
        for n in base:
            if base.count(n) == 1:
                names.append(n)
                continue
            k = seen.get(n, 0)
            while f"{n}_{k}" in taken:
                k += 1
            seen[n] = k + 1
            taken.add(f"{n}_{k}")
            names.append(f"{n}_{k}")
        # a source's extra per-sample values (an ensemble's members, rm_std) share per_source and
        # the reward/NAME logs with the sources: a clash would overwrite one with the other
        extra = [e for s, _ in items for e in getattr(s, "extra_names", ())]
        clash = sorted((set(extra) & set(names)) | {e for e in extra if extra.count(e) > 1})
        if clash:
            raise ValueError(f"reward source names {clash} are taken twice (a source's name and an ensemble's "
                             f"logged member/rm_std values, or two ensembles): rename the sources")
        self.sources = items
        self.names = names
        self.on_bad_reward = on_bad_reward
        self.convention = convention

    @staticmethod
    def _score(src: RewardSource, prompts, completions, ctx):
        """(the source's output, its extras dict: {} for a source without extra_names, its step
        rewards: B lists of (character end, reward) for a dense source, else None)."""
        if getattr(src, "dense", False):
            return src.score_steps(prompts, completions, ctx)
        if getattr(src, "extra_names", None):
            return (*src.score_with_extras(prompts, completions, ctx), None)
        return src(prompts, completions, ctx), {}, None

    def _call_one(self, src: RewardSource, name: str, prompts, completions, ctx):
        """(B floats, {extra name: ``[B]`` float32} — NaN on a row whose scoring failed, the
        indices of those rows, a dense source's B lists of step rewards — empty on a failed
        row — or None)."""
        B = len(completions)
        log = ctx.trl.log if ctx.trl is not None else None
        logged = {k: list(v) for k, v in log.extra.items()} if log is not None else None
        try:
            out, extras, steps = self._score(src, prompts, completions, ctx)
        except RewardError:  # a configuration error (a missing prompt field): no sample would score
            raise
        except Exception as e:  # noqa: BLE001 - reported with the source's name
            if self.on_bad_reward == "raise":
                raise RewardError(f"reward source {name!r} raised {type(e).__name__}: {e}") from e
            if log is not None:  # the row-by-row calls log their own columns again
                log.extra = logged
            # Isolate the failing samples by scoring one at a time.
            nan = float("nan")
            vals, extras, failed = [], {e: [nan] * B for e in getattr(src, "extra_names", ())}, []
            steps = [[] for _ in range(B)] if getattr(src, "dense", False) else None
            for i in range(B):
                try:
                    v, ex, st = self._score(src, [prompts[i]], [completions[i]], ctx.row(i))
                    v = v.tolist() if isinstance(v, torch.Tensor) else list(v)
                    vals.append(_reward_value(v[0]) if len(v) == 1 else nan)
                    if len(v) != 1:
                        failed.append(i)
                    for e, t in ex.items():
                        extras[e][i] = float(t[0])
                    if st is not None and len(v) == 1:
                        steps[i] = list(st[0])
                except Exception:  # noqa: BLE001
                    vals.append(nan)
                    failed.append(i)
            return vals, {e: torch.tensor(v, dtype=torch.float32) for e, v in extras.items()}, failed, steps
        try:
            vals = [_reward_value(v) for v in (out.tolist() if isinstance(out, torch.Tensor) else out)]
        except (TypeError, ValueError, OverflowError) as e:
            raise RewardError(f"reward source {name!r} must return a list of B={B} floats, got "
                              f"{type(out).__name__}: {e}") from e
        if len(vals) != B:
            raise RewardError(f"reward source {name!r} returned {len(vals)} rewards for {B} completions")
        return vals, extras, [], steps

    def __call__(self, prompts: List[str], completions: List[str], ctx: Optional[RewardContext] = None) -> RewardOutput:
        """Score B completions. Returns a :class:`RewardOutput`; raises :class:`RewardError`
        naming the source on a failure or NaN/inf when ``on_bad_reward="raise"``."""
        ctx = ctx or RewardContext()
        B = len(completions)
        if len(prompts) != B:
            raise ValueError(f"prompts and completions must have the same length, got {len(prompts)} and {B}")
        if self.convention == "trl":
            return self._combine_trl(prompts, completions, ctx)
        total = torch.zeros(B, dtype=torch.float32)
        scalar = torch.zeros(B, dtype=torch.float32)  # total without the dense sources' step sums
        valid = torch.ones(B, dtype=torch.bool)
        per, dropped, steps = {}, {}, None
        for (src, w), name in zip(self.sources, self.names):
            vals, extras, _, st = self._call_one(src, name, prompts, completions, ctx)
            bad = [i for i, v in enumerate(vals) if not math.isfinite(v)]
            if bad and self.on_bad_reward == "raise":
                # an ensemble's NaN comes from a member: name the member(s) that gave it
                members = [f"{e}={float(t[bad[0]])}" for e, t in extras.items()
                           if e != "rm_std" and not math.isfinite(float(t[bad[0]]))]
                raise RewardError(f"reward source {name!r} returned a non-finite reward ({vals[bad[0]]}) for "
                                  f"sample {bad[0]} (completion {completions[bad[0]][:60]!r})"
                                  + (f" from its member(s) {', '.join(members)}" if members else "")
                                  + "; set on_bad_reward='drop' to skip such samples")
            t = torch.tensor(vals, dtype=torch.float32)
            per.update(extras)
            per[name] = t
            dropped[name] = len(bad)
            ok = torch.isfinite(t)
            valid &= ok
            total += w * torch.where(ok, t, torch.zeros_like(t))
            if st is None:
                scalar += w * torch.where(ok, t, torch.zeros_like(t))
            else:
                steps = _add_steps(steps, st, w, B)
        total = torch.where(valid, total, torch.zeros_like(total))
        if steps is None:
            return RewardOutput(total=total, per_source=per, valid=valid, dropped=dropped)
        return RewardOutput(total=total, per_source=per, valid=valid, dropped=dropped,
                            steps=[row if v else [] for row, v in zip(steps, valid.tolist())],
                            scalar=torch.where(valid, scalar, torch.zeros_like(scalar)))

    def _combine_trl(self, prompts, completions, ctx: RewardContext) -> RewardOutput:
        """TRL's combination (see the class docstring): NaN = does not apply, nansum of the
        weighted rewards, all-NaN rows invalid; ±inf per ``on_bad_reward``."""
        B = len(completions)
        per, dropped, cols, ok, steps = {}, {}, [], torch.ones(B, dtype=torch.bool), None
        dense = []  # [K] bool: the sources whose rewards go on their steps' tokens
        for (src, w), name in zip(self.sources, self.names):
            vals, extras, failed, st = self._call_one(src, name, prompts, completions, ctx)
            dense.append(st is not None)
            if st is not None:
                steps = _add_steps(steps, st, w, B)
            t = torch.tensor(vals, dtype=torch.float32)
            bad = torch.isinf(t)
            bad[failed] = True  # (on_bad_reward drop) a row whose call raised: bad, not "does not apply"
            if bad.any() and self.on_bad_reward == "raise":
                i = int(bad.nonzero()[0, 0])
                raise RewardError(f"reward source {name!r} returned an infinite reward ({vals[i]}) for sample {i} "
                                  f"(completion {completions[i][:60]!r}); set on_bad_reward='drop' to skip such "
                                  "samples (None / NaN means 'does not apply' under calling_convention trl)")
            per.update(extras)
            per[name] = t
            dropped[name] = int(bad.sum())
            ok &= ~bad
            cols.append(t)
        rewards_per_func = torch.stack(cols, dim=1)  # [B, K]
        weights = torch.tensor([w for _, w in self.sources], dtype=torch.float32)
        # TRL's grpo_trainer / rloo_trainer: (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
        total = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        if unscorable.any():
            i = int(unscorable.nonzero()[0, 0])
            warnings.warn(f"All reward functions returned None for sample {i} (prompt "
                          f"{str(prompts[i])[:60]!r}, completion {str(completions[i])[:60]!r}); it is left "
                          "unscored (the RL trainer keeps it with advantage 0, as TRL). Please ensure that at "
                          "least one reward function returns a valid reward.", RuntimeWarning, stacklevel=3)
        valid = ok & ~unscorable
        total = torch.where(valid, total, torch.zeros_like(total))
        columns = ctx.trl.log.pop_extra(B) if ctx.trl is not None else {}
        extra = {}
        if steps is not None:
            w_last = weights.masked_fill(torch.tensor(dense), 0.0)
            scalar = (rewards_per_func * w_last.unsqueeze(0)).nansum(dim=1)
            extra = dict(steps=[row if v else [] for row, v in zip(steps, valid.tolist())],
                         scalar=torch.where(valid, scalar, torch.zeros_like(scalar)))
        # a row that also failed a source (on_bad_reward drop) is a bad reward, not unscored
        return RewardOutput(total=total, per_source=per, valid=valid, dropped=dropped, columns=columns,
                            unscored=unscorable & ok, **extra)


def _add_steps(steps: Optional[List[list]], new: Sequence[Sequence[tuple]], w: float, B: int) -> List[list]:
    """``steps`` (B lists of (character end, weighted reward); None: none yet) with a dense
    source's B lists ``new`` appended, their rewards weighted by ``w``."""
    if len(new) != B:
        raise RewardError(f"a dense reward source returned step rewards for {len(new)} completions, expected {B}")
    steps = steps if steps is not None else [[] for _ in range(B)]
    for row, more in zip(steps, new):
        row.extend((int(e), w * float(r)) for e, r in more)
    return steps


def clip_rewards(scores: torch.Tensor, clip_range: Optional[Sequence[float]]) -> torch.Tensor:
    """TRL RLOO's ``reward_clip_range``: scores ``[B]`` (the weighted sum of the sources, before
    the KL-in-reward term and the group baseline) clamped to ``[min, max]``; None returns them
    unchanged. Same dtype as ``scores``."""
    if clip_range is None:
        return scores
    if isinstance(clip_range, str) or len(clip_range) != 2:
        raise ValueError(f"clip_range must be a pair [min, max], got {clip_range!r}")
    lo, hi = (finite(f"clip_range[{i}]", v) for i, v in enumerate(clip_range))
    if not lo < hi:
        raise ValueError(f"clip_range must be [min, max] with min < max, got {list(clip_range)!r}")
    return scores.clamp(min=lo, max=hi)


def load_callable(spec: str, *, what: str = "reward function") -> Callable:
    """Import ``module:function`` (or ``path/to/file.py:function``) and return the function.
    ``what`` names the kind of callable in the errors (tools, environments, rollout functions and
    judges load through here too)."""
    import importlib
    import importlib.util
    import os

    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{what} must be given as 'module:function', got {spec!r}")
    mod_name, fn_name = spec.rsplit(":", 1)
    kind = "reward" if what == "reward function" else what  # the default keeps its old wording
    if mod_name.endswith(".py"):
        if not os.path.exists(mod_name):
            raise FileNotFoundError(f"{what} file {mod_name!r} does not exist")
        s = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(mod_name))[0], mod_name)
        mod = importlib.util.module_from_spec(s)
        try:
            s.loader.exec_module(mod)
        except (ImportError, SyntaxError) as e:  # (str(e) of a SyntaxError names the file and line)
            raise ValueError(f"cannot import {kind} file {mod_name!r} from {spec!r}: {e}") from e
    else:
        try:
            mod = importlib.import_module(mod_name)
        except (ImportError, SyntaxError) as e:
            raise ValueError(f"cannot import {kind} module {mod_name!r} from {spec!r}: {e}") from e
    fn = getattr(mod, fn_name, None)
    if fn is None or not callable(fn):
        raise ValueError(f"{spec!r}: module {mod_name!r} has no callable {fn_name!r}")
    return fn
