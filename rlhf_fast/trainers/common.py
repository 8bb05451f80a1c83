"""Pieces every trainer shares: seeding, LR schedule, metrics log, run folder."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .config import check_output_path, save_config, to_dict


def check_seed(name: str, seed) -> None:
    """ValueError unless ``seed`` is an int in [0, 2**63): torch's generators and the
    samplers' Philox keys take a 64-bit seed, and a larger one fails deep inside them."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {seed!r}")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) with ``seed``."""
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    check_seed("seed", seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, kind: str = "cosine", min_ratio: float = 0.0) -> float:
    """LR multiplier at ``step``: linear warm-up from 0 to 1 over ``warmup_steps``, then
    ``constant``, ``linear`` decay or ``cosine`` decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "linear":
        decay = 1.0 - progress
    elif kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"kind must be 'constant', 'linear' or 'cosine', got {kind!r}")
    return min_ratio + (1.0 - min_ratio) * decay


# ours (lr_lambda: linear warm-up, then min_lr_ratio ends a linear / cosine decay)
SCHEDULES = ("constant", "linear", "cosine")
# transformers' other LambdaLR schedules (SchedulerType; get_scheduler), built by transformers
# with lr_scheduler_kwargs; a LambdaLR, so a checkpoint restores it like ours
HF_SCHEDULES = ("constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt", "cosine_with_min_lr",
                "cosine_warmup_with_min_lr", "warmup_stable_decay")
LR_SCHEDULES = SCHEDULES + HF_SCHEDULES
# transformers' schedules that step on a metric: the offline trainers (SFT, reward, DPO, KTO) pass
# an evaluation metric (metric_for_best_model, eval_loss by default) to them after each evaluation
# (training_loop), as transformers' Trainer does; the online trainers' loop passes none
METRIC_SCHEDULES = ("reduce_lr_on_plateau", "greedy")
PLATEAU = "reduce_lr_on_plateau"
GREEDY = "greedy"  # transformers' GreedyLR: divides the LR by factor on improvement, multiplies on a plateau
# the evaluation metric a metric schedule steps on by default: transformers' metric_for_best_model
# for it ("loss" -> "eval_loss"), a key every offline trainer's evaluate() returns
PLATEAU_METRIC = "eval_loss"


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int = 0,
    total_steps: int,
    kind: str = "cosine",
    min_ratio: float = 0.0,
    lr_scheduler_kwargs: Optional[Mapping[str, Any]] = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """A LambdaLR for ``kind``: one of ``SCHEDULES`` (linear warm-up then constant, ``linear`` or
    ``cosine`` decay to ``min_ratio``; :func:`lr_lambda`), or one of ``HF_SCHEDULES``, built by
    ``transformers.get_scheduler(kind, optimizer, warmup_steps, total_steps,
    scheduler_specific_kwargs=lr_scheduler_kwargs)`` (its own warm-up formula; ``min_ratio`` must
    be 0: its kwargs set the final LR, e.g. ``min_lr_rate``). For ``kind`` ``PLATEAU``, torch's
    ``ReduceLROnPlateau(optimizer, **lr_scheduler_kwargs)`` as transformers builds it (no warm-up:
    ``warmup_steps`` and ``min_ratio`` must be 0).

    For ``GREEDY``, transformers' ``GreedyLR(optimizer, **lr_scheduler_kwargs)`` likewise.

    Call ``scheduler.step()`` once per optimizer step; a ReduceLROnPlateau or GreedyLR instead
    ``scheduler.step(metric)`` after each evaluation (:func:`steps_on_metric`).
    """
    if kind in METRIC_SCHEDULES:
        return _metric_scheduler(kind, optimizer, warmup_steps, min_ratio, lr_scheduler_kwargs)
    if kind not in LR_SCHEDULES:
        raise ValueError(f"kind must be one of {LR_SCHEDULES + METRIC_SCHEDULES}, got {kind!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if kind == "constant" and min_ratio:
        raise ValueError(f"min_ratio ends a 'linear' / 'cosine' decay; kind 'constant' has none, "
                         f"got min_ratio={min_ratio}")
    if kind in HF_SCHEDULES:
        if min_ratio:
            raise ValueError(f"min_ratio applies to kind 'linear' / 'cosine'; {kind!r} takes its final LR from "
                             f"lr_scheduler_kwargs, got min_ratio={min_ratio}")
        from transformers.optimization import get_scheduler

        return get_scheduler(kind, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                             scheduler_specific_kwargs=dict(lr_scheduler_kwargs or {}))
    if lr_scheduler_kwargs:
        raise ValueError(f"lr_scheduler_kwargs apply to the transformers schedules {HF_SCHEDULES}, not {kind!r}, "
                         f"got {dict(lr_scheduler_kwargs)!r}")

    def fn(step: int) -> float:
        return lr_lambda(step, warmup_steps=warmup_steps, total_steps=total_steps, kind=kind, min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def _metric_scheduler_cls(kind: str):
    """torch's ReduceLROnPlateau (``PLATEAU``) or transformers' GreedyLR (``GREEDY``)."""
    if kind == PLATEAU:
        return torch.optim.lr_scheduler.ReduceLROnPlateau
    try:
        from transformers.optimization import GreedyLR
    except ImportError:  # (our floor, transformers 4.46, predates it)
        import transformers

        raise ValueError(f"lr_schedule {GREEDY!r} needs a transformers release with GreedyLR (installed: "
                         f"{transformers.__version__}); upgrade transformers or pick another schedule") from None
    return GreedyLR


def _metric_scheduler(kind: str, optimizer, warmup_steps: int, min_ratio: float,
                      lr_scheduler_kwargs: Optional[Mapping[str, Any]]):
    # transformers' get_scheduler returns before it reads num_warmup_steps for these kinds: a
    # warm-up would be ignored there, so it is refused here
    if warmup_steps or min_ratio:
        raise ValueError(f"kind {kind!r} has no warm-up and no min_ratio (its min_lr is in lr_scheduler_kwargs), "
                         f"got warmup_steps={warmup_steps}, min_ratio={min_ratio}")
    kwargs = dict(lr_scheduler_kwargs or {})
    cls = _metric_scheduler_cls(kind)
    allowed = [n for n in inspect.signature(cls).parameters if n != "optimizer"]
    for key in kwargs:
        if key not in allowed:
            raise ValueError(f"lr_scheduler_kwargs key {key!r} is not an argument of "
                             f"{'torch' if kind == PLATEAU else 'transformers'}'s {cls.__name__} "
                             f"(kind {kind!r}); expected some of {allowed}")
    from transformers.optimization import get_scheduler

    sched = get_scheduler(kind, optimizer, scheduler_specific_kwargs=kwargs)
    if kind == PLATEAU:
        # the LR it starts from, saved with its state: a resume at another lr scales the reduced LR
        # by new / saved (checkpoint.keeping_hyperparameters); GreedyLR keeps it as _init_lrs
        sched.base_lrs = [g["lr"] for g in optimizer.param_groups]
    return sched


def steps_on_metric(scheduler) -> bool:
    """Whether ``scheduler`` steps on an evaluation metric (a ReduceLROnPlateau or transformers'
    GreedyLR: ``scheduler.step(metric)`` after each evaluation) rather than once per optimizer step."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return True
    if type(scheduler).__name__ != "GreedyLR":  # (called every step: no transformers import for the others)
        return False
    try:
        from transformers.optimization import GreedyLR
    except ImportError:  # a transformers without it built none of our schedulers
        return False
    return isinstance(scheduler, GreedyLR)


def schedule_metric(cfg) -> Tuple[str, bool]:
    """``(name, greater_is_better)`` of the evaluation metric an offline config's metric-driven
    ``lr_schedule`` steps on: transformers' rule (``TrainingArguments.__post_init__`` and
    ``Trainer._evaluate``): ``metric_for_best_model`` (null: ``"loss"``) with ``eval_`` put in front
    unless it starts so; ``greater_is_better`` (null: the name does not end in ``"loss"``)."""
    name = getattr(cfg, "metric_for_best_model", None) or "loss"
    gib = getattr(cfg, "greater_is_better", None)
    gib = (not name.endswith("loss")) if gib is None else gib
    return (name if name.startswith("eval_") else "eval_" + name), gib


# TRL's names of the offline trainers' metrics that are logged here under another name
# (docs/from_trl.md): a config ported from TRL may name them in metric_for_best_model
TRL_METRIC_NAMES = {"rewards/accuracies": "rewards/accuracy", "rewards/margins": "rewards/margin"}


def same_metric(name: str) -> str:
    """``name`` (with or without ``eval_``) with a TRL name of ``TRL_METRIC_NAMES`` as ours:
    ``"eval_rewards/accuracies"`` -> ``"eval_rewards/accuracy"``; any other name as it is."""
    base = name[len("eval_"):] if name.startswith("eval_") else name
    return name[:len(name) - len(base)] + TRL_METRIC_NAMES[base] if base in TRL_METRIC_NAMES else name


def metric_to_step_on(cfg, metrics: Mapping[str, Any], *, user: Optional[str] = None) -> float:
    """The value in an evaluation's ``metrics`` of the metric ``cfg``'s schedule steps on
    (:func:`schedule_metric`; a TRL name the evaluation did not log: ours, :func:`same_metric`);
    ValueError naming ``metric_for_best_model`` and the metrics
    the evaluation logged when it has none (transformers: a KeyError at the same point).
    ``user``: who reads the metric, for the message (None: the ``lr_schedule``, "steps on")."""
    name, _ = schedule_metric(cfg)
    if name not in metrics and same_metric(name) in metrics:
        return metrics[same_metric(name)]
    if name not in metrics:
        who = user or f"lr_schedule {cfg.lr_schedule!r} steps on"
        raise ValueError(f"metric_for_best_model {getattr(cfg, 'metric_for_best_model', None)!r}: {who} "
                         f"{name}, which this evaluation did not log; it logged {sorted(metrics)}")
    return metrics[name]


