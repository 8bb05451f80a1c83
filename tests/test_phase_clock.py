"""The trainers' phase clock (rlhf_fast.trainers.common.PhaseClock, RLConfig's ``sync_phase_timers``):
``now()`` waits for the CUDA device exactly when synchronising is on and the device is CUDA; every
RL-family trainer (GRPO, online DPO, A*-PO, distillation) reads its phase timers (``time/*``,
``step_time``) from ``trainer.phase_clock``; the key is checked; and ``rlhf-fast bench e2e`` sets
the switch instead of swapping the ``time`` module inside the trainer modules."""

import inspect
import os

import pytest
import torch

from rlhf_fast.trainers.common import PhaseClock
from rlhf_fast.trainers.config import load_config
from rlhf_fast.trainers.rl_config import (A2POConfig, DistillConfig, OptimConfig, PPOConfig, RLConfig,
                                          RolloutConfig)
from tests.test_rl_learning import PROMPTS, frac_a, make_policy

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.fixture
def cuda_syncs(monkeypatch):
    """torch.cuda.synchronize replaced by a recorder of the devices it was called with (no GPU here)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    return calls


# ----------------------------------------------------------------------------- the clock


@pytest.mark.parametrize("device,synchronize,waits", [
    ("cuda:0", True, True), ("cuda", True, True), ("cuda:0", False, False), ("cpu", True, False),
    ("cpu", False, False)])
def test_now_synchronises_exactly_when_on_and_on_cuda(cuda_syncs, device, synchronize, waits):
    clock = PhaseClock(device, synchronize=synchronize)
    a, b = clock.now(), clock.now()
    assert b >= a  # perf_counter seconds
    assert cuda_syncs == ([torch.device(device)] * 2 if waits else [])


def test_the_switch_is_off_by_default_settable_and_checked(cuda_syncs):
    clock = PhaseClock(torch.device("cuda", 1))
    assert clock.synchronize is False
    clock.now()
    assert cuda_syncs == []
    clock.synchronize = True
    clock.now()
    assert cuda_syncs == [torch.device("cuda", 1)]
    for bad in ("true", 1, None):  # ("false" would be truthy: a silent slowdown)
        with pytest.raises(TypeError, match="synchronize must be a bool"):
            clock.synchronize = bad
        with pytest.raises(TypeError, match="synchronize must be a bool"):
            PhaseClock("cpu", synchronize=bad)
    with pytest.raises(TypeError, match="device must be"):
        PhaseClock(3.5)


# ----------------------------------------------------------------------------- the config key


def test_sync_phase_timers_key():
    assert RLConfig().sync_phase_timers is False
    assert load_config(RLConfig, None, ["--sync_phase_timers", "true"]).sync_phase_timers is True
    assert load_config(RLConfig, None, ["--sync_phase_timers"]).sync_phase_timers is True  # a bare flag
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="sync_phase_timers must be true or false"):
            RLConfig(sync_phase_timers=bad)
    with pytest.raises(ValueError, match="sync_phase_timers"):
        load_config(RLConfig, None, ["--sync_phase_timers", "often"])


# ----------------------------------------------------------------------------- every trainer reads it


class TickClock(PhaseClock):
    """A clock whose every read advances one whole second: a timer read from it is a positive
    whole number, one that (at either end) read time.perf_counter is not."""

    def __init__(self, device):
        super().__init__(device)
        self.reads = 0

    def now(self) -> float:
        self.reads += 1
        return float(self.reads)


def _rollout(**kw):
    return RolloutConfig(prompts_per_step=4, max_new_tokens=4, **kw)


def _grpo(tmp_path, sync):
    from rlhf_fast.trainers.rl import RLTrainer

    pol, tok = make_policy()
    cfg = RLConfig(estimator="grpo", steps=2, output_dir=str(tmp_path / "run"), progress=False,
                   sync_phase_timers=sync, rollout=_rollout(group_size=2),
                   ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8), optim=OptimConfig(lr=1e-3))
    return RLTrainer(cfg, pol, tok, prompts=PROMPTS, reward_fns=[frac_a])


def _online_dpo(tmp_path, sync):
    from rlhf_fast.trainers.online_dpo import OnlineDPOTrainer

    pol, tok = make_policy()
    cfg = RLConfig(estimator="online_dpo", steps=2, output_dir=str(tmp_path / "run"), progress=False,
                   sync_phase_timers=sync, rollout=_rollout(group_size=2),
                   ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8), optim=OptimConfig(lr=1e-3))
    return OnlineDPOTrainer(cfg, pol, tok, prompts=PROMPTS, reward_fns=[frac_a])


def _a2po(tmp_path, sync):
    from rlhf_fast.trainers.a2po import A2POTrainer

    pol, tok = make_policy()
    cfg = RLConfig(estimator="a2po", steps=2, output_dir=str(tmp_path / "run"), progress=False,
                   sync_phase_timers=sync, rollout=_rollout(group_size=1),
                   ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4), optim=OptimConfig(lr=1e-3),
                   a2po=A2POConfig(num_value_samples=2, beta2=0.05, filter_all_incorrect=False))
    return A2POTrainer(cfg, pol, tok, prompts=PROMPTS, reward_fns=[frac_a])


def _distill(tmp_path, sync):
    from rlhf_fast.models.tiny import tiny_causal_lm
    from rlhf_fast.trainers.distill import DistillationTrainer

    pol, tok = make_policy()
    teacher = tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2, seed=7,
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)
    cfg = RLConfig(estimator="distill", steps=2, output_dir=str(tmp_path / "run"), progress=False,
                   sync_phase_timers=sync, rollout=_rollout(group_size=2),
                   ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8), optim=OptimConfig(lr=1e-3),
                   distill=DistillConfig(beta=0.5))
    return DistillationTrainer(cfg, pol, tok, prompts=PROMPTS, teacher_model=teacher)


FAMILIES = {
    "grpo": (_grpo, {"time/generate", "time/logprobs", "time/update", "time/step"}),
    "online_dpo": (_online_dpo, {"time/generate", "time/logprobs", "time/update", "time/step", "step_time"}),
    "a2po": (_a2po, {"time/value_estimation", "time/generate", "time/logprobs", "time/update", "time/step",
                     "step_time"}),
    "distill": (_distill, {"time/generate", "time/update", "time/step", "step_time"}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_phase_timer_reads_the_trainer_clock(tmp_path, family):
    build, expected = FAMILIES[family]
    tr = build(tmp_path, sync=True)
    assert isinstance(tr.phase_clock, PhaseClock) and tr.phase_clock.synchronize is True  # from the config
    assert tr.phase_clock.device == torch.device(tr.device)
    tr.phase_clock = clock = TickClock(tr.device)
    m = tr.step()
    timers = {k: v for k, v in m.items() if k.startswith("time/") or k == "step_time"}
    assert expected <= set(timers), sorted(timers)
    # both ends of every timer came from the trainer's clock: whole ticks, at least one apart
    assert all(float(v).is_integer() and v >= 1 for v in timers.values()), timers
    assert clock.reads >= 2 * len(expected) - 2  # (time/step and time/update share their starts)


def test_the_switch_set_after_construction_makes_a_step_wait(tmp_path, cuda_syncs):
    """A trainer built with the default (off) never waits; ``phase_clock.synchronize = True``
    set afterwards (what the benchmark does) waits at every timer read of a CUDA clock."""
    tr = _grpo(tmp_path, sync=False)
    tr.phase_clock.device = torch.device("cuda")  # the clock's CUDA path on this CPU run
    tr.step()
    assert cuda_syncs == []
    tr.phase_clock.synchronize = True
    tr.step()
    assert len(cuda_syncs) >= 8 and set(cuda_syncs) == {torch.device("cuda")}  # 2 reads per phase timer


# ----------------------------------------------------------------------------- the benchmark


def test_the_benchmark_sets_the_switch_and_leaves_the_modules_alone(monkeypatch):
    import sys
    import time

    from rlhf_fast.benchmarks import e2e

    src = inspect.getsource(e2e)
    assert "_SyncedClock" not in src and "sys.modules" not in src
    trainer_modules = [m for name, m in sys.modules.items() if name.startswith("rlhf_fast.trainers.")]
    before = {m.__name__: getattr(m, "time", None) for m in trainer_modules}

    class FakeTrainer:
        phase_clock = PhaseClock("cpu")

        def step(self):
            # during the timed step no module's ``time`` is swapped
            assert {m.__name__: getattr(m, "time", None) for m in trainer_modules} == before
            assert all(v is None or v is time for v in before.values())
            return {"time/generate": 0.5}

    tr = FakeTrainer()
    m, wall = e2e._timed_step(tr, "cpu")
    assert m == {"time/generate": 0.5} and wall >= 0 and tr.phase_clock.synchronize is True
