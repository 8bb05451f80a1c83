"""Review of environment rollouts (TRL GRPOTrainer's ``environment_factory``): defects found
against TRL 1.16 (installed) and the documented semantics.

1. An environment's ``reset()`` that raises (or returns something other than a string / None)
   surfaced as the bare exception of the user's code (a ``KeyError: 'missing'``) or as a
   TypeError naming neither the environment nor the prompt: with several environments and
   many prompts nothing said which one failed.
2. ``EnvironmentReward`` scored the answers of another environment class 0 under
   ``reward.calling_convention: trl``, where TRL's ``get_reward`` source gives None ("does not
   apply"). With no other source scoring those answers TRL marks them unscorable (NaN reward,
   outside the group / batch statistics); ours scored them 0, in the batch std of
   ``scale_rewards: batch``, ``reward/total`` and ``reward/NAME`` (one Counter group scoring
   [2, 1, 4, 1] and one Store group: ``reward/total`` 1.0 where TRL's nanmean is 2.0). The
   docs' "same total" was false there."""

import warnings
from types import SimpleNamespace

import pytest
import torch

from rlhf_fast.trainers.rl_config import DataConfig, RewardConfig
from tests.test_rl_environments import RECORDS, Counter, Store, _trainer, trl_reward_funcs
from tests.test_rl_tools import tok  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


class _Raises(Counter):
    def reset(self, **record):
        if record["start"] == 5:
            raise KeyError("missing")
        return super().reset(**record)


class _ReturnsInt(Counter):
    def reset(self, **record):
        super().reset(**record)
        return 3


@pytest.mark.parametrize("factory, error, match", [
    (_Raises, RuntimeError, r"_Raises\.reset\(\*\*record\) raised KeyError: 'missing'.*count from 5"),
    (_ReturnsInt, TypeError, r"_ReturnsInt\.reset\(\) must return a string or None, got int.*count from 1"),
])
def test_reset_failure_names_the_environment_and_the_prompt(tmp_path, tok, factory, error, match):
    tr = _trainer(tmp_path, tok, factory=factory, data=DataConfig(shuffle=False))
    with pytest.raises(error, match=match) as info:
        tr._generate(0)
    if error is RuntimeError:  # the environment's own exception stays reachable
        assert isinstance(info.value.__cause__, KeyError)


def test_get_reward_of_another_class_does_not_apply_under_trl_convention(tmp_path, tok, monkeypatch):
    """Counter prompts and Store prompts (Store owns no reward), the only source Counter's
    ``get_reward``: TRL's ``_calculate_rewards`` gives the store answers None — unscorable
    rows — and ours must too (NaN, ``unscored``), not a 0 that enters the statistics."""
    from trl.trainer import grpo_trainer
    from trl.trainer.grpo_trainer import GRPOTrainer

    # (TRL's warning about the unscorable rows goes through accelerate's logger, which needs its state)
    monkeypatch.setattr(grpo_trainer.logger, "warning", lambda *a, **k: None)
    records = [{**RECORDS[0], "environment": "counter"},
               {"prompt": [{"role": "user", "content": "remember"}], "environment": "store", "start": 0}]
    tr = _trainer(tmp_path, tok, factory={"counter": Counter, "store": Store},
                  records=records, reward_fns=(), data=DataConfig(shuffle=False),
                  reward=RewardConfig(calling_convention="trl"))
    batch, fields, extra = tr._generate(0)
    with warnings.catch_warnings():  # (TRL warns alike about completions no source scored)
        warnings.simplefilter("ignore")
        out = tr._score(batch, fields, extra)
    funcs, names = trl_reward_funcs([Counter(), Store()], [])
    me = SimpleNamespace(accelerator=SimpleNamespace(device="cpu", is_main_process=True), reward_funcs=funcs,
                         reward_processing_classes=[None] * len(funcs), reward_func_names=names,
                         environments=extra["environments"], state=SimpleNamespace(global_step=0),
                         args=SimpleNamespace(report_to=[]), _log_completion_extra=None, _log_metric=None)
    inputs = [dict(r) for r in records for _ in range(4)]
    trl = GRPOTrainer._calculate_rewards(me, inputs, list(batch.prompt_texts), list(batch.response_texts),
                                         [[0]] * 8)
    assert names == ["Counter"] and tr.reward.names == names
    torch.testing.assert_close(out.per_source["Counter"], trl[:, 0].float(), equal_nan=True)
    assert out.unscored_rows().tolist() == torch.isnan(trl).all(1).tolist() == [False] * 4 + [True] * 4
