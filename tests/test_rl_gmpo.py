"""ppo.policy_loss gmpo (Geometric-Mean Policy Optimization): the loss, its gradient and its
metrics against TRL 1.16's own ``GMPOTrainer._compute_loss`` (trl/experimental/gmpo/gmpo_trainer.py)
called on a stub trainer; the trainer end to end (micro-batching, learning a trivial reward);
the refusals."""

import math
import types
import warnings
from collections import defaultdict

import pytest
import torch

from rlhf_fast.algorithms import policy_losses as pl
from rlhf_fast.trainers.config import load_config
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import KLConfig, PPOConfig, RLConfig, RolloutConfig
from tests.test_rl_learning import PROMPTS, frac_a, make_config, make_policy
from tests.test_rl_loss_variants import B, T, _inputs
from tests.test_rl_loss_variants import _Accel as _LossVariantsAccel

pytestmark = pytest.mark.usefixtures("one_thread")

AGG = "seq-mean-token-mean"


# --------------------------------------------------------------------------- TRL's own code


class _Accel(_LossVariantsAccel):
    """What GMPOTrainer._compute_loss needs of an Accelerator beyond get_high_entropy_mask's, on one process."""

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def _trl_gmpo_loss(logp, ent, old, ref, adv_row, mask, *, eps_low, eps_high, beta, q, steps):
    """(loss, metrics) of TRL's ``GMPOTrainer._compute_loss`` itself, on a stub ``self`` whose
    ``_get_per_token_logps_and_entropies`` returns ``logp`` / ``ent`` (the completion is the
    whole row), with TRL's own ``get_high_entropy_mask``. adv_row ``[B]``."""
    GMPOTrainer = pytest.importorskip("trl.experimental.gmpo").GMPOTrainer
    GRPOTrainer = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer

    def logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, compute_entropy=False, **kw):
        assert logits_to_keep == logp.shape[1] and compute_entropy
        return logp, ent, None

    stub = types.SimpleNamespace(
        epsilon_low=eps_low, epsilon_high=eps_high, beta=beta, top_entropy_quantile=q,
        current_gradient_accumulation_steps=steps, model=types.SimpleNamespace(training=True),
        accelerator=_Accel(), _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    stub._get_per_token_logps_and_entropies = types.MethodType(logps_and_entropies, stub)
    stub.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, stub)
    m = mask.to(logp.dtype)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": m, "advantages": adv_row,
              "old_per_token_logps": old, "ref_per_token_logps": ref}
    loss = GMPOTrainer._compute_loss(stub, None, inputs)
    return loss, {k: v[0] for k, v in stub._metrics["train"].items()}


def _grad(loss, x):
    return torch.autograd.grad(loss, x)[0]


CASES = [
    # (clip_low, clip_high, beta = kl_coef, top_entropy_quantile, accumulation steps)
    (0.4, None, 0.0, 1.0, 1),  # GMPOConfig's defaults
    (0.2, 0.28, 0.1, 1.0, 2),
    (0.1, 0.05, 0.05, 0.4, 1),  # narrow: most tokens clipped on the advantage's side
    (0.4, 0.3, 0.0, 0.0, 3),  # only the highest-entropy token of the batch in the geometric means
]


@pytest.mark.parametrize("clip_low,clip_high,beta,q,steps", CASES)
def test_loss_gradient_and_metrics_are_trls(clip_low, clip_high, beta, q, steps):
    """Ragged masks with holes, a row with no loss token, advantages > 0, < 0 and 0, log-ratios
    on both sides of both bounds; TRL's per-micro-batch mean / accumulation steps is our row sum
    over the mini-batch's rows (normalizer = rows × steps)."""
    logp, old, ref, ent, adv, mask = _inputs()
    logp.requires_grad_(True)
    loss, st = pl.policy_loss_from_logp(logp, ent, old, adv, mask, policy_loss="gmpo", agg=AGG, clip_low=clip_low,
                                        clip_high=clip_high, top_entropy_quantile=q, ref_logp=ref, kl_coef=beta,
                                        kl_kind="k3", normalizer=B * steps)
    adv_row = adv[:, 1].clone()  # TRL's [B] advantages (ours per token, equal along each row)
    adv_row[2] = 0.0  # the row without loss tokens (ours: A = 0 there)
    want, metrics = _trl_gmpo_loss(logp, ent, old, ref, adv_row, mask, eps_low=clip_low,
                                   eps_high=clip_low if clip_high is None else clip_high, beta=beta, q=q, steps=steps)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    g, gw = _grad(loss, logp), _grad(want, logp)
    assert g[mask].abs().sum() > 0 and (g[~mask] == 0).all()
    torch.testing.assert_close(g, gw, rtol=1e-12, atol=1e-12)
    # TRL's metrics under ours: clip_ratio/{region,low,high}_mean = policy/clip_{,low_,high_}frac
    for ours, trl in (("clip_frac", "clip_ratio/region_mean"), ("clip_low_frac", "clip_ratio/low_mean"),
                      ("clip_high_frac", "clip_ratio/high_mean"), ("entropy", "entropy")):
        assert float(st[ours]) == pytest.approx(metrics[trl], rel=1e-12, abs=1e-15), ours
    assert float(st["clip_low_frac"]) > 0 and float(st["clip_high_frac"]) > 0
    if beta:
        assert float(st["kl"]) == pytest.approx(metrics["kl"], rel=1e-12) and float(st["kl"]) > 0
    else:
        assert "kl" not in metrics
    if q < 1:
        assert 0 < float(st["entropy_mask_frac"]) < 1


