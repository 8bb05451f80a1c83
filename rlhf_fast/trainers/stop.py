"""Ending a training run cleanly on a stop signal: the step finishes, a checkpoint is saved,
and :class:`TrainingStopped` says how to continue. (No torch import at module level: the CLI
imports this for every command.)"""

from __future__ import annotations

import signal
import threading
from typing import Any, Dict


class TrainingStopped(Exception):
    """A trainer's ``train()`` ended early on a stop signal, after saving a checkpoint at
    ``step`` in ``run_dir``; ``resume``: how to continue it. ``signum``: the signal."""

    def __init__(self, signum: int, step: int, run_dir: str, resume: str):
        self.signum, self.step, self.run_dir, self.resume = signum, step, run_dir, resume
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} at step {step}; checkpoint saved in {run_dir}; continue with {resume}")


class StopOnSignal:
    """While entered, SIGTERM and SIGUSR1 — what Slurm, Kubernetes and torchrun send before
    they kill a job — are noted instead of ending the process, so that the training loop can
    finish its step, save a checkpoint and raise :class:`TrainingStopped`. Ctrl-C keeps its
    effect (KeyboardInterrupt at once). Installs handlers only in the main thread; restores
    the previous ones on exit."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.signum = 0
        self._previous: Dict[int, Any] = {}

    def _note(self, signum, _frame) -> None:
        self.signum = signum

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        installed = bool(self._previous)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if installed and self.signum and exc_type is not None and not issubclass(exc_type, TrainingStopped):
            # the run failed before it could stop at a step (e.g. a collective lost a peer that
            # torchrun is stopping): the noted signal takes its usual effect now — by default
            # ending the process quietly, as torchrun means, instead of after the error's report
            signal.raise_signal(self.signum)

    def requested(self, ctx) -> int:
        """The stop signal (0: none) of any rank — every rank gets the same answer, so they
        all stop at the same step (one small all-reduce under torchrun)."""
        if not ctx.distributed:
            return self.signum
        import torch

        return int(ctx.all_reduce_max(torch.tensor([self.signum], dtype=torch.int64, device=ctx.device)))
