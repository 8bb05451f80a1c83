"""ppo.policy_loss clip_cov, kl_cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement
Learning for Reasoning Language Models") and gpg against verl's own functions, transcribed below
from volcengine/verl, verl/trainer/ppo/core_algos.py (commit 012be9d9dcb7c38499f23616142870d2682757fc):
the loss and its gradient on hand-built batches (ties in the covariance ranking, rows without a
loss token, batches where ratio·N < 1), the four aggregations as verl's ``agg_loss``, one real
GRPO step of a tiny model per loss, learning, and the refusals."""

import math
import types

import pytest
import torch

from rlhf_fast.algorithms import policy_losses as pl
from rlhf_fast.trainers.config import load_config
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import KLConfig, PPOConfig, RLConfig, RolloutConfig
from tests.test_rl_learning import PROMPTS, frac_a, make_config, make_policy

pytestmark = pytest.mark.usefixtures("one_thread")

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


# --------------------------------------------------------------------------- verl's code, transcribed


def verl_masked_mean(values, mask, axis=None):
    # verl/utils/torch_functional.py: masked_sum / masked_mean
    valid_values = torch.where(mask.bool(), values, 0.0)
    return valid_values.sum(axis=axis) / (mask.sum(axis=axis) + 1e-8)


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode):
    # verl/trainer/ppo/core_algos.py: agg_loss (the four modes our ppo.agg has)
    if loss_agg_mode == "token-mean":
        loss = verl_masked_mean(loss_mat, loss_mask)
    elif loss_agg_mode == "seq-mean-token-sum":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        loss = torch.mean(seq_losses)
    elif loss_agg_mode == "seq-mean-token-mean":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / torch.sum(loss_mask, dim=-1)
        loss = torch.mean(seq_losses)
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        max_response_length = loss_mask.shape[-1]
        loss = torch.sum(seq_losses) / max_response_length
    else:
        raise ValueError(loss_agg_mode)
    return loss


def verl_gpg(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None):
    # core_algos.py: compute_policy_loss_gpg
    pg_losses = -log_prob * advantages
    pg_loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode)
    return pg_loss, pg_losses


def verl_clip_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None):
    # core_algos.py: compute_policy_loss_clip_cov; also returns its per-token losses and the
    # selected tokens (corr == 0), for the checks
    clip_cov_ratio = config.policy_loss.clip_cov_ratio if config.policy_loss.clip_cov_ratio is not None else 0.0002
    cliprange = config.clip_ratio
    cliprange_low = config.clip_ratio_low if config.clip_ratio_low is not None else cliprange
    cliprange_high = config.clip_ratio_high if config.clip_ratio_high is not None else cliprange
    clip_cov_ub = config.policy_loss.clip_cov_ub if config.policy_loss.clip_cov_ub is not None else 5.0
    clip_cov_lb = config.policy_loss.clip_cov_lb if config.policy_loss.clip_cov_lb is not None else 1.0
    assert clip_cov_ratio > 0, "clip_ratio should be larger than 0."

    negative_approx_kl = log_prob - old_log_prob
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    corr = torch.ones_like(advantages)
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_by_origin = (pg_losses2 > pg_losses1) & (response_mask > 0)

    cov_all = (advantages - verl_masked_mean(advantages, response_mask)) * (
        log_prob - verl_masked_mean(log_prob.detach(), response_mask)
    )
    cov_all[response_mask == 0] = -torch.inf
    cov_all[clip_by_origin] = -torch.inf

    clip_num = max(int(clip_cov_ratio * response_mask.sum().item()), 1)
    top_k_idx = (cov_all < clip_cov_ub) & (cov_all > clip_cov_lb) & (response_mask > 0)
    top_k_idx = torch.nonzero(top_k_idx)

    if len(top_k_idx) > 0:
        perm = torch.randperm(len(top_k_idx))
        top_k_idx = top_k_idx[perm[: min(clip_num, len(top_k_idx))]]
    else:
        top_k_idx = torch.empty((0, 2), device=cov_all.device, dtype=torch.long)

    corr[top_k_idx[:, 0], top_k_idx[:, 1]] = 0
    pg_clipfrac = verl_masked_mean((corr == 0).float(), response_mask)
    pg_losses = torch.maximum(pg_losses1, pg_losses2) * corr
    pg_loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode)
    return pg_loss, pg_losses, corr == 0, pg_clipfrac