def test_the_clip_and_the_geometric_mean_matter():
    """Hand-made rows: the one-sided log-space clip and the geometric mean over the kept tokens."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    lr = torch.tensor([[0.6, -0.6, 0.1, 9.0], [0.6, -0.6, 0.1, -0.3]], dtype=torch.float64)
    adv = torch.tensor([[2.0] * 4, [-1.0] * 4], dtype=torch.float64)
    old = torch.zeros_like(lr)
    logp = lr.clone().requires_grad_(True)
    loss, w, low, high = pl.gmpo_sequence_loss(logp, old, adv, mask, clip_low=0.4, clip_high=0.5)
    # A > 0: only the upper side bounded, 0.6 → 0.5; A < 0: only the lower one, −0.6 → −0.4
    torch.testing.assert_close(w, torch.exp(torch.tensor([(0.5 - 0.6 + 0.1) / 3, (0.6 - 0.4 + 0.1 - 0.3) / 4],
                                                         dtype=torch.float64)))
    torch.testing.assert_close(loss, -w * adv[:, 0])
    assert high.tolist() == [[True, False, False, False], [False] * 4]
    assert low.tolist() == [[False] * 4, [False, True, False, False]]
    g = _grad(loss.sum(), logp)
    # the clipped tokens carry no gradient, the others −A·w/n each
    want = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    want = want * (-adv[:, :1] * w[:, None] / mask.sum(1, keepdim=True))
    torch.testing.assert_close(g, want)
    keep = torch.tensor([[False, True, False, False], [False] * 4])
    _, wk, _, _ = pl.gmpo_sequence_loss(logp, old, adv, mask, clip_low=0.4, clip_high=0.5, keep=keep)
    torch.testing.assert_close(wk, torch.exp(torch.tensor([-0.6, 0.0], dtype=torch.float64)))  # no kept token: 1


def test_float32_nan_outside_and_the_clamp():
    """Float32 in, float32 out; NaN at masked-out positions reaches neither the loss nor the
    gradient; a drift of 100 nats (A < 0: unbounded side) gives e^20, not inf."""
    logp, old, ref, ent, adv, mask = _inputs(torch.float32)
    for x in (logp, old, ent, adv, ref):
        x[~mask] = float("nan")
    old[1][mask[1]] = logp[1][mask[1]] - 100.0
    logp.requires_grad_(True)
    loss, st = pl.policy_loss_from_logp(logp, ent, old, adv, mask, policy_loss="gmpo", agg=AGG, clip_low=0.4,
                                        ref_logp=ref, kl_coef=0.1, entropy_coef=0.01)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    g = _grad(loss, logp)
    assert torch.isfinite(g).all() and (g[~mask] == 0).all()
    _, w, _, _ = pl.gmpo_sequence_loss(logp, old, adv, mask, clip_low=0.4)
    assert float(w[1]) == pytest.approx(math.exp(20.0), rel=1e-5) and float(w[2]) == 1.0
    assert all(torch.isfinite(v).all() for k, v in st.items() if k != "logp")


def test_entropy_bonus_on_the_kept_tokens():
    """The entropy bonus is −coef · the row mean of the kept tokens' entropies, averaged over rows
    (agg seq-mean-token-mean); the KL is never masked."""
    logp, old, ref, ent, adv, mask = _inputs()
    ent.requires_grad_(True)
    base, _ = pl.policy_loss_from_logp(logp, ent, old, adv, mask, policy_loss="gmpo", agg=AGG,
                                       top_entropy_quantile=0.5)
    loss, st = pl.policy_loss_from_logp(logp, ent, old, adv, mask, policy_loss="gmpo", agg=AGG,
                                        top_entropy_quantile=0.5, entropy_coef=0.1)
    keep = pl.high_entropy_mask(ent.detach(), mask, 0.5)
    e = torch.where(keep, ent.detach(), torch.zeros_like(ent))
    rows = e.sum(1) / mask.sum(1).clamp(min=1)
    torch.testing.assert_close(loss - base, -0.1 * rows.sum() / B)
    g = _grad(loss, ent)
    assert (g[~keep] == 0).all() and (g[keep] < 0).all()
    assert float(st["entropy_kept"]) == pytest.approx(float(ent.detach()[keep].mean()))


def test_the_function_refuses_what_gmpo_has_not():
    logp, old, _, ent, adv, mask = _inputs()
    call = lambda **kw: pl.policy_loss_from_logp(logp, ent, old, adv, mask, policy_loss="gmpo",
                                                 **{"agg": AGG, **kw})
    with pytest.raises(ValueError, match="gmpo.*needs agg 'seq-mean-token-mean', got 'token-mean'"):
        call(agg="token-mean")
    with pytest.raises(ValueError, match="importance_sampling_level 'sequence' is not supported"):
        call(importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="clips one ratio per answer"):
        call(importance_sampling_level="sequence_sum", agg="seq-mean-token-sum")
    for kw, name in ((dict(dual_clip=3.0), "dual_clip"), (dict(off_policy_mask_threshold=0.1), "off_policy"),
                     (dict(use_bias_correction_kl=True), "use_bias_correction_kl"),
                     (dict(is_weight=torch.ones(B, T)), "is_weight")):
        with pytest.raises(ValueError, match=f"'gmpo' is not supported with {name}"):
            call(**kw)
    with pytest.raises(ValueError, match="'gmpo' has no per-token loss"):
        pl.token_losses(logp, old, adv, policy_loss="gmpo")


# --------------------------------------------------------------------------- the trainer


def n_chars(prompts, completions):
    """A dense reward: groups rarely tie, so advantages (and updates) are non-zero."""
    return [float(len(c)) for c in completions]


def _gmpo(**kw):
    return PPOConfig(policy_loss="gmpo", agg=AGG, clip_low=0.4, **kw)


def _grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def test_trainer_micro_batching_and_the_composed_loss(tmp_path):
    """policy_backward with 8 rows in one micro-batch or in four gives the same loss, gradient and
    statistics (the row normaliser of the mini-batch), and its loss is policy_loss_from_logp's on
    the model's log-probs."""
    from rlhf_fast.models.logprobs import _target_mask, sequence_logprobs

    pol, tok = make_policy()
    cfg = make_config(tmp_path, "grpo", rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5),
                      ppo=_gmpo(mini_batch_size=8, micro_batch_size=8, clip_high=0.05, entropy_coef=0.01,
                                top_entropy_quantile=0.5),
                      kl=KLConfig(coef=0.1, placement="loss"))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS)
    data, _ = tr.rollout()
    assert data.advantages.abs().sum() > 0
    tr.optimizer.zero_grad()  # one step: the current policy differs from old_logp (ratios ≠ 1)
    tr.policy_backward(data)
    tr.optimizer.step()
    out = []
    for mb in (8, 2):
        tr.policy.zero_grad(set_to_none=True)
        out.append((tr.policy_backward(data, mb), _grads(tr.policy)))
    (s1, g1), (s2, g2) = out
    assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-5, abs=1e-7)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(a.abs().sum() > 0 for a in g1)
    for k in ("clip_frac", "clip_low_frac", "clip_high_frac", "entropy_mask_frac", "kl"):
        assert s1[k] == pytest.approx(s2[k], abs=1e-6), k
    assert s1["clip_frac"] > 0 and s1["clip_frac"] == pytest.approx(s1["clip_low_frac"] + s1["clip_high_frac"])
    assert 0 < s1["entropy_mask_frac"] < 1
    with torch.no_grad():
        mask = _target_mask(data.attention_mask, data.response_mask)
        logp, ent = sequence_logprobs(tr.policy, data.input_ids, data.attention_mask, response_mask=mask,
                                      return_entropy=True)
        want, _ = pl.policy_loss_from_logp(logp, ent, data.old_logp, data.advantages, mask, policy_loss="gmpo",
                                           agg=AGG, clip_low=0.4, clip_high=0.05, entropy_mask=data.entropy_mask,
                                           ref_logp=data.ref_logp, kl_coef=0.1, entropy_coef=0.01)
    assert s1["loss"] == pytest.approx(float(want), rel=1e-5)


