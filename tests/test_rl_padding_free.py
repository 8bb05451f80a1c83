"""RL ``ppo.padding_free``: every RL forward one packed row without padding.

Against the padded run, on rollouts whose prompts (1 to ~40 tokens, left-padded) and answers (1 to
12 tokens, right-padded) differ widely in length: the rollout's scoring (old log-probs, entropies,
reference log-probs, a ValueModel critic's values; GRPO and PPO) equal, each forward one row exactly
as long as the batch's attended tokens, each sequence its own block; one update (GRPO with the KL in
the loss, PPO with its critic, a composed loss, micro-batches that split prompt groups) equal —
loss, logged metrics, gradients, weights after; whole ``step()``\\ s of PPO and GRPO and of online
DPO, SDPO (distillation weight 0.5 and 1) equal; with ``prefix_sharing`` too it is prefix_sharing's
run; refusals named. Two gloo ranks (DDP, FSDP2): tests/test_rl_prefix_sharing_distributed.py."""

import pytest
import torch

from rlhf_fast.models import llama_forward
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import KLConfig, PPOConfig, RLConfig, RolloutConfig
from tests.test_rl_learning import make_config, make_policy
from tests.test_rl_prefix_sharing import _close, _grads, _reward, _same_metrics

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

# prompts of 1 to ~40 tokens with the 48-token tokenizer of make_policy
PROMPTS = ["x", "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9 a b c",
           "q: a b", "0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7", "z", "x y z w v u t s r q p o n m l k"]


def _trainer(tmp_path, pf, estimator="grpo", group_size=4, prompts_per_step=3, mini=None, micro=None,
             ppo=None, shared=False, **kw):
    pol, tok = make_policy()
    batch = group_size * prompts_per_step
    ppo = dict(epochs=2, mini_batch_size=mini or batch, micro_batch_size=micro or batch, **(ppo or {}))
    kw.setdefault("kl", KLConfig(coef=0.05, placement="loss"))
    cfg = make_config(tmp_path, estimator, steps=2,
                      rollout=RolloutConfig(prompts_per_step=prompts_per_step, group_size=group_size,
                                            max_new_tokens=12, stop_strings=["a", "1", "x"]),
                      ppo=PPOConfig(padding_free=pf, prefix_sharing=shared, **ppo), **kw)
    return RLTrainer(cfg, pol, tok, reward_fns=[_reward], prompts=PROMPTS)


def _pair(tmp_path, **kw):
    return _trainer(tmp_path / "padded", False, **kw), _trainer(tmp_path / "packed", True, **kw)


def _same_weights(a, b):
    """Weights after Adam steps (lr = 5e-3) equal to within 0.5% of one step: float rounding of a
    gradient near 0 moves Adam's normalised step there, so a relative bound is too tight."""
    for p, q in zip(a.parameters(), b.parameters()):
        assert float((q.detach() - p.detach()).abs().max()) <= 5e-3 * 5e-3


def _spy(monkeypatch):
    """Records (row shape, segments) of every llama_forward forward."""
    seen = []
    real = llama_forward.hidden_states
    monkeypatch.setattr(llama_forward, "hidden_states",
                        lambda base, ids, *r, **k: seen.append((tuple(ids.shape), k.get("segments"))) or
                        real(base, ids, *r, **k))
    return seen


def _one_row_per_sequence(shape, seg, am):
    """The forward is one row of exactly the attended tokens of ``am`` ``[b, T]``, each row its own
    causal block (no prompt shared, no padding)."""
    assert seg is not None and shape == (1, int(am.sum()))
    assert [(p, b) for p, b in seg.groups] == [(int(n), (0,)) for n in am.sum(1)]


@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_rollout_scoring_equals_the_padded_in_one_unpadded_row(tmp_path, monkeypatch, estimator):
    a, b = _pair(tmp_path, estimator=estimator, group_size=2 if estimator == "gae" else 4,
                 ppo=dict(top_entropy_quantile=0.5) if estimator == "grpo" else None)
    assert b._critic_shared == (estimator == "gae") and not a._critic_shared
    da, ma = a.rollout()
    seen = _spy(monkeypatch)
    db, mb = b.rollout()
    am = da.attention_mask
    prompt_len, ans_len = (am & ~da.response_mask).sum(1), da.response_mask.sum(1)
    # the batch the test is about: lengths that differ widely, so the padded row is mostly padding
    assert int(prompt_len.max()) >= 5 * int(prompt_len.min()) and int(ans_len.max()) >= 3 * int(ans_len.min())
    assert int(am.sum()) < 0.7 * am.numel()
    for k in ("input_ids", "attention_mask", "response_mask", "entropy_mask", "group"):
        assert (getattr(da, k) is None and getattr(db, k) is None) or torch.equal(getattr(da, k), getattr(db, k)), k
    for k in ("old_logp", "ref_logp", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(db, k), getattr(da, k), rtol=1e-5, atol=1e-5, msg=k)
    assert float(db.ref_logp.abs().sum()) > 0 and (estimator != "gae" or float(db.values.abs().sum()) > 0)
    _same_metrics(ma, mb)
    # the policy's, the reference's (and the critic's) forward: each one unpadded row
    assert len(seen) == (3 if estimator == "gae" else 2)
    for shape, seg in seen:
        _one_row_per_sequence(shape, seg, am)


