"""TRL RLOOConfig options beyond the estimator, and GRPO/RLOO ``generation_kwargs``:

1. ``ppo.importance_sampling_level: sequence_sum`` — TRL RLOO's ratio exp(Σ_t log-ratio), one
   per answer, the clipped loss averaged over answers, and its clip metrics;
2. ``reward.clip_range: [min, max]`` — TRL's ``reward_clip_range``, before the KL and the
   leave-one-out baseline;
3. ``ppo.whiten_advantages: sequence`` — TRL's ``normalize_advantages``, one advantage per
   answer normalised over the batch of every rank;
4. ``rollout.generation_kwargs`` — transformers' / vLLM's names mapped to the rollout keys.

Each against TRL 1.16's own code: its ``nanstd``, else the lines of
``RLOOTrainer._compute_loss`` / ``_generate_and_score_completions`` transcribed here with the
source lines named; then the trainer end to end (one short ``rloo`` run per option, the CLI
with all four and a resume) and the config errors."""

import json
import os

import pytest
import torch
import yaml

from rlhf_fast.algorithms import advantages as A
from rlhf_fast.algorithms import policy_losses as pl
from rlhf_fast.algorithms.rewards import clip_rewards
from rlhf_fast.models.logprobs import sequence_logprobs
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import (GENERATION_KWARGS, KLConfig, OptimConfig, PPOConfig, RewardConfig,
                                          RLConfig, RolloutConfig)
from tests.test_rl_learning import PROMPTS, make_config, make_policy
from tests.test_rl_loss_variants import _inputs

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ_SUM = dict(importance_sampling_level="sequence_sum", agg="seq-mean-token-sum")


def _nanstd():
    return pytest.importorskip("trl.trainer.utils").nanstd


# --------------------------------------------------------------------------- TRL, transcribed


def trl_rloo_loss(per_token_logps, old_per_token_logps, advantages, completion_mask, *, epsilon_low=0.2,
                  epsilon_high=0.2):
    """TRL 1.16 rloo_trainer.py RLOOTrainer: ``old_logps`` as ``_generate_and_score_completions``
    sums them (line 1610), then ``_compute_loss`` lines 1822-1833 (the loss) and 1850-1852 (the
    clip metrics, before gathering). advantages ``[B]``. Returns (loss, low, high, region)."""
    old_logps = (old_per_token_logps * completion_mask).sum(1)
    logps = (per_token_logps * completion_mask).sum(1)  # mask out padding and tokens after EOS
    log_ratio = logps - old_logps
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_sequence_loss1 = coef_1 * advantages
    per_sequence_loss2 = coef_2 * advantages
    per_sequence_loss = -torch.min(per_sequence_loss1, per_sequence_loss2)
    loss = per_sequence_loss.mean()
    is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    is_region_clipped = is_low_clipped | is_high_clipped
    return loss, is_low_clipped.float().mean(), is_high_clipped.float().mean(), is_region_clipped.float().mean()


def trl_rloo_advantages(rewards_per_func, reward_weights, completion_mask, num_generations, *, reward_clip_range=None,
                        beta=0.0, old_per_token_logps=None, ref_per_token_logps=None, normalize_advantages=False):
    """TRL 1.16 rloo_trainer.py ``_generate_and_score_completions`` lines 1653-1699 on one
    process (``gather`` is the identity): weighted sum, ``reward_clip_range``, the k1 KL summed
    per answer, the leave-one-out baseline, ``normalize_advantages``."""
    nanstd = _nanstd()
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    if reward_clip_range:
        rewards = rewards.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    if beta != 0.0:
        per_token_kl = old_per_token_logps - ref_per_token_logps
        kl = (per_token_kl * completion_mask).sum(-1)
        rewards = rewards - beta * kl
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
    baselines = baselines.view(-1)
    advantages = rewards - baselines
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


# --------------------------------------------------------------------------- 1. sequence_sum loss


def _off_policy_inputs():
    """_inputs' awkward rows (holes, row 2 without loss tokens, garbage outside the mask), with
    old log-probs shifted per row so the summed ratios fall on both sides of both clip bounds."""
    logp, old, ref, ent, adv, mask = _inputs()
    old = old.clone()
    shift = torch.tensor([0.0, 0.5, 0.0, -0.3, -0.15], dtype=old.dtype)[:, None] / mask.sum(1).clamp(min=1)[:, None]
    old = old + shift
    adv_row = adv[:, 1].clone()
    adv_row[2] = 0.0  # an answer without loss tokens has no advantage here (TRL: a constant −A)
    return logp, old, ref, ent, adv, adv_row, mask


