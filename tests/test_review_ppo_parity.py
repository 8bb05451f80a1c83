"""Review of ``rlhf-fast ppo`` (RLConfig estimator ``gae``: PPO with a critic) against TRL 0.x's
PPOTrainer and OpenRLHF's PPO, backing the rows of docs/from_trl.md's section "PPOTrainer / PPOConfig
(TRL 0.x; dropped from TRL 1.x) → rlhf-fast ppo".

The peers' lines are transcribed here on small hand-made tensors (TRL 1.16, the installed one, has
no PPOTrainer), each block citing its source:

* TRL: huggingface/trl ``trl/trainer/ppo_trainer.py`` @ be8a08742d7fb9191a48b7cb5f26c5a3e93130e8
  (``PPOTrainer.train``: "Response Processing", "4. compute rewards" to "6. compute advantages and
  returns", and the loss of the update); ``trl/core.py`` @ e5d10303fb6074e0bfb4d6d22f2d81777b52f78e
  (``masked_mean`` / ``masked_var`` / ``masked_whiten``); ``trl/trainer/utils.py``
  (``first_true_indices``, ``truncate_response``).
* OpenRLHF: OpenRLHF/OpenRLHF ``openrlhf/models/loss.py`` @ f5b3f08a05fd6cbd9a5b712ed931bbb72c24f2c4
  (``PolicyLoss``, ``ValueLoss``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.algorithms.advantages import compute_advantages, token_rewards

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # TRL's own line rewards[[actual_start, actual_end]] += scores
              pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")]

DOC = Path(__file__).resolve().parent.parent / "docs" / "from_trl.md"
PAD, EOS = 0, 1
INVALID_LOGPROB = 1.0  # TRL's constant for the log-probs of padding


# ----------------------------------------------------------------------------- TRL 0.x, transcribed


def trl_masked_mean(values, mask, axis=None):  # trl/core.py
    return (values * mask).sum(axis=axis) / mask.sum(axis=axis)


def trl_masked_var(values, mask, unbiased=True):  # trl/core.py
    mean = trl_masked_mean(values, mask)
    centered_values = values - mean
    variance = trl_masked_mean(centered_values**2, mask)
    if unbiased:
        bessel_correction = mask.sum() / (mask.sum() - 1)
        variance = variance * bessel_correction
    return variance


def trl_masked_whiten(values, mask, shift_mean=True):  # trl/core.py
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def trl_first_true_indices(bools, dtype=torch.long):  # trl/trainer/utils.py
    row_len = bools.size(-1)
    zero_or_index = row_len * (~bools).type(dtype) + torch.arange(row_len, dtype=dtype, device=bools.device)
    return torch.min(zero_or_index, dim=-1).values


def trl_truncate_response(stop_token_id, pad_token_id, responses):  # trl/trainer/utils.py
    trunc_idxs = trl_first_true_indices(responses == stop_token_id).unsqueeze(-1)
    new_size = [1] * (len(responses.size()) - 1) + [responses.shape[1]]
    idxs = torch.arange(responses.shape[1], device=responses.device).view(*new_size)
    return torch.masked_fill(responses, idxs > trunc_idxs, pad_token_id)


def trl_rollout(responses, logprobs, ref_logprobs, values, scores, *, kl_coef=0.05, kl_estimator="k1", gamma=1.0,
                lam=0.95, whiten_rewards=False, missing_eos_penalty=None, pad=PAD, eos=EOS):
    """PPOTrainer.train's rollout tensors (ppo_trainer.py @ be8a087, lines "Response Processing 1"
    to "6. compute advantages and returns"), with ``stop_token="eos"`` (stop_token_id = eos)."""
    scores = scores.clone()
    postprocessed_responses = trl_truncate_response(eos, pad, responses)
    sequence_lengths = trl_first_true_indices(postprocessed_responses == pad) - 1
    contain_eos_token = torch.any(postprocessed_responses == eos, dim=-1)
    if missing_eos_penalty is not None:
        scores[~contain_eos_token] -= missing_eos_penalty
    response_idxs = torch.arange(responses.shape[1]).repeat(responses.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)
    # 4. compute rewards
    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr  # Else statement is k3
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[[actual_start, actual_end]] += scores
    # 5. whiten rewards
    if whiten_rewards:
        rewards = trl_masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
    # 6. compute advantages and returns
    lastgaelam = 0
    advantages_reversed = []
    gen_length = responses.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    raw_advantages = advantages
    advantages = trl_masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return dict(scores=scores, rewards=rewards, advantages=advantages, raw_advantages=raw_advantages,
                returns=returns, padding_mask=padding_mask, padding_mask_p1=padding_mask_p1, kl=kl,
                non_score_reward=non_score_reward, contain_eos_token=contain_eos_token,
                # the logged metrics (ppo_trainer.py, "mean_kl = kl.sum(1).mean()" ...)
                objective_kl=kl.sum(1).mean(), objective_entropy=(-logprobs).sum(1).mean(),
                objective_non_score_reward=non_score_reward.sum(1).mean(),
                objective_rlhf_reward=non_score_reward.sum(1).mean() + scores.mean())


def trl_losses(new_logprobs, mb_logprobs, mb_advantage, vpred, mb_values, mb_return, padding_mask, padding_mask_p1,
               *, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1):
    """The loss of one micro-batch of PPOTrainer.train's update (ppo_trainer.py @ be8a087)."""
    new_logprobs = torch.masked_fill(new_logprobs, padding_mask, INVALID_LOGPROB)
    vpred = torch.masked_fill(vpred, padding_mask_p1, 0)
    vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * trl_masked_mean(vf_loss_max, ~padding_mask_p1)
    vf_clipfrac = trl_masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = trl_masked_mean(pg_loss_max, ~padding_mask)
    loss = pg_loss + vf_coef * vf_loss
    pg_clipfrac = trl_masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
    approxkl = 0.5 * (logprobs_diff**2).mean()
    return dict(loss=loss, pg_loss=pg_loss, vf_loss=vf_loss, vf_clipfrac=vf_clipfrac, pg_clipfrac=pg_clipfrac,
                approxkl=approxkl, ratio=ratio.mean())


