"""Second review pass of ``rlhf-fast ppo`` (estimator ``gae``, PPO with a critic): the critic's
metrics, construction and value targets on awkward rollouts (one-token answers, every answer cut
at ``rollout.max_new_tokens``). The first pass (TRL / OpenRLHF parity of the rewards, GAE, the
whitening and the losses) is tests/test_review_ppo_parity.py."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def _const(value):
    def reward(prompts, completions):
        return [value] * len(completions)

    reward.__name__ = "const"
    return reward


def test_explained_variance_of_constant_returns_is_zero(tmp_path):
    """One-token answers that all score 1.0 (no KL at the first step): every return is 1.0 (the
    score; returns = advantages + values), so the returns have no variance and the explained
    variance is the undefined case, logged 0 (as for returns that are exactly equal). It was
    1 − var(err) / var(ret) with var(ret) the float32 rounding noise of adv + values: ~ −9e11.
    The distributed path (``_global_rollout_metrics``) takes the same rule (tests/test_distributed_trainers.py
    compares its metrics with one process's)."""
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import KLConfig, PPOConfig, RolloutConfig
    from tests.test_rl_learning import make_config, make_policy

    torch.manual_seed(0)
    pol, tok = make_policy()
    cfg = make_config(tmp_path, "gae", steps=1, kl=KLConfig(coef=0.0),
                      rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=1),
                      ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[_const(1.0)], prompts=["a:", "bb bb b:", "c:", "ddd d d d:"])
    data, m = tr.rollout()
    rm = data.response_mask
    torch.testing.assert_close(data.returns[rm], torch.ones(int(rm.sum())))  # constant, up to rounding
    assert float(data.values[rm].abs().max()) > 0  # the critic's values are not 0: rounding in adv + values
    assert math.isfinite(m["value/explained_variance"])
    assert m["value/explained_variance"] == 0.0


def test_critic_argument_takes_trls_value_model(tmp_path):
    """TRL 0.x PPOTrainer's ``value_model`` argument is an AutoModelForSequenceClassification
    (num_labels=1): its score head on every token's hidden state is the value. Passed as
    ``RLTrainer(critic=...)`` it was called as a ValueModel and the first rollout died on
    ``'SequenceClassifierOutputWithPast' object has no attribute 'float'``; it now becomes the
    critic as a ``model.critic`` reward-model folder does: V(s_t) = score(h_{t-1})."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import PPOConfig, RolloutConfig
    from tests.test_rl_learning import frac_a, make_config, make_policy

    torch.manual_seed(0)
    pol, tok = make_policy()
    c = LlamaConfig(vocab_size=pol.config.vocab_size, hidden_size=16, intermediate_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    value_model = LlamaForSequenceClassification(c).eval()
    with torch.no_grad():
        value_model.score.weight.normal_()
    cfg = make_config(tmp_path, "gae", steps=1,
                      rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=3),
                      ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=["a:", "bb b:"], critic=value_model)
    data, _ = tr.rollout()
    with torch.no_grad():
        am = data.attention_mask.long()
        pos = (am.cumsum(1) - am).clamp(min=0)
        h = value_model.model(input_ids=data.input_ids, attention_mask=am, position_ids=pos).last_hidden_state
        full = value_model.score(h).squeeze(-1)
    rm = data.response_mask
    want = torch.cat([torch.zeros_like(full[:, :1]), full[:, :-1]], 1)  # TRL: full_value[:, P - 1 : -1]
    torch.testing.assert_close(data.values[rm], want[rm], rtol=1e-4, atol=1e-5)
    tr.update(data)  # and it trains
    # any other output: an error naming the critic and what it must return, not a torch.cat shape error
    from rlhf_fast.trainers.rl import critic_values

    ids, am = data.input_ids, data.attention_mask
    with pytest.raises(ValueError, match=r"critic must return .*\[B, L\] = \[8, \d+\].*got \(8, \d+, 1\)"):
        critic_values(lambda i, a: torch.zeros(*i.shape, 1), ids, am)


def _checkpointed(model) -> bool:
    """transformers 5's is_activation_checkpointing (is_gradient_checkpointing before)."""
    flag = getattr(type(model), "is_activation_checkpointing", None)
    return bool(model.is_activation_checkpointing if flag is not None else model.is_gradient_checkpointing)


def test_gradient_checkpointing_reaches_a_critic_loaded_from_a_folder(tmp_path):
    """``model.gradient_checkpointing: true`` is for memory; the TRL-style run (docs/from_trl.md's
    PPO example) loads its critic from the reward-model folder (``model.critic``), a model as big
    as the policy. That critic trained without checkpointing (only a critic copied from the
    policy inherited it); now both are checkpointed, and the values are unchanged."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhf_fast.trainers.rl import RLTrainer, _make_critic, critic_values
    from rlhf_fast.trainers.rl_config import ModelConfig, RolloutConfig
    from tests.test_rl_learning import frac_a, make_config, make_policy

    pol, tok = make_policy()
    c = LlamaConfig(vocab_size=pol.config.vocab_size, hidden_size=16, intermediate_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(c).save_pretrained(str(tmp_path / "rm"))
    cfg = make_config(tmp_path, "gae", steps=1, model=ModelConfig(critic=str(tmp_path / "rm"),
                                                                  gradient_checkpointing=True),
                      rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=2))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=["a:", "b:"])
    assert _checkpointed(tr.policy)
    assert _checkpointed(tr.critic.backbone)
    data, _ = tr.rollout()
    plain = _make_critic(None, str(tmp_path / "rm"))  # the same folder, not checkpointed
    assert not _checkpointed(plain.backbone)
    with torch.no_grad():
        want = critic_values(plain, data.input_ids, data.attention_mask) * data.response_mask
    torch.testing.assert_close(data.values, want)
    assert math.isfinite(tr.update(data)["value/loss"])  # the checkpointed critic trains
