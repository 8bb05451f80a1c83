"""TRL GRPOConfig options: ``scale_rewards``, ``reward.multi_objective_aggregation``
(GDPO), ``kl.use_bias_correction_kl``, ``ppo.is_mode`` (TRL's vllm_importance_sampling_mode),
``ppo.policy_loss`` luspo / vespo and ``ppo.use_adaptive_entropy``.

Each against TRL 1.16's own code: its functions where it has them (``nanstd``,
``GRPOTrainer.get_gamma_weights``), else the few lines of ``_generate_and_score_completions`` /
``_compute_loss`` transcribed here with the source lines named; then the trainer end to end
(defaults unchanged, resume exact, the CLI) and the config errors."""

import json
import math
import os
import warnings

import pytest
import torch
import yaml

from rlhf_fast.algorithms import advantages as A
from rlhf_fast.algorithms import policy_losses as pl
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import KLConfig, PPOConfig, RewardConfig, RLConfig, RolloutConfig
from tests.test_rl_learning import PROMPTS, frac_a, make_config, make_policy
from tests.test_rl_loss_variants import B, T, _inputs

pytestmark = pytest.mark.usefixtures("one_thread")

TRL_EPS = 1e-4  # TRL's std epsilon (ours is 1e-6): the functions take it, so compare with TRL's


def _trl_trainer():
    return pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer


def _nanstd():
    return pytest.importorskip("trl.trainer.utils").nanstd


def _scores(n_groups=5, G=4, K=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n_groups * G,) if K is None else (n_groups * G, K)
    s = torch.randn(*shape, generator=g) * 2 + 0.5
    s[:G] = 1.0  # a uniform group: std 0
    return s


# --------------------------------------------------------------------------- 1. scale_rewards


def trl_sum_then_normalize(rewards, num_generations, scale_rewards):
    """TRL 1.16 grpo_trainer.py lines 2761-2788 (``sum_then_normalize``), rewards ``[B]`` (the
    weighted sum already taken, no NaN)."""
    nanstd = _nanstd()
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    elif scale_rewards == "batch":
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_scale_rewards_is_trls(scale):
    s = _scores()
    mask = torch.ones(s.shape[0], 3, dtype=torch.bool)
    mask[1, 2] = False
    adv, ret = A.group_estimator_advantages(s, mask, 4, eps=TRL_EPS, scale_rewards=scale)
    want = trl_sum_then_normalize(s, 4, scale)
    torch.testing.assert_close(adv[:, 0], want, rtol=1e-5, atol=1e-6)
    assert (adv[1, 2] == 0) and torch.equal(ret[:, 0], s)
    if scale == "batch":  # not the group std: the two differ on these scores
        assert not torch.allclose(want, trl_sum_then_normalize(s, 4, "group"))


def test_scale_rewards_defaults_are_the_estimators_bit_for_bit():
    s = _scores()
    mask = torch.ones(s.shape[0], 2, dtype=torch.bool)
    for est, scale in (("grpo", "group"), ("dr_grpo", "none")):
        a, _ = A.compute_advantages(est, s, mask, group_size=4)
        b, _ = A.compute_advantages(est, s, mask, group_size=4, scale_rewards=scale)
        assert torch.equal(a, b)
    a, _ = A.compute_advantages("dr_grpo", s, mask, group_size=4)
    b, _ = A.compute_advantages("grpo", s, mask, group_size=4, scale_rewards="none")
    assert torch.equal(a, b)


def test_global_mean_std_one_process_and_edges():
    x = torch.tensor([1.0, 2.0, 4.0, 7.0])
    mean, std = A.global_mean_std(x)
    assert float(mean) == pytest.approx(3.5) and float(std) == pytest.approx(float(x.std()))
    assert float(A.global_mean_std(torch.tensor([3.0]))[1]) == 0.0  # one entry: 0 (TRL: zeros)


# --------------------------------------------------------------------------- 2. GDPO


def trl_normalize_then_sum(rewards_per_func, reward_weights, num_generations):
    """TRL 1.16 grpo_trainer.py lines 2790-2799 (``normalize_then_sum``), one process, no NaN."""
    nanstd = _nanstd()
    grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
    reward_k = (grouped - mean_k) / (std_k + 1e-4)
    reward_k = reward_k.view(-1, rewards_per_func.shape[1])
    rewards = (reward_k * reward_weights.unsqueeze(0)).nansum(dim=1)
    std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    return (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)