# ----------------------------------------------------------------------------- OpenRLHF, transcribed


def openrlhf_masked_mean(tensor, mask, dim=None):  # openrlhf/models/utils.py
    if mask is None:
        return tensor.mean(axis=dim)
    return (tensor * mask).sum(axis=dim) / mask.sum(axis=dim)


def openrlhf_policy_loss(log_probs, old_log_probs, advantages, action_mask, clip_eps_low=0.2, clip_eps_high=0.2,
                         token_level_loss=True):  # loss.py PolicyLoss.forward, policy_loss_type "ppo"
    log_ratio = log_probs - old_log_probs
    ratio = log_ratio.exp()
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * advantages
    loss = -torch.min(surr1, surr2)
    loss = (openrlhf_masked_mean(loss, action_mask, dim=None) if token_level_loss
            else openrlhf_masked_mean(loss, action_mask, dim=-1).mean())
    clip_ratio = openrlhf_masked_mean(torch.lt(surr2, surr1).float(), action_mask, dim=None)
    return loss, clip_ratio


def openrlhf_value_loss(values, old_values, returns, action_mask, clip_eps=0.2, token_level_loss=True):
    # loss.py ValueLoss.forward
    if clip_eps is not None:
        values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        surr1 = (values_clipped - returns) ** 2
        surr2 = (values - returns) ** 2
        loss = torch.max(surr1, surr2)
    else:
        loss = (values - returns) ** 2
    loss = (openrlhf_masked_mean(loss, action_mask, dim=None) if token_level_loss
            else openrlhf_masked_mean(loss, action_mask, dim=-1).mean())
    return 0.5 * loss


# ----------------------------------------------------------------------------- the hand-made batch


