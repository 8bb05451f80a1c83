"""SDPO learns (rlhf_fast.trainers.sdpo): a tiny model's share of answers that start with a digit
(a verifiable 0/1 reward) rises over 20 steps of SDPO with distillation_weight 0.5 and an EMA
teacher; the same run at lr 1e-12 stays where it started. (Pure self-distillation, weight 1,
needs a model that can read the demonstration in its teacher context, which a random tiny model
cannot: its reward does not rise, as measured for the report.)"""

import warnings

import pytest

from rlhf_fast.trainers.rl_config import KLConfig, OptimConfig, PPOConfig, RLConfig, RolloutConfig, SDPOConfig
from rlhf_fast.trainers.sdpo import SDPOTrainer
from tests.test_rl_learning import PROMPTS, make_policy
from tests.test_sdpo import starts_digit

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def run(tmp_path, lr):
    pol, tok = make_policy()
    cfg = RLConfig(estimator="sdpo", steps=20, output_dir=str(tmp_path / f"run{lr}"), progress=False, sample_every=0,
                   rollout=RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=4),
                   ppo=PPOConfig(epochs=2, mini_batch_size=8, micro_batch_size=8), optim=OptimConfig(lr=lr),
                   kl=KLConfig(coef=0.0), sdpo=SDPOConfig(distillation_weight=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hist = SDPOTrainer(cfg, pol, tok, prompts=PROMPTS, reward_fns=[starts_digit]).train()
    r = [m["reward/total"] for m in hist]
    return sum(r[:5]) / 5, sum(r[-5:]) / 5, hist


def test_sdpo_raises_a_verifiable_reward_and_the_control_does_not(tmp_path):
    first, last, hist = run(tmp_path, 1e-2)
    assert any(m["self_distillation/reprompt_sample_fraction"] > 0 for m in hist)  # the distillation term ran
    assert any(m["self_distillation/distillation_loss"] != 0 for m in hist)
    assert last >= 0.5 and last >= first + 0.2, (first, last)
    c_first, c_last, _ = run(tmp_path, 1e-12)
    assert c_last < 0.45 and c_last < last - 0.15, (c_first, c_last)