def _trl_kl_term(logp, ref, mask, beta):
    """GRPO's k3 term (grpo_trainer.py 3100) summed per answer and averaged over answers: the
    KL in the loss under agg seq-mean-token-sum (TRL's RLOO has the KL in the reward only)."""
    per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
    return beta * (per_token_kl * mask).sum(-1).mean()


@pytest.mark.parametrize("clip_high,beta", [(None, 0.0), (0.28, 0.0), (0.28, 0.1)])
def test_sequence_sum_loss_gradient_and_clip_metrics_are_trls(clip_high, beta):
    logp, old, ref, ent, adv, adv_row, mask = _off_policy_inputs()
    logp.requires_grad_(True)
    loss, st = pl.policy_loss_from_logp(logp, ent, old, adv, mask, clip_high=clip_high, ref_logp=ref,
                                        kl_coef=beta, kl_kind="k3", **SEQ_SUM)
    eh = 0.2 if clip_high is None else clip_high
    m = mask.double()
    want, low, high, region = trl_rloo_loss(logp, old, adv_row, m, epsilon_high=eh)
    if beta:
        want = want + _trl_kl_term(logp, ref, m, beta)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    g, gw = torch.autograd.grad(loss, logp)[0], torch.autograd.grad(want, logp)[0]
    torch.testing.assert_close(g, gw, rtol=1e-12, atol=1e-14)
    assert g[mask].abs().sum() > 0
    assert (float(st["clip_low_frac"]), float(st["clip_high_frac"]), float(st["clip_frac"])) == \
        pytest.approx((float(low), float(high), float(region)), abs=1e-7)  # TRL: float32
    assert 0 < float(low) and 0 < float(high) and float(region) < 1  # both bounds hit, not every answer


def test_sequence_sum_differs_from_token_and_gspo_off_policy_and_matches_token_sum_on_policy():
    """Off-policy the three levels give three gradients (why the new level exists); on policy
    (ratio 1) its gradient is the per-token clip's under seq-mean-token-sum, as docs/from_trl.md
    says of TRL's RLOO."""
    logp, old, _, ent, adv, _, mask = _off_policy_inputs()
    logp.requires_grad_(True)

    def grad(old_logp, level):
        loss, _ = pl.policy_loss_from_logp(logp, ent, old_logp, adv, mask, agg="seq-mean-token-sum",
                                           importance_sampling_level=level)
        return torch.autograd.grad(loss, logp)[0]

    g = {lvl: grad(old, lvl) for lvl in ("token", "sequence", "sequence_sum")}
    assert not torch.allclose(g["sequence_sum"], g["token"]) and not torch.allclose(g["sequence_sum"], g["sequence"])
    on = logp.detach().clone()
    torch.testing.assert_close(grad(on, "sequence_sum"), grad(on, "token"), rtol=1e-12, atol=1e-14)


def test_sequence_sum_float32_and_refusals():
    logp, old, _, ent, adv, adv_row, mask = _off_policy_inputs()
    lp32 = logp.float().requires_grad_(True)
    loss, st = pl.policy_loss_from_logp(lp32, ent.float(), old.float(), adv.float(), mask, **SEQ_SUM)
    want = trl_rloo_loss(logp, old, adv_row, mask.double())[0]
    assert loss.dtype == torch.float32 and float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    for kw, match in [(dict(policy_loss="sapo"), "needs policy_loss 'clip'"),
                      (dict(agg="token-mean"), "needs agg 'seq-mean-token-sum'"),
                      (dict(top_entropy_quantile=0.5), "not supported with top_entropy_quantile"),
                      (dict(off_policy_mask_threshold=0.1), "not supported with off_policy_mask_threshold"),
                      (dict(use_bias_correction_kl=True), "use_bias_correction_kl")]:
        with pytest.raises(ValueError, match=match):
            pl.policy_loss_from_logp(logp, ent, old, adv, mask, **{**SEQ_SUM, **kw})


# --------------------------------------------------------------------------- 2-3. clip range, normalisation


