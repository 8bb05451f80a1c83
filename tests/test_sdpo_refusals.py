"""What SDPO (``estimator: sdpo``) refuses rather than ignores: the RL trainer given an sdpo config,
``ppo.trpo`` (its line search would measure the GRPO surrogate alone), the critic's keys, and,
with ``sdpo.distillation_weight`` 1 (no policy-gradient loss), the policy-loss and KL keys; a
resume from a checkpoint without the EMA teacher. Each error names the key."""

import os
import warnings

import pytest

from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import (DistributedConfig, KLConfig, PPOConfig, RLConfig, RolloutConfig,
                                          SDPOConfig)
from rlhf_fast.trainers.sdpo import SDPOTrainer
from tests.test_rl_learning import PROMPTS, make_policy
from tests.test_sdpo import make_config, starts_digit

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def test_rl_trainer_refuses_an_sdpo_config(tmp_path):
    pol, tok = make_policy()
    with pytest.raises(ValueError, match=r"estimator 'sdpo': SDPO trains with rlhf_fast\.trainers\.sdpo\.SDPOTrainer "
                                         r"\(rlhf-fast sdpo\).*got RLTrainer"):
        RLTrainer(make_config(tmp_path), pol, tok, prompts=PROMPTS, reward_fns=[starts_digit])


def cfg(sdpo=None, ppo=None, kl=None, **kw):
    return RLConfig(estimator="sdpo", rollout=RolloutConfig(prompts_per_step=2, group_size=4),
                    ppo=ppo or PPOConfig(mini_batch_size=8, micro_batch_size=8), kl=kl or KLConfig(),
                    sdpo=sdpo or SDPOConfig(), **kw)


W1 = SDPOConfig(distillation_weight=1.0)


@pytest.mark.parametrize("kw,match", [
    (dict(ppo=PPOConfig(mini_batch_size=8, micro_batch_size=8, trpo=True)), r"^ppo\.trpo is not supported"),
    (dict(ppo=PPOConfig(mini_batch_size=8, micro_batch_size=8, value_coef=1.0)), r"^ppo\.value_coef: no effect"),
    (dict(ppo=PPOConfig(mini_batch_size=8, micro_batch_size=8, value_clip=None)), r"^ppo\.value_clip: no effect"),
    (dict(sdpo=W1, ppo=PPOConfig(mini_batch_size=8, micro_batch_size=8, entropy_coef=0.01, clip_low=0.1)),
     r"^ppo\.clip_low, ppo\.entropy_coef: no effect with sdpo\.distillation_weight 1"),
    (dict(sdpo=W1, ppo=PPOConfig(mini_batch_size=8, micro_batch_size=8, policy_loss="sapo")),
     r"^ppo\.policy_loss: no effect with sdpo\.distillation_weight 1"),
    (dict(sdpo=W1, kl=KLConfig(coef=0.1, placement="loss")),
     r"^kl\.coef, kl\.placement: no effect with sdpo\.distillation_weight 1"),
    (dict(sdpo=W1, kl=KLConfig(coef=0.0, kind="k1")), r"^kl\.kind: no effect with sdpo\.distillation_weight 1"),
])
def test_settings_sdpo_would_ignore_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        cfg(**kw)


def test_what_still_applies_is_accepted(tmp_path):
    # what the distillation-only step still reads, and every teacher under FSDP2 (base / ema: sharded copies)
    cfg(sdpo=W1, ppo=PPOConfig(mini_batch_size=8, micro_batch_size=4, epochs=3, max_grad_norm=0.5, target_kl=0.1,
                               old_logp="behaviour", prefix_sharing=True))
    for kind in ("live", "base", "ema"):
        cfg(distributed=DistributedConfig(strategy="fsdp2"), sdpo=SDPOConfig(teacher_model_kind=kind))
    cfg(distributed=DistributedConfig(strategy="fsdp2"), sdpo=SDPOConfig(distillation_weight=0.0))
    # weight 1 with the default KL (coef 0.05 in the rewards): dropped, so no reference is built
    pol, tok = make_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = SDPOTrainer(make_config(tmp_path, sdpo=SDPOConfig(distillation_weight=1.0), kl=KLConfig()), pol, tok,
                         prompts=PROMPTS, reward_fns=[starts_digit])
    assert tr.config.kl.coef == 0.0 and tr.reference is None


def test_resume_without_the_ema_teacher_is_refused(tmp_path):
    pol, tok = make_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = SDPOTrainer(make_config(tmp_path, sdpo=SDPOConfig(teacher_model_kind="live", distillation_weight=0.5),
                                    steps=1), pol, tok, prompts=PROMPTS, reward_fns=[starts_digit])
        a.train()
        pol, tok = make_policy()
        b = SDPOTrainer(make_config(tmp_path, sdpo=SDPOConfig(teacher_model_kind="ema", distillation_weight=0.5),
                                    steps=2, resume=str(tmp_path / "run")), pol, tok, prompts=PROMPTS,
                        reward_fns=[starts_digit])
        with pytest.raises(ValueError, match=r"has no EMA teacher \(sdpo\.teacher_model_kind was not 'ema'"):
            b.train()