@pytest.mark.parametrize("K", [1, 3])
def test_normalize_then_sum_is_trls(K):
    r = _scores(K=K, seed=K)
    r[4:8, 0] = 2.0  # one source uniform in one group only
    w = torch.tensor([1.0, 0.5, -2.0][:K])
    got = A.normalize_then_sum_advantages(r, w, 4, eps=TRL_EPS)
    want = trl_normalize_then_sum(r, w, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if K == 3:  # not the sum-then-normalise advantages of the weighted sum
        s = (r * w).sum(1)
        assert not torch.allclose(got, trl_sum_then_normalize(s, 4, "group"), atol=1e-2)
    mask = torch.ones(r.shape[0], 2, dtype=torch.bool)
    adv, ret = A.compute_advantages("grpo", (r * w).sum(1), mask, group_size=4, rewards_per_func=r,
                                    reward_weights=w, multi_objective_aggregation="normalize_then_sum")
    torch.testing.assert_close(adv[:, 1], A.normalize_then_sum_advantages(r, w, 4), rtol=0, atol=0)


def test_advantage_functions_refuse_what_does_not_apply():
    s, mask = _scores(), torch.ones(20, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="scale_rewards 'batch' applies to kind 'grpo'"):
        A.group_estimator_advantages(s, mask, 4, kind="rloo", scale_rewards="batch")
    with pytest.raises(ValueError, match="scale_rewards applies to the group estimators"):
        A.compute_advantages("reinforce++", s, mask, scale_rewards="group")
    with pytest.raises(ValueError, match="needs estimator 'grpo'"):
        A.compute_advantages("rloo", s, mask, group_size=4, multi_objective_aggregation="normalize_then_sum")
    with pytest.raises(ValueError, match="no KL in the reward"):
        A.compute_advantages("grpo", s, mask, group_size=4, kl=torch.ones(20, 2), kl_coef=0.1,
                             multi_objective_aggregation="normalize_then_sum", rewards_per_func=s[:, None],
                             reward_weights=torch.ones(1))


def _ranks_worker(rank, world, store, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        s, r = _scores(10), _scores(10, K=2, seed=1)
        w = torch.tensor([1.0, 0.3])
        n = s.shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)  # whole groups on each rank
        mask = torch.ones(n, 2, dtype=torch.bool)
        a, _ = A.compute_advantages("grpo", s[sl], mask, group_size=4, scale_rewards="batch",
                                    group=dist.group.WORLD)
        g, _ = A.compute_advantages("grpo", s[sl], mask, group_size=4, rewards_per_func=r[sl], reward_weights=w,
                                    multi_objective_aggregation="normalize_then_sum", group=dist.group.WORLD)
        torch.save((a[:, 0], g[:, 0]), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_batch_statistics_do_not_depend_on_the_rank_count(tmp_path):
    """scale_rewards batch and GDPO's batch step on two gloo ranks (five groups of 4 each) give
    the one process's advantages: the statistics are the global batch's, not each rank's."""
    import torch.multiprocessing as mp

    s, r = _scores(10), _scores(10, K=2, seed=1)
    w = torch.tensor([1.0, 0.3])
    # spawn, not fork: a fork of the multi-threaded test process can deadlock in the child
    mp.start_processes(_ranks_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2,
                       join=True, start_method="spawn")
    parts = [torch.load(tmp_path / f"out.{k}") for k in range(2)]
    mask = torch.ones(40, 2, dtype=torch.bool)
    one, _ = A.compute_advantages("grpo", s, mask, group_size=4, scale_rewards="batch")
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), one[:, 0], rtol=1e-6, atol=1e-7)
    gd = A.normalize_then_sum_advantages(r, w, 4)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), gd, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- 3-5. the loss