def _batch(seed=0, B=4, T=6, eos_at=(None, None, None, None)):
    """Responses ``[B, T]`` (tokens ≥ 2; ``eos_at[b]``: EOS at that column, padding after it),
    policy / reference log-probs, values V(s_t) and scores."""
    g = torch.Generator().manual_seed(seed)
    responses = torch.randint(2, 9, (B, T), generator=g)
    for b, e in enumerate(eos_at):
        if e is not None:
            responses[b, e] = EOS
            responses[b, e + 1:] = PAD
    logp = -torch.rand(B, T, generator=g, dtype=torch.float32) * 2
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float32)
    values = torch.randn(B, T, generator=g, dtype=torch.float32)
    scores = torch.randn(B, generator=g, dtype=torch.float32)
    return responses, logp, ref, values, scores


def _ours(responses, logp, ref, values, scores, mask, *, kl_coef, kind="k1", gamma=1.0, lam=0.95, whiten=True):
    kl = ops.kl_penalty(logp, ref, kind) * mask
    rewards = token_rewards(scores, mask, kl=kl, kl_coef=kl_coef)
    adv, ret = compute_advantages("gae", scores, mask, values=values * mask, kl=kl, kl_coef=kl_coef, gamma=gamma,
                                  lam=lam, whiten=whiten)
    return rewards, adv, ret


@pytest.mark.parametrize("kind", ["k1", "k3"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_rewards_gae_and_whitening_match_trl_on_answers_cut_at_response_length(kind, gamma, lam):
    """kl_coef / kl_estimator / gamma / lam and the advantage whitening: for answers that fill
    response_length (no EOS), TRL puts the score on the last token as ours, and the KL term, the
    token rewards, the GAE advantages (whitened over the response tokens, TRL's always-on
    masked_whiten = ppo.whiten_advantages true) and the returns are ours."""
    responses, logp, ref, values, scores = _batch()
    trl = trl_rollout(responses, logp, ref, values, scores, kl_coef=0.05, kl_estimator=kind, gamma=gamma, lam=lam)
    mask = ~trl["padding_mask"]
    assert mask.all()
    rewards, adv, ret = _ours(responses, logp, ref, values, scores, mask, kl_coef=0.05, kind=kind, gamma=gamma,
                              lam=lam)
    torch.testing.assert_close(ops.kl_penalty(logp, ref, kind), trl["kl"])
    torch.testing.assert_close(rewards, trl["rewards"])
    torch.testing.assert_close(adv, trl["advantages"])
    torch.testing.assert_close(ret, trl["returns"])


def test_gae_matches_trl_with_eos_when_lam_is_one_and_differs_otherwise():
    """TRL puts the score one token after the EOS (the first padding column, ``sequence_lengths_p1``)
    and trains the value there; ours (and OpenRLHF's) on the EOS, the last response token. With
    gamma = lam = 1 the advantages and returns of the response tokens are the same; with lam < 1 they
    differ (the docs say so)."""
    responses, logp, ref, values, scores = _batch(eos_at=(2, None, 4, 0))
    for lam, equal in ((1.0, True), (0.95, False)):
        trl = trl_rollout(responses, logp, ref, values, scores, kl_coef=0.05, gamma=1.0, lam=lam)
        mask = ~trl["padding_mask"]  # the response tokens up to and with the EOS: TRL's loss tokens
        assert mask.sum(1).tolist() == [3, 6, 5, 1]
        # TRL's score sits one column after our last token, where the row has room
        assert trl["rewards"][0, 3] != 0 and trl["padding_mask_p1"][0].tolist() == [False] * 4 + [True] * 2
        _, adv, ret = _ours(responses, logp, ref, values, scores, mask, kl_coef=0.05, gamma=1.0, lam=lam)
        close = torch.allclose(adv[mask], trl["advantages"][mask]) and torch.allclose(ret[mask], trl["returns"][mask])
        assert close == equal


def test_trl_pad_equal_to_eos_drops_the_eos_from_the_loss():
    """With ``pad_token_id == eos_token_id`` (a tokenizer without its own pad token) TRL's
    truncation turns the EOS into padding: the EOS token leaves TRL's loss mask and the score
    lands on it through ``sequence_lengths_p1``. Ours keeps the EOS as the last response token."""
    responses, logp, ref, values, scores = _batch(eos_at=(2, None, None, None))
    trl = trl_rollout(responses, logp, ref, values, scores, pad=EOS, eos=EOS)
    assert trl["padding_mask"][0].tolist() == [False, False, True, True, True, True]


def test_missing_eos_penalty_matches_trl():
    """missing_eos_penalty: TRL subtracts it from the score of each answer holding no EOS (an
    answer cut at response_length); ours, reward.missing_eos_penalty, from the score of each answer
    the engine cut at rollout.max_new_tokens."""
    from rlhf_fast.trainers.rl import missing_eos_scores

    responses, logp, ref, values, scores = _batch(eos_at=(2, None, 5, None))
    trl = trl_rollout(responses, logp, ref, values, scores, missing_eos_penalty=1.5)
    truncated = ~trl["contain_eos_token"]
    assert truncated.tolist() == [False, True, False, True]
    torch.testing.assert_close(missing_eos_scores(scores, truncated, 1.5), trl["scores"])
    torch.testing.assert_close(missing_eos_scores(scores, truncated, None), scores)


def test_missing_eos_penalty_reaches_the_ppo_rewards(tmp_path):
    """reward.missing_eos_penalty in a ppo rollout: reward/total = the sources' mean − penalty × the
    share of answers cut at max_new_tokens, and the token reward on each answer's last token is its
    penalised score (kl.coef 0)."""
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import KLConfig, RewardConfig, RolloutConfig
    from tests.test_rl_learning import frac_a, make_config, make_policy

    torch.manual_seed(0)
    pol, tok = make_policy()
    cfg = make_config(tmp_path, "gae", rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=3),
                      kl=KLConfig(coef=0.0), reward=RewardConfig(missing_eos_penalty=1.5))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[frac_a], prompts=["a:", "b:", "c:", "d:"])
    data, m = tr.rollout()
    cut = m["rollout/truncated_frac"]
    assert cut > 0
    assert m["reward/total"] == pytest.approx(m["reward/frac_a"] - 1.5 * cut, abs=1e-6)
    assert float(data.scores.mean()) == pytest.approx(m["reward/total"], abs=1e-6)


