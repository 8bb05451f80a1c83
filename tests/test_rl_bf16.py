"""RL ``bf16`` (TRL's): bf16 autocast around the scoring forwards (old / reference log-probs,
critic values) and the update's forwards (policy loss, value loss), not generation; on CUDA
only, so on the CPU it changes nothing, bit for bit. The CUDA path is exercised here by letting
the autocast apply to the CPU (as the FSDP2 bf16 test does): every forward runs under it, the
run trains with finite metrics close to fp32's, and weights stay fp32."""

import contextlib

import pytest
import torch

import rlhf_fast.models.logprobs as logprobs
import rlhf_fast.trainers.rl as rl
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import RLConfig, RolloutConfig
from tests.test_rl_learning import PROMPTS, make_config, make_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def n_chars(prompts, completions):
    """A dense reward: groups rarely tie, so advantages and losses are not zero."""
    return [float(len(c)) for c in completions]


def _untimed(metrics):
    return [{k: v for k, v in m.items() if not k.startswith("time/") and k != "tokens_per_second"} for m in metrics]


def _run(tmp_path, estimator, bf16, name):
    torch.manual_seed(0)
    pol, tok = make_policy()
    cfg = make_config(tmp_path / name, estimator, steps=2, bf16=bf16,
                      rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS)
    return tr, tr.train()


@pytest.fixture
def autocast_spy(monkeypatch):
    """Records, per forward entry point, whether CPU autocast was on when it ran."""
    seen = []

    def spy(name, fn):
        def wrapped(*a, **k):
            seen.append((name, torch.is_autocast_enabled("cpu")))
            return fn(*a, **k)
        return wrapped

    for name in ("sequence_logprobs", "policy_loss"):
        monkeypatch.setattr(logprobs, name, spy(name, getattr(logprobs, name)))
    monkeypatch.setattr(rl, "critic_values", spy("critic_values", rl.critic_values))
    return seen


def _cpu_autocast(device, bf16):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_bf16_on_the_cpu_changes_nothing(tmp_path, estimator, autocast_spy):
    a, ma = _run(tmp_path, estimator, False, "fp32")
    b, mb = _run(tmp_path, estimator, True, "bf16")
    assert not any(on for _, on in autocast_spy)
    assert _untimed(ma) == _untimed(mb)
    for x, y in zip(a.policy.parameters(), b.policy.parameters()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_bf16_autocasts_every_scoring_and_update_forward(tmp_path, estimator, autocast_spy, monkeypatch):
    monkeypatch.setattr(rl, "autocast_context", _cpu_autocast)
    ref, m32 = _run(tmp_path, estimator, False, "fp32")
    assert autocast_spy and not any(on for _, on in autocast_spy)
    autocast_spy.clear()
    tr, m16 = _run(tmp_path, estimator, True, "bf16")
    names = {n for n, _ in autocast_spy}
    assert {"sequence_logprobs", "policy_loss"} <= names and ("critic_values" in names) == (estimator == "gae")
    assert all(on for _, on in autocast_spy), autocast_spy
    assert all(p.dtype == torch.float32 for p in tr.policy.parameters())
    keys = ["policy/loss", "policy/kl", "entropy"] + (["value/loss"] if estimator == "gae" else [])
    for m in m16:
        assert all(torch.isfinite(torch.tensor(m[k])) for k in keys), m
    # the same answers (generation is not autocast), scored and trained under bf16 autocast:
    # close to fp32's numbers
    assert m16[0]["reward/total"] == m32[0]["reward/total"] and m16[0]["reward/std"] > 0
    for k in keys:
        assert m16[0][k] == pytest.approx(m32[0][k], rel=0.05, abs=0.02), k
    # (the fused LM head computes in its inputs' dtypes under autocast, as the Triton kernel and
    # fused_linear_divergence: fp32 weights and hidden states give fp32 logits, so the CPU
    # numbers may equal fp32's; the autocast regions are checked above)


def test_bf16_must_be_a_bool():
    with pytest.raises(ValueError, match="bf16 must be true or false"):
        RLConfig(bf16="yes")