def verl_kl_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None):
    # core_algos.py: compute_policy_loss_kl_cov; also returns its per-token losses and the selected tokens
    kl_cov_ratio = config.policy_loss.kl_cov_ratio if config.policy_loss.kl_cov_ratio is not None else 0.0002
    ppo_kl_coef = config.policy_loss.ppo_kl_coef if config.policy_loss.ppo_kl_coef is not None else 1.0
    assert kl_cov_ratio > 0, "kl_cov_ratio should be larger than 0."

    negative_approx_kl = log_prob - old_log_prob
    abs_kl = negative_approx_kl.abs()
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses_kl = -advantages * ratio + ppo_kl_coef * abs_kl
    pg_losses = pg_losses1
    selected = torch.zeros_like(response_mask, dtype=torch.bool)

    all_valid = response_mask > 0
    all_valid_idx = torch.nonzero(all_valid.reshape(-1), as_tuple=True)[0]
    all_valid_adv = advantages[all_valid].detach().reshape(-1).cpu()
    all_valid_logp = log_prob[all_valid].detach().reshape(-1).cpu()

    k = min(kl_cov_ratio, len(all_valid_adv))

    if k != 0:
        cov_lst_all = (all_valid_adv - all_valid_adv.mean()) * (all_valid_logp - all_valid_logp.mean())
        k_percent_nums = max(1, int(len(cov_lst_all) * kl_cov_ratio))
        large_cov_idxs = torch.topk(cov_lst_all, k_percent_nums, largest=True).indices

        if len(large_cov_idxs) != 0:
            large_cov_idxs = all_valid_idx[large_cov_idxs]
            pg_losses[large_cov_idxs // advantages.shape[1], large_cov_idxs % advantages.shape[1]] = pg_losses_kl[
                large_cov_idxs // advantages.shape[1], large_cov_idxs % advantages.shape[1]
            ]
            selected[large_cov_idxs // advantages.shape[1], large_cov_idxs % advantages.shape[1]] = True

    pg_loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode)
    return pg_loss, pg_losses, selected


def verl_config(clip_low=0.2, clip_high=None, clip_cov_ratio=0.0002, clip_cov_lb=1.0, clip_cov_ub=5.0,
                kl_cov_ratio=0.0002, ppo_kl_coef=0.1):
    """verl's ActorConfig fields its loss functions read (clip_ratio_low / _high; policy_loss.*)."""
    return types.SimpleNamespace(
        clip_ratio=clip_low, clip_ratio_low=clip_low, clip_ratio_high=clip_high,
        policy_loss=types.SimpleNamespace(clip_cov_ratio=clip_cov_ratio, clip_cov_lb=clip_cov_lb,
                                          clip_cov_ub=clip_cov_ub, kl_cov_ratio=kl_cov_ratio,
                                          ppo_kl_coef=ppo_kl_coef))


def verl_loss(name, old, logp, adv, mask, agg, cfg):
    fn = {"gpg": verl_gpg, "clip_cov": verl_clip_cov, "kl_cov": verl_kl_cov}[name]
    return fn(old, logp, adv, mask, agg, cfg)


# --------------------------------------------------------------------------- helpers


