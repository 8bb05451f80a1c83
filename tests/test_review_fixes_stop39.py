"""Stop 39's own fixes (outside the helpers' review files)."""
import math

import pytest
import torch

from rlhf_fast.algorithms.advantages import group_estimator_advantages


@pytest.mark.parametrize("kind,scale", [("grpo", None), ("grpo", "batch"), ("dr_grpo", None), ("rloo", None)])
def test_unscored_groups_of_equal_scores_get_zero_advantages(kind, scale):
    # a NaN (unscored) answer sends the batch down the NaN-skipping path; its float32 statistics
    # made a group of equal scores 3.3 an ulp off its mean, ±0.2 after the std division
    s = torch.tensor([3.3] * 7 + [float("nan")] + [1000.1] * 7 + [float("nan")])
    adv, _ = group_estimator_advantages(s, torch.ones(16, 3, dtype=torch.bool), 8, kind=kind,
                                        scale_rewards=scale)
    scored = adv[:, 0][~torch.isnan(s)]
    assert scored.dtype == torch.float32
    assert torch.equal(scored, torch.zeros_like(scored)), scored
    assert not any(math.isnan(float(a)) for a in scored)
