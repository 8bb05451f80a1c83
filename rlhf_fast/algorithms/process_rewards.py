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
with no scored step gets NaN, which ``reward.on_bad_reward`` raises or drops. Token-level rewards at each step's end (verl's
PRM-as-dense-reward for GAE) are not implemented.
"""

from __future__ import annotations

import warnings
from typing import Any, List, Optional, Sequence

import torch

from .rewards import RewardSource

PROCESS_AGGREGATIONS = ("min", "last", "mean", "prod")
DEFAULT_SEPARATOR = "\n"  # TRL's PRMConfig default, for a PRM saved without step_separator


def split_steps(completion: str, separator: str) -> List[str]:
    """The steps of ``completion``: the pieces between separators that hold more than whitespace
    (an empty completion has none; a trailing separator, as every training row has, or a blank
    line between steps adds none)."""
    return [s for s in completion.split(separator) if s.strip()]


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
                       batch_size: int = 64, add_bos: Optional[Sequence[bool]] = None) -> List[torch.Tensor]:
    """Per completion, ``[S]`` float32 on the CPU: softmax(PRM logits)[1] at each of its S steps'
    separator tokens (:func:`step_positions`; rows cut to the model's positions). ``prompts`` /
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
        p1 = torch.softmax(logits, -1)[..., 1].cpu()  # [b, T]
        out += [p1[j, pos] for j, (_, pos) in enumerate(chunk)]
    return out


def aggregate_steps(probs: Sequence[torch.Tensor], aggregation: str = "min") -> List[float]:
    """One reward per completion from its step probabilities ``[S]`` (see the module
    docstring); NaN for a completion with no step."""
    if aggregation not in PROCESS_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {PROCESS_AGGREGATIONS}, got {aggregation!r}")
    fn = {"min": lambda p: p.min(), "last": lambda p: p[-1], "mean": lambda p: p.mean(), "prod": lambda p: p.prod()}
    return [float(fn[aggregation](p)) if p.numel() else float("nan") for p in probs]


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
    assistant turns (:func:`_text`)."""

    def __init__(self, model, tokenizer, separator: Optional[str] = None, aggregation: str = "min",
                 name: str = "process_model"):
        from rlhf_fast.trainers.prm import check_separator, check_token_classifier

        check_token_classifier(model, "model")
        if aggregation not in PROCESS_AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {PROCESS_AGGREGATIONS}, got {aggregation!r}")
        if separator is None:
            separator = getattr(model.config, "step_separator", None) or DEFAULT_SEPARATOR
        check_separator(tokenizer, separator, "separator")
        self.model, self.tokenizer, self.separator = model.eval(), tokenizer, separator
        self.aggregation, self.name = aggregation, name

    def __call__(self, prompts, completions, ctx):
        from rlhf_fast.feedback.formats import render_prompt

        if ctx is not None and ctx.prompts is not None:  # the data's prompts: a chat in the PRM's own template
            prompts = ctx.prompts
        ps = [render_prompt(p, self.tokenizer) for p in prompts]
        cs = [_text(c, self.separator) for c in completions]
        bos = [isinstance(p, str) for p in prompts]  # a text prompt: the trainer's bos; a chat: the template's
        return aggregate_steps(step_probabilities(self.model, self.tokenizer, ps, cs, self.separator, add_bos=bos),
                               self.aggregation)


def load_process_reward_model(path: str, *, aggregation: str = "min", key: str = "reward.process_model",
                              device=None, init_kwargs=None) -> ProcessRewardModel:
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
    return ProcessRewardModel(model, tok, sep, aggregation)


__all__ = ["PROCESS_AGGREGATIONS", "split_steps", "max_positions", "step_positions", "step_probabilities", "aggregate_steps",
           "ProcessRewardModel", "load_process_reward_model"]
