"""ppo.policy_loss cispo / sapo, ppo.top_entropy_quantile and ppo.off_policy_mask_threshold:
the loss and its gradient against a transcription of TRL 1.16's GRPOTrainer._compute_loss (and
TRL's own mask helpers), clip unchanged, micro-batching independence in the trainer, short
runs that train and resume exactly, and the config checks."""

import json
import os

import pytest
import torch

from rlhf_fast.algorithms import policy_losses as pl
from rlhf_fast.ops import reference
from rlhf_fast.trainers.config import load_config
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import KLConfig, PPOConfig, RLConfig, RolloutConfig
from tests.test_rl_learning import PROMPTS, frac_a, make_config, make_policy

pytestmark = pytest.mark.usefixtures("one_thread")

B, T = 5, 7


def _inputs(dtype=torch.float64, seed=0, per_row_adv=True):
    """Awkward [B, T] inputs: holes in the mask, a row with no loss token (row 2), ratios
    spread over both sides of the clip and of ε_max, advantages of both signs and 0, entropy
    ties, large finite garbage (not read) at masked-out positions."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = False
    mask[2] = False
    mask[0, 1:] = True
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.6
    old[0, 1] = logp[0, 1] - 2.0  # ratio e² > ε_max = 5 in the cispo cases
    old[1] += 0.4  # row 1 (A < 0) drifted: the off-policy mask drops it
    old[3] += 0.4  # row 3 (A = 0) drifted too: kept (only A < 0 is dropped)
    ref = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    # float32-exact entropies (TRL takes the quantile in float32), two of them tied
    ent = (torch.rand(B, T, generator=g) * 4).double()
    ent[1, 2] = ent[0, 3] = ent[0, 2] = 2.0
    ent[0, 4] = 4.5  # the highest, in a row with A ≠ 0: ρ = 0 keeps it alone
    if per_row_adv:
        adv = torch.tensor([1.3, -0.7, 0.4, 0.0, -1.1], dtype=torch.float64)[:, None].expand(B, T).clone()
    else:
        adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    out = [logp, old, ref, ent, adv]
    for x in out:
        x[~mask] = 1e3  # finite, so that TRL's multiply-by-mask also ignores them
    return [x.to(dtype) for x in out] + [mask]


# --------------------------------------------------------------------------- TRL transcription


def trl_loss(loss_type, logp, old, adv, mask, *, eps_low=0.2, eps_high=0.28, tau_pos=1.0, tau_neg=1.05,
             level="token", beta=0.0, ref=None, entropy_mask=None, off_policy=None):
    """TRL 1.16 trl/trainer/grpo_trainer.py GRPOTrainer._compute_loss, lines 3085-3172: the
    importance weights (3085-3097), the KL with use_bias_correction_kl=False (3100-3107),
    cispo / clip ("dapo") / sapo per-token losses (3109-3124), the off-policy and entropy masks
    (3140-3144), the KL term (3149-3150) and the aggregation: "grpo"/"sapo" rows' token means
    (3153-3157), "cispo"/"dapo" the sum over the global token count (3168-3172; one process,
    one accumulation step, num_items_in_batch = mask.sum()). adv ``[B, 1]``."""
    mask = mask.to(logp.dtype)
    log_ratio = logp - old
    if level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)
    if beta != 0.0:
        per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
    if loss_type == "cispo":
        clamped = torch.clamp(coef_1, max=eps_high).detach()
        per_token_loss = -clamped * adv * logp
    elif loss_type in ("grpo", "dapo"):
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    elif loss_type == "sapo":
        temperatures = torch.where(adv > 0, tau_pos, tau_neg)
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        per_token_loss = -soft_coef_1 * adv
    if off_policy is not None:
        per_token_loss = per_token_loss * off_policy
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type in ("grpo", "sapo"):
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


class _Accel:
    """What get_high_entropy_mask needs of an Accelerator, on one process."""

    @staticmethod
    def pad_across_processes(x, dim=0, pad_index=0):
        return x

    @staticmethod
    def gather(x):
        return x


def _trl():
    return pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer


def _grad(loss, x):
    return torch.autograd.grad(loss, x)[0]


CASES = [
    # (our policy_loss, agg, TRL loss_type, extra options)
    ("cispo", "token-mean", "cispo", dict(clip_high=5.0)),
    ("cispo", "token-mean", "cispo", dict(clip_high=5.0, top_entropy_quantile=0.4, off_policy_mask_threshold=0.05,
                                          kl_coef=0.1)),
    ("sapo", "seq-mean-token-mean", "sapo", {}),
    ("sapo", "seq-mean-token-mean", "sapo", dict(sapo_temperature_pos=0.7, sapo_temperature_neg=2.0,
                                                 top_entropy_quantile=0.2, off_policy_mask_threshold=0.0)),
    ("sapo", "seq-mean-token-mean", "sapo", dict(importance_sampling_level="sequence", kl_coef=0.05)),
    ("clip", "token-mean", "dapo", dict(clip_high=0.28, top_entropy_quantile=0.5, off_policy_mask_threshold=0.1)),
    ("clip", "seq-mean-token-mean", "grpo", dict(clip_high=0.28, importance_sampling_level="sequence",
                                                 off_policy_mask_threshold=0.1)),
]


@pytest.mark.parametrize("ours,agg,trl_type,opts", CASES)
def test_loss_and_gradient_match_trl(ours, agg, trl_type, opts):
    GRPOTrainer = _trl()
    logp, old, ref, ent, adv, mask = _inputs()
    logp.requires_grad_(True)
    kl_coef = opts.pop("kl_coef", 0.0)
    loss, st = pl.policy_loss_from_logp(logp, ent, old, adv, mask, policy_loss=ours, agg=agg, ref_logp=ref,
                                        kl_coef=kl_coef, kl_kind="k3", **opts)
    stub = type("Stub", (), {"accelerator": _Accel()})()
    q = opts.get("top_entropy_quantile", 1.0)
    emask = GRPOTrainer.get_high_entropy_mask(stub, ent, mask, 1 - q) if q < 1 else None
    thr = opts.get("off_policy_mask_threshold")
    adv_row = adv[:, 1:2].clone()  # TRL's [B, 1] advantages (ours are per token, equal along each row)
    adv_row[2] = 0.0
    opm = (GRPOTrainer.get_off_policy_mask(adv_row, logp, old, mask.double(), thr) if thr is not None else None)
    want = trl_loss(trl_type, logp, old, adv_row, mask, eps_high=opts.get("clip_high") or 0.2,
                    tau_pos=opts.get("sapo_temperature_pos", 1.0), tau_neg=opts.get("sapo_temperature_neg", 1.05),
                    level=opts.get("importance_sampling_level", "token"), beta=kl_coef, ref=ref,
                    entropy_mask=emask, off_policy=opm)
    assert loss.dtype == torch.float64
    # TRL's torch.where(adv > 0, τ_pos, τ_neg) makes float32 temperatures: sapo agrees to float32's
    # precision; everything else to float64's
    tol = dict(rtol=1e-6, atol=1e-9) if ours == "sapo" else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, want, **tol)
    g, gw = _grad(loss, logp), _grad(want, logp)
    assert g[mask].abs().sum() > 0
    torch.testing.assert_close(g, gw, **tol)
    if emask is not None:
        assert st["entropy_mask_frac"] == pytest.approx(float(emask[mask].double().mean()))
        assert 0 < float(st["entropy_mask_frac"]) < 1
    if opm is not None:
        dropped = float((1 - opm.expand(B, T))[mask].mean())
        assert st["off_policy_mask_frac"] == pytest.approx(dropped)
        assert dropped > 0


@pytest.mark.parametrize("ours,trl_type", [("clip", "grpo"), ("sapo", "sapo")])
def test_sequence_level_with_the_entropy_mask(ours, trl_type):
    """GSPO with the high-entropy mask: TRL's loss value, but only the kept tokens carry the
    gradient, each its own log-prob's times the row's ratio term (GSPO-token, Zheng et al.
    eq. 13 / verl's gspo loss). TRL differentiates the row's ratio through every token's
    log-prob, so a masked token still gets a gradient there and the mask only rescales rows."""
    GRPOTrainer = _trl()
    logp, old, ref, ent, adv, mask = _inputs()
    logp.requires_grad_(True)
    kw = dict(clip_high=0.28) if ours == "clip" else {}
    loss, _ = pl.policy_loss_from_logp(logp, ent, old, adv, mask, policy_loss=ours, agg="seq-mean-token-mean",
                                       importance_sampling_level="sequence", top_entropy_quantile=0.6, **kw)
    stub = type("Stub", (), {"accelerator": _Accel()})()
    emask = GRPOTrainer.get_high_entropy_mask(stub, ent, mask, 0.4)
    adv_row = adv[:, 1:2].clone()
    adv_row[2] = 0.0
    want = trl_loss(trl_type, logp, old, adv_row, mask, eps_high=0.28, level="sequence", entropy_mask=emask)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-9)
    # GSPO-token: s_i·π/sg(π) per token, the value of s_i at every token, the gradient of its own log-prob
    m = mask.double()
    seq = (((logp - old) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).detach()
    tok = trl_loss(trl_type, logp, logp.detach() - seq, adv_row, mask, eps_high=0.28, entropy_mask=emask)
    g = _grad(loss, logp)
    assert (g[mask & ~emask] == 0).all() and g[emask].abs().sum() > 0
    torch.testing.assert_close(g, _grad(tok, logp), rtol=1e-6, atol=1e-9)


def test_cispo_stats_and_float32_and_masked_nan():
    """cispo's clip_frac is the share of loss tokens whose weight is capped (any sign of A);
    float32 inputs give a float32 loss; NaN at masked-out positions reaches neither the loss
    nor the gradient."""
    logp, old, ref, ent, adv, mask = _inputs(torch.float32, per_row_adv=False)
    for x in (logp, old, ent, adv):
        x[~mask] = float("nan")
    logp.requires_grad_(True)
    loss, st = pl.policy_loss_from_logp(logp, ent, old, adv, mask, policy_loss="cispo", clip_high=1.1,
                                        top_entropy_quantile=0.5, off_policy_mask_threshold=0.0, entropy_coef=0.1)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    g = _grad(loss, logp)
    assert torch.isfinite(g).all() and (g[~mask] == 0).all()
    r = torch.exp(logp.detach() - old)
    assert float(st["clip_frac"]) == pytest.approx(float((r > 1.1)[mask].float().mean()))
    assert 0 < float(st["clip_frac"]) < 1


def test_entropy_bonus_acts_on_the_high_entropy_tokens_only():
    """Entropy bonus: under token-mean the mean entropy over the loss tokens keep_H keeps, TRL's
    (tests/test_review_grpo_parity.py checks it against TRL's _compute_loss)."""
    logp, old, ref, ent, adv, mask = _inputs()
    ent.requires_grad_(True)
    loss, _ = pl.policy_loss_from_logp(logp, ent, old, adv, mask, top_entropy_quantile=0.3, entropy_coef=0.5)
    keep = pl.high_entropy_mask(ent.detach(), mask, 0.3)
    want = torch.where(keep, -0.5 * torch.ones_like(ent), torch.zeros_like(ent)) / keep.sum()
    torch.testing.assert_close(_grad(loss, ent), want)


def test_clip_is_the_reference_loss_bit_for_bit():
    logp, old, ref, ent, adv, mask = _inputs(torch.float32)
    for kw in (dict(), dict(clip_high=0.28, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01, agg="seq-mean-token-sum"),
               dict(agg="seq-mean-token-sum-norm", normalizer=40.0, kl_coef=0.2, kl_kind="k2")):
        a = logp.clone().requires_grad_(True)
        b = logp.clone().requires_grad_(True)
        la, sa = pl.policy_loss_from_logp(a, ent, old, adv, mask, ref_logp=ref, **kw)
        lb, sb = reference.policy_loss_from_logp(b, ent, old, adv, mask, ref_logp=ref, **kw)
        assert torch.equal(la, lb)
        assert torch.equal(_grad(la, a), _grad(lb, b))
        for k, v in sb.items():
            assert torch.equal(sa[k], v), k
        assert float(sa["entropy_mask_frac"]) == 1.0 and float(sa["off_policy_mask_frac"]) == 0.0


@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_high_entropy_mask_is_trls(q):
    GRPOTrainer = _trl()
    stub = type("Stub", (), {"accelerator": _Accel()})()
    _, _, _, ent, _, mask = _inputs(torch.float32)
    ent[1, 2] = float("nan")  # never read where masked out
    mask[1, 2] = False
    want = GRPOTrainer.get_high_entropy_mask(stub, ent, mask, 1 - q)
    assert torch.equal(pl.high_entropy_mask(ent, mask, q), want)
    assert want[0, 2] == want[0, 3]  # ties go together
    assert want[0, 4] and want[mask].sum() == max(1, round(q * int(mask.sum())))
    empty = torch.zeros_like(mask)
    assert not pl.high_entropy_mask(ent, empty, q).any()
    assert not GRPOTrainer.get_high_entropy_mask(stub, ent, empty, 1 - q).any()


def test_quantile_is_torch_quantile():
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 7, 1000):
        x = torch.rand(n, generator=g)
        x[: n // 3] = 0.5  # ties
        for q in (0.0, 0.2, 0.5, 0.8, 0.999, 1.0):
            assert torch.equal(pl.quantile(x, q), torch.quantile(x, q)), (n, q)


def test_off_policy_mask_is_trls():
    GRPOTrainer = _trl()
    logp, old, _, _, adv, mask = _inputs(torch.float32)
    adv_row = adv[:, 1:2].clone()
    adv_row[2] = 0.0
    for thr in (0.0, 0.05, 0.3):
        want = GRPOTrainer.get_off_policy_mask(adv_row, logp, old, mask.float(), thr).bool().expand(B, T)
        got = pl.off_policy_mask(adv, logp, old, mask, thr)
        assert torch.equal(got & mask, want & mask)


def test_sequence_level_cispo_is_refused_by_the_function():
    logp, old, _, ent, adv, mask = _inputs()
    with pytest.raises(ValueError, match="importance_sampling_level 'sequence'.*cispo"):
        pl.policy_loss_from_logp(logp, ent, old, adv, mask, policy_loss="cispo", clip_high=5.0,
                                 importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="policy_loss must be one of"):
        pl.policy_loss_from_logp(logp, ent, old, adv, mask, policy_loss="gspo")
    with pytest.raises(ValueError, match="clip_high"):
        pl.policy_loss_from_logp(logp, ent, old, adv, mask, policy_loss="cispo")


# --------------------------------------------------------------------------- the trainer


def n_chars(prompts, completions):
    """A dense reward: groups rarely tie, so advantages (and updates) are non-zero."""
    return [float(len(c)) for c in completions]


def _trainer(tmp_path, estimator="grpo", reward=frac_a, **kw):
    pol, tok = make_policy()
    kw.setdefault("rollout", RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5))
    cfg = make_config(tmp_path, estimator, **kw)
    return RLTrainer(cfg, pol, tok, reward_fns=[reward], prompts=PROMPTS)


def _grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("estimator,ppo", [
    ("grpo", dict(policy_loss="cispo", clip_high=1.05, top_entropy_quantile=0.3, entropy_coef=0.01)),
    ("rloo", dict(policy_loss="sapo", agg="seq-mean-token-sum-norm", off_policy_mask_threshold=0.0, is_cap=2.0)),
])
def test_micro_batching_gives_the_same_loss_and_gradient(tmp_path, estimator, ppo):
    tr = _trainer(tmp_path, estimator, n_chars, ppo=PPOConfig(mini_batch_size=8, micro_batch_size=8, **ppo),
                  kl=KLConfig(coef=0.1, placement="loss"))
    data, m = tr.rollout()
    assert data.advantages.abs().sum() > 0
    if "top_entropy_quantile" in ppo:
        # the rollout's own threshold over all its loss tokens, fixed for the update
        ent = data.entropy_mask
        assert ent is not None and not (ent & ~data.response_mask).any()
        assert 0.2 < float(ent.sum()) / float(data.response_mask.sum()) < 0.45
        assert m["rollout/entropy_threshold"] > 0
    tr.optimizer.zero_grad()  # one step: the current policy differs from old_logp (ratios ≠ 1)
    tr.policy_backward(data)
    tr.optimizer.step()
    out = []
    for mb in (8, 2):
        tr.policy.zero_grad(set_to_none=True)
        st = tr.policy_backward(data, mb)
        out.append((st, _grads(tr.policy)))
    (s1, g1), (s2, g2) = out
    assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-5, abs=1e-7)
    assert s1["approx_kl"] > 0 and s1["ratio_max"] != 1.0
    if ppo["policy_loss"] == "cispo":
        assert s1["clip_frac"] > 0  # ε_max = 1.05: some weights capped
    else:
        assert s1["clip_frac"] == 0 and s1["off_policy_mask_frac"] > 0
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(a.abs().sum() > 0 for a in g1)
    for k in ("clip_frac", "entropy_mask_frac", "off_policy_mask_frac"):
        assert s1[k] == pytest.approx(s2[k], abs=1e-6), k


