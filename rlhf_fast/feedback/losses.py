"""Reward-model losses with label-noise handling.

* Bradley–Terry on pairs, with an optional margin and label smoothing (the conservative
  loss ``−(1−ε)·logσ(d) − ε·logσ(−d)``, which bounds the pull of a flipped label) and
  per-example weights (e.g. per-annotator reliability);
* Plackett–Luce on K-wise rankings (K = 2 is Bradley–Terry);
* weighted mean-squared error on absolute scores.

Every loss returns a 0-dim float32 tensor (float64 stays float64) and is differentiable in
the rewards.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _weighted_mean(per_example: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    if weights is None:
        return per_example.mean()
    w = torch.as_tensor(weights, dtype=per_example.dtype, device=per_example.device)
    if w.shape != per_example.shape:
        raise ValueError(f"weights must have shape {tuple(per_example.shape)}, got {tuple(w.shape)}")
    if (w < 0).any():
        raise ValueError("weights must be >= 0")
    return (per_example * w).sum() / w.sum().clamp_min(torch.finfo(per_example.dtype).tiny)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    margin: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pairwise loss of rewards ``chosen`` [B] over ``rejected`` [B].

    d = chosen − rejected − margin (margin [B] ≥ 0, default 0); per pair
    −(1−ε)·logσ(d) − ε·logσ(−d) with ε = ``label_smoothing`` in [0, 0.5); weighted mean
    over pairs with ``weights`` [B] ≥ 0 (default uniform). Returns a 0-dim float32.
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected must both be [B], got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    dt = _out_dtype(chosen)
    d = chosen.to(dt) - rejected.to(dt)
    if margin is not None:
        m = torch.as_tensor(margin, dtype=dt, device=d.device)
        if m.shape != d.shape:
            raise ValueError(f"margin must have shape {tuple(d.shape)}, got {tuple(m.shape)}")
        d = d - m
    per = -(1.0 - label_smoothing) * F.logsigmoid(d)
    if label_smoothing > 0:
        per = per - label_smoothing * F.logsigmoid(-d)
    return _weighted_mean(per, weights)


def plackett_luce_loss(
    scores: torch.Tensor,
    ranking: torch.Tensor,
    *,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Negative log-likelihood of ``ranking`` under the Plackett–Luce model of ``scores``.

    scores [B, K] float (reward of each response); ranking [B, K] int64, the indices of the
    responses best first, padded with −1 for items with fewer than K responses. Per item
    −Σ_i [s_{π_i} − logsumexp_{j ≥ i} s_{π_j}] over its ranked positions (the last term is 0);
    weighted mean over items with ``weights`` [B]. Returns a 0-dim float32. ValueError for a row
    that repeats an index or holds one outside [0, K) other than the −1 padding.
    """
    if scores.dim() != 2 or ranking.shape != scores.shape:
        raise ValueError(f"scores and ranking must both be [B, K], got {tuple(scores.shape)} and {tuple(ranking.shape)}")
    dt = _out_dtype(scores)
    ranking = ranking.long()
    _check_ranking(ranking, scores.shape[1])
    valid = ranking >= 0
    s = scores.to(dt).gather(1, ranking.clamp_min(0))  # [B, K] in ranked order
    s = s.masked_fill(~valid, float("-inf"))
    # log of the remaining mass at each position: logcumsumexp from the right
    tail = torch.logcumsumexp(s.flip(1), dim=1).flip(1)
    terms = torch.where(valid, s - tail, torch.zeros_like(s))
    return _weighted_mean(-terms.sum(1), weights)


def _check_ranking(ranking: torch.Tensor, k: int) -> None:
    """ValueError unless each row of ``ranking`` [B, K] (int64) lists distinct response indices in
    [0, K), the rest −1: a repeated index would be ranked twice (a silently wrong likelihood), an
    index out of range fails inside ``gather`` with a message that names nothing."""
    if ((ranking < -1) | (ranking >= k)).any():
        raise ValueError(f"ranking must hold response indices in [0, {k}) or -1 (padding), got values "
                         f"{int(ranking.min())}..{int(ranking.max())}")
    srt = ranking.sort(dim=1).values
    if ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any():
        raise ValueError("ranking must list each response at most once per row (a permutation, padded with -1)")


def score_regression_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Weighted mean of (pred − target)² over [B] predictions. Returns a 0-dim float32."""
    if pred.shape != target.shape or pred.dim() != 1:
        raise ValueError(f"pred and target must both be [B], got {tuple(pred.shape)} and {tuple(target.shape)}")
    dt = _out_dtype(pred)
    return _weighted_mean((pred.to(dt) - target.to(dt)) ** 2, weights)


__all__ = ["bradley_terry_loss", "plackett_luce_loss", "score_regression_loss"]