def trl_loss(loss_type, logp, old, adv, mask, *, eps_low=0.2, eps_high=0.28, beta=0.0, ref=None, bias_kl=False,
             is_ratio=None, level="token", vespo=None):
    """TRL 1.16 grpo_trainer.py GRPOTrainer._compute_loss: the importance weights (3085-3097),
    the KL with ``use_bias_correction_kl`` (3100-3107), the clip ("dapo" / "luspo") and "vespo"
    per-token losses (3112-3138, VESPO's weights through TRL's own ``get_gamma_weights``), the
    vLLM importance weights (3146-3147), the KL term (3149-3150) and the aggregations: "dapo" /
    "vespo" the sum over the token count (3168-3174, one process, one accumulation step),
    "luspo" the mean over rows of each row's sum (3175-3181). adv ``[B, 1]``."""
    GRPOTrainer = _trl_trainer()
    mask = mask.to(logp.dtype)
    log_ratio = logp - old
    if level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
        if bias_kl:
            per_token_kl = per_token_kl * coef_1
    if loss_type in ("dapo", "luspo"):
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    elif loss_type == "vespo":
        phi_seq = GRPOTrainer.get_gamma_weights(advantages=adv, log_ratio_per_token=log_ratio, mask=mask,
                                                importance_sampling_ratio=is_ratio, **(vespo or {}))
        per_token_loss = -phi_seq * adv * logp
    if is_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * is_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "luspo":
        return (per_token_loss * mask).sum(-1).mean()
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


