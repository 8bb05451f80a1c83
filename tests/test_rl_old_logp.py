"""``ppo.old_logp``: the rollout's policy log-probs recomputed by a forward pass or taken from
the sampler. With plain temperature sampling both give the same update up to float rounding,
and ``behaviour`` skips the forward."""

import pytest
import torch

from rlhf_fast.models import logprobs as logprobs_mod
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import KLConfig, PPOConfig, RLConfig, RolloutConfig
from tests.test_rl_learning import PROMPTS, make_config, make_policy


pytestmark = pytest.mark.usefixtures("one_thread")


def n_chars(prompts, completions):
    """A dense reward: groups rarely tie, so advantages (and updates) are non-zero."""
    return [float(len(c)) for c in completions]


def _trainer(tmp_path, source, estimator="grpo", **ppo):
    pol, tok = make_policy()
    ppo_cfg = PPOConfig(**{"epochs": 2, "mini_batch_size": 4, "micro_batch_size": 4, "old_logp": source, **ppo})
    cfg = make_config(tmp_path / source, estimator, steps=2, ppo=ppo_cfg,
                      rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=6, temperature=0.8),
                      kl=KLConfig(coef=0.05, placement="reward" if estimator == "gae" else "loss", kind="k1"))
    return RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS)


@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_behaviour_gives_the_recomputed_update(tmp_path, estimator):
    a, b = _trainer(tmp_path, "recompute", estimator), _trainer(tmp_path, "behaviour", estimator)
    ma, mb = a.step(), b.step()
    # same samples (same seeds), and the sampler's log-probs equal the recomputed ones to rounding
    assert ma["logprob_gap/max"] < 1e-4
    for k in ("reward/total", "kl/seq", "policy/loss", "policy/approx_kl", "policy/clip_frac", "policy/kl"):
        assert mb[k] == pytest.approx(ma[k], rel=1e-3, abs=1e-5), k
    for pa, pb in zip(a.policy.parameters(), b.policy.parameters()):
        torch.testing.assert_close(pb, pa, atol=2e-5, rtol=1e-4)
    assert "logprob_gap/max" not in mb and "entropy" in ma


def test_behaviour_skips_the_policy_forward(tmp_path, monkeypatch):
    tr = _trainer(tmp_path, "behaviour")
    seen = []
    real = logprobs_mod.sequence_logprobs

    def spy(model, *args, **kw):
        seen.append(model)
        return real(model, *args, **kw)

    monkeypatch.setattr(logprobs_mod, "sequence_logprobs", spy)
    data, _ = tr.rollout()
    assert seen and all(m is not tr.policy for m in seen)  # only the reference was run
    # the rollout's old log-probs are the sampler's own
    torch.testing.assert_close(data.old_logp, data.behaviour_logp)


def test_behaviour_needs_plain_sampling_and_no_is_cap():
    for ro in (RolloutConfig(top_k=5), RolloutConfig(top_p=0.9), RolloutConfig(min_p=0.1)):
        with pytest.raises(ValueError, match="ppo.old_logp"):
            RLConfig(rollout=ro, ppo=PPOConfig(old_logp="behaviour"))
    with pytest.raises(ValueError, match="ppo.is_cap"):
        PPOConfig(old_logp="behaviour", is_cap=2.0)
    with pytest.raises(ValueError, match="ppo.old_logp"):
        PPOConfig(old_logp="sampler")
    RLConfig(rollout=RolloutConfig(top_k=5), ppo=PPOConfig(old_logp="recompute"))  # fine with a forward