def ours(name, logp, old, adv, mask, agg, cfg, **kw):
    """policy_loss_from_logp of ``name`` with verl's hyper-parameters of ``cfg``."""
    c, p = cfg, cfg.policy_loss
    return pl.policy_loss_from_logp(
        logp, torch.zeros_like(logp), old, adv, mask, policy_loss=name, clip_low=c.clip_ratio_low,
        clip_high=c.clip_ratio_high, clip_cov_ratio=p.clip_cov_ratio, clip_cov_lb=p.clip_cov_lb,
        clip_cov_ub=p.clip_cov_ub, kl_cov_ratio=p.kl_cov_ratio, ppo_kl_coef=p.ppo_kl_coef, agg=agg, **kw)


def expected(agg, verl_value, verl_tok, mask):
    """verl's aggregate where ours departs from it by definition: seq-mean-token-sum-norm is
    Σ / T in verl, Σ / (B·T) here (TRL's dr_grpo); seq-mean-token-mean gives a row without a loss
    token 0/0 = NaN in verl, 0 here (the row still counts in the mean over rows)."""
    B = mask.shape[0]
    if agg == "seq-mean-token-sum-norm":
        return verl_value / B
    if agg == "seq-mean-token-mean":
        rows = torch.where(mask, verl_tok, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)
        return rows.mean()
    return verl_value


def batch(dtype=torch.float32, seed=0, B=5, T=9, empty_row=True):
    """Ragged right-padded masks with a hole, one row without a loss token (``empty_row``); one
    advantage per row (GRPO-like, so covariances tie within a row's equal log-probs) of both
    signs; log-ratios on both sides of the clip; NaN-free padding (verl reads it)."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 4.0
    old = logp + (torch.rand(B, T, generator=g, dtype=dtype) - 0.5) * 0.8
    adv = (torch.randn(B, 1, generator=g, dtype=dtype) * 1.5).expand(B, T).contiguous()
    lens = torch.randint(2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lens[:, None]
    mask[0, 1] = False  # a hole
    if empty_row:
        mask[2] = False
    return logp, old, adv, mask


def _grad(loss, x):
    return torch.autograd.grad(loss, x)[0]


def check_equal(name, logp, old, adv, mask, agg, cfg, seed=0, tol=None):
    """Our loss, gradient and selection against verl's, the global generator reset to ``seed``
    before each (clip-cov's draw)."""
    tol = tol or {}
    x1 = logp.clone().requires_grad_(True)
    torch.manual_seed(seed)
    got, st = ours(name, x1, old, adv, mask, agg, cfg)
    after_ours = torch.rand(1)  # the generator's stream after the call: both draw the same
    x2 = logp.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = verl_loss(name, old, x2, adv, mask, agg, cfg)
    after_verl = torch.rand(1)
    assert torch.equal(after_ours, after_verl)
    want = expected(agg, out[0], out[1], mask)
    torch.testing.assert_close(got, want.to(got.dtype), **tol)
    torch.testing.assert_close(_grad(got, x1), _grad(want, x2), **tol)
    if name != "gpg":
        sel = out[2]
        assert float(st["cov_frac"]) == pytest.approx(float(sel[mask].float().mean()) if mask.any() else 0.0)
    return out


# --------------------------------------------------------------------------- the losses against verl


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpg_is_verls(agg, dtype):
    logp, old, adv, mask = batch(dtype)
    check_equal("gpg", logp, old, adv, mask, agg, verl_config())
    # no ratio: the old log-probs do not matter
    x = logp.clone().requires_grad_(True)
    a, _ = ours("gpg", x, old, adv, mask, agg, verl_config())
    b, _ = ours("gpg", x, old + 3.0, adv, mask, agg, verl_config())
    assert torch.equal(a, b)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ratio,lb,ub,clip_high", [
    (0.0002, 1.0, 5.0, None),  # verl's defaults: ratio·N < 1, one token at most
    (0.2, 0.0, 5.0, 0.28),  # several of many candidates, drawn at random
    (0.5, -1.0, 0.5, None),  # more asked than there are candidates: all of them
    (0.3, 50.0, 60.0, None),  # no candidate: nothing drawn, the generator untouched
])
def test_clip_cov_is_verls(agg, dtype, ratio, lb, ub, clip_high):
    logp, old, adv, mask = batch(dtype, seed=1)
    cfg = verl_config(clip_high=clip_high, clip_cov_ratio=ratio, clip_cov_lb=lb, clip_cov_ub=ub)
    for seed in range(3):
        check_equal("clip_cov", logp, old, adv, mask, agg, cfg, seed=seed)


