"""ppo.policy_loss gmpo: TRL 1.16's ``clip_ratio/low_min`` / ``clip_ratio/high_max``, logged as
``policy/clip_low_min`` / ``policy/clip_high_max``: against TRL's own ``GMPOTrainer._compute_loss``
(its nanmin / nanmax over the answers of each answer's share of clipped loss tokens); in the
trainer, the extreme over the mini-batch's answers whatever the micro-batches, averaged over the
mini-batches (one without an answer left out, TRL's NaN); on two gloo ranks (DDP), the min / max
over every rank's answers, as one process logs them (tests/clip_extremes_ddp.py)."""

import math

import pytest
import torch

from tests.clip_extremes_ddp import check_two_ranks_log_one_process_extremes

AGG = "seq-mean-token-mean"
EXTREMES = (("clip_low_min", "clip_ratio/low_min"), ("clip_high_max", "clip_ratio/high_max"))


def _ours_and_trls(logp, ent, old, ref, adv, mask, clip_low, clip_high, beta, q, steps):
    from rlhf_fast.algorithms import policy_losses as pl
    from tests.test_rl_gmpo import _trl_gmpo_loss

    _, st = pl.policy_loss_from_logp(logp, ent, old, adv, mask, policy_loss="gmpo", agg=AGG, clip_low=clip_low,
                                     clip_high=clip_high, top_entropy_quantile=q, ref_logp=ref, kl_coef=beta,
                                     normalizer=logp.shape[0] * steps)
    adv_row = (adv * mask).sum(1) / mask.sum(1).clamp(min=1)  # TRL's [B] (ours: per token, equal along a row)
    _, metrics = _trl_gmpo_loss(logp, ent, old, ref, adv_row, mask, eps_low=clip_low,
                                eps_high=clip_low if clip_high is None else clip_high, beta=beta, q=q, steps=steps)
    return st, metrics


def _cases():
    from tests.test_rl_gmpo import CASES

    return CASES


@pytest.mark.parametrize("all_negative", [False, True], ids=["mixed_adv", "all_adv_negative"])
@pytest.mark.parametrize("clip_low,clip_high,beta,q,steps", _cases())
def test_extremes_are_trls(clip_low, clip_high, beta, q, steps, all_negative):
    """tests/test_rl_loss_variants.py's awkward inputs (holes, a row with no loss token, which
    TRL's nanmin / nanmax skip); ``all_negative``: every answer with A < 0 and drifted below the
    lower bound, so that low_min is not 0 (an answer with A ≥ 0 has no low-clipped token)."""
    from tests.test_rl_loss_variants import _inputs

    logp, old, ref, ent, adv, mask = _inputs()
    if all_negative:
        adv = torch.tensor([-1.3, -0.7, -0.4, -0.2, -1.1], dtype=torch.float64)[:, None].expand_as(logp).clone()
        old = torch.where(mask, old + 0.5, old)
    st, metrics = _ours_and_trls(logp, ent, old, ref, adv, mask, clip_low, clip_high, beta, q, steps)
    for ours, trl in EXTREMES:
        assert float(st[ours]) == pytest.approx(metrics[trl], rel=1e-12, abs=1e-15), ours
    if all_negative:
        assert 0 < float(st["clip_low_min"]) < 1 and float(st["clip_high_max"]) == 0
    else:
        assert float(st["clip_low_min"]) == 0 and 0 < float(st["clip_high_max"]) <= 1


def test_no_answer_with_a_loss_token_is_nan_as_trls():
    from tests.test_rl_loss_variants import _inputs

    logp, old, ref, ent, adv, mask = _inputs()
    mask = torch.zeros_like(mask)
    st, metrics = _ours_and_trls(logp, ent, old, ref, adv, mask, 0.4, None, 0.0, 1.0, 1)
    for ours, trl in EXTREMES:
        assert math.isnan(float(st[ours])) and math.isnan(metrics[trl]), ours


# --------------------------------------------------------------------------- the trainer


def _trainer(tmp_path, **ppo):
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import KLConfig, RolloutConfig
    from tests.test_rl_gmpo import PROMPTS, _gmpo, make_config, make_policy, n_chars

    pol, tok = make_policy()
    cfg = make_config(tmp_path, "grpo", rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5),
                      ppo=_gmpo(**{"clip_high": 0.05, **ppo}), kl=KLConfig(coef=0.1, placement="loss"))
    return RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS)