def _is_ratio(mask, dtype, seed=5):
    """Token importance weights in [0, 3] (some 0, as a mask mode leaves them), 1 where masked
    out (TRL's ratio of a zero log-difference) — and garbage there for ours."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(B, T, generator=g, dtype=torch.float64) * 3).to(dtype)
    w[0, 3] = 0.0
    return torch.where(mask, w, torch.ones_like(w)), torch.where(mask, w, torch.full_like(w, 7.0))


VESPO = dict(k_pos=1.5, lambda_pos=2.5, k_neg=2.5, lambda_neg=1.5)
LOSS_CASES = [
    # (ours, agg, TRL loss type, options of ours, TRL options)
    ("clip", "token-mean", "dapo", dict(clip_high=0.28, kl_coef=0.1, use_bias_correction_kl=True),
     dict(beta=0.1, bias_kl=True)),
    ("clip", "token-mean", "dapo", dict(clip_high=0.28, is_weight=True), dict(is_ratio=True)),
    ("luspo", "seq-mean-token-sum", "luspo", dict(clip_high=0.28, importance_sampling_level="sequence",
                                                  kl_coef=0.05), dict(level="sequence", beta=0.05)),
    ("luspo", "seq-mean-token-sum", "luspo", dict(clip_high=0.28), {}),
    ("vespo", "token-mean", "vespo", {}, {}),
    ("vespo", "token-mean", "vespo", dict(is_weight=True, kl_coef=0.1, use_bias_correction_kl=True,
                                          **{f"vespo_{k}": v for k, v in VESPO.items()}),
     dict(is_ratio=True, beta=0.1, bias_kl=True, vespo=VESPO)),
]


@pytest.mark.parametrize("ours,agg,trl_type,opts,trl_opts", LOSS_CASES)
def test_loss_and_gradient_match_trl(ours, agg, trl_type, opts, trl_opts):
    logp, old, ref, ent, adv, mask = _inputs()
    logp.requires_grad_(True)
    opts, trl_opts = dict(opts), dict(trl_opts)
    if opts.pop("is_weight", False):
        trl_opts["is_ratio"], opts["is_weight"] = _is_ratio(mask, logp.dtype)
    loss, st = pl.policy_loss_from_logp(logp, ent, old, adv, mask, policy_loss=ours, agg=agg, ref_logp=ref,
                                        kl_kind="k3", **opts)
    adv_row = adv[:, 1:2].clone()
    adv_row[2] = 0.0
    want = trl_loss(trl_type, logp, old, adv_row, mask, ref=ref, **trl_opts)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    g, gw = torch.autograd.grad(loss, logp)[0], torch.autograd.grad(want, logp)[0]
    assert g[mask].abs().sum() > 0
    torch.testing.assert_close(g, gw, rtol=1e-10, atol=1e-12)
    if ours == "vespo":
        phi = _trl_trainer().get_gamma_weights(adv_row, logp.detach() - old, mask.double(), trl_opts.get("is_ratio"),
                                               **trl_opts.get("vespo", {}))
        m = mask.double()
        assert float(st["vespo_phi_mean"]) == pytest.approx(float((phi * m).sum() / m.sum()))
        assert 0 < float(st["vespo_phi_mean"]) < 1  # ratios ≠ 1: φ below its peak φ(1) = 1


def test_bias_corrected_kl_changes_only_the_kl_gradient():
    """On-policy (old = logp) the corrected KL has the plain KL's value but not its gradient
    (TRL's note); without a KL term the option changes nothing."""
    logp, old, ref, ent, adv, mask = _inputs()
    logp.requires_grad_(True)
    on = logp.detach().clone()
    res = []
    for flag in (False, True):
        loss, _ = pl.policy_loss_from_logp(logp, ent, on, adv, mask, ref_logp=ref, kl_coef=0.3,
                                           use_bias_correction_kl=flag)
        res.append((loss, torch.autograd.grad(loss, logp)[0]))
    torch.testing.assert_close(res[0][0], res[1][0])
    assert not torch.allclose(res[0][1], res[1][1])
    a, _ = pl.policy_loss_from_logp(logp, ent, old, adv, mask)
    b, _ = pl.policy_loss_from_logp(logp, ent, old, adv, mask, use_bias_correction_kl=True)
    assert torch.equal(a, b)


def test_luspo_and_vespo_refusals():
    logp, old, _, ent, adv, mask = _inputs()
    with pytest.raises(ValueError, match="luspo.*needs agg 'seq-mean-token-sum'"):
        pl.policy_loss_from_logp(logp, ent, old, adv, mask, policy_loss="luspo")
    with pytest.raises(ValueError, match="'sequence' is not supported with policy_loss 'vespo'"):
        pl.policy_loss_from_logp(logp, ent, old, adv, mask, policy_loss="vespo", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="mask .* must be given for policy_loss 'vespo'"):
        pl.token_losses(logp, old, adv, policy_loss="vespo")


# --------------------------------------------------------------------------- 4. importance sampling modes


def trl_is_ratio(old_per_token_logps, sampling_per_token_logps, mask, mode, clip_max, clip_min=None):
    """TRL 1.16 grpo_trainer.py lines 2663-2703: the vLLM importance-sampling ratio of each
    ``vllm_importance_sampling_mode``; ``[B, T]`` for token modes, ``[B, 1]`` for sequence ones."""
    per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    if sequence_level_is:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    elif mode in ["sequence_mask", "token_mask"]:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        invalid_mis_mask = (ratio < min_val) | (ratio > max_val)
        ratio = ratio.masked_fill(invalid_mis_mask, value=0.0)
    return ratio


@pytest.mark.parametrize("clip_min", [None, 0.4])
@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_is_modes_are_trls(mode, clip_min):
    """``ppo.is_cap`` / ``ppo.is_cap_min`` are TRL's vllm_importance_sampling_clip_max / _min."""
    g = torch.Generator().manual_seed(1)
    rm = torch.rand(6, 9, generator=g) > 0.3
    rm[:, 0] = False
    old = -torch.rand(6, 9, generator=g) * 2
    beh = old + torch.randn(6, 9, generator=g) * 0.5
    beh[0, 1:4] = old[0, 1:4] - 30.0  # an overflowing sequence weight (inf in TRL too)
    beh[~rm] = 5.0
    cap = 1.6
    stub = type("Stub", (), {"config": RLConfig(ppo=PPOConfig(is_cap=cap, is_mode=mode, is_cap_min=clip_min))})()
    w, masked = RLTrainer._is_weights(stub, old, beh, rm)
    want = trl_is_ratio(old, beh, rm.float(), mode, cap, clip_min).expand(6, 9) * rm
    torch.testing.assert_close(w, want, rtol=1e-6, atol=0)
    assert (w[~rm] == 0).all()
    raw = trl_is_ratio(old, beh, rm.float(), mode.replace("truncate", "mask"), None)  # (no bound: unmasked)
    below = rm & (raw.expand(6, 9) < 0.4)
    assert below.any()  # the lower bound has weights to act on
    if mode.endswith("mask"):
        assert torch.equal(masked, rm & (want == 0))
        assert 0 < int(masked.sum()) < int(rm.sum())
        assert (w[below] == 0).all() == (clip_min is not None)
    else:
        assert masked is None and float(w.max()) == pytest.approx(cap)
        if clip_min is not None:
            assert float(w[rm].min()) == pytest.approx(clip_min)


# --------------------------------------------------------------------------- the trainer


def n_chars(prompts, completions):
    """A dense reward: groups rarely tie, so advantages (and updates) are non-zero."""
    return [float(len(c)) for c in completions]


def _trainer(tmp_path, estimator="grpo", rewards=(frac_a,), weights=None, **kw):
    pol, tok = make_policy()
    kw.setdefault("rollout", RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5))
    cfg = make_config(tmp_path, estimator, **kw)
    return RLTrainer(cfg, pol, tok, reward_fns=list(rewards), reward_weights=weights, prompts=PROMPTS)


