"""A process reward model (PRM, ``rlhf-fast prm``) as an RL reward source: ``reward.process_model``.

Each completion is split into steps at the PRM's ``step_separator`` (recorded in its saved
config.json), encoded exactly as :class:`rlhf_fast.trainers.prm.PRMTrainer` encoded its training
rows (:func:`rlhf_fast.trainers.prm.tokenize_steps`: bos, the prompt, each step followed by the
separator), and the PRM's probability of label 1 ("correct") is read at each step's separator's
last token. The step probabilities p_1..p_S of a completion become one scalar reward by
``reward.process_aggregation``:

- ``min`` (the default): min_s p_s, a solution is as good as its worst step — the usual choice
  of PRM best-of-N and PRM-as-reward work (Lightman et al. 2023 "Let's Verify Step by Step";
  Wang et al. 2024 "Math-Shepherd"), and the hardest to game by adding padding steps;
- ``last``: p_S;
- ``mean``: mean_s p_s;
- ``prod``: Π_s p_s (the probability that every step is correct, if they were independent).

The scores are in [0, 1]; ``reward.process_model_weight`` weighs them against the other sources.
Pieces of only whitespace are no steps (an empty answer, a blank line between steps); a row
longer than the PRM's positions (``max_position_embeddings``) keeps its first tokens, as the
trainer's ``max_len``, and the steps whose separator it cuts off are not scored. A completion
with no scored step scores 0, the least any answer can (no step shown correct): an empty answer
never escapes its steps' scores, under either calling convention (a NaN would read as "does not
apply" under TRL's), and never stops the run.

``steps``: no aggregation — the process reward as a dense reward (Math-Shepherd's step-by-step
PPO, Wang et al. 2024 §3.3: the PRM's score at the end of each step; verl's ``token_level_scores``
``[B, T]`` of a reward manager, to which ``apply_kl_penalty`` in verl/trainer/ppo/ray_trainer.py
adds −β·KL per token, ``token_level_rewards = token_level_scores − beta·kld``, before GAE; PRIME,
Cui et al. 2025, puts its implicit PRM's per-token reward on every token the same way). Step s
gets the reward r_s on the policy's response token that covers the last character of its
separator (of its own text for a last step without one: a truncated answer), weighted by
``reward.process_model_weight``; the RL trainer adds these to the token rewards (the other
sources' scalar on the last response token, −β·KL per token with ``kl.placement: reward``), so
they need an estimator that takes token-level rewards (gae, reinforce++).
r_s is ``reward.process_step_reward``:

- ``log`` (the default): log p_s (from the PRM's log-softmax, finite). The answer's sum is
  log Π_s p_s, the log of the ``prod`` aggregation, and every step reward is ≤ 0, so padding an
  answer with extra plausible steps never raises its return — summing positive PRM rewards is
  hacked that way (Gao et al. 2024, "On Designing Effective RL Reward at Training Time for LLM
  Reasoning", whose fix, the Clip mechanism min(p − η, 0), has the same bound);
- ``prob``: p_s, as Math-Shepherd's PPO (positive: more steps, more reward);
- ``centered``: p_s − 0.5 (a doubtful step costs, a sound one pays).

Steps the PRM could not score (their separator cut off by its positions) get no reward; an answer
with no step gets none (its per-answer sum, logged as ``reward/process_model``, is 0, not NaN).
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .rewards import RewardSource

PROCESS_AGGREGATIONS = ("min", "last", "mean", "prod")  # one scalar per answer
DENSE_AGGREGATION = "steps"  # no aggregation: a reward per step, on its token
STEP_REWARDS = ("log", "prob", "centered")  # r_s of aggregation "steps"
DEFAULT_SEPARATOR = "\n"  # TRL's PRMConfig default, for a PRM saved without step_separator


def split_steps(completion: str, separator: str) -> List[str]:
    """The steps of ``completion``: the pieces between separators that hold more than whitespace
    (an empty completion has none; a trailing separator, as every training row has, or a blank
    line between steps adds none)."""
    return [s for s in completion.split(separator) if s.strip()]


def step_ends(completion: str, separator: str) -> List[int]:
    """The end (exclusive character offset into ``completion``) of each step of
    :func:`split_steps`: past its separator, or past its own text for a last step with none."""
    pieces = completion.split(separator)
    ends, pos = [], 0
    for k, piece in enumerate(pieces):
        end = pos + len(piece)
        if piece.strip():
            ends.append(end + len(separator) if k < len(pieces) - 1 else end)
        pos = end + len(separator)
    return ends


def max_positions(model) -> Optional[int]:
    """The longest row ``model`` reads (its config's ``max_position_embeddings`` / ``n_positions``),
    None when the config names none."""
    conf = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        v = getattr(conf, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def step_positions(tokenizer, prompt: str, steps: Sequence[str], separator: str, *, max_len: Optional[int] = None,
                   add_bos: bool = True):
    """``(input_ids [T] list, positions [S'] list)``: the row the PRM trainer would build for
    ``steps`` (its first ``max_len`` tokens; ``add_bos`` False for a prompt whose rendered text
    already holds it, as a chat template writes it) and the index of each step's separator's
    last token, where the step's label was trained (S' <= S: the steps whose separator survives)."""
    from rlhf_fast.trainers.prm import IGNORE, tokenize_steps

    row = tokenize_steps(tokenizer, prompt, steps, [True] * len(steps), step_separator=separator, max_len=max_len,
                         add_bos=add_bos)
    return row["input_ids"], [i for i, x in enumerate(row["labels"]) if x != IGNORE]


@torch.no_grad()
def step_probabilities(model, tokenizer, prompts: Sequence[str], completions: Sequence[str], separator: str, *,
                       batch_size: int = 64, add_bos: Optional[Sequence[bool]] = None,
                       log: bool = False) -> List[torch.Tensor]:
    """Per completion, ``[S]`` float32 on the CPU: softmax(PRM logits)[1] at each of its S steps'
    separator tokens (:func:`step_positions`; rows cut to the model's positions; ``log``: the
    log-softmax instead, finite where the probability underflows). ``prompts`` /
    ``completions``: B texts each; ``add_bos``: per row, whether the tokenizer's bos goes before
    the prompt (default: every row, as the trainer's rows)."""
    from rlhf_fast.feedback.formats import pad_right

    if len(prompts) != len(completions):
        raise ValueError(f"prompts and completions must have the same length, got {len(prompts)} and "
                         f"{len(completions)}")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    limit = max_positions(model)
    bos = [True] * len(prompts) if add_bos is None else list(add_bos)
    rows = [step_positions(tokenizer, p, split_steps(c, separator), separator, max_len=limit, add_bos=b)
            for p, c, b in zip(prompts, completions, bos)]
    out: List[torch.Tensor] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        ids, attn = pad_right([r[0] for r in chunk], pad)
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()  # [b, T, 2]
        p1 = (torch.log_softmax(logits, -1) if log else torch.softmax(logits, -1))[..., 1].cpu()  # [b, T]
        out += [p1[j, pos] for j, (_, pos) in enumerate(chunk)]
    return out


def aggregate_steps(probs: Sequence[torch.Tensor], aggregation: str = "min") -> List[float]:
    """One reward per completion from its step probabilities ``[S]`` (see the module
    docstring); 0.0 (the lowest score) for a completion with no step."""
    if aggregation not in PROCESS_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {PROCESS_AGGREGATIONS}, got {aggregation!r}")
    fn = {"min": lambda p: p.min(), "last": lambda p: p[-1], "mean": lambda p: p.mean(), "prod": lambda p: p.prod()}
    return [float(fn[aggregation](p)) if p.numel() else 0.0 for p in probs]


def _text(x: Any, separator: str) -> str:
    """A completion as the PRM reads it: text as it is; chat messages as the text of the assistant
    turns (a tool call's turn has none; tool results are not the policy's steps), each turn ending
    a step."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        x = [x]
    if not isinstance(x, (list, tuple)) or not all(isinstance(m, dict) for m in x):
        raise TypeError(f"a completion must be text or a list of chat messages, got {type(x).__name__}")
    said = [m["content"] for m in x if m.get("role", "assistant") == "assistant" and isinstance(m.get("content"), str)]
    return separator.join(said)


class ProcessRewardModel(RewardSource):
    """A trained PRM as a reward source: ``__call__(prompts, completions, ctx)`` -> B floats
    (:func:`step_probabilities` aggregated by ``aggregation``). The prompts are the data's
    (``ctx.prompts``) where the caller passes them, a chat rendered with the PRM tokenizer's
    template (which writes its own special tokens, as :func:`rlhf_fast.feedback.formats.reward_input_ids`
    keeps them: no bos is added before it); chat completions are read as the text of their
    assistant turns (:func:`_text`).

    ``aggregation="steps"`` makes it a dense source (``dense`` True): :meth:`score_steps` gives
    each step's reward ``step_reward`` (:data:`STEP_REWARDS`, module docstring) at the character
    where the step ends, which :class:`rlhf_fast.algorithms.rewards.CombinedReward` keeps out of
    the last-token total; ``__call__`` then returns each answer's sum of its step rewards."""

    def __init__(self, model, tokenizer, separator: Optional[str] = None, aggregation: str = "min",
                 name: str = "process_model", step_reward: str = "log"):
        from rlhf_fast.trainers.prm import check_separator, check_token_classifier

        check_token_classifier(model, "model")
        if aggregation not in PROCESS_AGGREGATIONS + (DENSE_AGGREGATION,):
            raise ValueError(f"aggregation must be one of {PROCESS_AGGREGATIONS + (DENSE_AGGREGATION,)}, "
                             f"got {aggregation!r}")
        if step_reward not in STEP_REWARDS:
            raise ValueError(f"step_reward must be one of {STEP_REWARDS}, got {step_reward!r}")
        if separator is None:
            separator = getattr(model.config, "step_separator", None) or DEFAULT_SEPARATOR
        check_separator(tokenizer, separator, "separator")
        self.model, self.tokenizer, self.separator = model.eval(), tokenizer, separator
        self.aggregation, self.name, self.step_reward = aggregation, name, step_reward
        self.dense = aggregation == DENSE_AGGREGATION
        if self.dense:  # logged as reward/process_steps: the scored steps per answer
            self.extra_names = ("process_steps",)

    def _probabilities(self, prompts, completions, ctx, log: bool = False):
        """(per completion ``[S]`` step probabilities, or log-probabilities with ``log``; the
        completion texts the PRM read)."""
        from rlhf_fast.feedback.formats import render_prompt

        if ctx is not None and ctx.prompts is not None:  # the data's prompts: a chat in the PRM's own template
            prompts = ctx.prompts
        kw = ctx.chat_template_kwargs if ctx is not None else None  # the run's data.chat_template_kwargs
        ps = [render_prompt(p, self.tokenizer, chat_template_kwargs=kw) for p in prompts]
        cs = [_text(c, self.separator) for c in completions]
        bos = [isinstance(p, str) for p in prompts]  # a text prompt: the trainer's bos; a chat: the template's
        return step_probabilities(self.model, self.tokenizer, ps, cs, self.separator, add_bos=bos, log=log), cs

    def __call__(self, prompts, completions, ctx):
        if self.dense:
            return self.score_steps(prompts, completions, ctx)[0]
        return aggregate_steps(self._probabilities(prompts, completions, ctx)[0], self.aggregation)

    def score_steps(self, prompts, completions, ctx) -> Tuple[List[float], Dict[str, torch.Tensor],
                                                              List[List[Tuple[int, float]]]]:
        """(B sums of the step rewards, ``{"process_steps": [B] float32}`` the scored steps per
        answer, B lists of ``(character end, step reward)`` in step order): the step ends are
        offsets into the completion text (:func:`step_ends`); only the S' steps the PRM scored
        are listed."""
        vals, cs = self._probabilities(prompts, completions, ctx, log=self.step_reward == "log")
        steps = []
        for v, c in zip(vals, cs):
            r = v - 0.5 if self.step_reward == "centered" else v  # [S'] float32
            steps.append(list(zip(step_ends(c, self.separator), r.tolist())))  # zip: the S' scored steps
        sums = [float(sum(r for _, r in row)) for row in steps]
        return sums, {"process_steps": torch.tensor([float(len(row)) for row in steps])}, steps


def token_char_ends(tokenizer, ids: Sequence[int], text: str, char_ends: Sequence[int]) -> List[int]:
    """For each exclusive character offset ``e`` into ``text`` (the decoding of ``ids``, as the
    rollout decodes its answers: ``skip_special_tokens=True``), the index into ``ids`` of the
    token that covers character e − 1: the first k whose prefix ``ids[:k + 1]`` decodes to text
    starting with ``text[:e]``. Prefixes are decoded, not the tokens one by one, so a token that
    spans a separator, a partial UTF-8 byte or a merged space is placed where its text completes;
    binary search, O(log n) decodes per offset. An offset past what the tokens decode to (or a
    text they do not decode to): the last token, ``len(ids) − 1``. ``ids`` must not be empty."""
    ids = list(ids)
    n = len(ids)
    memo: Dict[int, str] = {}

    def covers(k: int, e: int) -> bool:  # whether ids[:k] decodes past text[:e]
        if k not in memo:
            memo[k] = tokenizer.decode(ids[:k], skip_special_tokens=True)
        return memo[k].startswith(text[:e])

    out = []
    for e in char_ends:
        if e > len(text) or not covers(n, e):
            out.append(n - 1)
            continue
        lo, hi = 1, n  # smallest k in [lo, hi] with covers(k, e); covers(hi, e) holds
        while lo < hi:
            mid = (lo + hi) // 2
            if covers(mid, e):
                hi = mid
            else:
                lo = mid + 1
        out.append(lo - 1)
    return out


def step_token_rewards(tokenizer, input_ids: torch.Tensor, mask: torch.Tensor, texts: Sequence[str],
                       steps: Sequence[Sequence[Tuple[int, float]]]) -> torch.Tensor:
    """The dense rewards ``[B, T]`` float32 of ``steps`` (per row, ``(character end, reward)``
    pairs, :class:`rlhf_fast.algorithms.rewards.RewardOutput`'s ``steps``): each reward added on
    the response token of ``input_ids`` ``[B, T]`` where its step ends (:func:`token_char_ends`;
    the response tokens are those of ``mask`` ``[B, T]``, which decode to ``texts[b]``); 0
    elsewhere. Two steps ending in one token add up there; a row without response tokens gets
    nothing."""
    if input_ids.shape != mask.shape or len(texts) != input_ids.shape[0] or len(steps) != input_ids.shape[0]:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and mask {tuple(mask.shape)} must be [B, T] with "
                         f"one text and one list of steps per row, got {len(texts)} texts and {len(steps)} lists")
    out = torch.zeros(mask.shape, dtype=torch.float32)
    ids_cpu, m = input_ids.cpu(), mask.bool().cpu()
    for b, row in enumerate(steps):
        pos = m[b].nonzero(as_tuple=True)[0]  # the response tokens' columns
        if not row or pos.numel() == 0:
            continue
        ks = token_char_ends(tokenizer, ids_cpu[b, pos].tolist(), texts[b], [e for e, _ in row])
        for k, (_, r) in zip(ks, row):
            out[b, pos[k]] += r
    return out.to(input_ids.device)


def load_process_reward_model(path: str, *, aggregation: str = "min", key: str = "reward.process_model",
                              device=None, init_kwargs=None, step_reward: str = "log") -> ProcessRewardModel:
    """The PRM folder ``path`` (``rlhf-fast prm``'s ``final/``, or any 2-label token classifier
    with a tokenizer) as a :class:`ProcessRewardModel`, float32 unless ``init_kwargs`` says
    otherwise. ValueError naming ``key`` for a folder that is not a 2-label token classifier; a
    folder whose config has no ``step_separator`` uses TRL's default "\\n" (with a warning)."""
    from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

    from rlhf_fast.models.loading import (check_model_folder, check_model_init_kwargs, from_pretrained_kwargs,
                                          tokenizer_kwargs)

    check_model_folder(path, key, tokenizer=True)
    load_kw = from_pretrained_kwargs(check_model_init_kwargs(init_kwargs or {}))
    try:
        conf = AutoConfig.from_pretrained(path, trust_remote_code=load_kw.get("trust_remote_code", False))
    except (OSError, ValueError) as e:  # a peft adapter folder, an unknown model type
        raise ValueError(f"{key} {path!r}: no model config transformers reads ({e}); expected a token-classification "
                         "model with 2 labels (as `rlhf-fast prm` saves)") from None
    archs = [a for a in (getattr(conf, "architectures", None) or []) if isinstance(a, str)]
    if not any(a.endswith("ForTokenClassification") for a in archs) or conf.num_labels != 2:
        raise ValueError(f"{key} {path!r} holds {archs[0] if archs else 'no known architecture'}"
                         f" ({conf.num_labels} labels), not a process reward model; expected a token-classification "
                         "model with 2 labels (as `rlhf-fast prm` saves)")
    sep = getattr(conf, "step_separator", None)
    if not isinstance(sep, str) or not sep:
        warnings.warn(f"{key} {path!r}: its config.json records no step_separator; splitting steps at TRL's "
                      f"default {DEFAULT_SEPARATOR!r}", UserWarning, stacklevel=2)
        sep = DEFAULT_SEPARATOR
    model = AutoModelForTokenClassification.from_pretrained(path, **load_kw)
    tok = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs(load_kw))
    if device is not None:
        model = model.to(device)
    return ProcessRewardModel(model, tok, sep, aggregation, step_reward=step_reward)


__all__ = ["PROCESS_AGGREGATIONS", "DENSE_AGGREGATION", "STEP_REWARDS", "split_steps", "step_ends", "max_positions",
           "step_positions", "step_probabilities", "aggregate_steps", "ProcessRewardModel", "token_char_ends",
           "step_token_rewards", "load_process_reward_model"]
