"""Review of the critic-free estimators other than GRPO (RLOO, REINFORCE++, REINFORCE++-baseline,
Dr.GRPO) against their peers, on small hand-made tensors and one short trainer rollout.

Peers: TRL 1.16 ``trl/trainer/rloo_trainer.py`` (installed; its advantage lines are transcribed in
tests/test_rl_rloo_options.py::trl_rloo_advantages), OpenRLHF
``openrlhf/trainer/ppo_utils/experience_maker.py`` (OpenRLHF/OpenRLHF @ 89308a0b768d,
``compute_advantages_and_returns``: rloo / reinforce_baseline / dr_grpo / group_norm force
γ = 1 with a warning) and verl ``verl/trainer/ppo/core_algos.py`` (volcengine/verl @ 012be9d9dcb7).
"""

import pytest
import torch

from rlhf_fast.algorithms.advantages import compute_advantages, group_estimator_advantages
from rlhf_fast.trainers.rl_config import KLConfig, PPOConfig, RLConfig, RolloutConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rloo_mask_truncated_kl_in_reward_is_trls(tmp_path):
    """TRL RLOO with ``mask_truncated_completions`` zeroes a truncated answer's completion_mask
    (rloo_trainer.py 1518-1523) before the KL it subtracts from the reward is summed over that
    mask (1669-1673): a truncated answer enters its group's leave-one-out baseline with its raw
    reward, no KL. The siblings' advantages must be TRL's."""
    from tests.test_rl_rloo_options import _trainer, trl_rloo_advantages

    ro = RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=4, mask_truncated=True,
                       stop_strings=["6", "q", "h", "u"])
    tr = _trainer(tmp_path, steps=1, rollout=ro, kl=KLConfig(coef=0.5))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the policy leaves its reference, so the KL is not 0
        for p in tr.policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    data, _ = tr.rollout()
    loss_rm = data.response_mask  # TRL's completion_mask: the truncated rows zeroed
    kept = loss_rm.any(1)
    assert not kept.all() and kept.view(-1, 4).any(1).all()  # each group: a truncated and a kept answer
    rm = data.old_logp != 0  # every response token (the truncated rows' too)
    assert float(((data.old_logp - data.ref_logp) * rm).abs().sum()) > 0.1
    raw = torch.tensor([[t[2]] for t in tr._last_texts])
    want = trl_rloo_advantages(raw, torch.ones(1), loss_rm.float(), 4, beta=0.5,
                               old_per_token_logps=data.old_logp, ref_per_token_logps=data.ref_logp)
    ours = (data.advantages * loss_rm).sum(1) / loss_rm.sum(1).clamp(min=1)
    torch.testing.assert_close(ours[kept], want[kept], rtol=1e-5, atol=1e-5)


def test_gamma_is_refused_where_it_does_nothing(tmp_path):
    """γ discounts token rewards: the group estimators (one advantage per answer) ignore it,
    as OpenRLHF forces γ = 1 for rloo / group_norm / dr_grpo. Set away from 1 it must be refused
    (as reinforce++_baseline's is), not silently dropped."""
    s, m = torch.tensor([1.0, 2.0, 0.0, 4.0]), torch.ones(4, 3)
    for est in ("rloo", "dr_grpo", "grpo"):
        with pytest.raises(ValueError, match="gamma"):
            compute_advantages(est, s, m, group_size=2, gamma=0.9)
        with pytest.raises(ValueError, match="ppo.gamma"):
            RLConfig(estimator=est, ppo=PPOConfig(gamma=0.9), output_dir=str(tmp_path / "run"))
    compute_advantages("rloo", s, m, group_size=2, gamma=1.0)  # the default stays accepted


def test_unscored_answers_with_a_bad_group_size_name_it():
    """With a NaN score (an unscored answer) the group path must still say that group_size does
    not divide the batch, as the plain path does, not fail in a reshape."""
    s, m = torch.tensor([1.0, float("nan"), 2.0, 3.0, 4.0]), torch.ones(5, 2)
    for kind in ("rloo", "dr_grpo"):
        with pytest.raises(ValueError, match="group_size"):
            group_estimator_advantages(s, m, 2, kind=kind)
        with pytest.raises(ValueError, match="group_size"):
            group_estimator_advantages(s[:4], m[:4], 0, kind=kind)


def test_infinite_scores_are_refused():
    """An infinite score gives NaN advantages to its whole group (REINFORCE++: to the whole
    batch through the whitening) and poisons the update: refused with a ValueError naming
    scores, as a NaN one is by the estimators that cannot leave it out."""
    m = torch.ones(2, 3)
    for est in ("rloo", "dr_grpo", "reinforce++", "reinforce++_baseline"):
        with pytest.raises(ValueError, match="scores"):
            compute_advantages(est, torch.tensor([1.0, float("inf")]), m, group_size=2)


def test_kl_outside_the_mask_is_never_read():
    """The group estimators sum the KL over each answer's response tokens: whatever ``kl``
    holds outside the mask (NaN / inf padding, as the ops' contract allows) must not be read —
    a NaN there made every score NaN, i.e. every answer unscored, and every advantage silently 0."""
    s = torch.tensor([1.0, 2.0, 3.0, 5.0])
    m = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]).bool()
    kl = torch.rand(4, 3, generator=torch.Generator().manual_seed(0))
    dirty = kl.masked_fill(~m, float("nan"))
    for est in ("rloo", "dr_grpo", "reinforce++_baseline"):
        want = compute_advantages(est, s, m, group_size=2, kl=kl * m, kl_coef=0.1)
        got = compute_advantages(est, s, m, group_size=2, kl=dirty, kl_coef=0.1)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w)
        assert want[0].abs().sum() > 0
