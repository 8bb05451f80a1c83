"""Review of online DPO (rlhf_fast.trainers.online_dpo) and A*-PO (rlhf_fast.trainers.a2po)
against TRL 1.16's experimental OnlineDPOTrainer / A2POTrainer and the A*-PO paper: one test per
defect found (a resumed A*-PO run that restarts from step 0, malformed input to the public
helpers, the docs' list of the ppo keys online DPO takes)."""

import os
import re

import pytest
import torch
import yaml

from rlhf_fast.trainers.a2po import A2POTrainer, optimal_values
from rlhf_fast.trainers.online_dpo import chosen_first_rows, first_is_chosen, pair_metrics
from rlhf_fast.trainers.rl_config import ONLINE_DPO_PPO_KEYS, PPOConfig, RolloutConfig
from tests.test_a2po import make_config
from tests.test_rl_learning import PROMPTS, frac_a, make_policy

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a2po_resume_that_restarts_trains_the_filtered_step_count(tmp_path):
    """``resume`` of a run stopped before its first checkpoint starts it again from step 0; with
    ``num_train_epochs`` and ``a2po.filter_all_incorrect``, Stage 1 must run before the step count
    (and config.yaml) is fixed, as in a new run: the run trains ``config.steps`` steps, the ones
    of the kept prompts, and config.yaml records that count."""
    from rlhf_fast.trainers.config import save_config

    kw = dict(num_train_epochs=2.0, rollout=RolloutConfig(prompts_per_step=2, group_size=1, max_new_tokens=6),
              ppo=PPOConfig(epochs=1, mini_batch_size=2, micro_batch_size=2))
    run = str(tmp_path / "run")
    os.makedirs(run)
    save_config(make_config(tmp_path, **kw), os.path.join(run, "config.yaml"))  # stopped before a checkpoint
    tr = A2POTrainer(make_config(tmp_path, resume=run, **kw), *make_policy(), prompts=PROMPTS, reward_fns=[frac_a])
    assert tr.config.steps == 4  # 2 epochs over the 4 given prompts, 2 per step
    history = tr.train()
    k = len(tr.prompts)
    assert k < 4  # the filter dropped prompts (the case at hand)
    assert tr.config.steps == k
    assert len(history) == k and tr.global_step == k
    assert yaml.safe_load(open(os.path.join(run, "config.yaml")))["steps"] == k


def test_pair_helpers_refuse_malformed_input():
    """first_is_chosen / pair_metrics take ``[2N]`` rows (pairs at 2i, 2i + 1): an odd count
    broadcast its last half and gave N + 1 'pairs' from 2N + 1 scores; chosen_first_rows takes
    bool, an int mask gave negative row indices."""
    with pytest.raises(ValueError, match="scores"):
        first_is_chosen(torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="logp"):
        pair_metrics(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3), 0.1)
    with pytest.raises(TypeError, match="first"):
        chosen_first_rows(torch.tensor([1, 0]))
    # well-formed input as before
    assert first_is_chosen(torch.tensor([1.0, 1.0, 0.0, 2.0])).tolist() == [True, False]
    assert chosen_first_rows(torch.tensor([True, False])).tolist() == [0, 1, 3, 2]


def test_optimal_values_refuses_malformed_input():
    """V* needs ``[P, N]`` rewards with N >= 1 and β1 > 0: a 1-D tensor raised IndexError, N = 0
    'math domain error', β1 = 0 returned NaN silently."""
    with pytest.raises(ValueError, match="rewards"):
        optimal_values(torch.tensor([0.0, 1.0]), 0.5)
    with pytest.raises(ValueError, match="rewards"):
        optimal_values(torch.zeros(2, 0), 0.5)
    with pytest.raises(ValueError, match="beta1"):
        optimal_values(torch.tensor([[0.0, 1.0]]), 0.0)
    assert optimal_values(torch.tensor([[0.7, 0.7]]), 0.5).tolist() == pytest.approx([0.7])


def test_from_trl_lists_every_ppo_key_online_dpo_takes():
    """docs/from_trl.md's Online DPO section says which ppo keys apply ('only ... apply'); every
    key that the config accepts for online DPO (ONLINE_DPO_PPO_KEYS) must be in that list."""
    text = open(os.path.join(ROOT, "docs", "from_trl.md"), encoding="utf-8").read()
    section = text.split("### OnlineDPOTrainer / OnlineDPOConfig", 1)[1].split("\n### ", 1)[0]
    listed = re.search(r"\(only (.*?) apply", section, re.S).group(1)
    missing = [k for k in ONLINE_DPO_PPO_KEYS if f"`ppo.{k}`" not in listed]
    assert not missing, missing


def test_a_judge_giving_float_ranks_is_refused(tmp_path):
    """A pairwise judge returns one int per pair (0: the first answer); plain floats were refused,
    but a float tensor's were truncated by int(): 0.3 and 0.9 picked the first answer where
    TRL's ``rank == 0`` picks the second."""
    from rlhf_fast.trainers.online_dpo import OnlineDPOTrainer
    from tests.test_online_dpo import make_config as odpo_config

    def judge(prompts, pairs):
        return torch.tensor([0.3, 0.9])

    tr = OnlineDPOTrainer(odpo_config(tmp_path), *make_policy(), prompts=PROMPTS, pairwise_judge=judge)
    with pytest.raises(ValueError, match="one int per pair"):
        tr.judge_pairs(["p"] * 4, ["a", "b", "c", "d"])
    tr._pairwise_judge = lambda prompts, pairs: torch.tensor([0, 1])  # int tensors as before
    assert tr.judge_pairs(["p"] * 4, ["a", "b", "c", "d"]).tolist() == [True, False]
