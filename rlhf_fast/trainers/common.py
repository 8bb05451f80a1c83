"""Pieces every trainer shares: seeding, LR schedule, metrics log, run folder."""

from __future__ import annotations

import json
import math
import os
import random
from typing import Any, Dict, Mapping, Optional

import torch

from .config import save_config, to_dict


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) with ``seed``."""
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
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


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int = 0,
    total_steps: int,
    kind: str = "cosine",
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR with linear warm-up then ``kind`` in ("constant", "linear", "cosine") decay.

    Call ``scheduler.step()`` once per optimizer step.
    """
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"kind must be 'constant', 'linear' or 'cosine', got {kind!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")

    def fn(step: int) -> float:
        return lr_lambda(step, warmup_steps=warmup_steps, total_steps=total_steps, kind=kind, min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().float().item() if v.numel() == 1 else v.detach().cpu().tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the line parseable by strict readers
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        return _jsonable(v.item())
    return v


class MetricsLogger:
    """Appends one JSON object per step to ``run_dir/metrics.jsonl`` (flushed every line),
    and mirrors scalars to TensorBoard when ``tensorboard`` is importable."""

    def __init__(self, run_dir: str, *, tensorboard: bool = True, append: bool = True):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._f = open(self.path, "a" if append else "w", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tb"))
            except Exception:  # tensorboard not installed: the JSONL log is enough
                self._tb = None

    def log(self, step: int, metrics: Mapping[str, Any]) -> Dict[str, Any]:
        """Write ``{"step": step, **metrics}`` as one line; tensors become floats. Returns the record."""
        rec = {"step": int(step)}
        rec.update({str(k): _jsonable(v) for k, v in metrics.items()})
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))
        return rec

    def close(self) -> None:
        """Flush and close the log files."""
        if not self._f.closed:
            self._f.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(run_dir: str) -> list:
    """The records of ``run_dir/metrics.jsonl`` as a list of dicts."""
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class RunDir:
    """A run's output folder: creates it and writes the resolved config as ``config.yaml``.

    Attributes: ``path``, ``checkpoints`` (its checkpoints folder), ``metrics_path``.
    """

    def __init__(self, path: str, config: Optional[Any] = None):
        if not isinstance(path, str) or not path:
            raise ValueError(f"run_dir must be a non-empty path, got {path!r}")
        self.path = os.path.abspath(path)
        os.makedirs(self.path, exist_ok=True)
        self.checkpoints = os.path.join(self.path, "checkpoints")
        self.metrics_path = os.path.join(self.path, "metrics.jsonl")
        if config is not None:
            save_config(config, os.path.join(self.path, "config.yaml"))

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


def autocast_context(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when ``bf16``; a no-op context elsewhere (CPU trains in fp32)."""
    import contextlib

    if bf16 and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available else cpu; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None


__all__ = ["seed_everything", "lr_lambda", "make_scheduler", "MetricsLogger", "read_metrics", "RunDir",
           "autocast_context", "resolve_device", "to_dict"]
