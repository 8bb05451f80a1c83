"""Reward shaping before the estimator: clipping and whitening of sequence scores.

Whitening here is over the batch (optionally with running statistics carried across steps,
so a stopped and resumed run sees the same normalisation).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from rlhf_fast.ops._validate import finite


class RunningMoments:
    """Running mean / variance of scalar rewards (Chan et al. parallel update); JSON state.

    ``var`` is the population variance M2 / count (the saved state); :attr:`unbiased_var` is
    what whitening divides by, as TRL's (< 0.12) RunningMoments.std."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        """Fold in a batch ``[N]`` of finite values (ValueError otherwise: one NaN would poison the
        statistics of every later step)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor of rewards, got {type(x).__name__}")
        n = float(x.numel())
        if n == 0:
            return
        xm = float(x.mean())
        if not math.isfinite(xm):
            raise ValueError("x must hold finite values only; got NaN or inf")
        xv = float(x.var(unbiased=False)) if n > 1 else 0.0
        tot = self.count + n
        delta = xm - self.mean
        m2 = self.var * self.count + xv * n + delta * delta * self.count * n / tot
        self.mean += delta * n / tot
        self.var = m2 / tot
        self.count = tot

    @property
    def unbiased_var(self) -> float:
        """M2 / (count − 1): TRL's ``new_var * tot_count / (tot_count - 1)``; 0 with one value
        or none (no spread to divide by)."""
        return self.var * self.count / (self.count - 1) if self.count > 1 else 0.0

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, s: dict) -> None:
        self.mean, self.var, self.count = float(s["mean"]), float(s["var"]), float(s["count"])


def shape_scores(
    scores: torch.Tensor,
    *,
    clip: Optional[float] = None,
    whiten: bool = False,
    moments: Optional[RunningMoments] = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Scores ``[B]`` float → ``[B]`` float32: whitened, (s − mean) / sqrt(unbiased var + eps),
    with batch statistics, or running ones when ``moments`` is given (updated first), then
    clipped to ``[-clip, clip]``. Several ranks: pass the global batch (every rank's scores)."""
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        raise ValueError(f"clip must be a number > 0 or None, got {clip!r}")
    finite("eps", eps, ">= 0")
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError(f"scores must be a [B] tensor, got {getattr(scores, 'shape', type(scores).__name__)}")
    s = scores.float()
    if whiten:
        if moments is not None:
            moments.update(s)
            # unbiased, as the batch branch below and TRL's use_score_norm; one value in all has
            # no spread: centred only, as the batch branch's single score
            s = s - moments.mean
            if moments.count > 1:
                s = s / math.sqrt(moments.unbiased_var + eps)
        elif s.numel() > 1:
            s = (s - s.mean()) / torch.sqrt(s.var() + eps)
        else:
            s = s - s.mean()
    if clip is not None:
        s = s.clamp(-clip, clip)
    return s