def test_missing_eos_penalty_refused_where_it_does_nothing():
    from rlhf_fast.trainers.rl_config import RewardConfig, RLConfig, RolloutConfig

    with pytest.raises(ValueError, match="reward.missing_eos_penalty .*online_dpo.missing_eos_penalty"):
        RLConfig(estimator="online_dpo", reward=RewardConfig(missing_eos_penalty=1.0),
                 rollout=RolloutConfig(group_size=2))
    with pytest.raises(ValueError, match="reward.missing_eos_penalty"):
        RewardConfig(missing_eos_penalty=-1.0)
    with pytest.raises(ValueError, match="reward.missing_eos_penalty changes the summed reward"):
        RewardConfig(missing_eos_penalty=1.0, multi_objective_aggregation="normalize_then_sum")


def test_missing_eos_penalty_needs_finish_reasons():
    """An engine that gives no finish reasons cannot tell which answers lack an eos: refused, not
    silently unpenalised."""
    import types

    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import RewardConfig, RLConfig

    stub = types.SimpleNamespace(config=RLConfig(estimator="gae", reward=RewardConfig(missing_eos_penalty=1.0)),
                                 engine=object())
    batch = types.SimpleNamespace(input_ids=torch.zeros(2, 3, dtype=torch.long), finish_reasons=None)
    with pytest.raises(ValueError, match="reward.missing_eos_penalty needs the engine's finish_reasons"):
        RLTrainer._truncated_rows(stub, batch)
    batch.finish_reasons = ["stop", "length"]
    assert RLTrainer._truncated_rows(stub, batch).tolist() == [False, True]


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_trl(shift_mean):
    """masked_whiten (ppo.whiten_advantages, and TRL's whiten_rewards' shift_mean=False): the same
    mean, unbiased variance and rsqrt(var + 1e-8)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, generator=g, dtype=torch.float32)
    mask = torch.rand(3, 5, generator=g) > 0.3
    ours = ops.masked_whiten(x, mask, shift_mean=shift_mean)
    trl = trl_masked_whiten(x, mask, shift_mean=shift_mean)
    torch.testing.assert_close(ours[mask], trl[mask])


def test_losses_match_trl_and_openrlhf():
    """cliprange → ppo.clip_low, cliprange_value → ppo.value_clip, the value loss's 0.5 ·
    max(squared errors) and the clip fractions (policy/clip_frac = TRL's policy/clipfrac_avg,
    value/clip_frac = val/clipfrac_avg): ours equals TRL's and OpenRLHF's token-mean losses. TRL's
    value loss also counts the column after the EOS (padding_mask_p1), so the rows here fill T."""
    g = torch.Generator().manual_seed(2)
    B, T = 3, 5
    new = -torch.rand(B, T, generator=g, dtype=torch.float32)
    old = new + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float32)
    adv = torch.randn(B, T, generator=g, dtype=torch.float32)
    vpred = torch.randn(B, T, generator=g, dtype=torch.float32)
    vold = vpred + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float32)
    ret = torch.randn(B, T, generator=g, dtype=torch.float32)
    none = torch.zeros(B, T, dtype=torch.bool)
    trl = trl_losses(new, old, adv, vpred, vold, ret, none, none, cliprange=0.2, cliprange_value=0.2)
    mask = ~none
    pl, pst = ops.ppo_policy_loss(new, old, adv, mask, clip_low=0.2)
    vl, vst = ops.ppo_value_loss(vpred, vold, ret, mask, clip=0.2)
    torch.testing.assert_close(pl, trl["pg_loss"])
    torch.testing.assert_close(pst["clip_frac"], trl["pg_clipfrac"])
    torch.testing.assert_close(pst["approx_kl"], trl["approxkl"])
    torch.testing.assert_close(pst["ratio_mean"], trl["ratio"])
    torch.testing.assert_close(vl, trl["vf_loss"])
    torch.testing.assert_close(vst["clip_frac"], trl["vf_clipfrac"])
    assert 0 < float(trl["pg_clipfrac"]) < 1 and 0 < float(trl["vf_clipfrac"]) < 1  # both branches taken
    # OpenRLHF, with a ragged mask, both of its aggregations
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    for token_level, agg in ((True, "token-mean"), (False, "seq-mean-token-mean")):
        o_pl, o_clip = openrlhf_policy_loss(new, old, adv, mask, token_level_loss=token_level)
        pl, pst = ops.ppo_policy_loss(new, old, adv, mask, clip_low=0.2, agg=agg)
        torch.testing.assert_close(pl, o_pl)
        torch.testing.assert_close(pst["clip_frac"], o_clip)
        vl, _ = ops.ppo_value_loss(vpred, vold, ret, mask, clip=0.2, agg=agg)
        torch.testing.assert_close(vl, openrlhf_value_loss(vpred, vold, ret, mask, token_level_loss=token_level))


def test_trl_approxkl_and_ratio_count_the_padding():
    """TRL's policy/approxkl_avg and val/ratio are plain means over every column, padding included
    (log-ratio 0, ratio 1 there); ours are over the response tokens: ours × (tokens / columns) is
    TRL's approx KL."""
    responses, new, _, _, _ = _batch(eos_at=(1, None, 3, None))
    old = new + 0.2
    pm = trl_rollout(responses, new, new, torch.zeros_like(new), torch.zeros(4, dtype=torch.float32))["padding_mask"]
    trl = trl_losses(new, torch.masked_fill(old, pm, INVALID_LOGPROB), torch.zeros_like(new), torch.zeros_like(new),
                     torch.zeros_like(new), torch.zeros_like(new), pm, pm)
    _, st = ops.ppo_policy_loss(new, old, torch.zeros_like(new), ~pm)
    frac = (~pm).sum() / pm.numel()
    torch.testing.assert_close(st["approx_kl"] * frac, trl["approxkl"])


