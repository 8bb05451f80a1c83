"""The RL resume fixes of the revresume review, beyond its own tests (tests/test_review_resume.py):
the KL controllers continue only their state on a resume, a run of another kind (or with or
without a critic) is refused, keep_checkpoints 0 keeps all, and a run stopped before its first
checkpoint starts again when resumed, as the offline trainers' (open_supervised_run)."""

import json
import os
import re
import shutil

import pytest
import torch

from rlhf_fast.algorithms.kl_control import AdaptiveKLController, FixedKLController
from rlhf_fast.trainers.common import read_metrics
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import RLConfig, RolloutConfig
from tests.test_rl_learning import PROMPTS, frac_a, make_config, make_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def _rl(tmp_path, estimator="grpo", **kw):
    pol, tok = make_policy()
    kw.setdefault("rollout", RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=4))
    return RLTrainer(make_config(tmp_path, estimator, **kw), pol, tok, reward_fns=[frac_a], prompts=PROMPTS)


def _rows(run):
    """metrics.jsonl without its timings (which differ between two runs of the same steps)."""
    timing = ("time/", "tokens_per", "step_time")
    return [{k: v for k, v in m.items() if not k.startswith(timing)} for m in read_metrics(run)]


def _files(run, names=("config.yaml", "metrics.jsonl")):
    return {n: open(os.path.join(run, n)).read() for n in names}


def test_controllers_continue_only_their_state():
    """resume_from: a fixed coefficient is the config's; the adaptive β continues (exactly) under
    the config's target and horizon, and from a fixed controller's state (a run switched to
    adaptive) starts at the config's kl.coef; a damaged β is still named. load_state_dict stays
    an exact round trip."""
    fixed = FixedKLController(0.5)
    fixed.resume_from({"value": 0.01})
    assert fixed.value == 0.5
    old = AdaptiveKLController(0.05, target=6.0, horizon=100)
    old.update(9.0, 7)
    new = AdaptiveKLController(0.05, target=0.5, horizon=50)
    new.resume_from(old.state_dict())
    assert (new.value, new.target, new.horizon) == (old.value, 0.5, 50)
    switched = AdaptiveKLController(0.2, target=0.5, horizon=50)
    switched.resume_from(FixedKLController(0.01).state_dict())
    assert switched.value == 0.2
    with pytest.raises(ValueError, match=r"state\['value'\] must be a finite number >= 0"):
        new.resume_from({"value": float("nan"), "target": 6.0, "horizon": 100})
    again = AdaptiveKLController(1.0, target=1.0, horizon=1)
    again.load_state_dict(old.state_dict())
    assert again.state_dict() == old.state_dict()


@pytest.mark.parametrize("first,then", [("gae", "reinforce++"), ("reinforce++", "gae")])
def test_a_resume_that_adds_or_drops_the_critic_is_refused(tmp_path, first, then):
    """gae and reinforce++ are both `rlhf-fast ppo`, but only gae trains a critic: its checkpoint's
    critic would be dropped (or a critic started from scratch). Refused, naming both estimators
    and the folder, before anything in it changes."""
    tr = _rl(tmp_path, first, steps=1)
    tr.train()
    run = tr.config.output_dir
    before = _files(run)
    critic = {"gae": "with a critic", "reinforce++": "without a critic"}
    with pytest.raises(ValueError, match=re.escape(
            f"resume {run} holds a run of rlhf-fast ppo (estimator {first}, {critic[first]}), not of "
            f"rlhf-fast ppo (estimator {then}, {critic[then]}): continue it with estimator {first} "
            "(rlhf-fast ppo)")):
        _rl(tmp_path, then, steps=2, resume=run).train()
    assert _files(run) == before and os.listdir(os.path.join(run, "checkpoints")) == ["step_00000001"]


def test_a_resume_within_a_family_and_with_the_same_models_goes_on(tmp_path):
    """grpo → dr_grpo (both `rlhf-fast grpo`, neither with a critic) is a legitimate change."""
    tr = _rl(tmp_path, "grpo", steps=1)
    tr.train()
    run = tr.config.output_dir
    _rl(tmp_path, "dr_grpo", steps=2, resume=run).train()
    assert [m["step"] for m in read_metrics(run)] == [1, 2]