def warmup_steps_for(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    """The warm-up length: ceil(``warmup_ratio`` × ``total_steps``) when ``warmup_ratio`` > 0 (transformers'
    ``TrainingArguments.get_warmup_steps`` for a ``warmup_steps`` below 1, float rounding included:
    0.07 × 100 gives 8), else ``warmup_steps``."""
    return math.ceil(total_steps * warmup_ratio) if warmup_ratio > 0 else warmup_steps


def supervised_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LRScheduler:
    """The LR schedule of an SFT / reward / DPO / KTO config: ``warmup_steps`` (or ``warmup_ratio`` of
    ``max_steps``), then ``lr_schedule`` over ``max_steps``: ours decay down to ``min_lr_ratio`` × lr
    (TRL's ``cosine_with_min_lr`` with ``lr_scheduler_kwargs={"min_lr_rate": ...}``; 0: to zero),
    transformers' with ``lr_scheduler_kwargs`` (``reduce_lr_on_plateau`` / ``greedy``: a ReduceLROnPlateau /
    GreedyLR, stepped on the :func:`schedule_metric` by :func:`~rlhf_fast.trainers.sft.training_loop`). Build it once
    ``max_steps`` is final (:func:`steps_for_epochs`)."""
    warmup = warmup_steps_for(cfg.warmup_steps, getattr(cfg, "warmup_ratio", 0.0), cfg.max_steps)
    return make_scheduler(optimizer, warmup_steps=warmup, total_steps=cfg.max_steps, kind=cfg.lr_schedule,
                          min_ratio=cfg.min_lr_ratio, lr_scheduler_kwargs=getattr(cfg, "lr_scheduler_kwargs", None))


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):  # its floats through the non-finite check below, as Python's
        v = v.detach()
        return _jsonable(v.float().item()) if v.numel() == 1 else _finite_items(v.cpu().tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the line parseable by strict readers
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        return _jsonable(v.item())
    return v


def _non_finite_number(v: Any) -> bool:
    """Whether ``v`` is one number (:func:`_window_number`) that is NaN / inf."""
    n = _window_number(v)
    return n is not None and not math.isfinite(n)


def _finite_items(x: Any) -> Any:
    """A tensor's ``tolist()`` (nested lists of numbers) with every non-finite float as its text."""
    if isinstance(x, list):
        return [_finite_items(e) for e in x]
    return _jsonable(x)


# transformers' report_to names of the trackers MetricsLogger feeds, in the order of its
# get_available_reporting_integrations (integrations/integration_utils.py), with the pip package
# each needs. "all" is every one of them that is installed, as there; "none" is none of them.
TRACKER_PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
TRACKERS = tuple(TRACKER_PACKAGES)
# report_to values that stand alone: "auto" (our default, the behaviour from before report_to
# existed) is TensorBoard when it is installed, else nothing
REPORT_TO_WORDS = ("auto", "all", "none")
# the trackers of transformers that are not here, so that naming one says so rather than "unknown"
HF_ONLY_TRACKERS = ("azure_ml", "comet_ml", "neptune", "codecarbon", "clearml", "dagshub", "flyte", "dvclive",
                    "swanlab", "kubeflow")
TRACKER_IDS = "tracker_ids.json"  # in the run folder: the W&B / MLflow run a resumed run continues


def tracker_installed(name: str) -> bool:
    """Whether the package of the tracker ``name`` (one of ``TRACKERS``) can be imported, found
    as transformers finds it (``importlib.util.find_spec``, without importing it)."""
    import importlib.util

    return importlib.util.find_spec(TRACKER_PACKAGES[name]) is not None


def check_report_to(value: Any, key: str = "report_to"):
    """``value`` of the config key ``key`` checked and normalised: one of ``REPORT_TO_WORDS``, a
    tracker name, or a list of tracker names (comma-separated text is a list; a one-item list of
    a word is that word). Every named tracker must be installed. Returns a str or a list of str.
    ValueError naming ``key`` (and the pip package of a tracker that is missing) otherwise."""
    names = value
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")] if "," in names else [names.strip()]
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{key} must be one of {REPORT_TO_WORDS}, a tracker name {TRACKERS} or a list of them, "
                         f"got {value!r}")
    if len(names) == 1 and names[0] in REPORT_TO_WORDS:
        return names[0]
    for n in names:
        if n in REPORT_TO_WORDS:
            raise ValueError(f"{key}: {n!r} stands alone, not in a list with other names, got {value!r}")
        if n in HF_ONLY_TRACKERS:
            raise ValueError(f"{key}: {n!r} is a transformers integration not supported here; the trackers are "
                             f"{TRACKERS}")
        if n not in TRACKERS:
            raise ValueError(f"{key}: unknown tracker {n!r}; expected one of {TRACKERS}, or one of {REPORT_TO_WORDS}")
        if not tracker_installed(n):
            raise ValueError(f"{key} {n!r} needs the {TRACKER_PACKAGES[n]} package, which is not installed: "
                             f"pip install {TRACKER_PACKAGES[n]}")
    if len(set(names)) != len(names):
        raise ValueError(f"{key} names a tracker twice: {value!r}")
    return names[0] if len(names) == 1 and isinstance(value, str) else list(names)


def resolve_report_to(value: Any, key: str = "report_to") -> List[str]:
    """The trackers ``value`` (:func:`check_report_to`) stands for, in ``TRACKERS`` order for the
    words: ``auto`` → ``["tensorboard"]`` when it is installed, else ``[]``; ``all`` → every
    installed tracker (transformers' ``report_to="all"``); ``none`` → ``[]``."""
    value = check_report_to(value, key)
    if value == "auto":
        return ["tensorboard"] if tracker_installed("tensorboard") else []
    if value == "all":
        return [n for n in TRACKERS if tracker_installed(n)]
    if value == "none":
        return []
    return [value] if isinstance(value, str) else list(value)


def check_run_name(value: Any, key: str = "run_name") -> None:
    """ValueError naming ``key`` unless ``value`` is None or a non-empty string."""
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{key} must be null (the output folder's name) or a non-empty string, got {value!r}")


def _tracker_id(run_dir: str, name: str, new_id=None) -> Optional[str]:
    """The id of the ``name`` tracker's run saved in ``run_dir/TRACKER_IDS``; when there is none
    and ``new_id`` is given, ``new_id()`` is saved and returned."""
    from .config import atomic_write_text

    path = os.path.join(run_dir, TRACKER_IDS)
    ids = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            ids = json.load(f)
    if name not in ids and new_id is not None:
        ids[name] = new_id()
        atomic_write_text(path, json.dumps(ids, indent=2))
    return ids.get(name)


def _save_tracker_id(run_dir: str, name: str, run_id: str) -> None:
    _tracker_id(run_dir, name, lambda: run_id)


class _TensorBoard:
    """Scalars as TensorBoard events in ``run_dir/tb``; ``purge_step`` (SummaryWriter's): the
    events of that step and later that earlier writers left there are hidden."""

    def __init__(self, run_dir: str, run_name: str, config: Dict[str, Any], purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=os.path.join(run_dir, "tb"), purge_step=purge_step)

    def log(self, step: int, scalars: Dict[str, float]) -> None:
        for k, v in scalars.items():
            self._w.add_scalar(k, v, step)

    def log_table(self, step: int, name: str, columns: List[str], rows: List[List[Any]]) -> None:
        self._w.add_text(name, _markdown_table(columns, rows), step)

    def finish(self) -> None:
        self._w.close()


class _WandB:
    """A W&B run in project ``$WANDB_PROJECT`` (default "rlhf_fast"), files under ``run_dir/wandb``,
    its id kept in ``run_dir/TRACKER_IDS`` so that a resumed run continues it (``resume="allow"``).
    Each record is logged with its ``step`` as a key, the x-axis of every other key (as
    transformers' WandbCallback does with ``train/global_step``), so the steps a resumed run
    logs again after its checkpoint are new points, not dropped as steps going back."""

    def __init__(self, run_dir: str, run_name: str, config: Dict[str, Any]):
        import secrets

        import wandb

        run_id = _tracker_id(run_dir, "wandb", lambda: secrets.token_hex(4))
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlhf_fast"), name=run_name, config=config,
                               dir=run_dir, resume="allow", id=run_id)
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step", step_sync=True)

    def log(self, step: int, scalars: Dict[str, float]) -> None:
        self._run.log({"step": step, **scalars})

    def log_table(self, step: int, name: str, columns: List[str], rows: List[List[Any]]) -> None:
        import wandb

        self._run.log({"step": step, name: wandb.Table(columns=columns, data=rows)})

    def finish(self) -> None:
        self._run.finish()


class _Trackio:
    """A trackio run in project ``$TRACKIO_PROJECT`` (default "rlhf_fast") named ``run_name``,
    continued by name on resume (``resume="allow"``, as transformers' TrackioCallback)."""

    def __init__(self, run_dir: str, run_name: str, config: Dict[str, Any]):
        import trackio

        self._trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "rlhf_fast"), name=run_name, config=config,
                     resume="allow")

    def log(self, step: int, scalars: Dict[str, float]) -> None:
        self._trackio.log(scalars, step=step)

    def log_table(self, step: int, name: str, columns: List[str], rows: List[List[Any]]) -> None:
        import pandas as pd  # (a dependency of trackio)

        self._trackio.log({name: self._trackio.Table(dataframe=pd.DataFrame(rows, columns=columns))}, step=step)

    def finish(self) -> None:
        self._trackio.finish()