def test_clip_cov_selection():
    """The candidates are the unclipped loss tokens with lb < cov < ub; max(⌊ratio·N⌋, 1) of them
    are dropped (value and gradient 0); what PPO clips keeps its clipped term."""
    logp, old, adv, mask = batch(torch.float64, seed=2, empty_row=False)
    n = int(mask.sum())
    _, _, clipped, _ = pl.reference.ppo_token_loss(logp, old, adv)
    m = lambda x: torch.where(mask, x, 0.0).sum() / mask.sum()
    cov = (adv - m(adv)) * (logp - m(logp))
    cand = mask & ~clipped & (cov > 0.0) & (cov < 5.0)
    assert int(cand.sum()) >= 4 and (mask & clipped).any()
    for ratio, k in ((0.0002, 1), (3.0 / n, 3), (1.0, int(cand.sum()))):
        sel = pl.clip_cov_mask(logp, old, adv, mask, clip_cov_ratio=ratio, clip_cov_lb=0.0, clip_cov_ub=5.0)
        assert int(sel.sum()) == k and not (sel & ~cand).any()
        x = logp.clone().requires_grad_(True)
        tok, _, _, _ = pl.token_losses(x, old, adv, policy_loss="clip_cov", cov_mask=sel)
        g = _grad(tok.sum(), x)
        assert (tok[sel] == 0).all() and (g[sel] == 0).all() and (g[mask & ~sel & ~clipped] != 0).all()
    # a seeded generator of its own makes the draw reproducible without the global stream
    a = pl.clip_cov_mask(logp, old, adv, mask, clip_cov_ratio=0.2, clip_cov_lb=0.0,
                         generator=torch.Generator().manual_seed(3))
    b = pl.clip_cov_mask(logp, old, adv, mask, clip_cov_ratio=0.2, clip_cov_lb=0.0,
                         generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ratio,coef", [(0.0002, 0.1), (0.15, 1.0), (1.0, 0.5)])
def test_kl_cov_is_verls(agg, dtype, ratio, coef):
    logp, old, adv, mask = batch(dtype, seed=3)
    check_equal("kl_cov", logp, old, adv, mask, agg, verl_config(kl_cov_ratio=ratio, ppo_kl_coef=coef))


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_kl_cov_ties_are_verls(ratio):
    """Covariances that tie across the top-k boundary (equal log-probs within a row, one
    advantage per row, mirrored rows): the same tokens as verl's topk picks."""
    B, T = 4, 6
    logp = torch.tensor([-1.0, -1.0, -2.0, -2.0, -3.0, -1.0]).repeat(B, 1)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None].expand(B, T).contiguous()
    old = logp - 0.1 * torch.arange(B * T, dtype=torch.float32).reshape(B, T) / (B * T)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[3, 4:] = False
    _, _, sel = check_equal("kl_cov", logp, old, adv, mask, "token-mean",
                            verl_config(kl_cov_ratio=ratio, ppo_kl_coef=1.0))
    n = int(mask.sum())
    assert int(sel.sum()) == max(1, int(n * ratio))
    assert torch.equal(pl.kl_cov_mask(logp, adv, mask, kl_cov_ratio=ratio), sel)


