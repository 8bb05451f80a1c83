"""Online DPO's errors about its reward source and its pairwise judge (helper prmk).

- A run with no reward source names every way to give one, the pairwise ones
  (``pairwise_judge=``, ``online_dpo.judge``) included, not only RL's pointwise ``judge``.
- ``online_dpo.judge: missing.py:J`` names the key and calls the file the judge's, not a
  "reward function file".

(The PRM trainer renders no chat template: its stepwise records' prompts are text,
``load_stepwise_records`` refuses a chat, so a PRM has no template variables to save.)
"""

import os

import pytest

from rlhf_fast.trainers.online_dpo import OnlineDPOTrainer, load_pairwise_judge
from tests.test_online_dpo import PROMPTS, make_config, make_policy

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def test_no_reward_source_names_the_pairwise_judges(tmp_path):
    pol, tok = make_policy()
    with pytest.raises(ValueError, match="no reward source") as e:
        OnlineDPOTrainer(make_config(tmp_path), pol, tok, prompts=PROMPTS)
    msg = str(e.value)
    for way in ("pairwise_judge=", "online_dpo.judge", "reward_fns", "reward_models", "reward.functions",
                "reward.reward_model", "reward.process_model", "get_reward"):
        assert way in msg, way


def test_rl_no_reward_source_keeps_its_message(tmp_path):
    """RL (GRPO here) does not offer a pairwise judge: online DPO's keys are not named there."""
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import OptimConfig, PPOConfig, RLConfig, RolloutConfig

    cfg = RLConfig(estimator="grpo", steps=1, output_dir=str(tmp_path / "run"), progress=False,
                   rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=4),
                   ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4), optim=OptimConfig(lr=1e-3))
    with pytest.raises(ValueError, match="no reward source") as e:
        RLTrainer(cfg, *make_policy(), prompts=PROMPTS)
    assert "online_dpo.judge" not in str(e.value) and "pairwise_judge" not in str(e.value)


def test_missing_judge_file_names_the_key(tmp_path):
    spec = f"{tmp_path / 'no_judge.py'}:J"
    with pytest.raises(ValueError, match="online_dpo.judge") as e:
        load_pairwise_judge(spec)
    msg = str(e.value)
    assert "reward function" not in msg and "judge file" in msg
    assert repr(os.path.join(str(tmp_path), "no_judge.py")) in msg


def test_a_judge_file_loads(tmp_path):
    """The existence check reads the path before the colon: an existing file still loads."""
    path = tmp_path / "my_judge.py"
    path.write_text("def J(prompts, pairs):\n    return [0] * len(pairs)\n")
    fn = load_pairwise_judge(f"{path}:J")
    assert fn(["p"], [["a", "b"]]) == [0]