def _flat(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = v
    return out


class _MLflow:
    """An MLflow run (experiment ``$MLFLOW_EXPERIMENT_NAME``, tracking URI ``$MLFLOW_TRACKING_URI``,
    both read by mlflow) named ``run_name``, whose id is kept in ``run_dir/TRACKER_IDS`` so that a
    resumed run continues it. The config's keys (dotted) are its params, logged once, when the run
    is created (MLflow refuses to change a param), 100 per call and without the values longer than
    MLflow takes, as transformers' MLflowCallback does."""

    def __init__(self, run_dir: str, run_name: str, config: Dict[str, Any]):
        import mlflow

        self._mlflow = mlflow
        run_id = _tracker_id(run_dir, "mlflow")
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        if run_id is None:
            _save_tracker_id(run_dir, "mlflow", run.info.run_id)
            longest = getattr(getattr(getattr(mlflow, "utils", None), "validation", None), "MAX_PARAM_VAL_LENGTH", 500)
            params = [(k, str(v)) for k, v in _flat(config).items() if len(str(v)) <= longest]
            for i in range(0, len(params), 100):
                mlflow.log_params(dict(params[i:i + 100]))

    def log(self, step: int, scalars: Dict[str, float]) -> None:
        self._mlflow.log_metrics(scalars, step=step)

    def log_table(self, step: int, name: str, columns: List[str], rows: List[List[Any]]) -> None:
        self._mlflow.log_table(data={c: [r[i] for r in rows] for i, c in enumerate(columns)},
                               artifact_file=f"{name}/step_{step:07d}.json")

    def finish(self) -> None:
        self._mlflow.end_run()


TRACKER_CLASSES = {"tensorboard": _TensorBoard, "wandb": _WandB, "trackio": _Trackio, "mlflow": _MLflow}


def _cell(value: Any) -> Any:
    """A table cell as every tracker takes it: numbers, bools, text and None as they are,
    anything else (chat messages, lists) as JSON text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value, default=str)


def _markdown_table(columns: List[str], rows: List[List[Any]]) -> str:
    """``rows`` as a Markdown table (TensorBoard renders text summaries as Markdown)."""
    def cell(v):  # one table line per row: every line break (\r too) becomes <br>
        return "" if v is None else re.sub(r"\r\n|\r|\n", "<br>", str(v).replace("|", "\\|"))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def record_scalars(rec: Mapping[str, Any]) -> Dict[str, float]:
    """The numbers of a metrics record (as :meth:`MetricsLogger.log` returns it) that trackers
    plot: every int / float value but ``step`` (bools, lists and text are left out, so a Python
    float nan, which the record holds as the text "nan", is too: TensorBoard has always had
    these and only these)."""
    return {k: v for k, v in rec.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricsLogger:
    """Appends one JSON object per step to ``run_dir/metrics.jsonl`` (flushed every line; always),
    and sends its numbers (:func:`record_scalars`) to the trackers ``report_to`` names
    (:func:`resolve_report_to`: ``"auto"``, the default, is TensorBoard when it is installed, in
    ``run_dir/tb``; ``"wandb"``, ``"trackio"``, ``"mlflow"``, ``"all"``, ``"none"`` or a list),
    each run named ``run_name`` (None: the run folder's name) and given ``config`` (the run's
    resolved config as a dict) as its config. ``tensorboard=False`` leaves TensorBoard out
    whatever ``report_to`` says.

    Open it on rank 0 only. A resumed run opens it after ``truncate_metrics``: the W&B and
    MLflow runs continue under the ids saved in ``run_dir/tracker_ids.json``, and the steps the
    run had logged after its checkpoint are logged to them again (as a resumed TRL run does),
    while metrics.jsonl holds each step once. ``resume_step``: the step the run continues from
    (0: a fresh start): TensorBoard hides the events of the later steps that an earlier attempt
    wrote in ``run_dir/tb`` (SummaryWriter's ``purge_step``), so it too shows each step once;
    None keeps every event; ``relogged``: the record of ``resume_step`` itself is logged again (a
    stop's partial log window, restored from its checkpoint), so its events go too. A tracker
    named explicitly that fails to start raises; under ``"auto"`` a TensorBoard that cannot start
    is skipped, as before."""

    def __init__(self, run_dir: str, *, tensorboard: bool = True, append: bool = True, report_to: Any = "auto",
                 run_name: Optional[str] = None, config: Optional[Mapping[str, Any]] = None,
                 resume_step: Optional[int] = None, relogged: bool = False):
        check_run_name(run_name)
        names = [n for n in resolve_report_to(report_to) if tensorboard or n != "tensorboard"]
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        name = run_name or os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
        self._trackers = []
        # (a fresh start hides all: an aborted attempt's step 0, e.g. the evaluation at the start)
        purge = None if resume_step is None else (int(resume_step) + 1 if resume_step else 0)
        if relogged and resume_step:  # the checkpoint's own step is logged again: its event goes too
            purge = int(resume_step)
        try:
            for n in names:
                try:
                    kw = {"purge_step": purge} if n == "tensorboard" else {}
                    self._trackers.append(TRACKER_CLASSES[n](run_dir, name, dict(config or {}), **kw))
                except Exception:
                    if report_to != "auto":
                        raise
                    # TensorBoard installed but unusable: the JSONL log is enough
        except BaseException:
            self._finish_trackers()
            raise
        self._f = open(self.path, "a" if append else "w", encoding="utf-8")

    @classmethod
    def for_config(cls, run_dir: str, cfg: Any, *, resume_step: Optional[int] = None,
                   relogged: bool = False) -> "MetricsLogger":
        """The logger of a trainer whose config ``cfg`` has ``report_to`` and ``run_name`` (a config
        without them gets the defaults), with the run's config.yaml (written by then; else ``cfg``)
        as the trackers' config; ``resume_step``: the trainer's step as its loop starts."""
        import yaml

        path = os.path.join(run_dir, "config.yaml")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                config = yaml.safe_load(f) or {}
        else:
            config = to_dict(cfg)
        return cls(run_dir, report_to=getattr(cfg, "report_to", "auto"), run_name=getattr(cfg, "run_name", None),
                   config=config, resume_step=resume_step, relogged=relogged)

    @property
    def trackers(self) -> List[str]:
        """The names of the trackers this logger feeds."""
        names = {c: n for n, c in TRACKER_CLASSES.items()}
        return [names[type(t)] for t in self._trackers]

    def log(self, step: int, metrics: Mapping[str, Any]) -> Dict[str, Any]:
        """Write ``{"step": step, **metrics}`` as one line; tensors become floats. Returns the record."""
        rec = {"step": int(step)}
        rec.update({str(k): _jsonable(v) for k, v in metrics.items()})
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._trackers:
            # a NaN / inf (text in the JSON line) of a float or a one-value tensor still reaches the
            # trackers as a number, as transformers' callbacks write every float: a loss turning
            # NaN shows on their plots
            scalars = record_scalars({**rec, **{str(k): float(v) for k, v in metrics.items()
                                                if _non_finite_number(v)}})
            for t in self._trackers:
                t.log(int(step), scalars)
        return rec

    def log_table(self, step: int, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Send ``rows`` (records, e.g. samples.jsonl's; the columns are their keys in order of
        first appearance) to every tracker as the table ``name`` at ``step``: a W&B / trackio
        table, an MLflow table artifact, a TensorBoard text summary in Markdown (as TRL logs its
        completions). The run folder's own file of them is the caller's."""
        if not self._trackers or not rows:
            return
        columns = list(dict.fromkeys(str(k) for row in rows for k in row))
        data = [[_cell(row.get(c)) for c in columns] for row in rows]
        for t in self._trackers:
            t.log_table(int(step), name, columns, data)

    def _finish_trackers(self) -> None:
        trackers, self._trackers = self._trackers, []
        for t in trackers:
            t.finish()

    def close(self) -> None:
        """Flush and close the log file and finish every tracker's run."""
        if not self._f.closed:
            self._f.close()
        self._finish_trackers()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def window_keeps_last(key: str) -> bool:
    """Whether :class:`LogWindow` logs metric ``key`` as of the logged step rather than averaged
    over the steps since the last log: the learning rate, epoch and gradient norms (transformers
    logs the last step's), running counts (TRL's ``num_tokens``, ``reward/dropped_total``,
    ``sdft/teacher_syncs``) and the current β / loss scale."""
    return (key in ("lr", "epoch", "num_tokens", "kl/coef", "beta", "sdft/teacher_syncs")
            or key.endswith(("grad_norm", "loss_scale", "_total")))


def _window_number(v: Any) -> Optional[float]:
    """A metric value as a float when it is one number (int, float, numpy scalar, one-value
    tensor; not a bool), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, torch.Tensor):
        return float(v.item()) if v.numel() == 1 else None
    if hasattr(v, "item") and getattr(v, "size", None) == 1:  # a numpy scalar
        return float(v.item())
    return None


LOG_WINDOW_KEY = "log_window"  # a checkpoint's extra.json: the steps of a stop's unfinished log window


class LogWindow:
    """The metrics of the steps since the last logged one (``log_every``), given as one record
    when a step is logged (:meth:`pop`): each number the mean of its values over the steps that
    have it, NaN ones left out (NaN when all are), as TRL 1.16 averages its metrics between two
    logs (and transformers its loss); :func:`window_keeps_last`'s keys and anything that is not
    one number are the last step's. A window of one step gives its metrics unchanged. The
    trainers also log each checkpoint's step, so that a resumed run's windows are those of the
    uninterrupted run (transformers starts a new one at any resume); a stop signal's checkpoint
    keeps the steps of its unfinished window (:meth:`state`), whose record the stop logs and the
    resumed run replaces (:meth:`load`), for the same reason."""

    def __init__(self):
        self._steps: List[Dict[str, Any]] = []

    def add(self, metrics: Mapping[str, Any]) -> None:
        """Add one step's metrics."""
        self._steps.append(dict(metrics))

    def peek(self) -> Dict[str, Any]:
        """The record :meth:`pop` would give, the window left as it is."""
        steps = self._steps
        out = self.pop()
        self._steps = steps
        return out

    def state(self) -> List[Dict[str, Any]]:
        """The steps added since the last ``pop`` as JSON-able records (one-number values as
        Python numbers, NaN / inf kept as floats, the rest as the log writes them): what the
        checkpoint of a stop inside a window keeps, so that the resumed run logs the window of the
        uninterrupted run (:meth:`load`). ``[]`` when every step has been logged."""
        def plain(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                return float(v.detach().float().item())  # (as the log writes a one-value tensor)
            if isinstance(v, (bool, int, float, str)) or v is None:
                return v
            return v.item() if _window_number(v) is not None else _jsonable(v)

        return [{str(k): plain(v) for k, v in m.items()} for m in self._steps]

    def load(self, steps: Any) -> None:
        """Put back the steps a checkpoint kept (:meth:`state`) in front of the window; TypeError
        for anything but a list of dicts."""
        if not isinstance(steps, list) or not all(isinstance(m, dict) for m in steps):
            raise TypeError(f"a log window's state must be a list of dicts (LogWindow.state), got {steps!r}")
        self._steps = [dict(m) for m in steps] + self._steps

    def pop(self) -> Dict[str, Any]:
        """The record of the steps added since the last ``pop`` (``{}`` for none); empties the window."""
        steps, self._steps = self._steps, []
        out: Dict[str, Any] = {}
        for k in dict.fromkeys(k for m in steps for k in m):
            vals = [m[k] for m in steps if k in m]
            nums = [_window_number(v) for v in vals]
            if len(vals) == 1 or window_keeps_last(str(k)) or any(n is None for n in nums):
                out[k] = vals[-1]
                continue
            real = [n for n in nums if not math.isnan(n)]
            out[k] = sum(real) / len(real) if real else float("nan")
        return out


def read_metrics(run_dir: str) -> list:
    """The records of ``run_dir/metrics.jsonl`` as a list of dicts."""
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(run_dir: str, step: int) -> None:
    """Drop records after ``step`` from ``run_dir/metrics.jsonl`` (on resume from a
    checkpoint at ``step``, so the log continues as if the run had never stopped)."""
    from .config import atomic_write_text

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    atomic_write_text(path, "".join(log_records_up_to(path, step)))


def log_records_up_to(path: str, step: int) -> list:
    """The lines of the JSONL log ``path`` whose record has ``step`` <= ``step``. A torn last
    line (the process died mid-write, after the checkpoint it resumes from) is dropped, also
    one cut inside a multi-byte character (a log written with ``ensure_ascii=False``); a bad
    line elsewhere is a ValueError naming the file and line."""
    with open(path, "rb") as f:
        raw = f.readlines()
    keep = []
    for i, data in enumerate(raw):
        torn = i == len(raw) - 1 and not data.endswith(b"\n")
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError:
            if torn:
                break
            raise ValueError(f"{path}:{i + 1}: not UTF-8 text in the run's log") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if torn:
                break
            raise ValueError(f"{path}:{i + 1}: invalid JSON in the run's log") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object in the run's log")
        if rec.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    return keep


def step_logged(path: str, step: int) -> bool:
    """Whether the JSONL log ``path`` (absent: no) holds a record of ``step``."""
    if not os.path.isfile(path):
        return False
    return any(json.loads(line).get("step") == step for line in log_records_up_to(path, step))


class RunDir:
    """A run's output folder: creates it and writes the resolved config as ``config.yaml``.

    Attributes: ``path``, ``checkpoints`` (its checkpoints folder), ``metrics_path``.
    """

    def __init__(self, path: str, config: Optional[Any] = None, *, create: bool = True):
        check_output_dir(path)
        # a file, a folder below a file or one that cannot be written: named now, not as an OSError
        check_output_path(path, "output_dir", folder=True)
        self.path = os.path.abspath(path)
        if create:
            self.create()
        self.checkpoints = os.path.join(self.path, "checkpoints")
        self.metrics_path = os.path.join(self.path, "metrics.jsonl")
        if config is not None:
            self.write_config(config)

    def create(self) -> None:
        """Make the folder (and its parents) if it is not there."""
        os.makedirs(self.path, exist_ok=True)

    def write_config(self, config: Any) -> str:
        """Write ``config`` (a dataclass) as ``config.yaml`` in the run folder; returns the path."""
        p = os.path.join(self.path, "config.yaml")
        save_config(config, p)
        return p

    def file(self, *parts: str) -> str:
        """A path inside the run folder (parents created)."""
        p = os.path.join(self.path, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def write_json(self, name: str, obj: Any) -> str:
        """Write ``obj`` as pretty JSON to ``name`` inside the run folder; returns the path."""
        from .config import atomic_write_text

        p = self.file(name)
        atomic_write_text(p, json.dumps(obj, indent=2, default=_jsonable))
        return p

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


def run_contents(path: str, *, include_log: bool = True) -> list:
    """What of a finished or interrupted run the folder ``path`` already holds: ``"checkpoints"``
    (complete ones), ``"final"`` (a saved model) and, with ``include_log``, a non-empty
    ``"metrics.jsonl"``. Empty when ``path`` does not exist."""
    from .checkpoint import latest_checkpoint

    held = []
    if not os.path.isdir(path):
        return held
    if latest_checkpoint(path) is not None:
        held.append("checkpoints")
    if os.path.exists(os.path.join(path, "final")):
        held.append("final")
    log = os.path.join(path, "metrics.jsonl")
    if include_log and os.path.isfile(log) and os.path.getsize(log) > 0:
        held.append("metrics.jsonl")
    return held


def check_fresh_run_dir(path: str, *, option: str = "output_dir", resume_hint: Optional[str] = "resume: true",
                        include_log: bool = True) -> None:
    """Refuse to start a new run in a folder that already holds one: its checkpoints, final
    model and metrics log would be mixed with (and partly overwritten by) the new run's.
    Raises ValueError naming ``option``, the folder, what it holds and how to continue it
    (``resume_hint``; None when it cannot be continued)."""
    held = run_contents(path, include_log=include_log)
    if held:
        how = f"continue it ({resume_hint}), or " if resume_hint else "it has no checkpoint to continue from: "
        raise ValueError(f"{option} {path} already holds a run ({', '.join(held)}): {how}"
                         f"choose another {option}, or remove that folder first")


def open_supervised_run(cfg, is_main: bool):
    """The run folder of an SFT / reward / DPO / KTO trainer (not made yet) and the checkpoint it
    will resume from (None for a fresh start). A folder holding a run of another kind is refused
    (:func:`check_run_kind`); ``cfg.resume`` continues the latest complete checkpoint of
    ``cfg.output_dir`` (with the model and data that run names: :func:`check_same_run`); a fresh
    start into a folder holding another run is refused (``check_fresh_run_dir``), except that with
    ``resume`` the log of a run interrupted before its first checkpoint is dropped and the run
    starts again. Nothing is written now: a fresh start
    makes the folder and its config.yaml once data and model have loaded
    (:func:`begin_fresh_run`), a resumed run writes config.yaml once its checkpoint has loaded
    (``write_config``), so a run refused on the way leaves no folder, or the folder as it was."""
    from .checkpoint import latest_checkpoint

    check_output_dir(cfg.output_dir)
    path = os.path.abspath(cfg.output_dir)
    check_run_kind(path, cfg)
    ck = latest_checkpoint(path) if cfg.resume else None
    if ck is None:
        check_fresh_run_dir(path, include_log=not cfg.resume, resume_hint=None if cfg.resume else "resume: true")
    else:
        check_same_run(path, cfg)
    return RunDir(cfg.output_dir, create=False), ck


# the config keys that say which run a folder holds: a resume must keep them (others, such as
# lr or max_steps, may change)
RUN_DEFINING_KEYS = ("model", "data", "eval_data")


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        # (a path given relative in one run and absolute in the other names the same file)
        return a == b or (not a.startswith("tiny:") and os.path.realpath(a) == os.path.realpath(b))
    return a == b


def check_same_run(path: str, cfg, keys: Sequence[str] = RUN_DEFINING_KEYS) -> None:
    """Refuse to resume the run in the folder ``path`` with ``cfg`` when one of ``keys`` (the
    model and data it trains on) differs from the run's config.yaml: another experiment sent to
    the same output_dir would otherwise be taken for that run's continuation (its checkpoint
    loaded, config.yaml rewritten to name the new data). A key the saved config (or ``cfg``)
    lacks, or a config.yaml that cannot be read, is not compared. ValueError naming the key,
    both values and the folder."""
    from .report import read_config

    try:
        saved = read_config(path)
    except (ValueError, OSError):
        return
    for key in keys:
        if key not in saved or not hasattr(cfg, key):
            continue
        theirs, ours = saved[key], getattr(cfg, key)
        if not _same_value(theirs, ours):
            raise ValueError(f"output_dir {path} holds a run with {key} {theirs!r} (its config.yaml), but this "
                             f"one has {key} {ours!r}: resuming its checkpoint needs the same {key}; choose another "
                             f"output_dir for a new run, or set {key} back to continue that one")


def begin_fresh_run(run: RunDir, cfg, is_main: bool) -> None:
    """The start of an offline run that does not resume (:func:`open_supervised_run`), once its
    data and model have loaded: the folder made, a log left by a run interrupted before its first
    checkpoint dropped, and config.yaml written (on the main rank)."""
    run.create()
    if is_main:
        if os.path.exists(run.metrics_path):
            os.remove(run.metrics_path)
        run.write_config(cfg)


def check_output_dir(value: Any, key: str = "output_dir") -> None:
    """ValueError naming ``key`` unless ``value`` is a non-empty path (text)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty path, got {value!r}")


def held_run_kind(path: str) -> Optional[str]:
    """The kind of run (``rlhf-fast report``'s name, :func:`~rlhf_fast.trainers.config.saved_run_kind`)
    the folder ``path`` holds, or None when it has no config.yaml rlhf-fast can read or holds no
    log, checkpoint or final model (a config.yaml alone: a run refused before its step 1): the
    kind the trainers compare theirs with before they write into a folder."""
    from .config import saved_run_kind

    theirs = saved_run_kind(path)
    return theirs if theirs is not None and run_contents(path) else None


def check_run_kind(path: str, cfg, option: str = "output_dir") -> None:
    """Refuse to train ``cfg`` (an offline trainer's config) into the folder ``path`` when it
    holds a run of another kind (as ``rlhf-fast report`` tells it,
    :func:`~rlhf_fast.trainers.config.saved_run_kind`): a DPO trainer would otherwise resume an
    SFT run's checkpoint and overwrite its config.yaml, log and final model. A folder without
    a config.yaml rlhf-fast can read has no kind to compare. ValueError naming ``option``."""
    from .report import run_kind

    theirs = held_run_kind(path)
    if theirs is None:
        return
    try:
        ours = run_kind(to_dict(cfg))
    except ValueError:  # a config class of no known kind (a user's own): nothing to compare with
        return
    if theirs != ours:
        raise ValueError(f"{option} {path} holds a run of rlhf-fast {theirs}, not of rlhf-fast {ours}; "
                         f"choose another {option}")


def require_records(records: list, key: str, path: str) -> list:
    """``records`` loaded from the file ``path`` of the config key ``key``; ValueError if there
    are none (an empty file would otherwise fail later as 'no training examples left')."""
    if not records:
        raise ValueError(f"{key} {path} holds no records (the file is empty)")
    return records


def split_records(records: list, eval_fraction: float, seed: int,
                  key: Optional[Callable[[Any], Any]] = None) -> Tuple[list, list]:
    """(train, eval) split of ``records`` by a seeded shuffle of their items, each side in file
    order: every record of an item goes to the same side, so a pair labelled by several
    annotators is never held out and trained on at once. ``key(record)`` names its item (None:
    an item of its own); default :func:`rlhf_fast.feedback.formats.record_item_key` (the prompt
    and the unordered responses). ``eval_fraction`` of the items are held out (at least one when
    it is > 0 and there are two items or more)."""
    if key is None:
        from rlhf_fast.feedback.formats import record_item_key as key
    item_of: Dict[Any, int] = {}
    items = [item_of.setdefault(i if k is None else k, len(item_of))  # (the keys are tuples, never ints)
             for i, k in enumerate(map(key, records))]
    # the items numbered in first-occurrence order: with no repeats they are the records'
    # indices, and the split is the same as a shuffle of the records
    idx = list(range(len(item_of)))
    random.Random(seed).shuffle(idx)
    n_eval = int(round(len(idx) * eval_fraction))
    if eval_fraction > 0 and len(idx) >= 2:
        n_eval = max(1, n_eval)
    ev = set(idx[:n_eval])
    return [r for r, i in zip(records, items) if i not in ev], [r for r, i in zip(records, items) if i in ev]


def _check_data_source(value, key: str) -> None:
    """A config's ``data`` / ``eval_data``: a path must name a file (:func:`check_input_file`), a
    list or tuple holds the rows themselves; anything else (a ``datasets.Dataset``, which the run's
    config.yaml could not record) is a TypeError naming ``key``, before the run folder is made."""
    from rlhf_fast.feedback.formats import check_input_file

    if not value:
        return
    if isinstance(value, (str, os.PathLike)):
        check_input_file(os.fspath(value), key, datasets_ok=True)  # (a save_to_disk folder reads as its rows)
    elif not isinstance(value, (list, tuple)):
        records = "train_records" if key == "data" else "eval_records"
        raise TypeError(f"{key} must be a path to a JSONL / Parquet file or a list of rows, got "
                        f"{type(value).__name__}; pass rows held elsewhere (a datasets.Dataset) to the trainer "
                        f"as {records}= (its records), or save them to a file")


def load_split_records(cfg, load: Callable[[str], list], synthetic: Callable[[], list], train_records=None,
                       eval_records=None, expand: Optional[Callable[[list], list]] = None) -> Tuple[Any, Any]:
    """The ``(train records, eval records)`` of an SFT / reward / DPO / KTO trainer. Records passed
    in are kept as they are (``eval_records`` None stays None); without ``train_records``:
    ``load(cfg.data)`` (:func:`require_records`: an empty file is refused), or ``synthetic()``
    without ``cfg.data`` (it may raise, for a data kind the synthetic task does not have); the eval
    records ``load(cfg.eval_data)``, or without ``cfg.eval_data`` a ``cfg.eval_fraction`` of the
    training records held out (:func:`split_records`, seeded by ``cfg.seed``). ``expand`` maps
    the records loaded here, each side after the split (DPO's rankings to their pairs, so that
    one ranking's pairs are never on both sides)."""
    if train_records is not None:
        return train_records, eval_records
    _check_data_source(cfg.data, "data")  # (the loaders' own message cannot name the key)
    records = require_records(load(cfg.data), "data", cfg.data) if cfg.data else synthetic()
    expand = expand or (lambda recs: recs)
    if eval_records is None:
        if cfg.eval_data:
            _check_data_source(cfg.eval_data, "eval_data")
            eval_records = expand(require_records(load(cfg.eval_data), "eval_data", cfg.eval_data))
        else:
            records, eval_records = split_records(records, cfg.eval_fraction, cfg.seed)
            eval_records = expand(eval_records)
    return expand(records), eval_records


def annotator_weight_map(weights: Mapping[str, float], agreement_pairs: Optional[Sequence[Any]] = None
                         ) -> Dict[str, float]:
    """``{annotator: loss weight}`` of a reward / DPO / KTO trainer: the configured ``weights``
    (``annotator_weights``), and with ``agreement_pairs`` (PairRecords: ``auto_annotator_weights``)
    the weights derived from each annotator's agreement with the others on the items several of
    them labelled (:func:`rlhf_fast.feedback.agreement.annotator_weights`) for the annotators
    ``weights`` does not list (the configured ones win)."""
    out = dict(weights)
    if agreement_pairs is not None:
        from rlhf_fast.feedback.agreement import agreement_stats, annotator_weights
        from rlhf_fast.feedback.formats import comparable_pairs

        out = {**annotator_weights(agreement_stats(comparable_pairs(agreement_pairs))), **out}
    return out


def record_weight(weights: Mapping[str, float], annotator: Optional[str]):
    """The loss weight of a record by ``annotator`` (None: unattributed): ``weights[annotator]``,
    1.0 for an annotator not listed and for none."""
    return weights.get(annotator, 1.0) if annotator is not None else 1.0


def check_bool_fields(cfg, names: Sequence[str]) -> None:
    """ValueError naming the first of the config keys ``names`` whose value is not true or false."""
    for name in names:
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(cfg, name)!r}")


def check_annotator_weights(cfg) -> None:
    """``cfg.annotator_weights``: a mapping {annotator name: finite weight >= 0}; ValueError naming
    the key otherwise. Records' annotators are text (a JSONL ``"annotator": 1`` is read as "1"), so
    a non-text key (``{1: 0.5}`` from Python, ``yes`` from YAML) would never apply."""
    from rlhf_fast.ops._validate import finite

    if not isinstance(cfg.annotator_weights, dict):
        raise ValueError("annotator_weights must be a mapping {annotator: weight}, got "
                         f"{type(cfg.annotator_weights).__name__}")
    for k, w in cfg.annotator_weights.items():
        if not isinstance(k, str):
            raise ValueError(f"annotator_weights keys must be annotator names (strings), got {k!r}")
        finite(f"annotator_weights[{k!r}]", w, ">= 0")


def check_tokenizer_override_fields(cfg) -> None:
    """TRL's tokenizer overrides ``eos_token``, ``pad_token`` and ``chat_template_path`` (SFT,
    reward): null or a non-empty string each; ValueError naming the key."""
    for key in ("eos_token", "pad_token", "chat_template_path"):
        v = getattr(cfg, key)
        if v is not None and (not isinstance(v, str) or not v):
            raise ValueError(f"{key} must be null or a non-empty string, got {v!r}")


def check_lora_field(cfg, name: str = "lora") -> None:
    """``cfg.lora``: None, or a mapping of peft LoraConfig fields ({} for r=8, alpha=16, every
    linear layer), whose values given as command-line text (``--lora.r 16``) are read as YAML;
    ValueError naming the field (``name``) otherwise."""
    if cfg.lora is None:
        return
    if not isinstance(cfg.lora, dict):
        raise ValueError(f"{name} must be null or a mapping of LoraConfig fields, got {cfg.lora!r}")
    from .config import yaml_value

    # `--lora.r 16` arrives as text: read each value as YAML (16, 5e-2, [q_proj, v_proj])
    cfg.lora = {k: yaml_value(v) if isinstance(v, str) else v for k, v in cfg.lora.items()}
    _check_lora_values(cfg.lora, name)


def _check_lora_values(lora: Mapping[str, Any], name: str) -> None:
    """ValueError naming ``name.key`` for a field peft's LoraConfig lacks or a value it would
    only refuse at the model load (lora_alpha text fails inside a layer, a dropout outside
    [0, 1] in torch), so a bad setting stops the run before any model is loaded."""
    try:
        import peft
    except ImportError:  # pragma: no cover - peft is a declared dependency here
        return
    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    for key, v in lora.items():
        if key not in known:
            raise ValueError(f"{name}.{key} is not a peft LoraConfig field (r, lora_alpha, lora_dropout, "
                             "target_modules, modules_to_save, ... )")
    r, alpha, dropout = lora.get("r", 8), lora.get("lora_alpha", 16), lora.get("lora_dropout", 0.0)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{name}.r must be a positive integer (the adapters' rank), got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{name}.lora_alpha must be a finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
        raise ValueError(f"{name}.lora_dropout must be a number in [0, 1], got {dropout!r}")


# transformers' Trainer names (TrainingArguments.optim) of the optimizers that need no other
# package: transformers/trainer_optimizer.py, _get_adamw_torch, _get_adafactor, _get_sgd,
# _get_adagrad and _get_rmsprop
ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused")
OPTIMS = ADAMW_OPTIMS + ("adafactor", "sgd", "adagrad", "rmsprop")
# the optim_args each of them reads, and as what (the same handlers; they also read weight_decay,
# which the Trainer's parameter groups then override: the weight_decay key sets it here)
OPTIM_ARGS: Dict[str, Dict[str, type]] = {
    "sgd": {"momentum": float, "dampening": float, "nesterov": bool},
    "adagrad": {"lr_decay": float, "eps": float},
    "rmsprop": {"momentum": float, "alpha": float, "eps": float, "centered": bool},
}
ADAM_DEFAULTS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}  # TrainingArguments' (and torch's)
# updates that are not elementwise: Adafactor's second moment of a matrix is the outer product of
# its row and column means, and its update is clipped by the update's RMS, so a rank holding an
# FSDP2 shard of a matrix would step differently from one process holding all of it
NOT_ELEMENTWISE = ("adafactor",)
# the param-group key that names a non-AdamW optimizer in its state dict (an untagged state is
# AdamW's, as every checkpoint before the others existed), checked on load
OPTIM_KEY = "optim"


def _text_value(text: str) -> Any:
    """A value given as text, read as YAML, and a number in exponent form without a dot (which
    YAML 1.1 leaves as text: '1e-7') as a float."""
    import re

    import yaml

    v = yaml.safe_load(text)
    if isinstance(v, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", v.strip()):
        return float(v)
    return v


def _yaml_values(mapping: Mapping[str, Any]) -> Dict[str, Any]:
    """``mapping`` with text values read as YAML: ``--optim_args.momentum 0.9`` arrives as '0.9'."""
    return {k: _text_value(v) if isinstance(v, str) else v for k, v in mapping.items()}


def _mapping(name: str, value: Any) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{name} must be a mapping {{name: value}}, got {value!r}")
    return _yaml_values(value)


def _optim_args(optim: str, optim_args: Mapping[str, Any], name: str) -> Dict[str, Any]:
    """``optim_args`` checked against ``OPTIM_ARGS[optim]``: floats for its number keys, bools
    for its flags; ValueError naming ``name``.KEY otherwise."""
    allowed = OPTIM_ARGS.get(optim, {})
    out = {}
    for k, v in optim_args.items():
        if k == "weight_decay":
            raise ValueError(f"{name}.weight_decay: set the weight_decay key instead (it decays the matrices "
                             "only, as the Trainer's parameter groups do)")
        if k not in allowed:
            takes = f"takes {sorted(allowed)}" if allowed else "takes no optim_args"
            raise ValueError(f"{name}.{k}: optim {optim!r} {takes}")
        if allowed[k] is bool:
            if not isinstance(v, bool):
                raise ValueError(f"{name}.{k} must be true or false, got {v!r}")
            out[k] = v
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name}.{k} must be a finite number, got {v!r}")
            out[k] = float(v)
    return out


def optimizer_cls_and_kwargs(optim: str = "adamw_torch", *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                             optim_args: Optional[Mapping[str, Any]] = None):
    """``(optimizer class, keyword arguments besides the parameters)`` for the transformers name
    ``optim`` (one of ``OPTIMS``), as ``transformers.Trainer.get_optimizer_cls_and_kwargs`` gives
    them for ``learning_rate=lr``, ``adam_beta1, adam_beta2 = betas``, ``adam_epsilon=eps`` and
    ``optim_args`` (here a mapping {name: value} of ``OPTIM_ARGS[optim]``, there the text
    "name=value,..."). ``adafactor`` is transformers' ``Adafactor`` with ``scale_parameter`` and
    ``relative_step`` off, so it steps at ``lr`` under the LR schedule. ValueError naming
    ``optim`` / ``optim_args`` for anything else."""
    if optim not in OPTIMS:
        raise ValueError(f"optim must be one of {OPTIMS}, got {optim!r} (the optimizers of bitsandbytes, torchao, "
                         "GaLore, APOLLO, LOMO, schedulefree and the like need packages not used here)")
    args = _optim_args(optim, _mapping("optim_args", optim_args), "optim_args")
    kw: Dict[str, Any] = {"lr": lr}
    if optim in ADAMW_OPTIMS:
        kw.update(betas=(betas[0], betas[1]), eps=eps)
        if optim == "adamw_torch_fused":
            kw["fused"] = True
        return torch.optim.AdamW, kw
    if optim == "adafactor":
        from transformers.optimization import Adafactor

        kw.update(scale_parameter=False, relative_step=False)
        return Adafactor, kw
    kw.update(args)
    return {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}[optim], kw


def _same_optimizer_hook(optim: str):
    """A load_state_dict pre-hook: a state saved by another kind of optimizer (AdamW's moments
    loaded into Adafactor, say) is a ValueError naming both, not a KeyError at the next step."""
    mine = "adamw" if optim in ADAMW_OPTIMS else optim

    def hook(optimizer, state_dict):
        saved = {g.get(OPTIM_KEY, "adamw") for g in state_dict.get("param_groups", ())}
        saved = {"adamw" if s in ADAMW_OPTIMS else s for s in saved}
        if saved and saved != {mine}:
            theirs = "adamw_torch" if saved == {"adamw"} else ", ".join(sorted(saved))
            raise ValueError(f"the saved optimizer state is from optim {theirs!r}, but this run's optim is "
                             f"{optim!r}: resume with optim {theirs!r}, or start a new run")
        return None

    return hook


def make_optimizer(params, *, lr: float, weight_decay: float, optim: str = "adamw_torch", betas=(0.9, 0.999),
                   eps: float = 1e-8, optim_args: Optional[Mapping[str, Any]] = None) -> torch.optim.Optimizer:
    """The optimizer ``optim`` (one of ``OPTIMS``; :func:`optimizer_cls_and_kwargs`) over ``params``,
    with weight decay on the matrices only (:func:`decay_param_groups`). The AdamW names are
    :func:`make_adamw` (fused kernel where it applies, whichever of the two is named: the update
    is the same). A non-AdamW optimizer's groups carry its name (``OPTIM_KEY``), and loading a
    state dict saved by another kind of optimizer is a ValueError. ``adafactor`` over FSDP2
    shards (DTensor parameters) is refused: its update is not elementwise."""
    from torch.distributed.tensor import DTensor

    params = list(params)
    cls, kw = optimizer_cls_and_kwargs(optim, lr=lr, betas=betas, eps=eps, optim_args=optim_args)
    if optim in ADAMW_OPTIMS:
        opt = make_adamw(params, lr, weight_decay, betas=kw["betas"], eps=kw["eps"])
    else:
        if optim in NOT_ELEMENTWISE and any(isinstance(p, DTensor) for p in params):
            raise ValueError(f"optim {optim!r} cannot step FSDP2-sharded parameters (distributed.strategy fsdp2): "
                             "its update of a matrix is not elementwise, so each rank's shard would move unlike "
                             "the whole; use strategy ddp, or an elementwise optimizer")
        groups = [{**g, OPTIM_KEY: optim} for g in decay_param_groups(params, weight_decay)]
        opt = cls(groups, **kw)
    opt.register_load_state_dict_pre_hook(_same_optimizer_hook(optim))
    return opt


def supervised_optimizer(params, cfg) -> torch.optim.Optimizer:
    """The optimizer of an SFT / reward / DPO / KTO config over ``params``: ``optim`` (default
    ``adamw_torch``), ``lr``, ``weight_decay``, ``adam_beta1`` / ``adam_beta2`` / ``adam_epsilon``
    and ``optim_args`` (:func:`make_optimizer`)."""
    if not isinstance(cfg, OptimizerOptions):  # a config without these keys: AdamW at their defaults
        return make_optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return make_optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay, optim=cfg.optim,
                          betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, optim_args=cfg.optim_args)


def check_optimizer_fields(optim, adam_beta1, adam_beta2, adam_epsilon, optim_args, *, lr: float = 1e-3,
                           prefix: str = "", optim_key: str = "optim") -> Dict[str, Any]:
    """Check the optimizer keys of a config (``prefix`` + their names in the messages, the
    optimizer's own key ``optim_key``): ``optim`` one of ``OPTIMS``; betas in [0, 1) and epsilon
    > 0, set away from their defaults only for the AdamW names (transformers passes them to no
    other); ``optim_args`` those of ``OPTIM_ARGS[optim]`` — and the optimizer is built once on a
    dummy parameter, so what torch refuses (nesterov without momentum...) fails here, naming the
    key. Returns ``optim_args`` with text values read as YAML. ValueError otherwise."""
    if optim not in OPTIMS:
        raise ValueError(f"{optim_key} must be one of {OPTIMS}, got {optim!r} (the optimizers of bitsandbytes, "
                         "torchao, GaLore, APOLLO, LOMO, schedulefree and the like need packages not used here)")
    for name, v in (("adam_beta1", adam_beta1), ("adam_beta2", adam_beta2), ("adam_epsilon", adam_epsilon)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or not (0 < v if name == "adam_epsilon" else 0 <= v < 1):
            want = "a finite number > 0" if name == "adam_epsilon" else "a number in [0, 1)"
            raise ValueError(f"{prefix}{name} must be {want}, got {v!r}")
        if optim not in ADAMW_OPTIMS and v != ADAM_DEFAULTS[name]:
            raise ValueError(f"{prefix}{name} applies to {optim_key} {' / '.join(ADAMW_OPTIMS)} only (transformers "
                             f"passes it to no other optimizer), got {optim_key} {optim!r}")
    args = _optim_args(optim, _mapping(f"{prefix}optim_args", optim_args), f"{prefix}optim_args")
    cls, kw = optimizer_cls_and_kwargs(optim, lr=lr, betas=(adam_beta1, adam_beta2), eps=adam_epsilon,
                                       optim_args=args)
    kw.pop("fused", None)
    try:
        cls([torch.nn.Parameter(torch.zeros(2, 2))], **kw)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"{prefix}optim_args {args!r} for {optim_key} {optim!r}: {e}") from None
    return args


def check_schedule_fields(schedule, lr_scheduler_kwargs, min_lr_ratio, warmup_steps, warmup_ratio, *, lr: float,
                          total_steps: int, prefix: str = "", schedule_key: str = "lr_schedule",
                          eval_every: Optional[int] = None, eval_split: bool = False,
                          metric: str = PLATEAU_METRIC) -> Dict[str, Any]:
    """Check the LR-schedule keys of a config (``prefix`` + their names in the messages, the
    schedule's own key ``schedule_key``): the schedule one of ``LR_SCHEDULES``;
    ``lr_scheduler_kwargs`` only with transformers' schedules (``HF_SCHEDULES``), whose
    ``min_lr_ratio`` must stay 0, and such that transformers builds the schedule (tried on a
    dummy optimizer at ``lr`` over ``total_steps``); ``warmup_ratio`` in [0, 1), and not with a
    non-zero ``warmup_steps``. Returns ``lr_scheduler_kwargs`` with text values read as YAML.
    A trainer that steps ``METRIC_SCHEDULES`` on its evaluations passes its ``eval_every`` (None:
    refused), whether it has an eval split and the ``metric`` it steps on: :func:`check_plateau_fields`."""
    if schedule in METRIC_SCHEDULES and eval_every is not None:
        return check_plateau_fields(lr_scheduler_kwargs, min_lr_ratio, warmup_steps, warmup_ratio, lr=lr,
                                    eval_every=eval_every, eval_split=eval_split, prefix=prefix,
                                    schedule_key=schedule_key, schedule=schedule, metric=metric)
    choices = LR_SCHEDULES + (METRIC_SCHEDULES if eval_every is not None else ())
    if schedule in METRIC_SCHEDULES:
        raise ValueError(f"{prefix}{schedule_key} {schedule!r} steps on a metric, which no trainer here passes "
                         f"to its scheduler; choose one of {choices}")
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"{prefix}{schedule_key} must be one of {choices}, got {schedule!r}")
    r = warmup_ratio
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 <= r < 1:
        raise ValueError(f"{prefix}warmup_ratio must be a number in [0, 1), got {r!r}")
    if r > 0 and warmup_steps != 0:
        raise ValueError(f"{prefix}warmup_ratio ({r}) and {prefix}warmup_steps ({warmup_steps}) both set the "
                         f"warm-up: set {prefix}warmup_steps to 0 to use the ratio")
    kwargs = _mapping(f"{prefix}lr_scheduler_kwargs", lr_scheduler_kwargs)
    if schedule in SCHEDULES:
        if kwargs:
            raise ValueError(f"{prefix}lr_scheduler_kwargs apply to the transformers schedules {HF_SCHEDULES}; "
                             f"{prefix}{schedule_key} {schedule!r} takes {prefix}min_lr_ratio only, got {kwargs!r}")
        if schedule == "constant" and min_lr_ratio:  # (it would be ignored: the LR never decays)
            raise ValueError(f"{prefix}min_lr_ratio ends a 'linear' / 'cosine' decay; {prefix}{schedule_key} "
                             f"'constant' has none (the LR stays at lr): set {prefix}min_lr_ratio to 0 or pick a "
                             f"decaying schedule, got {prefix}min_lr_ratio={min_lr_ratio!r}")
        return kwargs
    if min_lr_ratio:
        raise ValueError(f"{prefix}min_lr_ratio applies to {prefix}{schedule_key} 'linear' / 'cosine'; for "
                         f"{schedule!r} set the final LR in {prefix}lr_scheduler_kwargs (e.g. min_lr_rate)")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    try:
        make_scheduler(opt, warmup_steps=warmup_steps_for(warmup_steps, r, total_steps), total_steps=total_steps,
                       kind=schedule, lr_scheduler_kwargs=kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{prefix}lr_scheduler_kwargs {kwargs!r} do not fit {prefix}{schedule_key} "
                         f"{schedule!r}: {e}") from None
    return kwargs


def check_plateau_fields(lr_scheduler_kwargs, min_lr_ratio, warmup_steps, warmup_ratio, *, lr: float,
                         eval_every: int, eval_split: bool, prefix: str = "",
                         schedule_key: str = "lr_schedule", schedule: str = PLATEAU,
                         metric: str = PLATEAU_METRIC) -> Dict[str, Any]:
    """Check the keys of a ``METRIC_SCHEDULES`` schedule (transformers' ``reduce_lr_on_plateau``
    or ``greedy``) that steps on the evaluation metric ``metric``: an evaluation to step on
    (``eval_every`` > 0 and an eval split, as transformers requires an eval strategy), no warm-up
    and ``min_lr_ratio`` 0 (transformers ignores both for it; its floor is ``min_lr`` in
    ``lr_scheduler_kwargs``), and ``lr_scheduler_kwargs`` arguments of torch's
    ``ReduceLROnPlateau`` / transformers' ``GreedyLR`` that build it (on a dummy optimizer at
    ``lr``); for greedy, a ``min_lr`` (default 0.001) at most ``lr`` and a ``max_lr`` (default 1)
    at least ``lr``, as else it could only raise, or only lower, the LR. Returns the kwargs
    with text values read as YAML. ValueError naming the key."""
    where = f"{prefix}{schedule_key} {schedule!r}"
    if not eval_every:
        raise ValueError(f"{where} steps on {metric} after each evaluation: set {prefix}eval_every > 0 "
                         f"(got {eval_every!r})")
    if not eval_split:
        raise ValueError(f"{where} steps on {metric} after each evaluation: give {prefix}eval_data or an "
                         f"{prefix}eval_fraction > 0")
    for key, value in (("warmup_steps", warmup_steps), ("warmup_ratio", warmup_ratio)):
        if value:
            raise ValueError(f"{where} has no warm-up (transformers ignores it there): set {prefix}{key} to 0, "
                             f"got {value!r}")
    if min_lr_ratio:
        raise ValueError(f"{where} takes no {prefix}min_lr_ratio: set its floor with min_lr in "
                         f"{prefix}lr_scheduler_kwargs, got {prefix}min_lr_ratio={min_lr_ratio!r}")
    kwargs = _mapping(f"{prefix}lr_scheduler_kwargs", lr_scheduler_kwargs)
    bounds = (("min_lr", 0), ("max_lr", None)) if schedule == GREEDY else (("min_lr", 0),)
    for key, _ in bounds:
        v = kwargs.get(key, 0)
        # a list would have to match the param groups, which the config does not know
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{prefix}lr_scheduler_kwargs {key} must be a number for {where}, got {v!r}")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    try:
        sched = _metric_scheduler(schedule, opt, 0, 0.0, kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{prefix}lr_scheduler_kwargs {kwargs!r} do not fit {where}: {e}") from None
    if schedule == GREEDY and not sched.min_lrs[0] <= lr <= sched.max_lrs[0]:
        # (GreedyLR's default min_lr, 0.001, is above most fine-tuning LRs: it would never lower them)
        raise ValueError(f"{where} moves the LR between {prefix}lr_scheduler_kwargs min_lr ({sched.min_lrs[0]}) "
                         f"and max_lr ({sched.max_lrs[0]}), which must hold {prefix}lr ({lr}): set them "
                         f"in {prefix}lr_scheduler_kwargs")
    return kwargs


def check_metric_fields(metric_for_best_model, greater_is_better, schedule, lr_scheduler_kwargs,
                        prefix: str = "", schedule_key: str = "lr_schedule", load_best: bool = False) -> None:
    """Check ``metric_for_best_model`` (null, or the name of an evaluation metric, with or without
    its ``eval_`` prefix) and ``greater_is_better`` (null or a bool): they choose the metric a
    ``METRIC_SCHEDULES`` schedule steps on (:func:`schedule_metric`) and the best checkpoint of
    ``load_best`` (``load_best_model_at_end``), and are refused when neither uses them.
    transformers takes the scheduler's mode from ``lr_scheduler_kwargs`` only (``mode``, default
    ``"min"``), never from ``greater_is_better``: when either key is set, a mode that disagrees
    with ``greater_is_better`` is refused, so an accepted config runs as transformers runs it.
    ValueError naming the key."""
    m, g = metric_for_best_model, greater_is_better
    if m is not None and (not isinstance(m, str) or not m.strip() or m != m.strip() or m == "eval_"):
        raise ValueError(f"{prefix}metric_for_best_model must be null or the name of an evaluation metric "
                         f"(e.g. loss, eval_rewards/accuracy), got {m!r}")
    if g is not None and not isinstance(g, bool):
        raise ValueError(f"{prefix}greater_is_better must be true, false or null, got {g!r}")
    if m is None and g is None:
        return
    if schedule not in METRIC_SCHEDULES:
        if load_best:  # they choose the best checkpoint alone
            return
        raise ValueError(f"{prefix}metric_for_best_model / {prefix}greater_is_better choose the metric "
                         f"{prefix}{schedule_key} {METRIC_SCHEDULES} steps on; {schedule!r} steps on none, and "
                         f"{prefix}load_best_model_at_end is off (no best checkpoint is kept): leave them null, or "
                         f"set {prefix}load_best_model_at_end: true")
    name = m or "loss"
    gib = (not name.endswith("loss")) if g is None else g
    mode = (lr_scheduler_kwargs or {}).get("mode", "min")
    if mode in ("min", "max") and (mode == "max") != gib:
        raise ValueError(f"{prefix}metric_for_best_model {name!r} is better when "
                         f"{'greater' if gib else 'smaller'} ({prefix}greater_is_better "
                         f"{'true' if gib else 'false'}{'' if g is not None else ', from its name'}) but "
                         f"{prefix}lr_scheduler_kwargs mode is {mode!r} (transformers takes the mode from "
                         f"lr_scheduler_kwargs alone, 'min' by default): set {prefix}lr_scheduler_kwargs mode: "
                         f"{'max' if gib else 'min'}, or {prefix}greater_is_better: {'false' if gib else 'true'}")


def _beside(key: str) -> Dict[str, str]:
    return {"after": key}  # config.py lists the field after ``key`` of the config that inherits it


@dataclasses.dataclass
class OptimizerOptions:
    """The optimizer and LR-schedule keys the offline trainer configs (SFT, reward, DPO, KTO)
    share with TRL (transformers' ``TrainingArguments``), inherited by each: ``optim`` (one of
    ``OPTIMS``), ``adam_beta1`` / ``adam_beta2`` / ``adam_epsilon`` (the AdamW names only),
    ``optim_args`` ({name: value}: ``OPTIM_ARGS`` of sgd / adagrad / rmsprop),
    ``lr_scheduler_kwargs`` (the keyword arguments of a transformers ``lr_schedule``,
    ``HF_SCHEDULES`` and ``METRIC_SCHEDULES``), ``warmup_ratio`` (a warm-up of ceil(ratio × max_steps) steps, with
    ``warmup_steps`` 0) and ``metric_for_best_model`` / ``greater_is_better`` (the evaluation metric a
    ``METRIC_SCHEDULES`` schedule steps on: :func:`schedule_metric`, :func:`check_metric_fields`; and
    the one ``load_best_model_at_end`` keeps the best checkpoint by: :mod:`.best_checkpoint`).
    :func:`check_training_schedule` calls :meth:`check_optimizer_options`."""

    optim: str = dataclasses.field(default="adamw_torch", metadata=_beside("weight_decay"))
    adam_beta1: float = dataclasses.field(default=0.9, metadata=_beside("weight_decay"))
    adam_beta2: float = dataclasses.field(default=0.999, metadata=_beside("weight_decay"))
    adam_epsilon: float = dataclasses.field(default=1e-8, metadata=_beside("weight_decay"))
    optim_args: Dict[str, Any] = dataclasses.field(default_factory=dict, metadata=_beside("weight_decay"))
    warmup_ratio: float = dataclasses.field(default=0.0, metadata=_beside("warmup_steps"))
    lr_scheduler_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict, metadata=_beside("min_lr_ratio"))
    # the eval metric a metric-driven lr_schedule steps on (null: loss) and whether greater is better
    # (null: unless the name ends in "loss"), as transformers' TrainingArguments
    metric_for_best_model: Optional[str] = dataclasses.field(default=None, metadata=_beside("min_lr_ratio"))
    greater_is_better: Optional[bool] = dataclasses.field(default=None, metadata=_beside("min_lr_ratio"))
    # transformers': load the best checkpoint (by metric_for_best_model) into the model before final/ is saved
    load_best_model_at_end: bool = dataclasses.field(default=False, metadata=_beside("keep_checkpoints"))

    def check_optimizer_options(self) -> None:
        """Check these keys, with the inheriting config's ``lr``, ``lr_schedule``, ``min_lr_ratio``,
        ``warmup_steps``, ``max_steps``, ``eval_every`` / ``eval_data`` / ``eval_fraction`` (for
        ``reduce_lr_on_plateau``) and ``distributed`` (a DistributedConfig by now); text values
        of the two mappings are read as YAML. ValueError naming the key."""
        self.optim_args = check_optimizer_fields(self.optim, self.adam_beta1, self.adam_beta2, self.adam_epsilon,
                                                 self.optim_args, lr=self.lr)
        from .best_checkpoint import check_load_best_fields

        check_load_best_fields(self.load_best_model_at_end, eval_every=self.eval_every, save_every=self.save_every,
                               eval_split=bool(self.eval_data) or self.eval_fraction > 0)
        check_metric_fields(self.metric_for_best_model, self.greater_is_better, self.lr_schedule,
                            _mapping("lr_scheduler_kwargs", self.lr_scheduler_kwargs),
                            load_best=self.load_best_model_at_end)
        self.lr_scheduler_kwargs = check_schedule_fields(
            self.lr_schedule, self.lr_scheduler_kwargs, self.min_lr_ratio, self.warmup_steps, self.warmup_ratio,
            lr=self.lr, total_steps=self.max_steps, eval_every=self.eval_every,
            eval_split=bool(self.eval_data) or self.eval_fraction > 0, metric=schedule_metric(self)[0])
        if self.optim in NOT_ELEMENTWISE and self.distributed.strategy == "fsdp2":
            raise ValueError(f"optim {self.optim!r} is not supported with distributed.strategy fsdp2: its update of "
                             "a matrix is not elementwise, so each rank's shard would move unlike the whole; use "
                             "strategy ddp, or an elementwise optimizer")


def check_model_init_field(value: Any, key: str = "model_init_kwargs") -> Dict[str, Any]:
    """A config's ``model_init_kwargs`` (TRL's: the ``from_pretrained`` keywords of a model loaded
    from a folder): a mapping whose text values (``--model_init_kwargs.dtype bfloat16``) are read
    as YAML, checked and normalised by
    :func:`rlhf_fast.models.loading.check_model_init_kwargs`; ValueError naming ``key``.NAME."""
    from rlhf_fast.models.loading import check_model_init_kwargs

    return check_model_init_kwargs(_mapping(key, value), key)


@dataclasses.dataclass
class ModelInitOptions:
    """TRL's ``model_init_kwargs``, shared by the offline trainer configs (SFT, reward, DPO, KTO)
    and listed after ``model``: the ``from_pretrained`` keywords of ``model`` (and ``ref_model``)
    loaded from a folder, or applied to a ``tiny:`` model once built (dtype, attention). ``{}``
    (the default) loads float32 master weights whatever dtype the folder was saved in;
    ``{dtype: bfloat16}`` loads the weights in bf16 and trains them so — parameters, gradients and
    optimizer moments in bf16, no float32 copy — as TRL does with that dtype. Keys:
    :func:`rlhf_fast.models.loading.check_model_init_kwargs`.
    :func:`check_training_schedule` calls :meth:`check_model_init_options`."""

    model_init_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict, metadata=_beside("model"))

    def check_model_init_options(self) -> None:
        """``model_init_kwargs`` checked and normalised (:func:`check_model_init_field`)."""
        self.model_init_kwargs = check_model_init_field(self.model_init_kwargs)


@dataclasses.dataclass
class LoggingOptions:
    """The experiment-tracker keys the offline trainer configs (SFT, reward, DPO, KTO) share with
    TRL (transformers' ``TrainingArguments``), inherited by each and listed after ``log_every``:
    ``report_to`` (``auto``: TensorBoard when it is installed, else none — the default, as before
    this key existed; ``none``, ``all`` = every installed tracker, or ``tensorboard``, ``wandb``,
    ``trackio``, ``mlflow`` or a list of them; :class:`MetricsLogger`) and ``run_name`` (null: the
    output folder's name). metrics.jsonl is written whatever they say.
    :func:`check_training_schedule` calls :meth:`check_logging_options`."""

    report_to: Union[str, List[str]] = dataclasses.field(default="auto", metadata=_beside("log_every"))
    run_name: Optional[str] = dataclasses.field(default=None, metadata=_beside("log_every"))

    def check_logging_options(self) -> None:
        """``report_to`` normalised (:func:`check_report_to`: known names, installed packages) and
        ``run_name`` checked; ValueError naming the key."""
        self.report_to = check_report_to(self.report_to)
        check_run_name(self.run_name)


def check_training_schedule(cfg) -> None:
    """The checks every supervised trainer config (SFT, reward) shares: ``distributed`` given as
    a dict becomes a ``DistributedConfig``; sizes and counts, eval_fraction, lr, grad_clip,
    lr_schedule and gradient_checkpointing in range. Raises TypeError / ValueError naming the field."""
    from rlhf_fast.distributed import DistributedConfig

    if isinstance(cfg.distributed, dict):
        cfg.distributed = DistributedConfig(**cfg.distributed)
    if not isinstance(cfg.distributed, DistributedConfig):
        raise TypeError(f"distributed must be a DistributedConfig, got {type(cfg.distributed).__name__}")
    if hasattr(cfg, "output_dir"):
        check_output_dir(cfg.output_dir)
    for names, low in ((("max_len", "batch_size", "grad_accum", "max_steps", "log_every"), 1),
                       (("warmup_steps", "eval_every", "save_every", "keep_checkpoints"), 0)):
        for name in names:
            v = getattr(cfg, name)
            # (a Python caller's "2" would otherwise fail deep in a comparison, naming nothing)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    f = cfg.eval_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
        raise ValueError(f"eval_fraction must be a number in [0, 1), got {f!r}")
    for name, low in (("lr", "> 0"), ("grad_clip", ">= 0 (0 disables)"), ("weight_decay", ">= 0")):
        v = getattr(cfg, name)
        # nan passes every comparison: refused with inf, as neither trains anything
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                or (name == "lr" and v == 0):
            raise ValueError(f"{name} must be a finite number {low}, got {v!r}")
    check_seed("seed", cfg.seed)
    r = cfg.min_lr_ratio
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
        raise ValueError(f"min_lr_ratio must be a number in [0, 1] (the final LR over lr), got {r!r}")
    if isinstance(cfg, OptimizerOptions):
        cfg.check_optimizer_options()
    if isinstance(cfg, ModelInitOptions):
        cfg.check_model_init_options()
    if isinstance(cfg, LoggingOptions):
        cfg.check_logging_options()
    else:
        check_schedule_fields(cfg.lr_schedule, {}, cfg.min_lr_ratio, cfg.warmup_steps, 0.0, lr=cfg.lr,
                              total_steps=cfg.max_steps)
    if not isinstance(cfg.gradient_checkpointing, bool):
        raise ValueError(f"gradient_checkpointing must be true or false, got {cfg.gradient_checkpointing!r}")
    if not isinstance(getattr(cfg, "activation_offloading", False), bool):
        raise ValueError(f"activation_offloading must be true or false, got {cfg.activation_offloading!r}")
    if hasattr(cfg, "check_compile_options"):  # torch_compile and its backend / mode (.compile.CompileOptions)
        cfg.check_compile_options()
    if hasattr(cfg, "check_merge_options"):  # TRL's MergeModelCallback settings (.merging.MergeOptions)
        cfg.check_merge_options()
    if not isinstance(getattr(cfg, "disable_dropout", False), bool):
        raise ValueError(f"disable_dropout must be true or false, got {cfg.disable_dropout!r}")
    check_pad_to_multiple_of(cfg)
    if hasattr(cfg, "fp16"):  # bf16 null: not fp16 (TRL's default); not both (mixed_precision)
        from .mixed_precision import check_precision_fields

        check_precision_fields(cfg)
    epochs = getattr(cfg, "num_train_epochs", None)
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float))
                               or not math.isfinite(epochs) or epochs <= 0):
        raise ValueError(f"num_train_epochs must be null or a finite number > 0, got {epochs!r}")


def check_pad_to_multiple_of(cfg) -> None:
    """``pad_to_multiple_of`` (TRL's): null or an int >= 1, for padded batches only — a packed
    row (SFT ``packing`` bfd, ``padding_free``, ``prefix_sharing``) has no padding to round, so the
    pair is refused rather than ignored. SFT's ``packing_strategy: wrapped`` chunks are padded rows
    (a block's last chunk is shorter), rounded as TRL's collator rounds them. ValueError naming the keys."""
    m = getattr(cfg, "pad_to_multiple_of", None)
    if m is None:
        return
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"pad_to_multiple_of must be null or an int >= 1, got {m!r}")
    for key in ("packing", "padding_free", "prefix_sharing"):
        if key == "packing" and getattr(cfg, "packing_strategy", "bfd") == "wrapped":
            continue
        if getattr(cfg, key, False):
            raise ValueError(f"pad_to_multiple_of rounds a padded batch's length; {key}: true packs the rows without "
                             f"padding: set one of them")