def test_a_folder_of_another_kind_is_refused_as_output_dir_and_as_resume(tmp_path):
    """A new run into a PPO run's folder names the kinds (not 'continue it (resume: ...)', which
    would then be refused); an SFT run's folder resumed from Python is refused by its kind, not
    with 'has no optimizer policy'."""
    ppo = _rl(tmp_path, "gae", steps=1)
    ppo.train()
    run = ppo.config.output_dir
    with pytest.raises(ValueError, match=rf"output_dir {run} holds a run of rlhf-fast ppo \(estimator gae, "
                                         r"with a critic\), not of rlhf-fast grpo \(estimator grpo, without "
                                         r"a critic\): choose another output_dir"):
        _rl(tmp_path, "grpo", steps=1).train()
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "config.yaml").write_text("model: tiny:llama\ncompletion_only_loss: true\npacking: false\n")
    (sft / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=rf"resume {sft} holds a run of rlhf-fast sft, not of rlhf-fast grpo "
                                         r"\(estimator grpo, without a critic\): choose another resume"):
        _rl(tmp_path, "grpo", steps=1, resume=str(sft)).train()
    assert (sft / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_cli_resume_of_a_ppo_run_with_a_grpo_config_is_refused(tmp_path, capsys):
    """`rlhf-fast grpo GRPO.yaml --resume PPO_RUN` (a config file of its own, so the CLI's check of
    the run's own estimator does not apply) exits 2 with the kinds named."""
    from rlhf_fast.cli import main
    from tests.test_rl_cli import _small

    ppo = _rl(tmp_path, "gae", steps=1)
    ppo.train()
    run = ppo.config.output_dir
    before = _files(run)
    capsys.readouterr()
    assert main(["grpo", _small(tmp_path, steps=2), "--resume", run]) == 2
    err = capsys.readouterr().err
    assert f"resume {run} holds a run of rlhf-fast ppo (estimator gae, with a critic)" in err, err
    assert _files(run) == before


def test_keep_checkpoints_takes_zero_not_below():
    assert RLConfig(keep_checkpoints=0).keep_checkpoints == 0
    with pytest.raises(ValueError, match="keep_checkpoints must be an int >= 0, got -1"):
        RLConfig(keep_checkpoints=-1)


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0(tmp_path):
    """What a kill at step 2 of 2 leaves (config.yaml, metrics.jsonl at step 1, samples.jsonl, no
    checkpoint): the resume drops its log and samples and trains as an uninterrupted run, to the
    same log and the same weights."""
    straight = _rl(tmp_path / "a", steps=2, sample_every=1)
    straight.train()
    killed = _rl(tmp_path / "b", steps=2, sample_every=1)
    killed.train()
    run = killed.config.output_dir
    for part in ("checkpoints", "final"):
        shutil.rmtree(os.path.join(run, part))
    with open(os.path.join(run, "metrics.jsonl")) as f:
        first = f.readline()
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write(first)
    with open(os.path.join(run, "samples.jsonl"), "a") as f:
        f.write(json.dumps({"step": 99, "prompt": "stale"}) + "\n")
    resumed = _rl(tmp_path / "b", steps=2, sample_every=1, resume=run)
    resumed.train()
    assert _rows(run) == _rows(straight.config.output_dir) and [r["step"] for r in _rows(run)] == [1, 2]
    with open(os.path.join(run, "samples.jsonl")) as f:
        assert [json.loads(ln)["step"] for ln in f] == [1] * 8 + [2] * 8
    for p, q in zip(straight.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(p, q)


def test_a_resume_with_no_checkpoint_and_nothing_to_start_again_is_refused(tmp_path):
    """A final model without checkpoints cannot be continued (it is not restarted over); a folder
    holding no run at all (a mistyped path) is not made into a new run."""
    tr = _rl(tmp_path, steps=1)
    tr.train()
    run = tr.config.output_dir
    shutil.rmtree(os.path.join(run, "checkpoints"))
    before = _files(run)
    with pytest.raises(ValueError, match=rf"resume {run} already holds a run \(final\): it has no checkpoint "
                                         r"to continue from"):
        _rl(tmp_path, steps=2, resume=run).train()
    assert _files(run) == before
    missing = str(tmp_path / "no_such_run")
    with pytest.raises(FileNotFoundError, match="resume: no complete checkpoint under .*no_such_run"):
        _rl(tmp_path, steps=1, resume=missing).train()
    assert not os.path.exists(missing)