def test_grpo_with_gmpo_learns(tmp_path):
    """The frac-of-'a' reward of tests/test_rl_learning.py rises under gmpo (KL in the loss)."""
    torch.manual_seed(0)
    pol, tok = make_policy()
    steps = 20
    cfg = make_config(tmp_path, "grpo", steps=steps, ppo=_gmpo(epochs=2, mini_batch_size=8, micro_batch_size=8),
                      kl=KLConfig(coef=0.01, placement="loss"))
    hist = RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS).train()
    r = [h["reward/total"] for h in hist]
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert last > first + 0.3 and last > 0.4, r
    assert all(math.isfinite(h["policy/loss"]) for h in hist)
    assert any(h["policy/clip_frac"] > 0 for h in hist)
    assert {"policy/clip_low_frac", "policy/clip_high_frac", "policy/kl"} <= set(hist[-1])


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw,match", [
    (dict(agg="token-mean"), "ppo.policy_loss 'gmpo' averages one loss per answer.*set ppo.agg "
                               "'seq-mean-token-mean', got 'token-mean'"),
    (dict(agg="seq-mean-token-sum"), "set ppo.agg 'seq-mean-token-mean', got 'seq-mean-token-sum'"),
    (dict(importance_sampling_level="sequence"), "ppo.importance_sampling_level is not supported with ppo.policy"),
    (dict(off_policy_mask_threshold=0.1), "ppo.off_policy_mask_threshold is not supported with ppo.policy_loss"),
    (dict(is_cap=2.0), "ppo.is_cap is not supported with ppo.policy_loss 'gmpo'"),
    (dict(dual_clip=3.0), "ppo.dual_clip is a bound of the 'clip' loss"),
    (dict(trpo=True), "ppo.trpo needs ppo.policy_loss 'clip'"),
    (dict(importance_sampling_level="sequence_sum", agg="seq-mean-token-sum"), "needs ppo.policy_loss 'clip'"),
])
def test_config_errors_name_the_key(kw, match):
    kw = {"policy_loss": "gmpo", "agg": AGG, "clip_low": 0.4, **kw}
    with pytest.raises(ValueError, match=match):
        PPOConfig(**kw)