def test_composed_clip_matches_the_fused_loss(tmp_path):
    """policy_loss clip through the composed path (an off-policy mask that keeps everything)
    gives the fused kernel's loss and gradient."""
    tr = _trainer(tmp_path, reward=n_chars, ppo=PPOConfig(mini_batch_size=8, micro_batch_size=4, clip_low=0.01, clip_high=0.002,
                                          entropy_coef=0.01), kl=KLConfig(coef=0.1, placement="loss"))
    data, _ = tr.rollout()
    assert data.advantages.abs().sum() > 0
    tr.optimizer.zero_grad()
    tr.policy_backward(data)
    tr.optimizer.step()
    res = []
    for thr in (None, 1e9):
        tr.config.ppo.off_policy_mask_threshold = thr
        tr.policy.zero_grad(set_to_none=True)
        res.append((tr.policy_backward(data), _grads(tr.policy)))
    (s1, g1), (s2, g2) = res
    assert "off_policy_mask_frac" not in s1 and s2["off_policy_mask_frac"] == 0.0
    assert s1["clip_frac"] > 0
    for k in ("loss", "clip_frac", "approx_kl", "kl", "entropy"):
        assert s1[k] == pytest.approx(s2[k], rel=1e-5, abs=1e-7), k
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _rows(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(ln).items() if not k.startswith(("time/", "tokens_per"))} for ln in f]


