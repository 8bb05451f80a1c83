"""RL ``num_train_epochs`` (TRL's): ``steps`` becomes ceil(epochs × training prompts /
prompts_per_step), counted after a held-out ``data.eval_fraction``; the LR schedule spans those
steps; a run trains exactly that many; bad values are refused with the key named."""

import pytest

from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import DataConfig, OptimConfig, RLConfig, RolloutConfig
from tests.test_rl_learning import frac_a, make_config, make_policy

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [f"p{i}:" for i in range(10)]


def _trainer(tmp_path, **kw):
    pol, tok = make_policy()
    cfg = make_config(tmp_path, "grpo", steps=99, rollout=RolloutConfig(prompts_per_step=4, group_size=2,
                                                                        max_new_tokens=3), **kw)
    return RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS)


@pytest.mark.parametrize("epochs,eval_fraction,steps", [(1, None, 3), (1.5, None, 4), (2, None, 5), (0.1, None, 1),
                                                        (1.5, 0.2, 3), (2, 0.2, 4)])
def test_epochs_set_the_steps(tmp_path, epochs, eval_fraction, steps):
    # 10 prompts (8 after holding out 0.2), 4 a step: ceil(epochs × n / 4)
    data = DataConfig(eval_fraction=eval_fraction) if eval_fraction else DataConfig()
    tr = _trainer(tmp_path, num_train_epochs=epochs, data=data,
                  optim=OptimConfig(lr=1e-3, schedule="linear"))
    assert tr.config.steps == steps
    # the linear decay reaches 0 at the last optimizer step of the run: steps × epochs × mini-batches
    total = steps * tr.config.ppo.epochs * (tr.config.batch_size // tr.config.ppo.mini_batch_size)
    assert tr.scheduler.lr_lambdas[0](total) == 0.0 and tr.scheduler.lr_lambdas[0](total - 1) > 0.0


def test_a_run_trains_the_epochs_steps(tmp_path):
    from rlhf_fast.trainers.common import read_metrics

    tr = _trainer(tmp_path, num_train_epochs=1.5)
    assert len(tr.train()) == 4 and tr.global_step == 4
    assert [m["step"] for m in read_metrics(tr.config.output_dir)] == [1, 2, 3, 4]


def test_without_epochs_steps_stay(tmp_path):
    assert _trainer(tmp_path).config.steps == 99


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "two"])
def test_bad_epochs_are_refused(bad):
    with pytest.raises((ValueError, TypeError), match="num_train_epochs"):
        RLConfig(num_train_epochs=bad)