def _row_adv(data):
    """One advantage per row ``[B]`` (each row's value on its response tokens)."""
    rm = data.response_mask
    return (data.advantages * rm).sum(1) / rm.sum(1).clamp(min=1)


def _grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def test_trainer_scale_rewards_batch(tmp_path):
    tr = _trainer(tmp_path, rewards=(n_chars,), scale_rewards="batch", kl=KLConfig(coef=0.0))
    data, m = tr.rollout()
    want = A.group_estimator_advantages(data.scores, torch.ones(8, 1, dtype=torch.bool), 4, scale_rewards="batch")[0]
    torch.testing.assert_close(_row_adv(data), want[:, 0] * data.response_mask.any(1))
    grp = A.group_estimator_advantages(data.scores, torch.ones(8, 1, dtype=torch.bool), 4)[0]
    assert not torch.allclose(want, grp)


def n_distinct(prompts, completions):
    """A second dense reward, not a function of the length alone."""
    return [float(len(set(c))) for c in completions]


def test_trainer_normalize_then_sum(tmp_path):
    """GDPO in the trainer: the advantages are those of the two sources' own scores (recomputed
    here from the completions) and weights, not of their weighted total."""
    w = torch.tensor([2.0, -0.5])
    tr = _trainer(tmp_path, rewards=(n_distinct, n_chars), weights=w.tolist(),
                  kl=KLConfig(coef=0.02, placement="loss"),
                  reward=RewardConfig(multi_objective_aggregation="normalize_then_sum"))
    data, m = tr.rollout()
    prompts = [p for p, _, _ in tr._last_texts]
    comps = [c for _, c, _ in tr._last_texts]
    r = torch.tensor([n_distinct(prompts, comps), n_chars(prompts, comps)]).T
    assert (r.view(2, 4, 2).std(1) > 0).any(0).all()  # each source spread in a group: the weights matter
    want = A.normalize_then_sum_advantages(r, w, 4)
    torch.testing.assert_close(_row_adv(data), want * data.response_mask.any(1), rtol=1e-5, atol=1e-6)
    total = A.group_estimator_advantages(data.scores, torch.ones(8, 1, dtype=torch.bool), 4)[0][:, 0]
    assert not torch.allclose(want, total, atol=1e-2)
    assert not torch.allclose(want, A.normalize_then_sum_advantages(r, torch.ones(2), 4), atol=1e-2)
    assert m["reward/total"] == pytest.approx(float((r * w).sum(1).mean()), rel=1e-6)


@pytest.mark.parametrize("mode", ["token_mask", "sequence_mask", "sequence_truncate"])
def test_trainer_is_modes(tmp_path, mode):
    """The recomputed and the sampler's log-probs differ by float rounding only: a cap of 1
    masks about half the tokens (or answers); the advantages carry the weights."""
    tr = _trainer(tmp_path, rewards=(n_chars,), ppo=PPOConfig(mini_batch_size=8, micro_batch_size=8, is_cap=1.0,
                                                               is_mode=mode))
    data, m = tr.rollout()
    w, masked = tr._is_weights(data.old_logp, data.behaviour_logp, data.response_mask)
    tr.config.ppo.is_cap = None
    tr2 = _trainer(tmp_path / "b", rewards=(n_chars,), ppo=PPOConfig(mini_batch_size=8, micro_batch_size=8))
    plain, _ = tr2.rollout()
    torch.testing.assert_close(data.advantages, plain.advantages * w)
    rm = data.response_mask
    assert (m["is_weight/min"], m["is_weight/max"]) == (float(w[rm].min()), float(w[rm].max()))
    if mode.endswith("mask"):
        assert 0 < m["is_weight/masked_frac"] < 1
        if mode == "sequence_mask":  # whole answers
            rows = masked.any(1)
            assert torch.equal(masked[rows], data.response_mask[rows])
    else:
        assert "is_weight/masked_frac" not in m and m["is_weight/mean"] <= 1.0