def test_config_needs_a_group_estimator_and_the_plain_kl(tmp_path):
    with pytest.raises(ValueError, match="ppo.policy_loss 'gmpo' needs one advantage per answer.*got estimator 'gae'"):
        RLConfig(estimator="gae", ppo=_gmpo(), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="kl.use_bias_correction_kl is not supported with ppo.policy_loss 'gmpo'"):
        RLConfig(estimator="grpo", ppo=_gmpo(), kl=KLConfig(placement="loss", use_bias_correction_kl=True),
                 output_dir=str(tmp_path))
    for est in ("grpo", "dr_grpo", "rloo"):
        RLConfig(estimator=est, ppo=_gmpo(), output_dir=str(tmp_path))


def test_ppo_default_clip_warns_and_log_space_bounds_load():
    with pytest.warns(UserWarning, match="log space: 0.2 .* recommends 0.4"):
        PPOConfig(policy_loss="gmpo", agg=AGG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PPOConfig(policy_loss="gmpo", agg=AGG, clip_low=0.2, clip_high=0.28)
        PPOConfig()
        PPOConfig(agg=AGG)
    cfg = load_config(RLConfig, None, ["--ppo.policy_loss", "gmpo", "--ppo.agg", AGG, "--ppo.clip_low", "0.4"])
    assert (cfg.ppo.policy_loss, cfg.ppo.clip_low, cfg.ppo.clip_high) == ("gmpo", 0.4, None)
    assert cfg.ppo.composed_loss and pl.GMPO_CLIP == 0.4
    d = PPOConfig()  # the defaults unchanged
    assert (d.policy_loss, d.clip_low, d.clip_high, d.agg) == ("clip", 0.2, None, "token-mean")