@pytest.mark.usefixtures("one_thread")
def test_trainer_extremes_do_not_depend_on_micro_batches(tmp_path):
    """policy_backward's extremes are those of the whole mini-batch's answers (clip_share_extremes
    of the model's log-probs), with its 8 rows in one micro-batch or in four."""
    from rlhf_fast.algorithms import policy_losses as pl
    from rlhf_fast.models.logprobs import _target_mask, sequence_logprobs

    tr = _trainer(tmp_path, mini_batch_size=8, micro_batch_size=8)
    data, _ = tr.rollout()
    tr.optimizer.zero_grad()  # one step, so that ratios are not 1
    tr.policy_backward(data)
    tr.optimizer.step()
    s1, s2 = (tr.policy_backward(data, mb) for mb in (8, 2))
    with torch.no_grad():
        mask = _target_mask(data.attention_mask, data.response_mask)
        logp = sequence_logprobs(tr.policy, data.input_ids, data.attention_mask, response_mask=mask)
        _, _, low, high = pl.gmpo_sequence_loss(logp, data.old_logp, data.advantages, mask, clip_low=0.4,
                                                clip_high=0.05)
        want = [float(x) for x in pl.clip_share_extremes(low, high, mask)]
    assert s1["clip_high_max"] > 0
    for (k, _), w in zip(EXTREMES, want):
        assert s1[k] == pytest.approx(w, abs=1e-6) and s2[k] == pytest.approx(w, abs=1e-6), k


@pytest.mark.usefixtures("one_thread")
def test_update_averages_the_mini_batches_leaving_out_those_without_an_answer(tmp_path):
    """policy/clip_low_min and clip_high_max are the mean over the update's mini-batches of
    policy_backward's values; a mini-batch whose value is the neutral ±inf (no answer with a loss
    token) is left out of the mean, as TRL's log leaves out its NaN; none left: NaN."""
    tr = _trainer(tmp_path, mini_batch_size=4, micro_batch_size=2, epochs=2)
    data, _ = tr.rollout()
    inner, seen = tr.policy_backward, []

    def recorded(mini, **kw):
        st = inner(mini, **kw)
        if len(seen) == 1:  # the second mini-batch: as if none of its answers had a loss token
            st["clip_low_min"], st["clip_high_max"] = math.inf, -math.inf
        seen.append(dict(st))
        return st

    tr.policy_backward = recorded
    m = tr.update(data)
    assert m["policy/updates"] == len(seen) == 4
    assert any(s["clip_high_max"] > 0 for s in seen)
    for k, _ in EXTREMES:
        kept = [s[k] for i, s in enumerate(seen) if i != 1]
        assert m[f"policy/{k}"] == pytest.approx(sum(kept) / 3, rel=1e-12, abs=1e-15), k

    def none(mini, **kw):
        st = inner(mini, **kw)
        st["clip_low_min"], st["clip_high_max"] = math.inf, -math.inf
        return st

    tr.policy_backward = none
    m = tr.update(data)
    assert math.isnan(m["policy/clip_low_min"]) and math.isnan(m["policy/clip_high_max"])
    assert math.isfinite(m["policy/clip_frac"])


def test_other_losses_log_no_extremes():
    """cispo / sapo / vespo have none, as TRL (the clip family: tests/test_rl_clip_extremes.py)."""
    from rlhf_fast.algorithms import policy_losses as pl
    from tests.test_rl_loss_variants import _inputs

    logp, old, ref, ent, adv, mask = _inputs()
    for loss, kw in (("cispo", dict(clip_high=5.0)), ("sapo", {}), ("vespo", {})):
        _, st = pl.policy_loss_from_logp(logp, ent, old, adv, mask, policy_loss=loss, **kw)
        assert "clip_low_min" not in st and "clip_high_max" not in st, loss


# --------------------------------------------------------------------------- two gloo ranks


def test_two_ranks_log_one_process_extremes(tmp_path_factory):
    check_two_ranks_log_one_process_extremes(tmp_path_factory, "gmpo")