def test_global_is_weight_min_max():
    """Under several ranks ``is_weight/min`` / ``max`` come from one max all-reduce (of −min and
    max): with the reductions of one rank they are the local masked extremes."""
    from rlhf_fast.distributed import DistContext

    g = torch.Generator().manual_seed(3)
    rm = torch.rand(4, 6, generator=g) > 0.4
    rm[:, 0] = False
    w = (torch.rand(4, 6, generator=g) * 3) * rm
    w[~rm] = 7.0  # outside the response: must not count
    z = torch.zeros(4, 6)
    stub = type("Stub", (), {"ctx": DistContext(), "device": torch.device("cpu"), "critic": None})()
    out = RLTrainer._global_rollout_metrics(stub, {}, torch.ones(4), torch.ones(4), z, rm, z, z, z, z, None, w,
                                            torch.zeros(4, dtype=torch.bool))
    assert (out["is_weight/min"], out["is_weight/max"]) == (float(w[rm].min()), float(w[rm].max()))
    out = RLTrainer._global_rollout_metrics(stub, {}, torch.ones(4), torch.ones(4), z, rm, z, z, z, z, None, None,
                                            torch.zeros(4, dtype=torch.bool))
    assert not any(k.startswith("is_weight") for k in out)


def test_trainer_vespo_takes_the_weights_in_the_loss(tmp_path):
    ppo = dict(mini_batch_size=8, micro_batch_size=4, policy_loss="vespo", is_cap=1.0, is_mode="token_mask")
    tr = _trainer(tmp_path, rewards=(n_chars,), ppo=PPOConfig(**ppo))
    data, m = tr.rollout()
    assert data.is_weight is not None and 0 < m["is_weight/masked_frac"] < 1
    tr2 = _trainer(tmp_path / "b", rewards=(n_chars,), ppo=PPOConfig(mini_batch_size=8, micro_batch_size=4))
    plain, _ = tr2.rollout()
    assert torch.equal(data.advantages, plain.advantages)  # not multiplied by the weights
    st = tr.policy_backward(data)
    assert 0 < st["vespo_phi_mean"] <= 1.0 and math.isfinite(st["loss"])


def test_bias_corrected_kl_in_the_trainer(tmp_path):
    """After one step (the policy is off the reference: KL ≠ 0) a fresh rollout's first backward
    is on-policy: the loss is the plain KL's, the gradient differs; the option moves the loss
    off the fused kernel onto the composed path."""
    tr = _trainer(tmp_path, rewards=(n_chars,), ppo=PPOConfig(mini_batch_size=8, micro_batch_size=4),
                  kl=KLConfig(coef=0.5, placement="loss"))
    tr.step()
    data, _ = tr.rollout()
    res = []
    for flag in (False, True):
        tr.config.kl.use_bias_correction_kl = flag
        tr.policy.zero_grad(set_to_none=True)
        st = tr.policy_backward(data)
        res.append((st, _grads(tr.policy)))
    (s0, g0), (s1, g1) = res
    assert s0["kl"] > 1e-4
    assert s1["loss"] == pytest.approx(s0["loss"], rel=1e-5, abs=1e-7) and s1["kl"] == pytest.approx(s0["kl"])
    assert "entropy_mask_frac" in s1 and "entropy_mask_frac" not in s0  # composed vs fused
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(g0, g1))


def test_defaults_keep_the_fused_loss_and_add_no_metric(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the default clip loss must stay on the fused kernel")

    monkeypatch.setattr(pl, "policy_loss_from_logp", boom)
    tr = _trainer(tmp_path, steps=1, ppo=PPOConfig(mini_batch_size=8, micro_batch_size=4, policy_loss="luspo",
                                                   agg="seq-mean-token-sum"))
    m = tr.train()[-1]
    assert not any(k.startswith(("is_weight", "policy/entropy_coef", "policy/vespo")) for k in m)
    assert "entropy_ctl" not in tr.state_dict_extra()
    d = RLConfig()
    assert (d.scale_rewards, d.reward.multi_objective_aggregation, d.kl.use_bias_correction_kl, d.ppo.is_mode,
            d.ppo.use_adaptive_entropy) == (None, "sum_then_normalize", False, "token_truncate", False)


# --------------------------------------------------------------------------- 6. adaptive entropy


class TRLEntropyController:
    """TRL 1.16 grpo_trainer.py: the coefficient applied to a window (3206-3209) and its update
    at the optimizer step from the window's entropy (3231-3238); state initialised at 850-853."""

    def __init__(self, args):
        self.args = args
        self.entropy_coef = args.entropy_coef
        self._last_world_entropy = float("inf")

    def apply_coef(self):
        return self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0

    def update(self, world_entropy):
        if world_entropy <= self.args.entropy_target:
            self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta, self.args.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta, self.args.entropy_coef_min)
        self._last_world_entropy = world_entropy


