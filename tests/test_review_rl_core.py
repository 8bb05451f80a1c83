"""Review of the core RL algorithms against the peers' published code (TRL 1.16, verl's
core_algos.py, OpenRLHF's experience_maker / models.utils, Ziegler et al.'s controller), on
hand-built batches and on one real tiny-model rollout per estimator.

The peers' lines are transcribed into the tests (a comment names the file and function). The
tests under "bugs" were strict xfails of bugs the review found, since fixed."""


import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.algorithms.shaping import RunningMoments, shape_scores
from rlhf_fast.ops import reference
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import KLConfig, PPOConfig, RewardConfig, RLConfig, RolloutConfig
from tests.test_rl_learning import PROMPTS, make_config, make_policy

pytestmark = pytest.mark.usefixtures("one_thread")

BETA = 0.1


def n_chars(prompts, completions):
    """A dense reward, so groups rarely tie."""
    return [float(len(c)) / 3 for c in completions]


def _trainer(tmp_path, estimator, *, perturb=True, **kw):
    """A tiny trainer of 2 prompts × 4 answers × 5 tokens; ``perturb`` moves the policy away
    from its reference so the KL terms are not 0."""
    pol, tok = make_policy()
    kw.setdefault("rollout", RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5))
    kw.setdefault("kl", KLConfig(coef=BETA))
    tr = RLTrainer(make_config(tmp_path, estimator, **kw), pol, tok, reward_fns=[n_chars], prompts=PROMPTS)
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in tr.policy.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return tr


def _logp(model, data, T):
    """Per-token log-probs ``[B, L]`` of ``data``'s tokens at temperature T, from the logits."""
    ids, am, rm = data.input_ids, data.attention_mask, data.response_mask
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am.long(),
                       position_ids=(am.long().cumsum(1) - 1).clamp(min=0)).logits.float()
    lp = torch.log_softmax(logits[:, :-1] / T, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros(ids.shape[0], 1), lp], 1) * rm


def _eos_scores(scores, mask):
    """OpenRLHF models/utils.py compute_reward: the score scattered on each row's last action."""
    eos = mask.shape[1] - 1 - mask.long().fliplr().argmax(dim=1, keepdim=True)
    return torch.zeros(mask.shape).scatter_(1, eos, scores.unsqueeze(1).float())


def verl_masked_whiten(values, mask, shift_mean=True):
    """verl utils/torch_functional.py masked_whiten (masked_var unbiased)."""
    mean = (values * mask).sum() / mask.sum()
    var = (((values - mean) ** 2) * mask).sum() / mask.sum()
    var = var * (mask.sum() / (mask.sum() - 1))
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    """verl trainer/ppo/core_algos.py compute_gae_advantage_return (masked positions skipped)."""
    nextvalues, lastgaelam, rev = 0, 0, []
    for t in reversed(range(token_level_rewards.shape[-1])):
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        rev.append(lastgaelam)
    advantages = torch.stack(rev[::-1], dim=1)
    returns = advantages + values
    return verl_masked_whiten(advantages, response_mask) * response_mask, returns


# --------------------------------------------------------------------------- the trainer's rollout