@pytest.mark.parametrize("ppo", [
    dict(policy_loss="cispo", clip_high=5.0),
    dict(top_entropy_quantile=0.2),
    dict(policy_loss="sapo", top_entropy_quantile=0.2, off_policy_mask_threshold=0.01, old_logp="behaviour"),
])
def test_grpo_variant_trains_and_resumes_exactly(tmp_path, ppo):
    kw = dict(steps=4, save_every=2, kl=KLConfig(coef=0.02, placement="loss"),
              ppo=PPOConfig(epochs=2, mini_batch_size=4, micro_batch_size=2, **ppo))
    a = _trainer(tmp_path / "a", **kw)
    init = [p.detach().clone() for p in a.policy.parameters()]
    ra = a.train()
    assert all(torch.isfinite(torch.tensor(r["policy/loss"])) for r in ra)
    assert any(not torch.equal(p, q) for p, q in zip(init, a.policy.parameters()))
    if ppo.get("top_entropy_quantile", 1.0) < 1:
        assert all(0 < r["policy/entropy_mask_frac"] < 0.5 for r in ra)
    b = _trainer(tmp_path / "b", **kw)
    b.train(steps=2)
    cfg = b.config
    cfg.resume = cfg.output_dir
    pol, tok = make_policy()
    c = RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS)
    c.train()
    assert _rows(a.config.output_dir) == _rows(cfg.output_dir)
    for p, q in zip(a.policy.parameters(), c.policy.parameters()):
        assert torch.equal(p, q)