def test_trl_objective_metrics_in_our_terms():
    """TRL's objective/kl = Σ_t kl per answer, averaged: our kl/seq (k1); objective/non_score_reward
    = −kl_coef · that; objective/rlhf_reward = objective/scores + objective/non_score_reward.
    TRL's objective/entropy (−Σ logp per answer) counts each padding column as −1
    (INVALID_LOGPROB = 1): with padding it is not an entropy estimate."""
    responses, logp, ref, values, scores = _batch(eos_at=(2, None, None, None))
    trl = trl_rollout(responses, logp, ref, values, scores, kl_coef=0.05)
    mask = ~trl["padding_mask"]
    kl_seq = (ops.kl_penalty(logp, ref, "k1") * mask).sum(1).mean()
    torch.testing.assert_close(kl_seq, trl["objective_kl"])
    torch.testing.assert_close(-0.05 * kl_seq, trl["objective_non_score_reward"])
    torch.testing.assert_close(scores.mean() - 0.05 * kl_seq, trl["objective_rlhf_reward"])
    sampled_entropy = (-logp * mask).sum(1).mean()
    torch.testing.assert_close(trl["objective_entropy"], sampled_entropy - (~mask).sum() / mask.shape[0])


def test_value_of_a_state_is_read_one_token_early():
    """TRL's ``value = full_value[:, context_length - 1 : -1]``: the value of response token t is the
    critic's output at the token before it; critic_values gives the same alignment."""
    from rlhf_fast.trainers.rl import critic_values

    g = torch.Generator().manual_seed(3)
    full_value = torch.randn(2, 7, generator=g)
    ids = torch.zeros(2, 7, dtype=torch.long)
    context_length = 3
    ours = critic_values(lambda i, a: full_value, ids, torch.ones_like(ids))
    torch.testing.assert_close(ours[:, context_length:], full_value[:, context_length - 1:-1])