@contextlib.contextmanager
def random_states_kept(device: torch.device):
    """Restores the torch (CPU and ``device``'s CUDA), ``random`` and numpy random states on
    exit: what runs inside (an evaluation's reward functions) leaves training's streams as
    they were (an RL evaluation; DPO's generate_during_eval)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        np = None
    py = random.getstate()
    npst = np.random.get_state() if np is not None else None
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py)
            if np is not None:
                np.random.set_state(npst)


def autocast_context(device: torch.device, bf16: bool, fp16: bool = False):
    """float16 autocast when ``fp16`` (on CUDA: :mod:`rlhf_fast.trainers.mixed_precision`), bf16
    autocast on CUDA when ``bf16``; a no-op context elsewhere (CPU trains in fp32)."""
    import contextlib

    from .mixed_precision import fp16_autocast, fp16_on

    if fp16_on(fp16, device):
        return fp16_autocast(device)
    if bf16 and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class PhaseClock:
    """The clock of a trainer's phase timers (``time/generate``, ``time/logprobs``,
    ``time/update``, ``time/step``, ``step_time``...): :meth:`now` is ``time.perf_counter()``.

    CUDA runs kernels asynchronously, so a phase that only queues work ends before its kernels
    do and its time lands in whichever later phase waits for them. With ``synchronize`` on
    (config ``sync_phase_timers``, or ``trainer.phase_clock.synchronize = True`` after
    construction) and ``device`` a CUDA device, :meth:`now` first waits for the device's queued
    work, so each phase holds its own GPU time. Off by default: every wait stalls the CPU's
    queueing of the next kernels, which costs throughput. Elsewhere (CPU) it never waits.

    device: a ``torch.device`` or its string (``"cpu"``, ``"cuda:0"``); synchronize: bool."""

    def __init__(self, device, synchronize: bool = False):
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise TypeError(f"device must be a torch.device or a device string, got {device!r}") from None
        self.synchronize = synchronize

    @property
    def synchronize(self) -> bool:
        """Whether :meth:`now` waits for the CUDA device's queued work first."""
        return self._synchronize

    @synchronize.setter
    def synchronize(self, value: bool) -> None:
        if not isinstance(value, bool):  # ("false" would be truthy: a silent slowdown)
            raise TypeError(f"synchronize must be a bool, got {value!r}")
        self._synchronize = value

    def now(self) -> float:
        """Seconds of ``time.perf_counter()``, after the device's queued work when synchronising."""
        if self._synchronize and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available else cpu; otherwise ``torch.device(device)``, which
    must exist on this machine (ValueError naming it otherwise)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(expected) from None
    if dev.type not in ("cpu", "cuda"):  # mps, meta, xpu...: the kernels and trainers run on CPU or CUDA only
        raise ValueError(expected)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device {device!r} was asked for, but this machine has no CUDA device "
                             "(use 'cpu' or 'auto')")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {device!r} was asked for, but this machine has {n} CUDA device(s)")
    return dev


