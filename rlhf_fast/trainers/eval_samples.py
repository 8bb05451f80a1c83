"""``generate_during_eval`` of the DPO trainer (TRL's CPOTrainer / ORPOTrainer option): at each
evaluation, answers to a few eval prompts from the policy and, where the loss has one, the
reference, appended to ``RUN_DIR/eval_samples.jsonl``.

TRL's ``evaluation_loop`` picks ``eval_batch_size`` eval rows with ``random.sample``, generates
with ``model.generate(max_length=max_length, do_sample=True)`` and logs a (Prompt, Policy) table
to W&B / Comet, refusing the option when neither is installed. Here (deliberate differences):

* the ``batch_size`` prompts (all of them when the eval split is smaller, where TRL's
  ``random.sample`` fails) are drawn by :func:`sample_indices` from a generator of their own,
  seeded from ``seed`` and the step, so the training streams are not drawn from and a rerun
  picks the same prompts;
* answers are greedy (TRL samples: ``do_sample=True``) with TRL's length budget: ``max_len``
  tokens per row, the prompts' left padding included, so ``max_len`` − the longest picked
  prompt new tokens at most; they stop at the eos ids. The engine is
  :class:`~rlhf_fast.rollout.HFRolloutEngine` (that of ``rlhf-fast generate`` and the RL
  evaluation), fed the prompts' token ids as training truncated them;
* the torch (CPU and CUDA), ``random`` and numpy states are restored afterwards and the models
  go back to their train / eval mode, so a run's metrics do not depend on the option;
* the file is always written (rank 0; one line per prompt ``{"step", "prompt", "policy"[,
  "reference"]}``, flushed), whatever trackers are installed; the trackers get TRL's table only
  where the training loop hands its logger over (``trainer._logger``, see
  :func:`generate_during_eval`).

Every rank generates the same prompts (under FSDP2 the engine gathers each model's weights,
a collective every rank must join; under DDP the forward in eval mode without gradients syncs
nothing). The reference of a LoRA policy is the policy with its adapters disabled; with
``precompute_ref_logps`` a full policy's reference is gone (its log-probs were scored before
training), so the records have no ``reference`` then.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Dict, List, Optional, Sequence

SAMPLES_FILE = "eval_samples.jsonl"


def sample_indices(n: int, k: int, seed: int, step: int) -> List[int]:
    """``min(k, n)`` distinct indices into ``n`` eval items, in drawn order: TRL's
    ``random.sample(range(n), k)`` from a ``random.Random`` of its own seeded with (``seed``,
    ``step``), so the global streams are untouched and a rerun draws the same."""
    return random.Random(seed * 1_000_003 + step).sample(range(n), min(k, n))


def greedy_answers(model, tokenizer, prompts: Sequence[Sequence[int]], max_len: int, device) -> List[str]:
    """The greedy answer text (special tokens dropped, as TRL's ``batch_decode``) of ``model``
    (a causal LM, or a peft / DDP / FSDP2 wrapper of one) to each prompt (lists of token ids),
    all in one engine call of ``max(1, max_len - longest prompt)`` new tokens at most, stopping
    at the eos ids — TRL's ``generate(max_length=max_len)`` budget for the left-padded batch."""
    from rlhf_fast.rollout import HFRolloutEngine, SamplingParams

    room = max(1, max_len - max(len(p) for p in prompts))
    params = SamplingParams(temperature=0.0, max_new_tokens=room)
    return list(HFRolloutEngine(model, tokenizer, device=device).generate([list(p) for p in prompts],
                                                                          params).response_texts)


def reference_generator(trainer):
    """``(model, context)`` the reference answers come from: a reference model as it is, the
    policy under adapters-off for a LoRA policy (also with precomputed log-probs: its base is still
    there); None for a reference-free loss or a full policy's precomputed log-probs."""
    import contextlib

    from rlhf_fast.distributed import unwrap
    from rlhf_fast.models.loading import AdapterDisabledReference, make_reference

    if trainer.cfg.reference_free:
        return None
    ref = trainer.reference
    if ref is None and trainer.is_peft:  # the base with adapters disabled, as the trainer's own reference
        ref = make_reference(unwrap(trainer.model))
    if isinstance(ref, AdapterDisabledReference):
        return ref.rlhf_wrapped, ref.rlhf_context
    return (ref, contextlib.nullcontext) if ref is not None else None


def eval_samples(trainer, items: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The records of one evaluation at ``trainer.step``: :func:`sample_indices` of ``items``
    (``trainer.cfg.batch_size`` of them), each ``{"step", "prompt" (its token ids decoded,
    special tokens kept: what the model saw), "policy"[, "reference"]}`` with the greedy answers
    (:func:`greedy_answers`). Leaves every random state and each model's train / eval mode as
    it found them. Every rank must call it (FSDP2 gathers the weights)."""
    from .common import random_states_kept

    cfg, tok = trainer.cfg, trainer.tokenizer
    picked = [items[i] for i in sample_indices(len(items), cfg.batch_size, cfg.seed, trainer.step)]
    if not picked:
        return []
    prompts = [it["prompt"] for it in picked]
    ref = reference_generator(trainer)
    with random_states_kept(trainer.device):
        policy = greedy_answers(trainer.model, tok, prompts, cfg.max_len, trainer.device)
        reference = None
        if ref is not None:
            with ref[1]():
                reference = greedy_answers(ref[0], tok, prompts, cfg.max_len, trainer.device)
    out = []
    for i, p in enumerate(prompts):
        rec = {"step": int(trainer.step), "prompt": tok.decode(p, skip_special_tokens=False),
               "policy": policy[i]}
        if reference is not None:
            rec["reference"] = reference[i]
        out.append(rec)
    return out


def append_samples(run_dir: str, records: Sequence[Dict[str, Any]], *, first: bool) -> None:
    """Append ``records`` to ``run_dir/eval_samples.jsonl``, flushed. ``first`` (the session's
    first write): records of this step or later are dropped first — what a run resumed from an
    earlier checkpoint (or restarted) had written past it, as metrics.jsonl is cut back."""
    from .common import log_records_up_to
    from .config import atomic_write_text

    path = os.path.join(run_dir, SAMPLES_FILE)
    if first and records and os.path.exists(path):
        atomic_write_text(path, "".join(log_records_up_to(path, records[0]["step"] - 1)))
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()


# TRL's table columns (its DPOTrainer's game_log: Prompt, Policy, Ref Model)
_TABLE_COLUMNS = {"prompt": "Prompt", "policy": "Policy", "reference": "Ref Model"}


def generate_during_eval(trainer, items: Sequence[Dict[str, Any]]) -> Optional[List[Dict[str, Any]]]:
    """The DPO trainer's hook, on every rank: :func:`eval_samples` of the evaluated ``items``,
    appended by rank 0 (:func:`append_samples`) and, where the training loop exposes its
    :class:`~rlhf_fast.trainers.common.MetricsLogger` as ``trainer._logger``, sent to the run's
    trackers as TRL's ``game_log`` table; returns the records (None off rank 0)."""
    records = eval_samples(trainer, items)
    if not trainer.ctx.is_main:
        return None
    append_samples(trainer.run.path, records, first=not getattr(trainer, "_eval_samples_started", False))
    trainer._eval_samples_started = True
    logger = getattr(trainer, "_logger", None)
    if records and callable(getattr(logger, "log_table", None)):
        rows = [{_TABLE_COLUMNS[k]: v for k, v in r.items() if k in _TABLE_COLUMNS} for r in records]
        logger.log_table(trainer.step, "game_log", rows)
    return records


__all__ = ["SAMPLES_FILE", "sample_indices", "greedy_answers", "reference_generator", "eval_samples",
           "append_samples", "generate_during_eval"]