def test_trpo_with_the_entropy_mask_runs(tmp_path):
    tr = _trainer(tmp_path, steps=1, ppo=PPOConfig(mini_batch_size=8, micro_batch_size=4, trpo=True,
                                                   top_entropy_quantile=0.2))
    m = tr.train()[-1]
    assert "policy/trpo_step_frac" in m and m["policy/entropy_mask_frac"] < 0.5


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw,match", [
    (dict(policy_loss="gspo"), "ppo.policy_loss must be one of"),
    (dict(policy_loss="cispo"), "ppo.clip_high is cispo's cap"),
    (dict(policy_loss="cispo", clip_high=0.0), "ppo.clip_high is cispo's cap"),
    (dict(policy_loss="cispo", clip_high=5.0, importance_sampling_level="sequence"),
     "ppo.importance_sampling_level 'sequence' is not supported with ppo.policy_loss 'cispo'"),
    (dict(policy_loss="cispo", clip_high=5.0, dual_clip=3.0), "ppo.dual_clip"),
    (dict(policy_loss="sapo", trpo=True), "ppo.trpo needs ppo.policy_loss 'clip'"),
    (dict(policy_loss="sapo", clip_high=0.28), "ppo.clip_high has no effect"),
    (dict(sapo_temperature_pos=2.0), "ppo.sapo_temperature_pos / ppo.sapo_temperature_neg only apply"),
    (dict(policy_loss="sapo", sapo_temperature_neg=0.0), "ppo.sapo_temperature_neg must be"),
    (dict(top_entropy_quantile=1.5), "ppo.top_entropy_quantile must be in"),
    (dict(top_entropy_quantile=-0.1), "ppo.top_entropy_quantile must be in"),
    (dict(top_entropy_quantile=True), "ppo.top_entropy_quantile must be in"),
    (dict(off_policy_mask_threshold=-1.0), "ppo.off_policy_mask_threshold must be"),
    (dict(off_policy_mask_threshold=float("nan")), "ppo.off_policy_mask_threshold must be"),
])
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**kw)


def test_the_guides_variant_config_loads():
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parent.parent / "docs" / "rlvr.md").read_text(encoding="utf-8")
    block = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL) if "policy_loss: cispo" in b]
    assert len(block) == 1
    p = PPOConfig(**yaml.safe_load(block[0])["ppo"])
    assert p.policy_loss == "cispo" and p.clip_high == 5.0 and p.composed_loss


def test_config_loads_from_the_command_line():
    cfg = load_config(RLConfig, None, ["--ppo.policy_loss", "cispo", "--ppo.clip_high", "5.0",
                                       "--ppo.top_entropy_quantile", "0.2", "--ppo.off_policy_mask_threshold", "0.5"])
    p = cfg.ppo
    assert (p.policy_loss, p.clip_high, p.top_entropy_quantile, p.off_policy_mask_threshold) == ("cispo", 5.0, 0.2, 0.5)
    assert p.composed_loss and not PPOConfig().composed_loss
    d = PPOConfig()
    assert (d.policy_loss, d.sapo_temperature_pos, d.sapo_temperature_neg, d.top_entropy_quantile,
            d.off_policy_mask_threshold) == ("clip", 1.0, 1.05, 1.0, None)