def test_tiny_and_empty_batches():
    """One loss token (ratio·N < 1: it is selected), no loss token at all (nothing selected, the
    loss 0, no draw), float32 in a bf16 input's place."""
    logp, old, adv, mask = batch(torch.float32, seed=4, B=2, T=3, empty_row=False)
    one = torch.zeros_like(mask)
    one[1, 0] = True
    old1 = logp.clone()  # on policy: nothing clipped
    adv1 = torch.full_like(adv, 0.0)
    adv1[1, 0] = 2.0  # (A − Ā) = 0 with one token: cov 0, in (lb, ub) when lb < 0
    check_equal("kl_cov", logp, old, adv, one, "token-mean", verl_config(ppo_kl_coef=1.0))
    assert int(pl.kl_cov_mask(logp, adv, one).sum()) == 1
    check_equal("clip_cov", logp, old1, adv1, one, "token-mean", verl_config(clip_cov_lb=-1.0))
    assert int(pl.clip_cov_mask(logp, old1, adv1, one, clip_cov_lb=-1.0).sum()) == 1
    none = torch.zeros_like(mask)
    for name in ("clip_cov", "kl_cov", "gpg"):
        x = logp.clone().requires_grad_(True)
        torch.manual_seed(0)
        loss, st = ours(name, x, old, adv, none, "token-mean", verl_config())
        assert torch.equal(torch.rand(1), torch.manual_seed(0) and torch.rand(1))  # no draw
        assert float(loss.detach()) == 0.0 and (_grad(loss, x) == 0).all()
        if name != "gpg":
            assert float(st["cov_frac"]) == 0.0
    lb, ob, ab = logp.bfloat16(), old.bfloat16(), adv.bfloat16()
    loss, _ = ours("kl_cov", lb.requires_grad_(True), ob, ab, mask, "token-mean", verl_config(kl_cov_ratio=0.5))
    assert loss.dtype == torch.float32


def test_masked_out_entries_are_never_read():
    """NaN outside the mask changes neither loss nor gradient nor selection (ours; verl reads them)."""
    logp, old, adv, mask = batch(torch.float64, seed=5)
    cfg = verl_config(clip_cov_ratio=0.3, clip_cov_lb=0.0, kl_cov_ratio=0.3, ppo_kl_coef=1.0)
    nan = lambda t: torch.where(mask, t, torch.full_like(t, math.nan))
    for name in ("clip_cov", "kl_cov", "gpg"):
        res = []
        for a, b, c in ((logp, old, adv), (nan(logp), nan(old), nan(adv))):
            x = a.clone().requires_grad_(True)
            torch.manual_seed(1)
            loss, _ = ours(name, x, b, c, mask, "seq-mean-token-mean", cfg)
            res.append((loss, _grad(loss, x)))
        assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1]), name


def test_function_refusals():
    logp, old, adv, mask = batch()
    for name in ("clip_cov", "kl_cov", "gpg"):
        with pytest.raises(ValueError, match=f"importance_sampling_level 'sequence' is not supported with "
                                             f"policy_loss '{name}'"):
            ours(name, logp, old, adv, mask, "token-mean", verl_config(), importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="mask .* or cov_mask must be given for policy_loss 'kl_cov'"):
        pl.token_losses(logp, old, adv, policy_loss="kl_cov")


# --------------------------------------------------------------------------- the trainer


def n_chars(prompts, completions):
    """A dense reward: groups rarely tie, so advantages (and updates) are non-zero."""
    return [float(len(c)) for c in completions]


def _grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


STEP_CASES = [
    ("gpg", dict(), "token-mean"),
    ("clip_cov", dict(clip_cov_ratio=0.2, clip_cov_lb=0.0, clip_high=0.1, clip_low=0.1), "token-mean"),
    ("kl_cov", dict(kl_cov_ratio=0.2, ppo_kl_coef=1.0), "seq-mean-token-sum"),
]