__all__ = ["check_seed", "seed_everything", "lr_lambda", "make_scheduler", "steps_on_metric", "schedule_metric",
           "TRL_METRIC_NAMES", "same_metric",
           "metric_to_step_on", "check_metric_fields", "make_optimizer", "OptimizerOptions",
           "LoggingOptions", "warmup_steps_for", "MetricsLogger", "check_report_to", "resolve_report_to", "read_metrics", "RunDir",
           "ModelInitOptions", "check_model_init_field", "LogWindow", "LOG_WINDOW_KEY",
           "load_causal_lm", "parse_tiny_spec", "truncate_metrics",
           "autocast_context", "random_states_kept", "resolve_device", "to_dict"]


def parse_tiny_spec(spec: str) -> Dict[str, Any]:
    """``"tiny:llama:hidden_size=64,num_layers=2,vocab_size=300"`` -> keyword arguments
    (``family`` plus ints for sizes). ``"tiny:"`` alone means a default tiny llama."""
    if not spec.startswith("tiny:"):
        raise ValueError(f"model spec must start with 'tiny:', got {spec!r}")
    parts = spec[len("tiny:"):].split(":", 1)
    out: Dict[str, Any] = {"family": parts[0] or "llama"}
    if len(parts) > 1 and parts[1]:
        for kv in parts[1].split(","):
            if "=" not in kv:
                raise ValueError(f"model spec {spec!r}: expected key=value after the family, got {kv!r}")
            k, v = kv.split("=", 1)
            try:
                out[k.strip()] = int(v)
            except ValueError:
                raise ValueError(f"model spec {spec!r}: {k} must be an int, got {v!r}") from None
    return out