# ----------------------------------------------------------------------------- the critic from a reward model


def _tiny_reward_model(folder, vocab=40):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        rm.score.weight.normal_()
    rm.save_pretrained(str(folder))
    return rm


def test_critic_from_a_reward_model_folder(tmp_path):
    """TRL 0.x's value_model is AutoModelForSequenceClassification.from_pretrained(reward_model_path,
    num_labels=1): a critic whose value at each token is the reward model's score head on that
    token's hidden state. model.critic given a reward-model folder loads that critic (it was refused
    as 'value_head.pt missing')."""
    from rlhf_fast.trainers.rl import _make_critic

    rm = _tiny_reward_model(tmp_path / "rm")
    critic = _make_critic(None, str(tmp_path / "rm")).eval()
    ids = torch.tensor([[3, 5, 7, 9, 11], [2, 4, 6, 8, 10]])
    am = torch.ones_like(ids)
    with torch.no_grad():
        want = rm.score(rm.model(input_ids=ids, attention_mask=am).last_hidden_state).squeeze(-1)
        got = critic(ids, am)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_critic_folder_of_neither_kind_names_the_key(tmp_path):
    from rlhf_fast.trainers.rl import _make_critic
    from tests.conftest import save_tiny_model

    folder = save_tiny_model(tmp_path / "lm")  # a causal LM: neither a ValueModel nor a reward model
    with pytest.raises(ValueError, match="model.critic"):
        _make_critic(None, folder)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce++"])
