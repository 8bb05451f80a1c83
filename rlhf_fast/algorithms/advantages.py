"""Advantage estimators: GAE with a critic; GRPO, Dr.GRPO, RLOO, REINFORCE++ and
REINFORCE++-baseline without one.

Each estimator maps a batch of rewards (and values) to ``(advantages, returns)`` ``[B, T]``
float32, zero outside the response mask, and does its per-token work through
:mod:`rlhf_fast.ops`. Sequence-level scores ``[B]`` become token rewards with
:func:`token_rewards` (score on the last response token, minus the per-token KL penalty
when the KL is placed in the reward).

Variants, where peers differ: GRPO's std is the unbiased one (TRL, verl); with the KL in the
reward the group estimators subtract the sequence's summed KL from its score before the group
baseline (TRL's RLOO; OpenRLHF instead keeps the KL per token and takes discounted returns);
REINFORCE++ whitens over the whole (global) batch, never per group; REINFORCE++-baseline
(OpenRLHF's ``reinforce_baseline``) subtracts each prompt group's mean score first, then does
the same (KL per token in the reward, returns, global whitening).

TRL GRPOTrainer options: ``scale_rewards`` (group | batch | none: divide GRPO's centred score by
its group's std, by the std of the whole global batch — PPO Lite — or by nothing, Dr.GRPO) and
``multi_objective_aggregation="normalize_then_sum"`` (GDPO: each reward function's scores
normalised within their group, summed with the weights, the sum normalised over the batch).
Batch statistics are taken over every rank's rows (``group``), so they do not depend on the
rank count.

Unscored answers (TRL's ``None`` from every reward function, ``reward.calling_convention:
trl``): a NaN score. The group estimators leave it out of every statistic, as TRL's
``nanmean`` / ``nanstd`` / leave-one-out over the scorable siblings, and give it advantage 0
(so does an answer whose group statistic is undefined: the only scored one of its group);
GAE and REINFORCE++ refuse NaN scores. Scores without NaN take the plain path unchanged.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from rlhf_fast import ops
from rlhf_fast.ops import _validate
from rlhf_fast.ops._validate import finite

ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce++", "reinforce++_baseline")
CRITIC_ESTIMATORS = ("gae",)
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
# a baseline per prompt group: the batch comes in groups of group_size rows (≥ 2), and a group
# that lost an answer is dropped whole. The GROUP_ESTIMATORS' options (scale_rewards, whiten
# "sequence", unscored answers, dynamic sampling) stay theirs alone.
PROMPT_GROUP_ESTIMATORS = GROUP_ESTIMATORS + ("reinforce++_baseline",)
# the estimators whose returns are sums of per-token rewards: the ones that can take dense rewards
# (a PRM's step rewards); the others turn one score per answer into its advantage
TOKEN_REWARD_ESTIMATORS = ("gae", "reinforce++")
SCALE_REWARDS = ("group", "batch", "none")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
WHITEN_MODES = (False, True, "sequence")
ANSWER_NORM_EPS = 1e-4  # TRL RLOOTrainer's normalize_advantages: (A − mean) / (std + 1e-4)


def _check_mask(mask: torch.Tensor, B: Optional[int] = None) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"mask must be a [B, T] tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
    if B is not None and mask.shape[0] != B:
        raise ValueError(f"mask must have B={B} rows (one per score), got shape {tuple(mask.shape)}")


def _check_tensor(name: str, t, shape=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last set position of each row of mask ``[B, T]`` (0 for empty rows). ``[B]`` int64."""
    m = mask.bool()
    T = m.shape[1]
    pos = torch.arange(T, device=m.device).expand_as(m)
    return torch.where(m, pos, torch.full_like(pos, -1)).max(dim=1).values.clamp(min=0)