def _one_update(a, b, da, db, monkeypatch):
    """The whole batch's policy gradient, micro-batched, then one update of each trainer on its
    batch (the same row shuffle): compared; every forward of ``b`` unpadded."""
    for tr, d in ((a, da), (b, db)):
        tr.policy.zero_grad(set_to_none=True)
        tr.policy_backward(d)
    for p, q in zip(_grads(a.policy), _grads(b.policy)):
        _close(q, p)
    assert any(float(p.abs().sum()) > 0 for p in _grads(a.policy))
    for tr in (a, b):
        tr.policy.zero_grad(set_to_none=True)
    ua = a.update(da)
    seen = _spy(monkeypatch)
    ub = b.update(db)
    assert seen and all(seg is not None and all(br == (0,) for _, br in seg.groups) for _, seg in seen)
    _same_metrics(ua, ub, rel=2e-5)
    _same_weights(a.policy, b.policy)
    if a.critic is not None:
        assert "value/loss" in ua
        _same_weights(a.critic, b.critic)
    return ua, ub


@pytest.mark.parametrize("estimator,kw", [
    # micro-batches of 5 and 3 rows: prompt groups split across them (prefix_sharing refuses this)
    ("grpo", dict(group_size=4, prompts_per_step=3, mini=6, micro=3)),
    ("gae", dict(group_size=2, prompts_per_step=3, mini=6, micro=3, ppo=dict(whiten_advantages=True))),
    ("grpo", dict(mini=12, micro=4, ppo=dict(policy_loss="cispo", clip_high=5.0, top_entropy_quantile=0.6))),
])
def test_one_update_equals_the_padded(tmp_path, monkeypatch, estimator, kw):
    a, b = _pair(tmp_path, estimator=estimator, **kw)
    (da, _), (db, _) = a.rollout(), b.rollout()
    assert b._shuffle_units(db) is None  # single rows, as the padded run
    ua, _ = _one_update(a, b, da, db, monkeypatch)
    assert ua["policy/updates"] == 2 * (da.input_ids.shape[0] // a.config.ppo.mini_batch_size)


@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_full_steps_equal_the_padded(tmp_path, estimator):
    """Two whole steps (rollout, scoring, advantages, update) of GRPO and of PPO with its critic:
    the same metrics and the same weights after (to float rounding)."""
    kw = dict(estimator=estimator, group_size=4 if estimator == "grpo" else 2, mini=6, micro=3)
    a, b = _pair(tmp_path, **kw)
    for _ in range(2):
        ma, mb = a.step(), b.step()
        _same_metrics(ma, mb, rel=1e-4)
    for x, y in ((a.policy, b.policy), (a.critic, b.critic)):
        if x is not None:
            _same_weights(x, y)


def test_with_prefix_sharing_it_is_prefix_sharings_run(tmp_path, monkeypatch):
    """Both keys: prefix_sharing's shared rows (each prompt once per group), its group shuffle."""
    kw = dict(group_size=4, prompts_per_step=2, mini=8, micro=4)
    a = _trainer(tmp_path / "shared", False, shared=True, **kw)
    b = _trainer(tmp_path / "both", True, shared=True, **kw)
    da, _ = a.rollout()
    seen = _spy(monkeypatch)
    db, _ = b.rollout()
    assert all(any(br != (0,) for _, br in seg.groups) for _, seg in seen)  # shared, not one row per answer
    assert b._shuffle_units(db) == a._shuffle_units(da) == [4, 4]
    for k in ("old_logp", "ref_logp"):
        assert torch.equal(getattr(da, k), getattr(db, k)), k
    ua, ub = a.update(da), b.update(db)
    _same_metrics(ua, ub, rel=0)


def test_online_dpo_equals_the_padded(tmp_path, monkeypatch):
    from tests.test_rl_prefix_sharing import online_dpo_trainer

    a, b = (online_dpo_trainer(tmp_path / str(on), PROMPTS, 10, padding_free=on) for on in (False, True))
    ma = a.step()
    seen = _spy(monkeypatch)
    mb = b.step()
    assert seen and all(seg is not None and all(br == (0,) for _, br in seg.groups) for _, seg in seen)
    _same_metrics(ma, mb, rel=2e-5)
    _same_weights(a.policy, b.policy)


def test_refusals_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"ppo.padding_free must be true or false"):
        PPOConfig(padding_free=1)
    # no constraint on the batch sizes (prefix_sharing's multiples of group_size)
    RLConfig(estimator="grpo", rollout=RolloutConfig(prompts_per_step=3, group_size=4),
             ppo=PPOConfig(mini_batch_size=6, micro_batch_size=3, padding_free=True))
    RLConfig(estimator="distill", ppo=PPOConfig(padding_free=True))  # (distillation takes it: test below)
    for compile_kw in (dict(torch_compile=True), dict(torch_compile_backend="eager")):
        with pytest.raises(ValueError, match=r"torch_compile: true cannot run with ppo.padding_free"):
            RLConfig(estimator="grpo", ppo=PPOConfig(padding_free=True), **compile_kw)
    for est, name in (("a2po", r"A\*-PO"), ("sdft", "SDFT")):  # (as prefix_sharing: their steps read neither key)
        with pytest.raises(ValueError, match=rf"^ppo.padding_free: no effect in {name}"):
            RLConfig(estimator=est, rollout=RolloutConfig(group_size=1), ppo=PPOConfig(padding_free=True))