@pytest.mark.parametrize("name,kw,agg", STEP_CASES)
def test_grpo_step_is_verls(tmp_path, name, kw, agg):
    """One GRPO update of a tiny model (one micro-batch of 8 answers, after a first step so the
    ratios are not 1): the trainer's loss and parameter gradients equal verl's function applied to
    the same model's log-probs, old log-probs, advantages and loss mask."""
    from rlhf_fast.models.logprobs import _target_mask, sequence_logprobs

    pol, tok = make_policy()
    cfg = make_config(tmp_path, "grpo", rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5),
                      ppo=PPOConfig(policy_loss=name, mini_batch_size=8, micro_batch_size=8, agg=agg, **kw),
                      kl=KLConfig(coef=0.0))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS)
    data, _ = tr.rollout()
    assert data.advantages.abs().sum() > 0
    tr.optimizer.zero_grad()
    tr.policy_backward(data)
    tr.optimizer.step()
    tr.policy.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    st = tr.policy_backward(data)
    g1 = _grads(tr.policy)
    tr.policy.zero_grad(set_to_none=True)
    mask = _target_mask(data.attention_mask, data.response_mask)
    logp = sequence_logprobs(tr.policy, data.input_ids, data.attention_mask, response_mask=mask,
                             temperature=cfg.rollout.temperature)
    vcfg = verl_config(clip_low=cfg.ppo.clip_low, clip_high=cfg.ppo.clip_high, clip_cov_ratio=cfg.ppo.clip_cov_ratio,
                       clip_cov_lb=cfg.ppo.clip_cov_lb, clip_cov_ub=cfg.ppo.clip_cov_ub,
                       kl_cov_ratio=cfg.ppo.kl_cov_ratio, ppo_kl_coef=cfg.ppo.ppo_kl_coef)
    torch.manual_seed(11)
    out = verl_loss(name, data.old_logp, logp, data.advantages, mask, agg, vcfg)
    out[0].backward()
    g2 = _grads(tr.policy)
    assert st["loss"] == pytest.approx(float(out[0].detach()), rel=1e-5, abs=1e-7)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(a.abs().sum() > 0 for a in g1)
    if name != "gpg":
        assert 0 < st["cov_frac"] == pytest.approx(float(out[2][mask].float().mean()))
    if name == "clip_cov":
        assert st["clip_frac"] > 0  # PPO's clip is active too: its tokens are no candidates


def test_selection_is_per_micro_batch(tmp_path):
    """As verl (its loss is called per micro-batch on each rank), the covariance, its means and
    the count max(⌊ratio·N⌋, 1) are each micro-batch's: with verl's default ratio 0.0002 every
    micro-batch selects one token, so four micro-batches select four."""
    from rlhf_fast.models.logprobs import _target_mask

    pol, tok = make_policy()
    cfg = make_config(tmp_path, "grpo", rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5),
                      ppo=PPOConfig(policy_loss="kl_cov", mini_batch_size=8, micro_batch_size=8),
                      kl=KLConfig(coef=0.0))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS)
    data, _ = tr.rollout()
    n = float(_target_mask(data.attention_mask, data.response_mask).sum())
    for mb, k in ((8, 1), (2, 4)):
        tr.policy.zero_grad(set_to_none=True)
        st = tr.policy_backward(data, mb)
        assert st["cov_frac"] == pytest.approx(k / n), mb


@pytest.mark.parametrize("name,kw", [("gpg", dict()), ("clip_cov", dict(clip_cov_ratio=0.05, clip_cov_lb=0.0)),
                                     ("kl_cov", dict(kl_cov_ratio=0.05))])