def load_causal_lm(spec: str, *, texts: Optional[list] = None, kind: str = "causal", tokenizer: Any = None,
                   init_kwargs: Optional[Mapping[str, Any]] = None):
    """``(model, tokenizer)`` from a local folder (save_pretrained output) or a ``tiny:`` spec.

    ``kind`` "causal" (AutoModelForCausalLM) or "reward" (AutoModelForSequenceClassification,
    one label). For ``tiny:`` specs a byte-level BPE tokenizer is trained on ``texts``
    (plus a small built-in corpus) unless ``tokenizer`` is given; spec keys: family,
    vocab_size (default 512), hidden_size, num_layers, num_heads, seed. Nothing is downloaded.
    ``init_kwargs``: a config's checked ``model_init_kwargs`` (:class:`ModelInitOptions`), the
    ``from_pretrained`` keywords of a folder (float32 unless its ``dtype`` says otherwise; its
    ``trust_remote_code`` also reaches the tokenizer), applied to a tiny model once built.
    A folder holding a peft adapter (a LoRA run's final/) gives its base with the adapter: as a
    trainable peft model for "causal" (:func:`rlhf_fast.models.loading.load_policy`), merged into
    the sequence classifier's backbone for "reward".
    """
    if kind not in ("causal", "reward"):
        raise ValueError(f"kind must be 'causal' or 'reward', got {kind!r}")
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model must be a local path or a 'tiny:' spec, got {spec!r}")
    init_kwargs = check_model_init_field(init_kwargs)
    if spec.startswith("tiny:"):
        from rlhf_fast.models.tiny import sample_texts, tiny_causal_lm, tiny_reward_model, train_tokenizer

        kw = parse_tiny_spec(spec)
        vocab = kw.pop("vocab_size", 512)
        allowed = {"family", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                   "max_position_embeddings", "seed"}
        bad = sorted(set(kw) - allowed)
        if bad:
            raise ValueError(f"model spec {spec!r}: unknown keys {bad} (valid: {sorted(allowed | {'vocab_size'})})")
        build = tiny_causal_lm if kind == "causal" else tiny_reward_model
        try:
            if tokenizer is None:
                corpus = list(texts or []) + sample_texts(64)
                # right padding: trainers build [prompt | completion | pad] rows
                tokenizer = train_tokenizer(corpus, vocab, padding_side="right")
            model = build(len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.bos_token_id, **kw)
        except ValueError as e:
            # the message alone ("num_layers must be ...") would not say which setting holds it
            raise ValueError(f"model spec {spec!r}: {e}") from None
        from rlhf_fast.models.loading import apply_model_init_kwargs

        return apply_model_init_kwargs(model, init_kwargs), tokenizer
    if not os.path.isdir(spec):
        raise ValueError(f"model must be a local folder or a 'tiny:' spec; {spec!r} is neither (nothing is downloaded)")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_fast.models.loading import adapter_base, check_model_folder, from_pretrained_kwargs, tokenizer_kwargs

    check_model_folder(spec, "model", tokenizer=tokenizer is None)
    # an adapter whose base is not a local folder: refused, not looked up on the hub
    adapter = adapter_base(spec, "model")
    # absolute: peft saves a LoRA run's base by the path it was loaded from, which must hold from any folder
    spec = os.path.abspath(spec)
    # float32 master weights whatever dtype the folder was saved in (transformers 5 loads the
    # saved dtype by default: a bf16 save would train in pure bf16), unless model_init_kwargs'
    # dtype asks otherwise; autocast does the rest
    load_kw = from_pretrained_kwargs(init_kwargs)
    tok = tokenizer or AutoTokenizer.from_pretrained(spec, **tokenizer_kwargs(load_kw))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if kind == "causal" and adapter:
        from rlhf_fast.models.loading import load_policy

        # a LoRA run's final/: base + adapter as a trainable peft model (transformers' own loading
        # of the folder freezes every weight, and a fresh `lora` would replace the adapter)
        model = load_policy(spec, init_kwargs=init_kwargs)
    elif kind == "causal":
        model = AutoModelForCausalLM.from_pretrained(spec, **load_kw)
    elif adapter:  # a LoRA SFT run's final/ starting a reward model: the adapter merged into its backbone
        from rlhf_fast.models.loading import merged_adapter

        model = merged_adapter(AutoModelForSequenceClassification.from_pretrained(
            os.path.abspath(adapter), num_labels=1, **load_kw), spec)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(spec, num_labels=1, **load_kw)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
    if kind == "causal":
        from rlhf_fast.models.loading import mirror_pad_id

        mirror_pad_id(model, tok.pad_token_id)
    return model, tok


