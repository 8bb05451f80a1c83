"""REINFORCE++-baseline (``estimator: reinforce++_baseline``) against OpenRLHF's
``advantage_estimator=reinforce_baseline``, transcribed below; its refusals; that it learns; and
the KL estimator of ``kl.reward_kind`` (k1 by default; ``kl.kind`` is the loss's, k3)."""

from dataclasses import replace

import pytest
import torch

from rlhf_fast.algorithms.advantages import compute_advantages
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import KLConfig, PPOConfig, RLConfig, RolloutConfig
from tests.test_review_rl_core import BETA, _trainer
from tests.test_rl_learning import PROMPTS, frac_a, make_config, make_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def openrlhf_compute_approx_kl(log_probs, log_probs_base, kl_estimator="k1"):
    """OpenRLHF openrlhf/models/utils.py compute_approx_kl."""
    log_ratio = log_probs.float() - log_probs_base.float()
    if kl_estimator == "k2":
        log_ratio = log_ratio ** 2 / 2.0
    if kl_estimator == "k3":
        log_ratio = -log_ratio
        log_ratio = log_ratio.exp() - 1 - log_ratio
    return log_ratio


def openrlhf_reinforce_baseline(scores, log_probs, log_probs_base, action_mask, n_samples_per_prompt, kl_coef,
                                kl_estimator="k1"):
    """OpenRLHF openrlhf/trainer/ppo_utils/experience_maker.py compute_advantages_and_returns with
    advantage_estimator "reinforce_baseline" (one experience, identity indices): group-mean
    baseline; models/utils.py compute_reward; get_cumulative_returns (γ forced to 1.0); the
    global normalisation (population variance, var.clamp(min=1e-8).rsqrt()). Returns
    (advantages, returns) on every column; only the action_mask's columns are meaningful."""
    kl = openrlhf_compute_approx_kl(log_probs, log_probs_base, kl_estimator)
    rewards = scores.float().reshape(-1, n_samples_per_prompt)
    rewards = rewards - rewards.mean(-1, keepdim=True)
    r = rewards.reshape(-1)
    # compute_reward
    kl_reward = -kl_coef * kl
    eos_indices = action_mask.size(1) - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
    last_reward = torch.zeros_like(kl).scatter_(dim=1, index=eos_indices, src=r.unsqueeze(1).to(kl.dtype))
    reward = last_reward + kl_reward
    # get_cumulative_returns, gamma = 1.0
    returns = torch.zeros_like(reward)
    cumulative_return = torch.zeros(reward.size(0))
    reward = action_mask * reward
    for t in reversed(range(reward.size(1))):
        cumulative_return = reward[:, t] + 1.0 * cumulative_return
        returns[:, t] = cumulative_return
    advantages = returns.clone()
    # "Normalize advantages across all experiences"
    m = action_mask.float().flatten()
    a = advantages.flatten().float()
    num_actions = m.sum()
    mean = (a * m).sum() / num_actions
    var = ((a - mean).pow(2) * m).sum() / num_actions
    rstd = var.clamp(min=1e-8).rsqrt()
    return (advantages - mean) * rstd, returns


def _bessel(mask):
    """Ours whitens with the unbiased variance (verl's masked_whiten, as our reinforce++);
    OpenRLHF with the population one: ours = OpenRLHF's · sqrt((n − 1)/n), n the token count."""
    n = mask.float().sum()
    return torch.sqrt((n - 1) / n)