def _rollout_like(n_groups=4, G=4, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n_groups * G, K, generator=g) * 2
    mask = torch.rand(n_groups * G, 6, generator=g) > 0.3
    mask[:, 0] = True
    old = -torch.rand(n_groups * G, 6, generator=g) * 2
    ref = old + torch.randn(n_groups * G, 6, generator=g) * 0.2
    return r, torch.tensor([1.0, -0.5])[:K], mask, old, ref


def _ours(r, w, mask, old, ref, G, clip_range=None, beta=0.0, whiten=False):
    """The trainer's path: weighted total → clip_rewards → compute_advantages (KL k1 in the
    reward, leave-one-out, normalisation); one advantage per answer."""
    scores = clip_rewards((r * w).sum(1), clip_range)
    kl = (old - ref) * mask
    adv, _ = A.compute_advantages("rloo", scores, mask, kl=kl, kl_coef=beta, group_size=G, whiten=whiten)
    return (adv * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("clip_range,beta,normalize", [
    ([-1.0, 0.5], 0.0, False), ([-1.0, 0.5], 0.3, False), (None, 0.3, True), ([-0.5, 2.0], 0.3, True)])
def test_clip_range_and_normalize_advantages_are_trls(clip_range, beta, normalize):
    r, w, mask, old, ref = _rollout_like()
    got = _ours(r, w, mask, old, ref, 4, clip_range=clip_range, beta=beta, whiten="sequence" if normalize else False)
    want = trl_rloo_advantages(r, w, mask.float(), 4, reward_clip_range=clip_range, beta=beta, old_per_token_logps=old,
                               ref_per_token_logps=ref, normalize_advantages=normalize)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
    if clip_range is not None:  # the clip bites, and before the KL (clipping after it would differ)
        total = (r * w).sum(1)
        assert ((total < clip_range[0]) | (total > clip_range[1])).any()
        late = trl_rloo_advantages(r, w, mask.float(), 4, beta=beta, old_per_token_logps=old,
                                   ref_per_token_logps=ref, normalize_advantages=normalize)
        assert not torch.allclose(got, late, atol=1e-3)
    if normalize:
        assert float(got.mean()) == pytest.approx(0.0, abs=1e-5)
        assert float(got.std()) == pytest.approx(1.0, abs=1e-3)  # unbiased std, + 1e-4
        tok = _ours(r, w, mask, old, ref, 4, clip_range=clip_range, beta=beta, whiten=True)
        assert not torch.allclose(got, tok, atol=1e-3)  # per token: long answers weigh more


def test_defaults_are_unchanged_bit_for_bit():
    r, w, mask, old, ref = _rollout_like()
    s = (r * w).sum(1)
    assert clip_rewards(s, None) is s
    kl = (old - ref) * mask
    a, _ = A.compute_advantages("rloo", s, mask, kl=kl, kl_coef=0.1, group_size=4)
    b, _ = A.compute_advantages("rloo", s, mask, kl=kl, kl_coef=0.1, group_size=4, whiten=False)
    assert torch.equal(a, b)
    d = RLConfig()
    assert (d.reward.clip_range, d.ppo.whiten_advantages, d.ppo.importance_sampling_level,
            d.rollout.generation_kwargs) == (None, False, "token", {})


def test_normalize_answer_advantages_edges_and_refusals():
    one = A.normalize_answer_advantages(torch.tensor([2.0]))
    assert float(one) == 0.0  # one answer: std 0 (TRL's nanstd is NaN, then 0 by nan_to_num)
    with pytest.raises(ValueError, match=r"\[B\] tensor"):
        A.normalize_answer_advantages(torch.zeros(2, 2))
    mask = torch.ones(4, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="whiten 'sequence' .* needs a group estimator"):
        A.compute_advantages("gae", torch.zeros(4), mask, values=torch.zeros(4, 2), whiten="sequence")
    with pytest.raises(ValueError, match="whiten must be one of"):
        A.compute_advantages("rloo", torch.zeros(4), mask, group_size=2, whiten="tokens")
    with pytest.raises(ValueError, match="clip_range must be"):
        clip_rewards(torch.zeros(3), [1.0, 0.0])


def _ranks_worker(rank, world, store, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        r, w, mask, old, ref = _rollout_like()
        n = r.shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)  # whole groups on each rank
        s = clip_rewards((r[sl] * w).sum(1), [-1.0, 1.5])
        a, _ = A.compute_advantages("rloo", s, mask[sl], kl=(old[sl] - ref[sl]) * mask[sl], kl_coef=0.2, group_size=4,
                                    whiten="sequence", group=dist.group.WORLD)
        torch.save(a, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_normalization_statistics_are_over_every_rank(tmp_path):
    """Two gloo ranks holding two groups each normalise as one process holding all four."""
    import torch.multiprocessing as mp

    mp.start_processes(_ranks_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2,
                       join=True, start_method="spawn")
    got = torch.cat([torch.load(tmp_path / f"out.{k}") for k in range(2)])
    r, w, mask, old, ref = _rollout_like()
    s = clip_rewards((r * w).sum(1), [-1.0, 1.5])
    want, _ = A.compute_advantages("rloo", s, mask, kl=(old - ref) * mask, kl_coef=0.2, group_size=4,
                                   whiten="sequence")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- 4. generation_kwargs


def test_generation_kwargs_names_are_transformers_or_vllm():
    """Every key is a ``transformers.GenerationConfig`` attribute or one of vLLM's
    ``SamplingParams`` fields (vllm/sampling_params.py, transcribed: vLLM is not installed)."""
    from transformers import GenerationConfig

    vllm = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
            "max_tokens", "min_tokens", "stop"}
    hf = set(GenerationConfig().to_dict())
    assert all(k in hf or k in vllm for k in GENERATION_KWARGS)
    assert {"max_new_tokens", "min_new_tokens", "stop_strings", "no_repeat_ngram_size", "do_sample"} <= hf
    fields = set(RolloutConfig.__dataclass_fields__)
    assert set(GENERATION_KWARGS.values()) <= fields


def test_generation_kwargs_set_the_rollout_keys():
    r = RolloutConfig(generation_kwargs={"temperature": "0.7", "top_k": -1, "top_p": 0.9, "min_p": 0.05,
                                         "repetition_penalty": 1.1, "presence_penalty": 0.2,
                                         "frequency_penalty": 0.1, "no_repeat_ngram_size": 3, "max_tokens": 5,
                                         "min_tokens": 1, "stop": "\n", "do_sample": True})
    assert (r.temperature, r.top_k, r.top_p, r.min_p, r.repetition_penalty, r.presence_penalty,
            r.frequency_penalty, r.no_repeat_ngram_size, r.max_new_tokens, r.min_new_tokens, r.stop_strings) == \
        (0.7, 0, 0.9, 0.05, 1.1, 0.2, 0.1, 3, 5, 1, ["\n"])
    # the same value under both the rollout key and the mapping: no conflict (a saved config reloads)
    again = RolloutConfig(temperature=0.7, stop_strings=["\n"], generation_kwargs=dict(r.generation_kwargs))
    assert again.temperature == 0.7 and again.stop_strings == ["\n"]
    assert RolloutConfig(generation_kwargs={"stop_strings": "[a, b]"}).stop_strings == ["a", "b"]
    assert RolloutConfig(generation_kwargs={"stop": "1"}).stop_strings == ["1"]  # text, not a number


@pytest.mark.parametrize("kw,match", [
    (dict(generation_kwargs={"num_beams": 2}), r"rollout\.generation_kwargs\.num_beams: not a generation argument"),
    (dict(generation_kwargs={"temperature": 0.5}, temperature=0.9),
     r"rollout\.generation_kwargs\.temperature \(0\.5\) conflicts with rollout\.temperature \(0\.9\)"),
    (dict(generation_kwargs={"max_tokens": 4, "max_new_tokens": 5}), "both set rollout.max_new_tokens"),
    (dict(generation_kwargs={"top_p": 1.5}), r"rollout\.generation_kwargs\.top_p: rollout\.top_p must be in"),
    (dict(generation_kwargs={"max_tokens": 0}), r"rollout\.generation_kwargs\.max_tokens: .*max_new_tokens"),
    (dict(generation_kwargs={"repetition_penalty": 0}), r"generation_kwargs\.repetition_penalty: "),
    (dict(generation_kwargs={"stop": [""]}), r"generation_kwargs\.stop: rollout\.stop_strings\[0\]"),
    (dict(generation_kwargs={"stop": 3}), r"generation_kwargs\.stop: rollout\.stop_strings must be a list"),
    (dict(generation_kwargs={"do_sample": False}), "rollouts always sample"),
    (dict(generation_kwargs=[1]), "rollout.generation_kwargs must be a mapping"),
])
def test_generation_kwargs_errors_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        RolloutConfig(**kw)


# --------------------------------------------------------------------------- the trainer, end to end


def n_chars(prompts, completions):
    """A dense reward of a wide range: groups rarely tie, and a clip range bites."""
    return [float(len(c)) for c in completions]


def _trainer(tmp_path, steps=2, **kw):
    pol, tok = make_policy()
    kw.setdefault("rollout", RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5))
    kw.setdefault("kl", KLConfig(coef=0.05))
    cfg = make_config(tmp_path, "rloo", steps=steps, **kw)
    return RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS)