def trainer_model(cfg, model, tokenizer, texts: Callable[[], Sequence[str]], kind: str = "causal"):
    """``(model, tokenizer)`` of an SFT / reward / DPO / KTO trainer: both as passed in, or without
    ``model`` ``cfg.model`` loaded as ``kind`` (:func:`load_causal_lm`, ``cfg.model_init_kwargs``;
    a ``tiny:`` model's tokenizer, unless ``tokenizer`` is given, trained on ``texts()``, which is
    called only then). ValueError when ``model`` comes without its tokenizer. A ``model`` passed in
    is used as it is: a non-empty ``cfg.model_init_kwargs`` gets a warning (as TRL's trainers
    give), since it only applies to what is loaded (DPO / KTO's ``ref_model`` folder still is)."""
    if model is None:
        return load_causal_lm(cfg.model, texts=list(texts()), kind=kind, tokenizer=tokenizer,
                              init_kwargs=cfg.model_init_kwargs)
    if tokenizer is None:
        raise ValueError("tokenizer must be given together with model")
    if cfg.model_init_kwargs:
        import warnings

        warnings.warn(f"model_init_kwargs ({cfg.model_init_kwargs}) is not applied to the model passed in, which is "
                      "already built (cast it yourself); it applies to the models loaded from folders",
                      UserWarning, stacklevel=3)
    return model, tokenizer


