"""Rollout-phase options of the RL trainer.

``ppo.old_logp``: the rollout's policy log-probs recomputed by a forward pass or taken from
the sampler. With plain temperature sampling both give the same update up to float rounding,
and ``behaviour`` skips the forward. ``distributed.offload_reference``: the frozen reference
lives on the CPU and visits the device only for its log-prob pass."""

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
        # (Adam's normalised step turns a near-zero gradient's rounding into a share of lr: 2.3e-5
        # on an AMD EPYC; a wrong update moves weights by ~lr)
        torch.testing.assert_close(pb, pa, atol=1e-4, rtol=1e-4)
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


# --------------------------------------------------------------------------- distributed.offload_reference


def _offload_trainer(tmp_path, device="cpu", offload=True):
    from rlhf_fast.distributed import DistributedConfig

    pol, tok = make_policy()
    cfg = make_config(tmp_path / f"off{offload}", "grpo", steps=1, device=device,
                      rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=4),
                      ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4),
                      distributed=DistributedConfig(offload_reference=offload))
    return RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS)


def test_offload_reference_moves_it_only_around_its_pass(tmp_path):
    tr = _offload_trainer(tmp_path)
    assert all(p.device.type == "cpu" for p in tr.reference.parameters())
    moves = []

    class Spy(torch.nn.Module):
        def to(self, *args, **kw):
            moves.append(torch.device(args[0]).type)
            return self

    tr.reference, tr.device = Spy(), torch.device("cuda")  # the context manager's logic only
    with tr._reference_on_device():
        assert moves == ["cuda"]
    assert moves == ["cuda", "cpu"]
    with pytest.raises(RuntimeError), tr._reference_on_device():  # back to the CPU on errors too
        raise RuntimeError("boom")
    assert moves[-1] == "cpu"
    tr.config.distributed.offload_reference = False
    with tr._reference_on_device():
        pass
    assert len(moves) == 4


def test_offload_reference_refuses_a_shared_weights_reference(tmp_path):
    from rlhf_fast.distributed import DistributedConfig

    pol, tok = make_policy()
    cfg = make_config(tmp_path, "grpo", steps=1, distributed=DistributedConfig(offload_reference=True))

    class SharedRef:  # what a peft policy's adapter-disabled reference is: not a module of its own
        pass

    with pytest.raises(ValueError, match="offload_reference"):
        RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS, reference=SharedRef())


@pytest.mark.cuda
def test_offload_reference_on_gpu_gives_the_same_step(tmp_path):
    a = _offload_trainer(tmp_path / "a", device="cuda", offload=False)
    b = _offload_trainer(tmp_path / "b", device="cuda", offload=True)
    ma, mb = a.step(), b.step()
    assert all(p.device.type == "cpu" for p in b.reference.parameters())
    for k in ("kl/seq", "policy/loss"):
        assert mb[k] == pytest.approx(ma[k], rel=1e-5, abs=1e-6), k


# --------------------------------------------------------------------------- sampling penalties


def test_rollout_penalties_reach_the_sampler(tmp_path):
    """rollout.min_new_tokens / no_repeat_ngram_size reach the sampler: they shape every response."""
    pol, tok = make_policy()
    ro = RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=6, temperature=1.5,
                       min_new_tokens=4, no_repeat_ngram_size=1, repetition_penalty=1.3)
    cfg = make_config(tmp_path / "pen", "grpo", steps=1, rollout=ro, kl=KLConfig(coef=0.0))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS)
    data, _ = tr.rollout()
    eos = tok.eos_token_id
    for ids, mask in zip(data.input_ids, data.response_mask.bool()):
        resp = ids[mask].tolist()
        assert len(resp) >= 4 and eos not in resp[:4]      # min_new_tokens
        assert len(set(resp)) == len(resp)                  # no token twice (1-gram ban)


def test_rollout_penalty_config_errors():
    with pytest.raises(ValueError, match="rollout.repetition_penalty"):
        RolloutConfig(repetition_penalty=0.0)
    with pytest.raises(ValueError, match="rollout.min_new_tokens"):
        RolloutConfig(min_new_tokens=-1)
    with pytest.raises(ValueError, match="ppo.old_logp 'behaviour' needs no sampling penalties"):
        RLConfig(rollout=RolloutConfig(presence_penalty=0.5), ppo=PPOConfig(old_logp="behaviour"))