def test_adaptive_entropy_controller_is_trls():
    trl = pytest.importorskip("trl")
    kw = dict(entropy_coef=0.02, entropy_coef_min=0.005, entropy_coef_max=0.04, entropy_coef_delta=0.01,
              entropy_target=1.0)
    with warnings.catch_warnings():  # transformers' deprecation notices about unrelated arguments
        warnings.simplefilter("ignore")
        args = trl.GRPOConfig(output_dir="unused", use_cpu=True, bf16=False, use_adaptive_entropy=True, **kw)
    ref = TRLEntropyController(args)
    ours = RLTrainer.__new__(RLTrainer)  # the controller needs only the config and its own state
    ours.config = RLConfig(ppo=PPOConfig(use_adaptive_entropy=True, **kw))
    ours.entropy_coef, ours.last_entropy = 0.02, float("inf")
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        assert ours._entropy_coef() == ref.apply_coef()
        e = float(torch.rand((), generator=g) * 2)
        ours._adapt_entropy(e)
        ref.update(e)
        assert (ours.entropy_coef, ours.last_entropy) == (ref.entropy_coef, ref._last_world_entropy)
        seen.add(round(ours.entropy_coef, 6))
    assert {0.005, 0.04} <= seen  # both bounds reached


def _rows(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(ln).items() if not k.startswith(("time/", "tokens_per"))} for ln in f]


def test_adaptive_entropy_trains_and_resumes_exactly(tmp_path):
    """The coefficient moves once per optimizer step (the entropy here, ~3.8 nats, is below the
    target 10: up by delta each step, the bonus on from the second step) and is checkpointed:
    a run stopped at step 2 and resumed equals the uninterrupted one."""
    ppo = PPOConfig(epochs=2, mini_batch_size=4, micro_batch_size=2, entropy_coef=0.01, use_adaptive_entropy=True,
                    entropy_target=10.0, entropy_coef_delta=0.02, top_entropy_quantile=0.5)
    kw = dict(steps=4, save_every=2, kl=KLConfig(coef=0.02, placement="loss"), ppo=ppo)
    a = _trainer(tmp_path / "a", **kw)
    assert a._entropy_coef() == 0.0  # nothing measured yet: no bonus (TRL's inf start)
    ra = a.train()
    # 4 optimizer steps per rollout step (2 epochs x 2 mini-batches): +0.02 each, logged as the mean
    for i, r in enumerate(ra):
        base = 0.01 + 0.02 * 4 * i
        assert r["policy/entropy_coef"] == pytest.approx(base + 0.02 * 2.5)
    assert a.entropy_coef == pytest.approx(0.01 + 0.02 * 16) and 0 < a.last_entropy <= 10.0
    b = _trainer(tmp_path / "b", **kw)
    b.train(steps=2)
    cfg = b.config
    cfg.resume = cfg.output_dir
    pol, tok = make_policy()
    c = RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS)
    c.train()
    assert _rows(a.config.output_dir) == _rows(cfg.output_dir)
    assert (c.entropy_coef, c.last_entropy) == (a.entropy_coef, a.last_entropy)
    for p, q in zip(a.policy.parameters(), c.policy.parameters()):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------- the CLI and the config