@pytest.mark.parametrize("weight", [0.5, 1.0])
def test_sdpo_step_equals_the_padded(tmp_path, monkeypatch, weight):
    """SDPO: the policy-gradient part's forwards (and the scoring's) packed, the self-distillation
    term padded as under prefix_sharing; one step's metrics and weights equal the padded step's;
    ``sdpo.distillation_weight`` 1 (no policy-gradient loss) takes the key too."""
    import warnings

    from rlhf_fast.trainers.rl_config import OptimConfig, SDPOConfig
    from rlhf_fast.trainers.sdpo import SDPOTrainer
    from tests.test_sdpo import starts_digit

    def one(pf):
        pol, tok = make_policy()
        cfg = RLConfig(estimator="sdpo", steps=1, output_dir=str(tmp_path / str(pf)), progress=False,
                       rollout=RolloutConfig(prompts_per_step=3, group_size=4, max_new_tokens=10,
                                             stop_strings=["a", "1", "x"]),
                       ppo=PPOConfig(epochs=1, mini_batch_size=12, micro_batch_size=6, padding_free=pf),
                       optim=OptimConfig(lr=1e-2), kl=KLConfig(coef=0.0),
                       sdpo=SDPOConfig(success_reward_threshold=1.0, distillation_weight=weight))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return SDPOTrainer(cfg, pol, tok, prompts=PROMPTS, reward_fns=[starts_digit])

    a, b = one(False), one(True)
    ma = a.step()
    seen = _spy(monkeypatch)
    mb = b.step()
    assert any(seg is not None for _, seg in seen)
    _same_metrics(ma, mb, rel=2e-5)
    assert any(k.startswith("self_distillation/") and v for k, v in mb.items())  # the term was active
    for p, q in zip(a.policy.parameters(), b.policy.parameters()):
        assert float((q.detach() - p.detach()).abs().max()) <= 1e-2 * 5e-3  # well under one Adam step (lr 1e-2)


def test_a_distillation_step_equals_the_padded(tmp_path, monkeypatch):
    """Estimator distill takes ppo.padding_free: the student's and the teacher's forwards packed,
    one on-policy step (loss, metrics, weights) equal to the padded run's; the teacher must be a
    model the packed path runs, and GOLD's cross-tokenizer teacher refuses it, naming the key."""
    from rlhf_fast.trainers.distill import DistillationTrainer
    from rlhf_fast.trainers.rl_config import DistillConfig
    from tests.test_distill import make_config, make_teacher
    from tests.test_rl_learning import PROMPTS, make_policy

    import rlhf_fast.trainers.distill as D

    groups, real = [], D.distillation_loss

    def spy(*a, **kw):  # the update's loss: packed rows (each row its own group) only with the key
        groups.append(kw.get("prefix_groups"))
        return real(*a, **kw)

    monkeypatch.setattr(D, "distillation_loss", spy)
    runs = []
    for packed in (False, True):
        groups.clear()
        pol, tok = make_policy()
        cfg = make_config(tmp_path / str(packed), 0.5, distill=DistillConfig(beta=0.5),
                          rollout=RolloutConfig(prompts_per_step=3, group_size=2, max_new_tokens=6, temperature=0.9),
                          ppo=PPOConfig(epochs=2, mini_batch_size=3, micro_batch_size=3, padding_free=packed))
        t = DistillationTrainer(cfg, pol, tok, prompts=PROMPTS, teacher_model=make_teacher(tok))
        runs.append((t, t.step()))
        assert groups and all((g is not None) == packed for g in groups)
        assert all(g.shape[1] == 1 for g in groups if g is not None)  # each row its own group
    (a, ma), (b, mb) = runs
    keys = {k for k in ma if not k.startswith(("time/", "step_time", "tokens_per_s"))}
    assert ma["loss"] > 0.05
    for k in sorted(keys):
        assert mb[k] == pytest.approx(ma[k], rel=2e-5, abs=1e-7), k
    for p, q in zip(a.policy.parameters(), b.policy.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)
