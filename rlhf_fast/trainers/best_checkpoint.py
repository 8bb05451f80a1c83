"""transformers' ``load_best_model_at_end`` for the offline trainers (SFT, reward, DPO, KTO).

With ``load_best_model_at_end: true`` a run keeps, among the evaluations made at a scheduled
checkpoint (every ``save_every`` steps, and the last step, which always evaluates and saves), the
best value of the metric ``metric_for_best_model`` (null: ``eval_loss``; greater is better unless
the name ends in "loss", or as ``greater_is_better`` says: :func:`~.common.schedule_metric`),
compared strictly as transformers' ``Trainer._determine_best_metric`` does (``np.greater`` /
``np.less`` against the best so far, ±inf at first). The best value and its step are
transformers' ``TrainerState.best_metric`` / ``best_global_step`` / ``best_model_checkpoint``;
they are saved in every checkpoint's ``extra.json`` (``best_checkpoint``), so a resumed run knows
the best so far. Checkpoint pruning (``keep_checkpoints``) never deletes the best checkpoint
(transformers' ``rotate_checkpoints``: the newest and the best are kept, so ``keep_checkpoints``
1 may keep 2). At the end of training, after the last checkpoint, the best checkpoint's weights
are loaded into the model (a peft model: its adapters; a sharded checkpoint on every rank, as a
resume loads it) before ``final/`` is saved, and ``RUN_DIR/best_checkpoint.json`` records them
(transformers writes the same three fields to ``trainer_state.json``).

Where transformers differs: its best metric is taken at every evaluation, checkpointed or not
(with ``save_every`` a multiple k > 1 of ``eval_every``, a best evaluation without a checkpoint
then keeps a later, better checkpoint from being chosen); here only the evaluations with a
checkpoint compete. Its last step is a candidate only when it falls on an evaluation; here the
last step always evaluates and saves. With ``save_total_limit`` 1 it deletes every checkpoint but
the best at the end of training; here the last one stays, so that a finished run resumed does not
train again from the best one. Resumed after the best checkpoint's folder was removed, it keeps that
checkpoint's metric as the bar a later evaluation must beat; here the best is chosen afresh among
the later checkpoints.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Any, Dict, Mapping, Optional

from .common import metric_to_step_on, same_metric, schedule_metric

# the key of the tracker's state in a checkpoint's extra.json, and the run folder's record
EXTRA_KEY = "best_checkpoint"
BEST_FILE = "best_checkpoint.json"
KEY = "load_best_model_at_end"


def check_load_best_fields(load_best: Any, *, eval_every: int, save_every: int, eval_split: bool,
                           prefix: str = "") -> None:
    """Check ``load_best_model_at_end`` of an offline config as transformers'
    ``TrainingArguments.__post_init__`` does: a bool; when true, evaluations to choose from
    (``eval_every`` > 0 and an eval split) and checkpoints at them — ``save_every`` > 0 (transformers:
    the save strategy must match the eval strategy) and a multiple of ``eval_every`` (its
    ``save_steps % eval_steps == 0``). ValueError naming the keys."""
    if not isinstance(load_best, bool):
        raise ValueError(f"{prefix}{KEY} must be true or false, got {load_best!r}")
    if not load_best:
        return
    if not eval_every:
        raise ValueError(f"{prefix}{KEY} chooses among evaluations: set {prefix}eval_every > 0 (got {eval_every!r})")
    if not eval_split:
        raise ValueError(f"{prefix}{KEY} chooses among evaluations: give {prefix}eval_data or an "
                         f"{prefix}eval_fraction > 0")
    if not save_every or save_every % eval_every:
        raise ValueError(f"{prefix}{KEY} needs a checkpoint at evaluations: {prefix}save_every ({save_every!r}) "
                         f"must be a multiple of {prefix}eval_every ({eval_every}) (transformers: save_steps a "
                         "multiple of eval_steps, the save and eval strategies alike)")


class BestCheckpoint:
    """The best checkpointed evaluation of a run with ``load_best_model_at_end``: ``metric``
    (float or None: transformers' ``best_metric``) and ``step`` (int or None: its
    ``best_global_step``, the checkpoint ``checkpoints/step_N``) of the metric ``name``
    (greater is better when ``greater_is_better``). :meth:`observe` takes each evaluation of
    the training loop, :meth:`at_checkpoint` judges it when its step is checkpointed."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.name, self.greater_is_better = schedule_metric(cfg)
        self.metric: Optional[float] = None
        self.step: Optional[int] = None
        self._pending = None  # (step, value) of the latest evaluation
        self.part: Optional[str] = None  # the checkpoints' name of the model (save_supervised sets it)

    @classmethod
    def for_config(cls, cfg) -> Optional["BestCheckpoint"]:
        """A tracker when ``cfg.load_best_model_at_end`` is on, else None."""
        return cls(cfg) if getattr(cfg, KEY, False) else None

    def value(self, metrics: Mapping[str, Any]) -> float:
        """The tracked metric of an evaluation's ``metrics``; ValueError naming
        ``metric_for_best_model`` and what the evaluation logged when it lacks it."""
        return float(metric_to_step_on(self.cfg, metrics, user=f"{KEY} compares"))

    def observe(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Take the evaluation ``metrics`` made after step ``step``."""
        self._pending = (int(step), self.value(metrics))

    def is_better(self, value: float) -> bool:
        """transformers' ``Trainer._determine_best_metric``: ``np.greater`` (``greater_is_better``)
        or ``np.less`` against the best so far, which starts at -inf / +inf (nan never wins)."""
        import numpy as np

        best = self.metric
        if best is None:
            best = float("-inf") if self.greater_is_better else float("inf")
        return bool((np.greater if self.greater_is_better else np.less)(value, best))

    def at_checkpoint(self, step: int) -> bool:
        """Before the checkpoint of ``step`` is written: when the latest evaluation was made at
        ``step`` and ``step`` is a scheduled checkpoint (a multiple of ``save_every``, or
        ``max_steps``; not one a stop signal asked for, which a straight run would not have),
        it becomes the best if :meth:`is_better`. Returns whether it did."""
        pending, self._pending = self._pending, None
        cfg = self.cfg
        scheduled = (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps
        if pending is None or pending[0] != step or not scheduled or not self.is_better(pending[1]):
            return False
        self.metric, self.step = pending[1], int(step)
        return True

    def state(self) -> Dict[str, Any]:
        """What a checkpoint's ``extra.json`` keeps under ``EXTRA_KEY``."""
        return {"metric_for_best_model": self.name, "greater_is_better": self.greater_is_better,
                "best_metric": self.metric, "best_global_step": self.step}

    def load(self, state: Any, run_dir: str) -> None:
        """Continue from a checkpoint's ``state`` (None: it was written without
        ``load_best_model_at_end``, so nothing is known yet). A best checkpoint that no longer
        exists is dropped with its metric, with a warning (transformers drops the folder only and
        keeps the metric as the bar a later evaluation must beat), and so is a state
        kept for another metric or direction (its values cannot be compared with this one's; TRL's
        name of a metric is the same metric as ours: :func:`~.common.same_metric`)."""
        if state is None:
            return
        if not isinstance(state, dict) or not {"best_metric", "best_global_step"} <= set(state):
            raise ValueError(f"{EXTRA_KEY} in the checkpoint's extra.json is not a best-checkpoint state: {state!r}")
        kept = state.get("metric_for_best_model")
        if ((same_metric(kept) if isinstance(kept, str) else kept, state.get("greater_is_better"))
                != (same_metric(self.name), self.greater_is_better)):
            warnings.warn(f"the checkpoint's best {state.get('metric_for_best_model')} (greater_is_better "
                          f"{state.get('greater_is_better')}) was kept for another metric than {self.name} "
                          f"(greater_is_better {self.greater_is_better}): the best checkpoint is chosen afresh",
                          UserWarning, stacklevel=2)
            return
        step = state["best_global_step"]
        if step is not None and not _is_checkpoint(run_dir, step):
            warnings.warn(f"the best checkpoint (step {step}) recorded in the resumed state does not exist anymore; "
                          "ignoring it and its metric: the best is chosen among the later checkpoints (transformers "
                          "forgets the folder but keeps its metric as the bar to beat)", UserWarning, stacklevel=2)
            return
        self.metric, self.step = state["best_metric"], step

    def record(self, run_dir: str) -> Dict[str, Any]:
        """transformers' ``trainer_state.json`` fields: ``best_metric``, ``best_global_step``,
        ``best_model_checkpoint`` (the folder, or None), with the metric's name and direction."""
        from .checkpoint import checkpoint_dir

        folder = None if self.step is None else checkpoint_dir(run_dir, self.step)
        return {**self.state(), "best_model_checkpoint": folder}


def _is_checkpoint(run_dir: str, step: int) -> bool:
    from .checkpoint import checkpoint_dir

    return os.path.isfile(os.path.join(checkpoint_dir(run_dir, step), "COMPLETE"))


def load_best_model(trainer, part: str) -> Optional[str]:
    """transformers' ``_load_best_model`` at the end of training: the weights of the best
    checkpoint of ``trainer.best`` (the model saved under ``part`` there) loaded into
    ``trainer.model`` — the adapters of a peft model (the trainable weights a checkpoint holds),
    a sharded checkpoint into this wrapping on every rank (a collective, as a resume's load);
    nothing to load when the best is the step the model is at. Rank 0 writes
    ``RUN_DIR/BEST_FILE`` and prints one line. Returns the checkpoint folder (None without a
    best one, e.g. every evaluation gave nan)."""
    from .checkpoint import checkpoint_dir, load_checkpoint

    best = trainer.best
    folder = None if best.step is None else checkpoint_dir(trainer.run.path, best.step)
    if folder is not None and best.step != trainer.step:
        from rlhf_fast.distributed import load_sharded, unwrap

        from .sft import is_sharded_checkpoint

        if is_sharded_checkpoint(folder):
            load_sharded(folder, trainer.model, None, trainer.ctx)
        else:  # (under FSDP2 each rank takes its shard of the one-process checkpoint's weights)
            load_checkpoint(folder, models={part: unwrap(trainer.model)}, restore_rng=False)
    if trainer.ctx.is_main:
        trainer.run.write_json(BEST_FILE, best.record(trainer.run.path))
        if folder is None:
            print(f"rlhf-fast: {KEY}: no evaluation gave a best {best.name} (all nan?); final/ holds the last weights",
                  file=sys.stderr, flush=True)
        else:
            print(f"rlhf-fast: {KEY}: the best checkpoint is step {best.step} ({best.name}={_fmt(best.metric)}); "
                  f"final/ holds its weights", file=sys.stderr, flush=True)
    trainer.ctx.barrier()
    return folder


def _fmt(v: Optional[float]) -> str:
    return "None" if v is None else (f"{v:.6g}" if math.isfinite(v) else str(v))


__all__ = ["BestCheckpoint", "check_load_best_fields", "load_best_model", "EXTRA_KEY", "BEST_FILE"]