def test_grpo_cli_with_the_new_options(tmp_path):
    from rlhf_fast.cli import main

    examples = os.path.join(os.path.dirname(__file__), "..", "examples")
    with open(os.path.join(examples, "grpo.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg.update(progress=False, steps=2, save_every=1, sample_every=1)
    cfg["rollout"].update(prompts_per_step=2, max_new_tokens=4)
    cfg["ppo"].update(mini_batch_size=8, micro_batch_size=4, epochs=1)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    run = str(tmp_path / "run")
    assert main(["grpo", str(p), "--output_dir", run, "--scale_rewards", "batch", "--ppo.policy_loss", "vespo",
                 "--ppo.clip_high", "null", "--ppo.is_cap", "1.0", "--ppo.is_mode", "token_mask",
                 "--kl.use_bias_correction_kl", "true", "--ppo.use_adaptive_entropy", "true",
                 "--ppo.entropy_target", "10"]) == 0
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0 < r["policy/vespo_phi_mean"] <= 1 and "is_weight/masked_frac" in r for r in rows)
    assert rows[1]["policy/entropy_coef"] > rows[0]["policy/entropy_coef"]
    with open(os.path.join(run, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    assert saved["scale_rewards"] == "batch" and saved["ppo"]["is_mode"] == "token_mask"
    assert main(["grpo", "--resume", run, "--steps", "3"]) == 0
    assert [r["step"] for r in _rows(run)] == [1, 2, 3]


@pytest.mark.parametrize("make,match", [
    (lambda: RLConfig(scale_rewards="global"), "scale_rewards must be one of"),
    (lambda: RLConfig(estimator="rloo", scale_rewards="group"), "scale_rewards 'group' applies to estimator 'grpo'"),
    (lambda: RLConfig(estimator="dr_grpo", scale_rewards="batch"), "scale_rewards 'batch' applies"),
    (lambda: RewardConfig(multi_objective_aggregation="sum"), "reward.multi_objective_aggregation must be one of"),
    (lambda: RewardConfig(multi_objective_aggregation="normalize_then_sum", whiten=True), "reward.whiten"),
    (lambda: RLConfig(reward=RewardConfig(multi_objective_aggregation="normalize_then_sum")),
     "kl.placement 'loss' or kl.coef 0"),
    (lambda: RLConfig(estimator="rloo", reward=RewardConfig(multi_objective_aggregation="normalize_then_sum")),
     "needs estimator 'grpo'"),
    (lambda: RLConfig(scale_rewards="batch", kl=KLConfig(coef=0.0),
                      reward=RewardConfig(multi_objective_aggregation="normalize_then_sum")),
     "scale_rewards has no effect"),
    (lambda: KLConfig(use_bias_correction_kl=True), "kl.use_bias_correction_kl .* needs kl.placement 'loss'"),
    (lambda: KLConfig(placement="loss", use_bias_correction_kl=1), "kl.use_bias_correction_kl must be true or false"),
    (lambda: PPOConfig(is_mode="token"), "ppo.is_mode must be one of"),
    (lambda: PPOConfig(is_mode="sequence_mask"), "ppo.is_mode 'sequence_mask' .* set ppo.is_cap"),
    (lambda: PPOConfig(policy_loss="luspo"), "ppo.policy_loss 'luspo' .* set ppo.agg 'seq-mean-token-sum'"),
    (lambda: PPOConfig(policy_loss="vespo", clip_high=0.28), "ppo.clip_high has no effect"),
    (lambda: PPOConfig(policy_loss="vespo", importance_sampling_level="sequence"),
     "ppo.importance_sampling_level 'sequence' is not supported"),
    (lambda: PPOConfig(policy_loss="vespo", is_cap=2.0, is_mode="sequence_truncate"),
     "ppo.is_mode 'sequence_truncate' is not supported with ppo.policy_loss 'vespo'"),
    (lambda: PPOConfig(policy_loss="vespo", trpo=True), "ppo.trpo needs"),
    (lambda: PPOConfig(vespo_k_pos=1.0), "ppo.vespo_k_pos / .* only apply to ppo.policy_loss 'vespo'"),
    (lambda: PPOConfig(policy_loss="vespo", vespo_lambda_neg=0.0), "ppo.vespo_lambda_neg must be"),
    (lambda: PPOConfig(policy_loss="vespo", vespo_k_pos=float("nan")), "ppo.vespo_k_pos must be"),
    (lambda: PPOConfig(entropy_target=1.0), "only apply with ppo.use_adaptive_entropy"),
    (lambda: PPOConfig(use_adaptive_entropy="yes"), "ppo.use_adaptive_entropy must be true or false"),
    (lambda: PPOConfig(use_adaptive_entropy=True, entropy_coef_min=0.5, entropy_coef_max=0.1),
     "ppo.entropy_coef_min .* must be <= ppo.entropy_coef_max"),
    (lambda: PPOConfig(use_adaptive_entropy=True, entropy_coef_delta=-1.0), "ppo.entropy_coef_delta must be"),
    (lambda: PPOConfig(use_adaptive_entropy=True, trpo=True), "ppo.use_adaptive_entropy is not supported"),
])
def test_config_errors_name_the_key(make, match):
    with pytest.raises(ValueError, match=match):
        make()