def token_rewards(
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    dense: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dense token rewards ``[B, T]`` float32: ``scores[b]`` on the last response token of row b,
    plus ``dense`` on the response tokens, minus ``kl_coef · kl`` on every response token (KL in
    the reward, Ziegler et al.).

    scores ``[B]``, mask ``[B, T]`` (bool or 0/1), kl ``[B, T]`` per-token estimate (k1, or the
    trainer's ``kl.kind``) or None; dense ``[B, T]`` float per-token rewards (a PRM's step
    rewards where the steps end, :func:`rlhf_fast.algorithms.process_rewards.step_token_rewards`;
    verl's ``token_level_scores``) or None.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError(f"scores must be a [B] tensor, got {getattr(scores, 'shape', type(scores).__name__)}")
    _check_mask(mask, scores.shape[0])
    if mask.shape[1] == 0 and mask.shape[0] > 0:
        raise ValueError("mask must have at least one column (the token that carries each score), got shape "
                         f"{tuple(mask.shape)}")
    finite("kl_coef", kl_coef)
    if kl is not None:
        _check_tensor("kl", kl, mask.shape)
    if dense is not None:
        _check_tensor("dense", dense, mask.shape)
    m = mask.bool()
    r = torch.zeros(m.shape, dtype=torch.float32, device=m.device)
    idx = last_token_index(m)
    has = m.any(dim=1)
    r[torch.arange(m.shape[0], device=m.device), idx] = torch.where(has, scores.float(), torch.zeros_like(scores.float()))
    if dense is not None:
        r = r + torch.where(m, dense.float(), 0.0)
    if kl is not None and kl_coef != 0.0:
        r = r - kl_coef * torch.where(m, kl.float(), 0.0)  # NaN padding of kl never read
    return r


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> Tuple[torch.Tensor, torch.Tensor]:
    """PPO's estimator: GAE over the response tokens. rewards, values, mask ``[B, T]``.

    Returns ``(advantages, returns)`` ``[B, T]`` float32; returns are the critic's targets.
    """
    _check_tensor("rewards", rewards)
    _check_tensor("values", values)
    return ops.gae(rewards.float(), values.float(), mask, gamma=gamma, lam=lam)


def global_mean_std(x: torch.Tensor, group=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std (as ``torch.std``; 0 for fewer than 2 entries) of every entry of
    ``x`` on every rank of the process group ``group`` (None: this process's alone).

    Two passes in float64 (sum and count, then the squared deviations), each one all-reduce,
    so the result is the one process's up to float64 rounding whatever the rank count. NaN
    entries (unscored answers) are left out, as TRL's ``nanmean`` / ``nanstd``; none at all:
    mean 0. Returns two 0-dim tensors in ``x``'s dtype (float32 for half inputs)."""
    from rlhf_fast.ops.reference import out_dtype

    xd = x.detach().double().reshape(-1)
    nan = torch.isnan(xd)
    if nan.any():
        xd = xd[~nan]
    s = torch.stack([xd.sum(), torch.tensor(float(xd.numel()), dtype=torch.float64, device=xd.device)])
    if group is not None:
        torch.distributed.all_reduce(s, group=group)
    n = s[1]
    mean = s[0] / n.clamp(min=1)
    sq = ((xd - mean) ** 2).sum()
    if group is not None:
        torch.distributed.all_reduce(sq, group=group)
    std = torch.sqrt(sq / (n - 1)) if float(n) > 1 else torch.zeros_like(sq)
    dt = out_dtype(x.dtype)
    return mean.to(dt), std.to(dt)


def _check_scale_rewards(kind: str, scale_rewards: Optional[str]) -> None:
    if scale_rewards is None:
        return
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS} or None, got {scale_rewards!r}")
    if kind == "rloo" or (kind == "dr_grpo" and scale_rewards != "none"):
        raise ValueError(f"scale_rewards {scale_rewards!r} applies to kind 'grpo' (dr_grpo is 'none'), "
                         f"got kind {kind!r}")


def normalize_answer_advantages(advantages: torch.Tensor, *, eps: float = ANSWER_NORM_EPS, group=None) -> torch.Tensor:
    """TRL RLOO's ``normalize_advantages``: one advantage per answer ``[B]`` → (A − mean) /
    (std + eps) with the mean and the unbiased std of every answer of every rank of ``group``
    (:func:`global_mean_std`; one answer in all: std 0). Returns ``[B]`` float32 (float64 for
    float64 input)."""
    _check_tensor("advantages", advantages)
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be a [B] tensor (one per answer), got shape {tuple(advantages.shape)}")
    finite("eps", eps, ">= 0")
    mean, std = global_mean_std(advantages, group)
    a = advantages.to(mean.dtype)
    return (a - mean) / (std + eps)


def nanstd(x: torch.Tensor, dim: Optional[int] = None, keepdim: bool = False) -> torch.Tensor:
    """The unbiased std of ``x``'s non-NaN entries along ``dim`` (None: all), NaN where fewer
    than two: TRL's ``trl.trainer.utils.nanstd`` (the same float operations). Same dtype as
    ``x``."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    n = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    var = var * torch.where(n > 1, n / (n - 1), torch.full_like(var, float("nan")))
    std = torch.sqrt(var)
    if keepdim:
        return std
    return std.squeeze() if dim is None else std.squeeze(dim)


def _unscored_group_advantages(s: torch.Tensor, group_size: int, kind: str, eps: float,
                               scale_rewards: Optional[str], group) -> torch.Tensor:
    """:func:`_group_row_advantages` of scores ``[B]`` float32 with NaN (unscored answers):
    TRL 1.16's NaN-skipping statistics (grpo_trainer.py and rloo_trainer.py,
    ``_generate_and_score_completions``). NaN where TRL's ``nan_to_num`` gives 0: the unscored
    answers, and the scored ones whose group statistic is undefined (the only scored answer
    of its group, under grpo's group std and rloo's baseline)."""
    # the statistics in float64, as ops.group_advantages': in float32 a group of equal scores
    # has a mean an ulp off them, which the division by its std (~0) + eps made ±0.2 advantages
    g = s.to(torch.float64).view(-1, group_size)
    if kind == "rloo":
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 for kind='rloo', got {group_size}")
        # the baseline averages the scorable siblings: (sum − own) / (scorable − 1); 0/0 alone
        n = (~torch.isnan(g)).sum(dim=1, keepdim=True)
        return (g - (torch.nansum(g, dim=1, keepdim=True) - g) / (n - 1)).view(-1).to(s.dtype)
    centred = g - torch.nanmean(g, dim=1, keepdim=True)
    scale = scale_rewards or ("group" if kind == "grpo" else "none")
    if scale == "none":
        return centred.view(-1).to(s.dtype)
    if scale == "batch":
        _, std = global_mean_std(s, group)
        return (centred.view(-1) / (std + eps)).to(s.dtype)
    return (centred / (nanstd(g, dim=1, keepdim=True) + eps)).view(-1).to(s.dtype)


def _group_row_advantages(s: torch.Tensor, group_size: int, kind: str, eps: float, scale_rewards: Optional[str],
                          group) -> torch.Tensor:
    """:func:`group_estimator_advantages`' one advantage per answer ``[B]`` (scores float32;
    NaN rows: :func:`_unscored_group_advantages`)."""
    if torch.isnan(s).any():
        return _unscored_group_advantages(s, group_size, kind, eps, scale_rewards, group)
    if scale_rewards == "batch":
        centred = ops.group_advantages(s, group_size, kind="dr_grpo", eps=eps)
        _, std = global_mean_std(s, group)
        return centred / (std + eps)
    if scale_rewards is not None:
        kind = "grpo" if scale_rewards == "group" else "dr_grpo"
    return ops.group_advantages(s, group_size, kind=kind, eps=eps)


def group_estimator_advantages(
    scores: torch.Tensor, mask: torch.Tensor, group_size: int, *, kind: str = "grpo", eps: float = 1e-6,
    scale_rewards: Optional[str] = None, group=None, normalize_answers: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """GRPO / Dr.GRPO / RLOO: one advantage per answer ``[B]`` from its group of ``group_size``
    consecutive answers to the same prompt, broadcast to every response token.

    scores ``[B]`` (already including any KL-in-reward term), mask ``[B, T]``. ``scale_rewards``
    (TRL's GRPO option; None = the kind's own: grpo "group", dr_grpo "none"): ``group`` divides
    s − group mean by the group's unbiased std + eps, ``batch`` by the unbiased std of every
    score of the batch on every rank of ``group`` + eps (PPO Lite), ``none`` by nothing (= kind
    dr_grpo). ``normalize_answers``: the answers' advantages then go through
    :func:`normalize_answer_advantages` over every rank of ``group`` (TRL RLOO's
    ``normalize_advantages``). A NaN score is an unscored answer: out of every statistic,
    advantage 0 (module docstring). Returns ``(advantages, returns)`` ``[B, T]`` float32;
    returns = scores broadcast (for logging; 0 for an unscored answer).
    """
    _check_tensor("scores", scores)
    _check_mask(mask, scores.shape[0])
    _check_scale_rewards(kind, scale_rewards)
    # checked here too (the op's own check): the NaN (unscored) path reshapes without the op
    group_size = _validate.group_size(group_size, scores.shape[0])
    s = scores.float()
    a = _group_row_advantages(s, group_size, kind, eps, scale_rewards, group)
    if normalize_answers:
        a = normalize_answer_advantages(a, group=group)
    m = mask.to(torch.float32)
    if torch.isnan(s).any():
        # TRL: "Unscorable completions carry no learning signal: zero their advantage"; NaN·0
        # would stay NaN in the padding, so the rows are zeroed before the broadcast
        a, s = torch.nan_to_num(a, nan=0.0), torch.nan_to_num(s, nan=0.0)
    return a[:, None] * m, s[:, None] * m


def normalize_then_sum_advantages(
    rewards_per_func: torch.Tensor, weights: torch.Tensor, group_size: int, *, eps: float = 1e-6, group=None
) -> torch.Tensor:
    """GDPO (TRL's ``multi_objective_aggregation="normalize_then_sum"``): one advantage per answer.

    rewards_per_func ``[B, K]`` float (the K reward sources' unweighted scores, rows in groups
    of ``group_size`` consecutive answers), weights ``[K]``. Each source's scores are
    normalised within each group, (r − group mean) / (group std + eps) with the unbiased std
    (0 for groups of one); the weighted sum R over sources is then normalised over the whole
    batch on every rank of ``group``: (R − mean) / (std + eps), unbiased std. Returns ``[B]``
    float32 (TRL's eps is 1e-4; ours 1e-6, as GRPO's).

    NaN entries (a reward function's None, ``reward.calling_convention: trl``) are left out of
    their source's group statistics and of the sum, as TRL's ``nanmean`` / ``nanstd`` /
    ``nansum``; a source's score in a group where it scored fewer than two answers drops out
    of the sum (TRL's NaN std). An answer no source scored is NaN, and out of the batch
    statistics; the caller zeroes it (:func:`compute_advantages`)."""
    _check_tensor("rewards_per_func", rewards_per_func)
    if rewards_per_func.dim() != 2:
        raise ValueError(f"rewards_per_func must be a [B, K] tensor, got shape {tuple(rewards_per_func.shape)}")
    B, K = rewards_per_func.shape
    _check_tensor("weights", weights, (K,))
    if B % group_size:
        raise ValueError(f"group_size={group_size} must divide the number of rows B={B}")
    r = rewards_per_func.float().view(-1, group_size, K)
    w = weights.to(r.device, torch.float32)
    unscored = torch.isnan(rewards_per_func).all(dim=1)  # [B]
    if torch.isnan(r).any():
        # TRL 1.16 grpo_trainer.py _generate_and_score_completions, normalize_then_sum branch
        mean_k = torch.nanmean(r, dim=1, keepdim=True)
        std_k = nanstd(r, dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean_k)
        total = (((r - mean_k) / (std_k + eps)).view(B, K) * w).nansum(dim=1)
        total = total.masked_fill(unscored, float("nan"))
    else:
        mean_k = r.mean(dim=1, keepdim=True)
        std_k = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean_k)
        total = (((r - mean_k) / (std_k + eps)).view(B, K) * w).sum(dim=1)
    mean, std = global_mean_std(total, group)
    return (total - mean) / (std + eps)


def reinforce_pp_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, group=None,
    whiten_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: token-level discounted returns of the rewards (KL already in them), whitened
    over all response tokens of the global batch (not per prompt group). rewards, mask ``[B, T]``.

    ``group``: a ``torch.distributed`` process group when the batch is split over ranks; the
    whitening statistics are then all-reduced, so every rank normalises by the global batch
    (as OpenRLHF's ``replay_buffer.normalize``), not by its own share. ``whiten_mask``
    ``[B, T]`` bool (default ``mask``): the tokens the whitening's statistics are over (0
    outside them); :func:`compute_advantages`.
    Returns ``(advantages, returns)`` ``[B, T]`` float32.
    """
    _check_tensor("rewards", rewards)
    returns = ops.discounted_returns(rewards.float(), mask, gamma=gamma)
    return ops.masked_whiten(returns, mask if whiten_mask is None else whiten_mask, group=group), returns


def reinforce_pp_baseline_advantages(
    scores: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    *,
    kl: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    group=None,
    whiten_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline (Hu et al.; OpenRLHF's ``advantage_estimator=reinforce_baseline``):
    each score minus its prompt group's mean (no division by the group std), put on the last
    response token with −kl_coef·kl on every response token (:func:`token_rewards`), summed
    into undiscounted returns (γ = 1, as OpenRLHF forces), whitened over every response token
    of the global batch as :func:`reinforce_pp_advantages` (unbiased variance: OpenRLHF's
    population variance differs by sqrt((n − 1)/n), n the token count).

    scores ``[B]`` float, rows in groups of ``group_size`` (≥ 2) consecutive answers to one
    prompt; mask ``[B, T]``; kl ``[B, T]`` per-token estimate or None. ``group``: the process
    group holding the rest of the batch (whitening statistics over every rank; the groups
    themselves are rank-local). ``whiten_mask``: as :func:`reinforce_pp_advantages`'.
    Returns ``(advantages, returns)`` ``[B, T]`` float32."""
    _check_tensor("scores", scores)
    _check_mask(mask, scores.shape[0])
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (the baseline is the mean of the prompt's "
                         f"answers), got {group_size!r}")
    B = scores.shape[0]
    if B % group_size:
        raise ValueError(f"group_size={group_size} must divide the number of rows B={B}")
    s = scores.float().view(-1, group_size)
    s = (s - s.mean(dim=1, keepdim=True)).view(-1)  # [B]
    r = token_rewards(s, mask, kl=kl, kl_coef=kl_coef)
    return reinforce_pp_advantages(r, mask, gamma=1.0, group=group, whiten_mask=whiten_mask)


def compute_advantages(
    estimator: str,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    values: Optional[torch.Tensor] = None,
    kl: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten=False,
    group=None,
    scale_rewards: Optional[str] = None,
    multi_objective_aggregation: str = "sum_then_normalize",
    rewards_per_func: Optional[torch.Tensor] = None,
    reward_weights: Optional[torch.Tensor] = None,
    dense_rewards: Optional[torch.Tensor] = None,
    whiten_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns ``[B, T]`` float32 for one of :data:`ESTIMATORS`.

    scores ``[B]`` sequence rewards; mask ``[B, T]`` response mask; values ``[B, T]`` (gae only),
    ``values[:, t]`` = V(s_t), the value of the state before response token t (see
    :func:`rlhf_fast.trainers.rl.critic_values`); kl ``[B, T]`` per-token KL estimate put in the
    reward with ``kl_coef`` (pass kl_coef=0 when the KL goes in the loss). For group estimators
    the KL term is summed per sequence and subtracted from the score before the group baseline
    (as TRL's RLOO). ``whiten`` (:data:`WHITEN_MODES`): True whitens the advantages over the
    masked tokens (REINFORCE++ always does); ``"sequence"`` (group estimators) normalises the
    one advantage per answer over the answers, TRL RLOO's ``normalize_advantages``
    (:func:`normalize_answer_advantages`, after the group baseline);
    ``group``: the process group whose ranks hold the rest of the batch, so
    whitening (and ``scale_rewards="batch"``, GDPO's batch step) uses the statistics of the
    global batch. ``scale_rewards``: see :func:`group_estimator_advantages` (grpo / dr_grpo).
    ``multi_objective_aggregation="normalize_then_sum"`` (estimator grpo, no KL in the reward):
    the advantages are :func:`normalize_then_sum_advantages` of ``rewards_per_func`` ``[B, K]``
    and ``reward_weights`` ``[K]`` instead of the group statistics of ``scores`` (which are
    still the returns, for logging).

    ``reinforce++_baseline``: :func:`reinforce_pp_baseline_advantages` (``group_size`` ≥ 2,
    ``gamma`` 1; already whitened, so ``whiten`` adds nothing, as for reinforce++). The group
    estimators (one advantage per answer, nothing to discount) refuse ``gamma`` ≠ 1, and every
    estimator refuses an infinite score.

    A NaN score (group estimators; with normalize_then_sum, a row of ``rewards_per_func`` that
    is all NaN) is an answer no reward function scored (TRL's None): out of every statistic,
    advantage and return 0, and out of ``whiten=True``'s statistics; GAE and REINFORCE++ (and
    REINFORCE++-baseline) refuse it.

    ``dense_rewards`` ``[B, T]`` (``reward.process_aggregation: steps``): per-token rewards added
    to the token rewards (:func:`token_rewards`' ``dense``) — estimators ``gae`` and
    ``reinforce++`` only, the ones that take token-level rewards; the others refuse them.

    ``whiten_mask`` ``[B, T]`` bool within ``mask`` (default: ``mask``): the tokens whose
    statistics the token whitening takes (``whiten=True``, and REINFORCE++'s /
    REINFORCE++-baseline's own); the advantages are 0 outside it, the returns unchanged.
    ``rollout.mask_truncated`` passes the loss tokens, as verl-tool's ``mask_overlong_loss``
    and SkyRL's ``apply_overlong_filtering`` zero the mask their whitening reads.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
        raise ValueError(f"multi_objective_aggregation must be one of {MULTI_OBJECTIVE_AGGREGATIONS}, "
                         f"got {multi_objective_aggregation!r}")
    if scale_rewards is not None and estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"scale_rewards applies to the group estimators, got estimator {estimator!r}")
    if multi_objective_aggregation == "normalize_then_sum" and estimator != "grpo":
        raise ValueError(f"multi_objective_aggregation 'normalize_then_sum' needs estimator 'grpo', got {estimator!r}")
    if not (isinstance(whiten, bool) or whiten == "sequence"):
        raise ValueError(f"whiten must be one of {WHITEN_MODES}, got {whiten!r}")
    per_answer = whiten == "sequence"
    if per_answer and estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"whiten 'sequence' normalises one advantage per answer: it needs a group estimator "
                         f"({', '.join(GROUP_ESTIMATORS)}), got {estimator!r}")
    _check_tensor("scores", scores)
    _check_mask(mask, scores.shape[0])
    finite("kl_coef", kl_coef)
    if kl is not None:
        _check_tensor("kl", kl, mask.shape)
    if values is not None:
        _check_tensor("values", values, mask.shape)
    if whiten_mask is not None and (not isinstance(whiten_mask, torch.Tensor)
                                    or whiten_mask.shape != mask.shape):
        raise ValueError(f"whiten_mask must be a [B, T] tensor of mask's shape {tuple(mask.shape)}, got "
                         f"{getattr(whiten_mask, 'shape', type(whiten_mask).__name__)}")
    wmask = mask if whiten_mask is None else whiten_mask.bool()
    if dense_rewards is not None and estimator not in TOKEN_REWARD_ESTIMATORS:
        raise ValueError(f"dense_rewards (per-token rewards) need an estimator that takes token-level rewards "
                         f"({', '.join(TOKEN_REWARD_ESTIMATORS)}), got {estimator!r}")
    if estimator in GROUP_ESTIMATORS and gamma != 1.0:
        raise ValueError(f"gamma has no effect with estimator {estimator!r} (one advantage per answer, nothing to "
                         f"discount): leave it at 1.0, got {gamma!r}")
    if torch.isinf(scores).any():
        raise ValueError(f"scores must be finite (or NaN for an unscored answer under a group estimator), got "
                         f"{scores[torch.isinf(scores)][0].item()} for estimator {estimator!r}")
    scored = ~torch.isnan(scores)  # [B]
    unscored = not bool(scored.all())
    if unscored and estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"scores must be numbers for estimator {estimator!r}: a NaN score (an answer no reward "
                         f"function scored) needs a group estimator ({', '.join(GROUP_ESTIMATORS)})")
    if estimator == "gae":
        if values is None:
            raise ValueError("values must be given (a [B, T] tensor from the critic) for estimator 'gae'")
        r = token_rewards(scores, mask, kl=kl, kl_coef=kl_coef, dense=dense_rewards)
        adv, ret = gae_advantages(r, values, mask, gamma=gamma, lam=lam)
    elif estimator == "reinforce++":
        r = token_rewards(scores, mask, kl=kl, kl_coef=kl_coef, dense=dense_rewards)
        # (already whitened)
        return reinforce_pp_advantages(r, mask, gamma=gamma, group=group, whiten_mask=wmask)
    elif estimator == "reinforce++_baseline":
        if gamma != 1.0:
            raise ValueError(f"gamma must be 1.0 for estimator 'reinforce++_baseline' (undiscounted "
                             f"returns; OpenRLHF sets it to 1), got {gamma!r}")
        return reinforce_pp_baseline_advantages(scores, mask, group_size, kl=kl, kl_coef=kl_coef, group=group,
                                                whiten_mask=wmask)
    elif multi_objective_aggregation == "normalize_then_sum":
        if kl is not None and kl_coef != 0.0:
            raise ValueError("multi_objective_aggregation 'normalize_then_sum' takes no KL in the reward (kl_coef 0)")
        if scale_rewards is not None:
            raise ValueError("scale_rewards has no effect with multi_objective_aggregation 'normalize_then_sum'")
        if rewards_per_func is None or reward_weights is None:
            raise ValueError("multi_objective_aggregation 'normalize_then_sum' needs rewards_per_func and "
                             "reward_weights")
        _check_tensor("rewards_per_func", rewards_per_func)
        if rewards_per_func.dim() != 2 or rewards_per_func.shape[0] != scores.shape[0]:
            raise ValueError(f"rewards_per_func must be [B={scores.shape[0]}, K], got {tuple(rewards_per_func.shape)}")
        a = normalize_then_sum_advantages(rewards_per_func, reward_weights, group_size, group=group)
        if per_answer:
            a = normalize_answer_advantages(a, group=group)
        m, s = mask.to(torch.float32), scores.float()
        if torch.isnan(a).any() or unscored:  # TRL: nan_to_num(advantages, nan=0.0)
            a, s = torch.nan_to_num(a, nan=0.0), torch.nan_to_num(s, nan=0.0)
        adv, ret = a[:, None] * m, s[:, None] * m
    else:
        s = scores.float()
        if kl is not None and kl_coef != 0.0:
            # torch.where, not a product: whatever kl holds outside the mask (NaN padding) is never read
            s = s - kl_coef * torch.where(mask.bool(), kl.float(), 0.0).sum(dim=1)
        adv, ret = group_estimator_advantages(s, mask, group_size, kind=estimator, scale_rewards=scale_rewards,
                                              group=group, normalize_answers=per_answer)
    if whiten is True:
        # unscored answers keep advantage 0, out of the statistics (masked_whiten gives 0 there)
        adv = ops.masked_whiten(adv, wmask.bool() & scored[:, None] if unscored else wmask, group=group)
    return adv, ret