def pad_token_id(tokenizer) -> int:
    """The id that pads a trainer's rows: the tokenizer's pad token, 0 when it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def add_config_arguments(parser, config_cls=None) -> None:
    """CLI arguments shared by the trainer commands: CONFIG.yaml ('none' for the defaults)
    then ``--key value`` overrides (``--a.b value`` for nested keys); ``--help`` lists the
    keys of ``config_cls`` with their defaults."""
    import argparse

    from .config import config_keys_help

    parser.add_argument("config", help="YAML config file ('none': defaults)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="--key value overrides (--a.b for nested keys); --print-config")
    if config_cls is not None:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = config_keys_help(config_cls, resolved_null_defaults(config_cls))
    parse = parser.parse_args

    def parse_args(args=None, namespace=None):
        # REMAINDER takes a --help after CONFIG as an override ("unknown config key 'help'"):
        # it asks for the help, as it does before CONFIG and for the RL commands
        ns = parse(args, namespace)
        if any(t in ("-h", "--help") for t in ns.overrides):
            parser.print_help()
            parser.exit(0)
        return ns

    parser.parse_args = parse_args


def resolved_null_defaults(config_cls) -> Dict[str, Any]:
    """{key: value} for the keys of ``config_cls`` whose declared default is null but which the
    config resolves when it is built — ``bf16``: true unless ``fp16`` (TRL's rule) — so that
    ``--help`` states the value the command runs with, as ``--print-config`` shows it (read from
    the field defaults: building a config would import transformers for its optimizer check)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    bf16, fp16 = fields.get("bf16"), fields.get("fp16")
    if bf16 is not None and bf16.default is None and fp16 is not None and isinstance(fp16.default, bool):
        return {"bf16": not fp16.default}
    return {}


def quiet_hf_progress() -> None:
    """No transformers progress bars ("Writing model shards" at every save) in a CLI run: its
    own log lines say what happens (a process-wide setting, so for the commands only)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def run_trainer_cli(name: str, config_cls, trainer_cls, args) -> int:
    """Load ``config_cls`` from ``args`` (see :func:`add_config_arguments`), train with
    ``trainer_cls`` and print one summary line (rank 0 only under torchrun). With
    ``--print-config``: print the resolved config as YAML instead, and train nothing."""
    from .config import config_yaml, load_config, take_print_config

    path = None if args.config in ("none", "-") else args.config
    overrides, show = take_print_config(args.overrides)
    cfg = load_config(config_cls, path, overrides)
    if show:
        print(config_yaml(cfg), end="")
        return 0
    quiet_hf_progress()
    trainer = trainer_cls(cfg)
    m = trainer.train()
    if trainer.ctx.is_main:
        print(f"{name}: {trainer.step} steps, " + ", ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float))
              + f"; model saved to {os.path.join(trainer.run.path, 'final')}")
    return 0


def trainer_commands(name: str, config_cls, trainer_cls):
    """``(add_arguments, run)``: the two functions :mod:`rlhf_fast.cli` calls on the module of the
    trainer command ``rlhf-fast NAME`` — the CLI arguments (:func:`add_config_arguments` with the
    keys of ``config_cls``) and the entry point (:func:`run_trainer_cli` with ``config_cls`` and
    ``trainer_cls``)."""

    def add_arguments(parser) -> None:
        """CLI arguments: CONFIG.yaml ('none' for the defaults) then ``--key value`` overrides."""
        add_config_arguments(parser, config_cls)

    def run(args) -> int:
        return run_trainer_cli(name, config_cls, trainer_cls, args)

    run.__doc__ = f"Entry point of ``rlhf-fast {name}``."
    return add_arguments, run


def decay_param_groups(params, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW parameter groups over ``params``: weight decay on the matrices (linear and
    embedding weights, LoRA A/B), none on biases and norm gains (parameters of fewer than two
    dimensions), as TRL (transformers' Trainer, ``get_decay_parameter_names``) and OpenRLHF
    (``get_optimizer_grouped_parameters``) do: decaying an RMSNorm / LayerNorm gain pulls it
    towards 0, not towards its identity value 1. With ``weight_decay`` 0 there is one group
    (the layout of earlier checkpoints, which therefore still resume)."""
    params = list(params)
    if weight_decay == 0:
        return [{"params": params, "weight_decay": 0.0}]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def make_adamw(params: List[torch.nn.Parameter], lr: float, weight_decay: float, *, betas=(0.9, 0.999),
               eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over each parameter for the whole update; on a
    small model's CPU step 0.2 ms instead of 0.6) where every parameter is a plain CPU / CUDA
    float tensor; else the multi-tensor (foreach) one, e.g. for FSDP2's DTensor parameters.
    ``betas`` / ``eps``: torch's defaults, which are also transformers'."""
    from torch.distributed.tensor import DTensor

    fused = bool(params) and all(not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda")
                                 and p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
                                 for p in params)
    # weight decay on the matrices only (decay_param_groups: not on biases and norm gains)
    return torch.optim.AdamW(decay_param_groups(params, weight_decay), lr=lr, betas=betas, eps=eps,
                             **({"fused": True} if fused else {"foreach": True}))


def steps_for_epochs(cfg, n_examples: int, *, batch: Optional[int] = None, batches_per_step: Optional[int] = None
                     ) -> None:
    """When ``cfg.num_train_epochs`` is set, replace ``cfg.max_steps`` by the optimizer steps that
    pass over ``n_examples`` training examples that many times (TRL / transformers'
    ``num_train_epochs``; like theirs, a fractional count is allowed). An epoch is
    ceil(n_examples / batch) batches, its last one short when ``batch`` does not divide the
    examples (as the trainers' batchers cut it), and a step takes ``batches_per_step`` of them,
    the epoch's last step those left (no step crosses an epoch's end: ``_Batches.step``), so
    transformers' count: max(1, ceil(epochs × ceil(ceil(n_examples / batch) / batches_per_step))).
    ``batch`` defaults to
    ``cfg.batch_size`` and ``batches_per_step`` to ``cfg.grad_accum`` (micro-batches); a trainer
    that batches whole steps passes batch = batch_size × grad_accum and batches_per_step = 1.
    Call it once the training examples are known and before the LR scheduler is built; a
    resumed run recomputes the same count."""
    epochs = getattr(cfg, "num_train_epochs", None)
    if epochs is None:
        return
    if n_examples < 1:
        raise ValueError("num_train_epochs needs training examples, and there are none")
    batch = cfg.batch_size if batch is None else batch
    per_step = cfg.grad_accum if batches_per_step is None else batches_per_step
    batches = -(-n_examples // batch)  # an epoch's batches, the last one short
    per_epoch = -(-batches // per_step)  # an epoch's steps, the last one taking the batches left
    # the small slack keeps 0.3 × 10 steps at 3, not 4, against float rounding
    cfg.max_steps = max(1, math.ceil(epochs * per_epoch - 1e-9))


def disable_dropout(model: torch.nn.Module) -> int:
    """Turn off dropout in ``model`` for training (TRL's ``disable_dropout``, on by default for its
    DPO / KTO / reward trainers): p = 0 in every ``torch.nn.Dropout`` module, and a float
    ``attention_dropout`` of 0 on the model config and on every module that keeps one (transformers'
    attention modules apply it through sdpa, not through a Dropout module, so setting p alone
    would leave it on). Returns the number of settings changed (0: the model had no dropout)."""
    changed = 0
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p != 0:
            m.p = 0.0
            changed += 1
        if isinstance(getattr(m, "attention_dropout", None), float) and m.attention_dropout != 0:
            m.attention_dropout = 0.0
            changed += 1
        cfg = getattr(m, "config", None)
        if isinstance(getattr(cfg, "attention_dropout", None), float) and cfg.attention_dropout != 0:
            cfg.attention_dropout = 0.0
            changed += 1
    return changed
