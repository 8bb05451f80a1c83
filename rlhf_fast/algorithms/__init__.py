"""Policy-optimisation building blocks composed from :mod:`rlhf_fast.ops`: advantage
estimators (GAE, GRPO, Dr.GRPO, RLOO, REINFORCE++), KL controllers, reward shaping and
reward sources."""

from .advantages import (
    CRITIC_ESTIMATORS,
    ESTIMATORS,
    GROUP_ESTIMATORS,
    MULTI_OBJECTIVE_AGGREGATIONS,
    SCALE_REWARDS,
    compute_advantages,
    gae_advantages,
    global_mean_std,
    group_estimator_advantages,
    normalize_then_sum_advantages,
    reinforce_pp_advantages,
    token_rewards,
)
from .kl_control import AdaptiveKLController, FixedKLController, make_kl_controller
from .rewards import (
    CallableReward,
    CombinedReward,
    JudgeReward,
    LengthPenalty,
    OverlongPenalty,
    RepetitionPenalty,
    RewardContext,
    RewardError,
    RewardModelEnsemble,
    RewardModelReward,
    RewardOutput,
    RewardSource,
    fields_per_row,
    load_callable,
)
from .shaping import RunningMoments, shape_scores

__all__ = [
    "ESTIMATORS", "CRITIC_ESTIMATORS", "GROUP_ESTIMATORS", "SCALE_REWARDS", "MULTI_OBJECTIVE_AGGREGATIONS",
    "compute_advantages", "gae_advantages", "global_mean_std", "group_estimator_advantages",
    "normalize_then_sum_advantages", "reinforce_pp_advantages", "token_rewards", "FixedKLController",
    "AdaptiveKLController", "make_kl_controller", "RewardSource", "CallableReward", "RewardModelReward",
    "RewardModelEnsemble", "JudgeReward", "LengthPenalty", "OverlongPenalty", "RepetitionPenalty", "CombinedReward",
    "RewardContext", "RewardOutput",
    "RewardError", "fields_per_row", "load_callable", "RunningMoments", "shape_scores",
]