def _row_adv(data):
    rm = data.response_mask
    return (data.advantages * rm).sum(1) / rm.sum(1).clamp(min=1)


def _grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _trl_advantages_of(tr, data, **kw):
    """TRL's advantages of the trainer's own rollout: the raw rewards of its answers, its old
    and reference log-probs, its KL coefficient."""
    r = torch.tensor([[t[2]] for t in tr._last_texts])
    return trl_rloo_advantages(r, torch.ones(1), data.response_mask.float(), tr.config.rollout.group_size,
                               beta=tr.config.kl.coef, old_per_token_logps=data.old_logp,
                               ref_per_token_logps=data.ref_logp, **kw)


@pytest.mark.parametrize("placement", ["reward", "loss"])
def test_trainer_sequence_sum_is_trls_off_policy(tmp_path, placement):
    """The trainer's update on its own rollout, with the old log-probs moved (a stand-in for an
    earlier policy, as on a later epoch): its loss over two micro-batches, its gradients and its
    clip metrics are TRL's on the whole batch (gradient accumulation = the mean over answers)."""
    ppo = PPOConfig(epochs=2, mini_batch_size=8, micro_batch_size=4, clip_high=0.28, **SEQ_SUM)
    tr = _trainer(tmp_path, ppo=ppo, kl=KLConfig(coef=0.05, placement=placement))
    data, _ = tr.rollout()
    rm = data.response_mask
    # answers of unequal lengths, so token-weighted and answer-weighted statistics differ
    last = A.last_token_index(rm)
    rm[torch.arange(3), last[:3]] = rm[:3].sum(1) < 2
    assert rm.any(1).all() and rm[:4].sum() != rm[4:].sum()
    g = torch.Generator().manual_seed(1)
    data.old_logp = data.old_logp + torch.randn(rm.shape, generator=g) * 0.15 * rm
    tr.policy.zero_grad(set_to_none=True)
    st = tr.policy_backward(data)
    ours = _grads(tr.policy)
    tr.policy.zero_grad(set_to_none=True)
    logp = sequence_logprobs(tr.policy, data.input_ids, data.attention_mask, response_mask=rm,
                             temperature=tr.config.rollout.temperature)
    want, low, high, region = trl_rloo_loss(logp, data.old_logp, _row_adv(data), rm.float(), epsilon_high=0.28)
    if placement == "loss":
        want = want + _trl_kl_term(logp, data.ref_logp, rm.float(), 0.05)
    want.backward()
    assert st["loss"] == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-7)
    for a, b in zip(ours, _grads(tr.policy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert (st["clip_low_frac"], st["clip_high_frac"], st["clip_frac"]) == \
        pytest.approx((float(low), float(high), float(region)), abs=1e-6)
    assert 0 < st["clip_frac"] < 1


def test_trainer_sequence_sum_trains_two_epochs(tmp_path, monkeypatch):
    """A short rloo run at the sequence_sum level with two epochs (the second off-policy): it
    goes through the composed loss, not the fused kernel, and logs TRL's clip metrics."""
    from rlhf_fast.models import logprobs

    def boom(*a, **k):
        raise AssertionError("sequence_sum must not take the fused kernel")

    monkeypatch.setattr(logprobs, "policy_loss", boom)
    tr = _trainer(tmp_path, ppo=PPOConfig(epochs=2, mini_batch_size=4, micro_batch_size=2, **SEQ_SUM),
                  optim=OptimConfig(lr=0.05))
    rows = tr.train()
    assert len(rows) == 2 and all(r["policy/updates"] == 4 for r in rows)
    for r in rows:
        assert 0 <= r["policy/clip_low_frac"] <= 1 and 0 <= r["policy/clip_high_frac"] <= 1
        assert r["policy/clip_frac"] == pytest.approx(r["policy/clip_low_frac"] + r["policy/clip_high_frac"])
    assert any(r["policy/clip_frac"] > 0 for r in rows)  # lr 0.05: the second epoch clips


def test_trainer_clip_range(tmp_path):
    tr = _trainer(tmp_path, reward=RewardConfig(clip_range=[-1.0, 3.0]))
    data, m = tr.rollout()
    raw = torch.tensor([t[2] for t in tr._last_texts])
    assert (raw > 3.0).any() and float(data.scores.max()) <= 3.0
    assert torch.equal(data.scores, raw.clamp(-1.0, 3.0))
    want = _trl_advantages_of(tr, data, reward_clip_range=[-1.0, 3.0])
    torch.testing.assert_close(_row_adv(data), want * data.response_mask.any(1), rtol=1e-5, atol=1e-5)
    assert m["reward/shaped"] < m["reward/total"]
    tr.update(data)


def test_trainer_normalize_advantages(tmp_path):
    ppo = PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8, whiten_advantages="sequence")
    tr = _trainer(tmp_path, ppo=ppo)
    data, m = tr.rollout()
    want = _trl_advantages_of(tr, data, normalize_advantages=True)
    torch.testing.assert_close(_row_adv(data), want, rtol=1e-5, atol=1e-5)
    assert float(want.std()) == pytest.approx(1.0, abs=1e-3)
    assert tr.train()[-1]["policy/updates"] == 1


def test_trainer_generation_kwargs_sample_as_the_rollout_keys(tmp_path):
    """A run with generation_kwargs samples exactly the answers of a run with the same values
    as rollout keys (same seed); the names map, nothing else changes."""
    gk = {"temperature": 0.8, "top_k": 10, "max_tokens": 4, "repetition_penalty": 1.2}
    a = _trainer(tmp_path / "a", rollout=RolloutConfig(prompts_per_step=2, group_size=4, generation_kwargs=gk))
    b = _trainer(tmp_path / "b", rollout=RolloutConfig(prompts_per_step=2, group_size=4, temperature=0.8, top_k=10,
                                                       max_new_tokens=4, repetition_penalty=1.2))
    da, _ = a.rollout()
    db, _ = b.rollout()
    assert torch.equal(da.input_ids, db.input_ids) and torch.equal(da.old_logp, db.old_logp)
    assert int(da.response_mask.sum(1).max()) <= 4
    assert len(a.train()) == 2


def test_per_answer_options_without_a_group_estimator_are_refused(tmp_path):
    """Refused when the config is built (RLConfig's checks), and again by the trainer for a
    config changed after it was built."""
    pol, tok = make_policy()
    for ppo, match in [(PPOConfig(whiten_advantages="sequence"), "ppo.whiten_advantages 'sequence' needs"),
                       (PPOConfig(**SEQ_SUM), "ppo.importance_sampling_level 'sequence_sum' needs")]:
        with pytest.raises(ValueError, match=match):
            make_config(tmp_path, "reinforce++", ppo=ppo)
        cfg = make_config(tmp_path, "reinforce++")
        cfg.ppo = ppo
        with pytest.raises(ValueError, match=match):
            RLTrainer(cfg, pol, tok, reward_fns=[n_chars], prompts=PROMPTS)
    with pytest.raises(ValueError, match="kl.use_bias_correction_kl .* not supported"):
        make_config(tmp_path, "rloo", ppo=PPOConfig(**SEQ_SUM), kl=KLConfig(placement="loss",
                                                                           use_bias_correction_kl=True))


def _stats_worker(rank, world, store, out):
    import torch.distributed as dist

    from rlhf_fast.distributed import DistContext

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        cfg = RLConfig(estimator="rloo", ppo=PPOConfig(**SEQ_SUM))
        stub = type("Stub", (), {"ctx": DistContext(rank=rank, world_size=world), "device": torch.device("cpu"),
                                 "config": cfg, "_row_mean_stats": RLTrainer._row_mean_stats})()
        # rank 0: 1 answer of 6 tokens, clipped; rank 1: 3 answers of 1 token, none clipped
        mask = torch.ones(1, 6, dtype=torch.bool) if rank == 0 else torch.ones(3, 1, dtype=torch.bool)
        st = {"loss": 0.5, "clip_frac": 1.0 - rank, "approx_kl": 0.1 * (rank + 1), "ratio_max": 2.0 - rank}
        torch.save(RLTrainer._global_stats(stub, st, mask), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_answer_statistics_over_ranks_are_weighed_by_answers(tmp_path):
    """Under several ranks ``policy/clip_frac`` of sequence_sum is the share of every rank's
    answers (TRL gathers the answers' flags), while token statistics stay token-weighted."""
    import torch.multiprocessing as mp

    mp.start_processes(_stats_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2,
                       join=True, start_method="spawn")
    for k in range(2):
        got = torch.load(tmp_path / f"out.{k}")
        assert got["clip_frac"] == pytest.approx(1 / 4)  # 1 of 4 answers (token-weighted: 6/9)
        assert got["approx_kl"] == pytest.approx((0.1 * 6 + 0.2 * 3) / 9)
        assert (got["loss"], got["ratio_max"]) == (pytest.approx(1.0), 2.0)


def _rows(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_rloo_cli_with_the_new_options(tmp_path):
    """`rlhf-fast rloo` with all four options from the command line, saved and resumed."""
    from rlhf_fast.cli import main

    examples = os.path.join(os.path.dirname(__file__), "..", "examples")
    with open(os.path.join(examples, "rloo.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg.update(progress=False, steps=2, save_every=1, sample_every=1)
    cfg["rollout"].update(prompts_per_step=2)
    cfg["ppo"].update(mini_batch_size=8, micro_batch_size=4, epochs=2)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    run = str(tmp_path / "run")
    assert main(["rloo", str(p), "--output_dir", run, "--ppo.importance_sampling_level", "sequence_sum",
                 "--ppo.agg", "seq-mean-token-sum", "--ppo.whiten_advantages", "sequence",
                 "--reward.clip_range", "-0.5,0.5", "--rollout.generation_kwargs.top_p", "0.95",
                 "--rollout.generation_kwargs.stop", "q"]) == 0
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2] and all("policy/clip_low_frac" in r for r in rows)
    with open(os.path.join(run, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    assert saved["rollout"]["top_p"] == 0.95 and saved["rollout"]["generation_kwargs"] == {"top_p": 0.95,
                                                                                          "stop": ["q"]}
    assert saved["reward"]["clip_range"] == [-0.5, 0.5] and saved["ppo"]["whiten_advantages"] == "sequence"
    assert main(["rloo", "--resume", run, "--steps", "3"]) == 0
    assert [r["step"] for r in _rows(run)] == [1, 2, 3]


@pytest.mark.parametrize("make,match", [
    (lambda: PPOConfig(importance_sampling_level="sequence_sum"),
     "ppo.importance_sampling_level 'sequence_sum' .* set ppo.agg 'seq-mean-token-sum'"),
    (lambda: PPOConfig(policy_loss="cispo", clip_high=5.0, **SEQ_SUM), "needs ppo.policy_loss 'clip'"),
    (lambda: PPOConfig(top_entropy_quantile=0.2, **SEQ_SUM), "not supported with ppo.top_entropy_quantile"),
    (lambda: PPOConfig(importance_sampling_level="seq_sum"), "ppo.importance_sampling_level must be one of"),
    (lambda: PPOConfig(whiten_advantages="answer"), "ppo.whiten_advantages must be true, false or 'sequence'"),
    (lambda: PPOConfig(whiten_advantages=1), "ppo.whiten_advantages must be"),
    (lambda: RewardConfig(clip_range=[1.0]), r"reward.clip_range must be a pair \[min, max\]"),
    (lambda: RewardConfig(clip_range=[1.0, -1.0]), "reward.clip_range must have min < max"),
    (lambda: RewardConfig(clip_range=[0.0, float("inf")]), r"reward.clip_range\[1\] must be a finite number"),
    (lambda: RewardConfig(clip=1.0, clip_range=[-1.0, 1.0]), "reward.clip and reward.clip_range are both set"),
    (lambda: RewardConfig(multi_objective_aggregation="normalize_then_sum", clip_range=[-1.0, 1.0]),
     "reward.clip_range shape the summed reward"),
])
def test_config_errors_name_the_key(make, match):
    with pytest.raises(ValueError, match=match):
        make()