def test_critic_keys_refused_without_a_critic(estimator):
    """model.critic, ppo.value_coef, ppo.value_clip and ppo.lam do nothing without a critic (a TRL
    0.x PPO config moved to ``rlhf-fast grpo`` would train with none of them): refused, naming
    them; their defaults pass, and gae takes them."""
    from rlhf_fast.trainers.rl_config import ModelConfig, PPOConfig, RLConfig, RolloutConfig

    ro = RolloutConfig(group_size=2)
    for kw, key in ((dict(model=ModelConfig(critic="/models/rm")), "model.critic"),
                    (dict(ppo=PPOConfig(value_coef=0.1)), "ppo.value_coef"),
                    (dict(ppo=PPOConfig(value_clip=None)), "ppo.value_clip"),
                    (dict(ppo=PPOConfig(lam=0.9)), "ppo.lam")):
        with pytest.raises(ValueError, match=rf"{re.escape(key)}.*no effect with estimator {re.escape(repr(estimator))}"):
            RLConfig(estimator=estimator, rollout=ro, **kw)
        RLConfig(estimator="gae", rollout=ro, **kw)
    RLConfig(estimator=estimator, rollout=ro)


# ----------------------------------------------------------------------------- the document


def _section() -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index("### PPOTrainer / PPOConfig (TRL 0.x; dropped from TRL 1.x) → rlhf-fast ppo")
    end = text.index("\n### ", start + 10)
    return text[start:end]


# TRL 0.x PPOConfig's own fields (ppo_config.py @ be8a087's era, TRL 0.1x: OnPolicyConfig's and PPOConfig's)
TRL_PPO_FIELDS = (
    "exp_name", "reward_model_path", "model_adapter_name", "ref_adapter_name", "num_ppo_epochs", "whiten_rewards",
    "kl_coef", "kl_estimator", "cliprange", "vf_coef", "cliprange_value", "gamma", "lam", "ds3_gather_for_generation",
    "dataset_num_proc", "num_mini_batches", "total_episodes", "local_rollout_forward_batch_size",
    "num_sample_generations", "response_length", "stop_token", "stop_token_id", "temperature",
    "missing_eos_penalty", "sft_model_path")


def test_doc_section_rows_name_trl_fields_and_our_keys(tmp_path):
    """The section's table: every TRL 0.x PPOConfig field has a row, every TRL name of a row is a
    field of it (or of TrainingArguments), every key of ours is an RLConfig key and a row's
    ``key: value`` settings load together; the YAML example loads."""
    import dataclasses

    import yaml
    from transformers import TrainingArguments

    from rlhf_fast.trainers.config import load_config
    from rlhf_fast.trainers.rl_config import RLConfig
    from tests.test_docs_from_trl import _load_mapping, _set, key_exists, our_items, trl_names

    sec = _section()
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in sec.splitlines() if ln.startswith("| `")]
    assert len(rows) >= len(TRL_PPO_FIELDS)
    named, bad = set(), []
    for i, (trl_cell, ours_cell, _notes) in enumerate(rows):
        for n in trl_names(trl_cell):
            named.add(n)
            if n not in TRL_PPO_FIELDS and n not in base and "(trainer argument)" not in trl_cell:
                bad.append(f"row {i}: {n!r} is no TRL 0.x PPOConfig field")
        items = our_items(ours_cell)
        if items is None:
            continue
        data = {}
        for key, value in items:
            if not key_exists(RLConfig, key):
                bad.append(f"row {i}: {key!r} is not an RLConfig key")
            elif value is not None:
                _set(data, key, yaml.safe_load(value))
        if data and not bad:
            _load_mapping(RLConfig, data, tmp_path, f"row{i}")
    assert not bad, "\n".join(bad)
    assert not set(TRL_PPO_FIELDS) - named, f"no row for {sorted(set(TRL_PPO_FIELDS) - named)}"
    blocks = re.findall(r"```yaml\n(.*?)```", sec, re.S)
    assert len(blocks) == 1
    path = tmp_path / "ppo.yaml"
    path.write_text(blocks[0], encoding="utf-8")
    cfg = load_config(RLConfig, str(path))
    assert cfg.estimator == "gae"
