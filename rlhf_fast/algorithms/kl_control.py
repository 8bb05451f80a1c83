"""KL coefficient controllers: fixed, and adaptive as in Ziegler et al. (2019).

The adaptive controller moves β so the measured KL tracks ``target``:
e = clip(KL / target − 1, −0.2, 0.2); β ← β · (1 + e · n_steps / horizon).
Both keep their state in a JSON-able dict for checkpoints.
"""

from __future__ import annotations

import math
from typing import Optional


class FixedKLController:
    """A constant KL coefficient ``value`` (float ≥ 0)."""

    def __init__(self, init: float = 0.05):
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not init >= 0:
            raise ValueError(f"init must be a number >= 0, got {init!r}")
        self.value = float(init)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the coefficient."""
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al.'s proportional controller. ``init`` β, ``target`` KL (nats per sequence,
    > 0), ``horizon`` (steps/samples over which β may change by e^{±0.2}, > 0)."""

    def __init__(self, init: float = 0.05, target: float = 6.0, horizon: float = 10000):
        super().__init__(init)
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0:
            raise ValueError(f"target must be a number > 0, got {target!r}")
        if isinstance(horizon, bool) or not isinstance(horizon, (int, float)) or not horizon > 0:
            raise ValueError(f"horizon must be a number > 0, got {horizon!r}")
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move β after ``n_steps`` samples (or steps) with measured KL ``current_kl``; returns β.

        A non-finite KL leaves β unchanged (the trainer reports it separately)."""
        if not math.isfinite(current_kl):
            return self.value
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


def make_kl_controller(kind: str, init: float, target: Optional[float] = None, horizon: float = 10000):
    """``kind`` "fixed" or "adaptive" (needs ``target``)."""
    if kind == "fixed":
        return FixedKLController(init)
    if kind == "adaptive":
        if target is None:
            raise ValueError("target must be set (a KL in nats > 0) for the adaptive KL controller")
        return AdaptiveKLController(init, target, horizon)
    raise ValueError(f"kind must be 'fixed' or 'adaptive', got {kind!r}")