def test_gae_rollout_is_verls_at_the_sampling_temperature(tmp_path):
    """PPO: old and reference log-probs at the rollout temperature (0.7); token rewards = score
    on the last response token − β·k1; GAE with V(s_t) and 0 after the last token; advantages
    whitened over the batch's response tokens (unbiased), returns not whitened."""
    tr = _trainer(tmp_path, "gae", rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5,
                                                         temperature=0.7),
                  ppo=PPOConfig(whiten_advantages=True, gamma=0.99, lam=0.9))
    data, m = tr.rollout()
    rm = data.response_mask
    with torch.no_grad():  # V(s_t): the critic's output after reading token t − 1 (verl: values[:, -R - 1 : -1])
        raw = tr.critic(data.input_ids, data.attention_mask).float()
    torch.testing.assert_close(data.values[:, 1:], raw[:, :-1] * rm[:, 1:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(data.old_logp, _logp(tr.policy, data, 0.7), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(data.ref_logp, _logp(tr.reference, data, 0.7), rtol=1e-4, atol=1e-5)
    kl = (data.old_logp - data.ref_logp) * rm
    assert m["kl/seq"] == pytest.approx(float(kl.sum(1).mean()), rel=1e-5) and m["kl/seq"] > 0.1
    # verl core_algos.py apply_kl_penalty: token_level_scores − β·kld (kl_penalty "kl" = k1)
    rewards = _eos_scores(data.scores, rm) - BETA * kl
    P = int(rm.float().argmax(1).min())  # the response columns (every row's prompt ends before)
    f = rm[:, P:].float()
    adv, ret = verl_gae(rewards[:, P:], data.values[:, P:], f, 0.99, 0.9)
    torch.testing.assert_close(data.advantages[:, P:], adv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(data.returns[:, P:], ret * f, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_with_the_kl_in_the_reward_are_the_peers(tmp_path, estimator):
    """The KL in the reward: the score minus β·Σ_t k1 (TRL rloo_trainer.py
    _generate_and_score_completions: ``rewards = rewards - self.beta * kl``), then the group
    baseline of verl core_algos.py: compute_grpo_outcome_advantage ((s − mean) / (std + 1e-6),
    torch.std; ``norm_adv_by_std_in_grpo=False`` for Dr.GRPO) and compute_rloo_outcome_advantage
    (s·n/(n−1) − mean·n/(n−1))."""
    tr = _trainer(tmp_path, estimator)
    data, _ = tr.rollout()
    rm = data.response_mask
    kl = ((data.old_logp - data.ref_logp) * rm).sum(-1)
    assert float(kl.abs().max()) > 0.1
    s = (data.scores - BETA * kl).view(-1, 4)
    mean, std, n = s.mean(1, keepdim=True), s.std(1, keepdim=True), 4
    want = {"grpo": (s - mean) / (std + 1e-6), "dr_grpo": s - mean,
            "rloo": s * n / (n - 1) - mean * n / (n - 1)}[estimator].reshape(-1)
    torch.testing.assert_close(data.advantages, want[:, None] * rm, rtol=1e-5, atol=1e-5)


def test_reinforce_pp_is_verls_and_openrlhfs_up_to_bessel(tmp_path):
    """REINFORCE++: per-token −β·k1 plus the score on the last token (OpenRLHF compute_reward),
    discounted returns (get_cumulative_returns; verl compute_reinforce_plus_plus_outcome_advantage)
    whitened over every response token of the batch with the unbiased variance (verl
    masked_whiten). OpenRLHF's global whitening divides by the population variance: the two
    differ by exactly sqrt((n−1)/n), n the token count."""
    tr = _trainer(tmp_path, "reinforce++", ppo=PPOConfig(gamma=0.9))
    data, _ = tr.rollout()
    rm = data.response_mask
    f = rm.float()
    reward = _eos_scores(data.scores, rm) - BETA * (data.old_logp - data.ref_logp) * f
    returns, running = torch.zeros_like(reward), torch.zeros(reward.shape[0])
    for t in reversed(range(reward.shape[1])):  # response tokens are contiguous here: no hole
        running = reward[:, t] + 0.9 * running * f[:, t]
        returns[:, t] = running * f[:, t]
    verl = verl_masked_whiten(returns, f) * f
    torch.testing.assert_close(data.advantages, verl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(data.returns, returns, rtol=1e-5, atol=1e-5)
    # OpenRLHF experience_maker: var = Σ (x − mean)² m / num_actions; rstd = var.clamp(1e-8).rsqrt()
    n = f.sum()
    mean = (returns * f).sum() / n
    orl = (returns - mean) * (((returns - mean) ** 2 * f).sum() / n).clamp(min=1e-8).rsqrt() * f
    torch.testing.assert_close(orl * torch.sqrt((n - 1) / n), data.advantages, rtol=1e-4, atol=1e-5)


def test_every_epoch_takes_the_rollouts_old_logp(tmp_path):
    """Two PPO epochs (one mini-batch each): the second update's ratio is to the rollout's
    log-probs, not to log-probs recomputed after the first update (its ratios move off 1)."""
    tr = _trainer(tmp_path, "grpo", perturb=False, ppo=PPOConfig(epochs=2, mini_batch_size=8, micro_batch_size=8))
    data, _ = tr.rollout()
    seen, real = [], tr.policy_backward

    def spy(d, *a, **k):
        st = real(d, *a, **k)
        seen.append((d.old_logp.clone(), st))
        return st

    tr.policy_backward = spy
    tr.update(data)
    assert len(seen) == 2
    for old, _ in seen:  # (rows shuffled: compare as sorted rows)
        torch.testing.assert_close(old.sum(1).sort().values, data.old_logp.sum(1).sort().values)
    assert seen[0][1]["approx_kl"] < 1e-10 and seen[1][1]["approx_kl"] > 1e-8


def test_adaptive_kl_update_is_zieglers(tmp_path):
    """Ziegler et al. (lm-human-preferences, TRL < 0.12 core.py AdaptiveKLController.update):
    e = clip(KL / target − 1, ±0.2); β ← β·(1 + e·n_steps / horizon), with KL the rollout's
    mean summed k1 per sequence and n_steps the batch's samples."""
    tr = _trainer(tmp_path, "grpo", kl=KLConfig(coef=BETA, controller="adaptive", target=2.0, horizon=40))
    m = tr.step()
    e = min(max(m["kl/seq"] / 2.0 - 1, -0.2), 0.2)
    assert e != 0 and tr.kl_ctl.value == pytest.approx(BETA * (1 + e * 8 / 40), rel=1e-9)


# --------------------------------------------------------------------------- the ops against verl


def _batch(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 1.0 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, :2] = False
    return logp, old, ref, adv, mask


def verl_agg_loss(loss_mat, loss_mask, mode):
    """verl core_algos.py agg_loss (one process), with Dr.GRPO's constant as TRL's
    ``loss_type="dr_grpo"`` (B · max_completion_length); verl divides that sum by T alone."""
    if mode == "token-mean":
        return (loss_mat * loss_mask).sum() / loss_mask.sum()
    if mode == "seq-mean-token-sum":
        return torch.sum(loss_mat * loss_mask, dim=-1).mean()
    if mode == "seq-mean-token-mean":
        return (torch.sum(loss_mat * loss_mask, dim=-1) / torch.sum(loss_mask, dim=-1)).mean()
    return torch.sum(loss_mat * loss_mask) / (loss_mask.shape[0] * loss_mask.shape[-1])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_ppo_loss_with_dual_clip_is_verls(agg):
    """verl core_algos.py compute_policy_loss (vanilla): asymmetric clip, dual clip c = 3 on
    A < 0, clip fraction; aggregated by agg_loss."""
    logp, old, _, adv, mask = _batch()
    neg_kl = torch.clamp(logp - old, -20.0, 20.0)
    ratio = torch.exp(neg_kl)
    pg1, pg2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - 0.2, 1 + 0.28)
    clip1 = torch.maximum(pg1, pg2)
    pg_losses = torch.where(adv < 0, torch.min(-adv * 3.0, clip1), clip1)
    f = mask.double()
    want = verl_agg_loss(pg_losses, f, agg)
    clipfrac = ((pg2 > pg1).double() * f).sum() / f.sum()
    loss, st = ops.ppo_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg=agg)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(st["clip_frac"], clipfrac)
    assert 0 < float(clipfrac) < 1 and float(st["dual_clip_frac"]) > 0  # every branch is taken


def test_kl_estimators_are_verls_and_openrlhfs():
    """verl core_algos.py kl_penalty: "kl" (k1), "abs", "mse" (k2 = ½d²), "low_var_kl" (k3 =
    e^{ref−logp} − (ref−logp) − 1; verl clamps it to ±10, out of reach here); OpenRLHF
    compute_approx_kl k3 (log_ratio = −(logp − ref); e^{log_ratio} − 1 − log_ratio)."""
    logp, _, ref, _, _ = _batch(1)
    kl = ref - logp
    verl = {"k1": logp - ref, "abs": (logp - ref).abs(), "k2": 0.5 * (logp - ref).square(),
            "k3": torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)}
    for kind, want in verl.items():
        torch.testing.assert_close(ops.kl_penalty(logp, ref, kind), want)
    lr = -(logp - ref)
    torch.testing.assert_close(ops.kl_penalty(logp, ref, "k3"), lr.exp() - 1 - lr)


def test_value_loss_is_verls_clipped_loss():
    """verl core_algos.py compute_value_loss: vpredclipped = clip(vpred, values ± c);
    0.5·max((vpred − R)², (vpredclipped − R)²), token-mean; clip fraction where the clipped one
    is larger."""
    vpred, values, _, returns, mask = _batch(2)
    vclip = values + torch.clamp(vpred - values, -0.2, 0.2)
    l1, l2 = (vpred - returns) ** 2, (vclip - returns) ** 2
    f = mask.double()
    want = 0.5 * (torch.max(l1, l2) * f).sum() / f.sum()
    loss, st = ops.ppo_value_loss(vpred, values, returns, mask, clip=0.2)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(st["clip_frac"], ((l2 > l1).double() * f).sum() / f.sum())


def test_entropy_bonus_lowers_the_loss_and_raises_the_entropy():
    """The entropy bonus is subtracted (maximised): d loss / d entropy = −coef / tokens."""
    logp, old, _, adv, mask = _batch(3)
    ent = torch.rand(logp.shape, dtype=torch.float64, requires_grad=True)
    loss, _ = reference.policy_loss_from_logp(logp, ent, old, adv, mask, entropy_coef=0.01)
    base, _ = reference.policy_loss_from_logp(logp, ent, old, adv, mask)
    loss.backward()
    f = mask.double()
    torch.testing.assert_close(base - loss, 0.01 * (ent * f).sum() / f.sum())
    torch.testing.assert_close(ent.grad, -0.01 * f / f.sum())


# --------------------------------------------------------------------------- bugs


def trl_running_moments_update(state, xs):
    """TRL (< 0.12) trainer/utils.py RunningMoments.update, one process; returns the new state
    with ``std`` the running unbiased std, as PPOTrainer divides by it (use_score_norm)."""
    mean, var, count = state
    xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
    xs_count = xs.numel()
    delta = xs_mean - mean
    tot_count = count + xs_count
    new_sum = xs_var * xs_count
    old_sum = var * count + delta ** 2 * count * xs_count / tot_count
    tot_sum = old_sum + new_sum
    mean = mean + delta * xs_count / tot_count
    new_var = tot_sum / tot_count
    std = (new_var * tot_count / (tot_count - 1)).sqrt()
    return (mean, new_var, tot_count), std


def test_running_reward_whitening_divides_by_the_unbiased_std():
    """TRL PPOTrainer (< 0.12) step, use_score_scaling + use_score_norm:
    (scores − running.mean) / (running.std + eps), running.std unbiased over all scores seen."""
    x1 = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 7])
    x2 = torch.tensor([3.0, -1, 2, 9])
    moments, state = RunningMoments(), (torch.tensor(0.0), torch.tensor(1.0), 1e-24)
    for x in (x1, x2):
        state, std = trl_running_moments_update(state, x)
        want = (x - state[0]) / (std + torch.finfo(torch.float32).eps)
        torch.testing.assert_close(shape_scores(x, whiten=True, moments=moments), want, rtol=1e-5, atol=1e-6)
    # the same first batch through the batch-statistics branch (no moments): unbiased already
    torch.testing.assert_close(shape_scores(x1, whiten=True), shape_scores(x1, whiten=True, moments=RunningMoments()))


def test_kl_kind_in_the_reward_is_used_or_refused(tmp_path):
    """kl.kind k2 with the KL in the reward: either refused naming kl.kind, or the reward holds
    −β·k2 (verl core_algos.py apply_kl_penalty with kl_penalty "mse"; OpenRLHF compute_reward
    with kl_estimator k2) — not k1 silently."""
    try:
        tr = _trainer(tmp_path, "dr_grpo", kl=KLConfig(coef=BETA, kind="k2", placement="reward"))
    except ValueError as e:
        assert "kl.kind" in str(e)
        return
    data, _ = tr.rollout()
    rm = data.response_mask
    k2 = (0.5 * (data.old_logp - data.ref_logp) ** 2 * rm).sum(-1)
    s = (data.scores - BETA * k2).view(-1, 4)
    torch.testing.assert_close(data.advantages, (s - s.mean(1, keepdim=True)).reshape(-1)[:, None] * rm,
                               rtol=1e-5, atol=1e-5)


P4 = ["q:", "x", "0", "a b"]


def by_prompt(prompts, completions):
    """The prompt's index: rank 0 holds prompts 0 and 1 (scores 0, 1), rank 1 prompts 2 and 3."""
    return [float(P4.index(p)) for p in prompts]


def _whiten_worker(rank, world, store, out):
    import os

    import torch.distributed as dist

    from rlhf_fast.distributed import DistributedConfig

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        pol, tok = make_policy()
        cfg = RLConfig(estimator="reinforce++", steps=1, output_dir=f"{out}/run", progress=False,
                       rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=3),
                       reward=RewardConfig(whiten=True), kl=KLConfig(coef=0.0),
                       ppo=PPOConfig(mini_batch_size=4, micro_batch_size=4),
                       distributed=DistributedConfig(strategy="ddp"))
        tr = RLTrainer(cfg, pol, tok, reward_fns=[by_prompt], prompts=P4)
        data, _ = tr.rollout()
        raw = torch.tensor([r for _, _, r in tr._last_texts])  # this rank's raw totals, in row order
        torch.save((data.scores, raw), f"{out}/scores.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_reward_whiten_uses_every_ranks_scores(tmp_path):
    """Two gloo ranks: the shaped scores are the whitening of the global batch's raw scores
    (0,0,1,1,2,2,3,3 over the ranks, as one process has them, and as TRL's RunningMoments with
    get_global_statistics), not of each rank's own half (rank 0's 0,0,1,1 → ±1)."""
    import torch.multiprocessing as mp

    # spawn, not fork: a fork of this multi-threaded process (tqdm's and huggingface_hub's threads,
    # xdist's) can deadlock in the child (it hung a CI run)
    mp.start_processes(_whiten_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    parts = [torch.load(tmp_path / f"scores.{k}") for k in range(2)]
    got, raw = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    assert sorted(raw.tolist()) == [0.0, 0, 1, 1, 2, 2, 3, 3]
    torch.testing.assert_close(got, shape_scores(raw, whiten=True, moments=RunningMoments()))