def test_grpo_learns(tmp_path, name, kw):
    """The frac-of-'a' reward of tests/test_rl_learning.py rises under each loss, and does not
    with lr 1e-12 (the same seed: the rise is the loss's doing)."""
    rewards = {}
    for lr in (5e-3, 1e-12):
        torch.manual_seed(0)
        pol, tok = make_policy()
        cfg = make_config(tmp_path / str(lr), "grpo", steps=22, lr=lr,
                          ppo=PPOConfig(policy_loss=name, epochs=2, mini_batch_size=8, micro_batch_size=8, **kw))
        hist = RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=PROMPTS).train()
        assert all(math.isfinite(h["policy/loss"]) for h in hist)
        if name != "gpg":
            assert any(h["policy/cov_frac"] > 0 for h in hist) or lr == 1e-12
        r = [h["reward/total"] for h in hist]
        rewards[lr] = sum(r[-4:]) / 4
    assert rewards[5e-3] > rewards[1e-12] + 0.25 and rewards[5e-3] > 0.4, rewards


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw,match", [
    (dict(clip_cov_ratio=0.01), r"ppo.clip_cov_ratio / ppo.clip_cov_lb / ppo.clip_cov_ub only apply to "
                                r"ppo.policy_loss 'clip_cov', got policy_loss 'clip'"),
    (dict(policy_loss="kl_cov", clip_cov_ub=3.0), "only apply to ppo.policy_loss 'clip_cov', got policy_loss 'kl_cov'"),
    (dict(ppo_kl_coef=1.0), r"ppo.kl_cov_ratio / ppo.ppo_kl_coef only apply to ppo.policy_loss 'kl_cov'"),
    (dict(policy_loss="gpg", kl_cov_ratio=0.1), "only apply to ppo.policy_loss 'kl_cov', got policy_loss 'gpg'"),
    (dict(policy_loss="clip_cov", clip_cov_ratio=0.0), r"ppo.clip_cov_ratio must be in \(0, 1\]"),
    (dict(policy_loss="kl_cov", kl_cov_ratio=1.5), r"ppo.kl_cov_ratio must be in \(0, 1\]"),
    (dict(policy_loss="clip_cov", clip_cov_lb=5.0), r"ppo.clip_cov_lb \(5.0\) must be less than ppo.clip_cov_ub"),
    (dict(policy_loss="clip_cov", clip_cov_ub=float("nan")), "ppo.clip_cov_ub must be a number"),
    (dict(policy_loss="kl_cov", ppo_kl_coef=-1.0), "ppo.ppo_kl_coef"),
    (dict(policy_loss="kl_cov", clip_high=0.3), "ppo.clip_high has no effect with ppo.policy_loss 'kl_cov'"),
    (dict(policy_loss="gpg", clip_high=0.3), "ppo.clip_high has no effect with ppo.policy_loss 'gpg'"),
    (dict(policy_loss="clip_cov", dual_clip=3.0), "ppo.dual_clip is a bound of the 'clip' loss"),
    (dict(policy_loss="gpg", trpo=True), "ppo.trpo needs ppo.policy_loss 'clip'"),
    (dict(policy_loss="kl_cov", importance_sampling_level="sequence"),
     "ppo.importance_sampling_level 'sequence' is not supported with ppo.policy_loss 'kl_cov'"),
    (dict(policy_loss="clip_cov", importance_sampling_level="sequence_sum", agg="seq-mean-token-sum"),
     "needs ppo.policy_loss 'clip'"),
    (dict(policy_loss="clip-cov"), "ppo.policy_loss"),
])
def test_config_errors_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**kw)


def test_config_defaults_and_loading():
    d = PPOConfig()
    assert (d.policy_loss, d.clip_cov_ratio, d.clip_cov_lb, d.clip_cov_ub, d.kl_cov_ratio, d.ppo_kl_coef) == \
        ("clip", 0.0002, 1.0, 5.0, 0.0002, 0.1)  # verl's PolicyLossConfig defaults
    assert not d.composed_loss
    cfg = load_config(RLConfig, None, ["--ppo.policy_loss", "clip_cov", "--ppo.clip_cov_ratio", "0.001",
                                       "--ppo.clip_cov_lb", "0.5", "--ppo.clip_high", "0.28"])
    assert (cfg.ppo.policy_loss, cfg.ppo.clip_cov_ratio, cfg.ppo.clip_cov_lb) == ("clip_cov", 0.001, 0.5)
    assert cfg.ppo.composed_loss
    for name in ("kl_cov", "gpg"):
        assert PPOConfig(policy_loss=name).composed_loss
