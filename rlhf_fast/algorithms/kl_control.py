"""KL coefficient controllers: fixed, and adaptive as in Ziegler et al. (2019).

The adaptive controller moves β so the measured KL tracks ``target``:
e = clip(KL / target − 1, −0.2, 0.2); β ← β · (1 + e · n_steps / horizon), as TRL's (0.x) and
OpenRLHF's ``AdaptiveKLController`` (where that factor is ≤ 0, 1 + e: β never changes sign).
Both keep their state in a JSON-able dict for checkpoints; a resumed run continues only the
adaptive β from it (``resume_from``), the settings coming from its new config.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from rlhf_fast.ops._validate import finite


class FixedKLController:
    """A constant KL coefficient ``value`` (float ≥ 0)."""

    def __init__(self, init: float = 0.05):
        self.value = finite("init", init, ">= 0")

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the coefficient."""
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = finite("state['value']", state["value"], ">= 0")

    def resume_from(self, state: dict) -> None:
        """Continue a run from its checkpoint's :meth:`state_dict` under this controller's
        settings (the resumed run's config, as the learning rate: ``keeping_hyperparameters``).
        A fixed coefficient is a setting, not state: nothing is restored."""


class AdaptiveKLController(FixedKLController):
    """Ziegler et al.'s proportional controller. ``init`` β, ``target`` KL (nats per sequence,
    > 0), ``horizon`` (steps/samples over which β may change by e^{±0.2}, > 0)."""

    def __init__(self, init: float = 0.05, target: float = 6.0, horizon: float = 10000):
        super().__init__(init)
        self.target = finite("target", target, "> 0")
        self.horizon = finite("horizon", horizon, "> 0")

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move β after ``n_steps`` samples (or steps) with measured KL ``current_kl``; returns β.

        Both may be Python, numpy or one-element tensor numbers. The multiplier is TRL's /
        OpenRLHF's 1 + e·n/horizon; where that would leave β ≤ 0 (e·n/horizon ≤ −1: a step of
        5 horizons or more below target) β moves by one horizon's factor 1 + e instead. A
        non-finite KL leaves β unchanged (the trainer reports it separately)."""
        current_kl, n_steps = _plain(current_kl), _plain(n_steps)
        if isinstance(current_kl, bool) or not isinstance(current_kl, (int, float)):
            raise TypeError(f"current_kl must be a number, got {type(current_kl).__name__}")
        n = finite("n_steps", n_steps, ">= 0")
        if not math.isfinite(current_kl):
            return self.value
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + err * n / self.horizon
        if mult <= 0.0:  # the peers' β would change sign: one horizon's change at most
            mult = 1.0 + err * min(n / self.horizon, 1.0)
        self.value *= mult
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = finite("state['value']", state["value"], ">= 0")
        self.target = finite("state['target']", state.get("target", self.target), "> 0")
        self.horizon = finite("state['horizon']", state.get("horizon", self.horizon), "> 0")

    def resume_from(self, state: dict) -> None:
        """Continue from a checkpoint's :meth:`state_dict`: β is state and continues; ``target``
        and ``horizon`` are settings and stay this controller's (the resumed run's config). The
        state of a fixed controller (no ``target``: a run switched to adaptive) leaves β at
        ``init``, where the config starts it."""
        if "target" in state:
            self.value = finite("state['value']", state["value"], ">= 0")


def _plain(x):
    """``x`` as a Python number when it is a numpy scalar or a one-element tensor (else as is)."""
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    if not isinstance(x, (bool, int, float)) and isinstance(x, numbers.Real):
        return int(x) if isinstance(x, numbers.Integral) else float(x)
    return x


def make_kl_controller(kind: str, init: float, target: Optional[float] = None, horizon: float = 10000):
    """``kind`` "fixed" or "adaptive" (needs ``target``)."""
    if kind == "fixed":
        return FixedKLController(init)
    if kind == "adaptive":
        if target is None:
            raise ValueError("target must be set (a KL in nats > 0) for the adaptive KL controller")
        return AdaptiveKLController(init, target, horizon)
    raise ValueError(f"kind must be 'fixed' or 'adaptive', got {kind!r}")