def _hand_batch(seed=0, B=6, T=7):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, generator=g) * 2
    logp = -torch.rand(B, T, generator=g) * 3
    ref = logp + 0.5 * torch.randn(B, T, generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (lo, hi) in enumerate([(2, 7), (2, 5), (1, 7), (3, 4), (2, 6), (0, 7)]):
        mask[b, lo:hi] = True  # prompts of several lengths, responses of several lengths
    return scores, logp, ref, mask


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_hand_built_batch_is_openrlhfs(kind):
    scores, logp, ref, mask = _hand_batch()
    kl = openrlhf_compute_approx_kl(logp, ref, kind) * mask
    adv, ret = compute_advantages("reinforce++_baseline", scores, mask, kl=kl, kl_coef=0.1, group_size=3)
    want_adv, want_ret = openrlhf_reinforce_baseline(scores, logp, ref, mask, 3, 0.1, kind)
    f = mask.float()
    torch.testing.assert_close(ret, want_ret * f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adv, want_adv * f * _bessel(mask), rtol=1e-5, atol=1e-6)
    assert float(kl.abs().max()) > 0.01
    # the baseline is per group, not the batch's: shifting one group's scores changes nothing
    shifted = scores.clone()
    shifted[:3] += 5.0
    adv2, _ = compute_advantages("reinforce++_baseline", shifted, mask, kl=kl, kl_coef=0.1, group_size=3)
    torch.testing.assert_close(adv2, adv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["k1", "k2"])
def test_one_real_step_is_openrlhfs(tmp_path, kind):
    """A tiny-model rollout (2 prompts × 4 answers, the policy moved off its reference): the
    trainer's advantages and returns are OpenRLHF's on its scores and log-probs, with the KL
    estimator of kl.reward_kind (default k1, OpenRLHF's default kl_estimator)."""
    tr = _trainer(tmp_path, "reinforce++_baseline", kl=KLConfig(coef=BETA, reward_kind=kind))
    data, m = tr.rollout()
    rm = data.response_mask
    assert float(((data.old_logp - data.ref_logp) * rm).abs().max()) > 0.1
    want_adv, want_ret = openrlhf_reinforce_baseline(data.scores, data.old_logp, data.ref_logp, rm, 4, BETA,
                                                     kind)
    f = rm.float()
    torch.testing.assert_close(data.returns, want_ret * f, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(data.advantages, want_adv * f * _bessel(rm), rtol=1e-4, atol=1e-5)
    # the kl/* metrics stay k1 whatever the reward's estimator
    assert m["kl/seq"] == pytest.approx(float(((data.old_logp - data.ref_logp) * f).sum(1).mean()), rel=1e-5)


def test_refusals(tmp_path):
    base = dict(estimator="reinforce++_baseline", output_dir=str(tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match=r"rollout\.group_size must be >= 2"):
        RLConfig(**base, rollout=RolloutConfig(prompts_per_step=4, group_size=1),
                 ppo=PPOConfig(mini_batch_size=4, micro_batch_size=4))
    with pytest.raises(ValueError, match=r"ppo\.gamma must be 1\.0"):
        RLConfig(**base, ppo=PPOConfig(gamma=0.9))
    scores, _, _, mask = _hand_batch()
    with pytest.raises(ValueError, match="group_size must be an int >= 2"):
        compute_advantages("reinforce++_baseline", scores, mask, group_size=1)
    with pytest.raises(ValueError, match="group_size=4 must divide"):
        compute_advantages("reinforce++_baseline", scores, mask, group_size=4)
    with pytest.raises(ValueError, match="gamma must be 1.0"):
        compute_advantages("reinforce++_baseline", scores, mask, group_size=3, gamma=0.9)
    with pytest.raises(ValueError, match="scale_rewards applies to the group estimators"):
        compute_advantages("reinforce++_baseline", scores, mask, group_size=3, scale_rewards="batch")
    with pytest.raises(ValueError, match=r"kl\.kind must be one of"):
        KLConfig(kind="k4")


def test_kl_kind_defaults_are_k1_in_the_reward_and_k3_in_the_loss(tmp_path):
    """Each placement has its estimator key, as verl's kl_penalty / kl_loss_type: kl.reward_kind
    (k1) for the reward, kl.kind (k3, the previous default, unchanged) for the loss; the other
    placement's key is refused away from its default (it would do nothing)."""
    assert (KLConfig().reward_kind, KLConfig().loss_kind) == ("k1", "k3")
    assert KLConfig(kind="k3").reward_kind == "k1"  # configs saved before reward_kind existed
    assert KLConfig(kind="k1").reward_kind == "k1"  # the reward's own estimator, said twice
    with pytest.raises(ValueError, match=r"kl\.kind is the estimator of the KL in the loss"):
        KLConfig(kind="k2")
    with pytest.raises(ValueError, match=r"kl\.reward_kind is the estimator of the KL in the reward"):
        KLConfig(placement="loss", reward_kind="k2")
    with pytest.raises(ValueError, match=r"kl\.reward_kind must be one of"):
        KLConfig(reward_kind="k4")
    tr = _trainer(tmp_path, "grpo", perturb=False, kl=KLConfig(coef=BETA, placement="loss"))
    assert tr._loss_kwargs()["kl_kind"] == "k3"
    tr.config = replace(tr.config, kl=KLConfig(coef=BETA, placement="loss", kind="k1"))
    assert tr._loss_kwargs()["kl_kind"] == "k1"


def test_reward_rises(tmp_path):
    """The frac_a task of tests/test_rl_learning.py: REINFORCE++-baseline raises the reward well
    above the same run at lr 1e-12 (same seeds, so the same first rollouts)."""

    def run(lr, sub):
        torch.manual_seed(0)
        pol, tok = make_policy()
        cfg = make_config(tmp_path / sub, "reinforce++_baseline", steps=20, lr=lr, kl=KLConfig(coef=0.01))
        hist = RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS).train()
        return [h["reward/total"] for h in hist]

    r, control = run(5e-3, "a"), run(1e-12, "b")
    assert r[0] == pytest.approx(control[0])
    last, last_c = sum(r[-5:]) / 5, sum(control[-5:]) / 5
    assert last > last_c + 0.25 and last > 0.4, (r, control)
