"""TRL 1.16's ``clip_ratio/low_min`` / ``clip_ratio/high_max`` for the clipped surrogates, logged as
``policy/clip_low_min`` / ``policy/clip_high_max``: against TRL's own ``GRPOTrainer._compute_loss``
for each loss type that logs them (grpo, bnpo, dr_grpo, dapo, luspo: our ``clip`` / ``luspo``; token
and sequence level, TRL's ``delta``) and ``RLOOTrainer._compute_loss`` (``sequence_sum``); none for
cispo / sapo / vespo, which TRL does not log them for; the fused kernel's path in the trainer as the
composed one; on two gloo ranks (DDP) as one process (tests/clip_extremes_ddp.py)."""

import math
import types
from collections import defaultdict

import pytest
import torch

from tests.clip_extremes_ddp import check_two_ranks_log_one_process_extremes

EXTREMES = (("clip_low_min", "clip_ratio/low_min"), ("clip_high_max", "clip_ratio/high_max"))
ADV_ROW = [1.3, -0.7, 0.4, 0.0, -1.1]  # tests/test_rl_loss_variants.py's rows; row 2 has no loss token


class _Accel:
    """An Accelerator of one process, as TRL's _compute_loss uses it."""

    num_processes = 1

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    gather_for_metrics = gather


def _stub(**attrs):
    return types.SimpleNamespace(model=types.SimpleNamespace(training=True), accelerator=_Accel(),
                                 _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, **attrs)


def _trl_grpo_metrics(loss_type, logp, old, adv_row, mask, *, eps_low, eps_high, level="token", delta=None):
    """The metrics of TRL's ``GRPOTrainer._compute_loss`` itself (trl/trainer/grpo_trainer.py,
    the clip_ratio lines 3272-3283) on a stub ``self`` whose per-token log-probs are ``logp`` (the
    completion is the whole row); adv_row ``[B]``, as GRPOTrainer's."""
    GRPOTrainer = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer
    B, T = logp.shape
    stub = _stub(loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, beta=0.0,
                 top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, use_vllm=False,
                 vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
                 max_completion_length=T, _entropy_bonus_enabled=False, aux_loss_enabled=False,
                 args=types.SimpleNamespace(delta=delta, use_bias_correction_kl=False, steps_per_generation=1))
    stub._get_per_token_logps_and_entropies = lambda *a, **kw: (logp, torch.zeros_like(logp), None)
    m = mask.to(logp.dtype)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": m, "advantages": adv_row,
              "old_per_token_logps": old, "num_items_in_batch": m.sum()}
    GRPOTrainer._compute_loss(stub, None, inputs)
    return {k: v[0] for k, v in stub._metrics["train"].items()}


def _inputs(all_negative=False, empty=False, zero_row=False):
    """tests/test_rl_loss_variants.py's awkward inputs (holes, row 2 without loss tokens, ratios
    on both sides of the bounds); ``all_negative``: every A < 0 and old_logp drifted up, so that
    low_min is not 0 (``zero_row``: but row 3's A = 0, which is never clipped, and no row with
    A > 0, so the sign test is A < 0, not A ≤ 0); ``empty``: no loss token at all. Returns ours
    (per-token advantages) and TRL's [B] advantages (its row 2 keeps one, as a truncated answer
    under a zeroed mask)."""
    from tests.test_rl_loss_variants import _inputs as base

    logp, old, _, _, adv, mask = base()
    adv_row = torch.tensor(ADV_ROW, dtype=torch.float64)
    if all_negative:
        adv_row = -adv_row.abs() - (0.0 if zero_row else 0.1)
        old = torch.where(mask, old + 0.6, old)
    if empty:
        mask = torch.zeros_like(mask)
    adv = torch.where(mask, adv_row[:, None].expand_as(logp), adv)
    return logp, old, adv, adv_row, mask


# (TRL loss_type, our policy_loss, agg, level); TRL refuses the sequence level with bnpo / dr_grpo / dapo
TYPES = [("grpo", "clip", "seq-mean-token-mean", "token"), ("bnpo", "clip", "token-mean", "token"),
         ("dr_grpo", "clip", "seq-mean-token-sum-norm", "token"), ("dapo", "clip", "token-mean", "token"),
         ("luspo", "luspo", "seq-mean-token-sum", "token"), ("grpo", "clip", "seq-mean-token-mean", "sequence"),
         ("luspo", "luspo", "seq-mean-token-sum", "sequence")]
BOUNDS = [(0.2, 0.28, None), (0.2, None, None),
          (0.2, 0.28, 1.25)]  # TRL's delta below 1 + ε_high: its clamped ratio is never high-clipped


@pytest.mark.parametrize("inputs", ["mixed", "all_negative", "zero_row", "empty"])
@pytest.mark.parametrize("clip_low,clip_high,dual", BOUNDS, ids=["asym", "sym", "delta"])
@pytest.mark.parametrize("trl_type,ours,agg,level", TYPES, ids=[f"{t[0]}-{t[3]}" for t in TYPES])
def test_extremes_are_trls(trl_type, ours, agg, level, clip_low, clip_high, dual, inputs):
    from rlhf_fast.algorithms import policy_losses as pl

    logp, old, adv, adv_row, mask = _inputs(inputs in ("all_negative", "zero_row"), inputs == "empty",
                                            inputs == "zero_row")
    _, st = pl.policy_loss_from_logp(logp, torch.zeros_like(logp), old, adv, mask, policy_loss=ours, agg=agg,
                                     clip_low=clip_low, clip_high=clip_high, dual_clip=dual,
                                     importance_sampling_level=level)
    metrics = _trl_grpo_metrics(trl_type, logp, old, adv_row, mask, eps_low=clip_low,
                                eps_high=clip_low if clip_high is None else clip_high, level=level, delta=dual)
    for k, trl in EXTREMES:
        assert st[k].dtype == torch.float64
        if math.isnan(metrics[trl]):
            assert math.isnan(float(st[k])), k
        else:
            assert float(st[k]) == pytest.approx(metrics[trl], rel=1e-12, abs=1e-15), k
    if inputs == "mixed":  # the inputs reach both bounds, so that the cases can tell definitions apart
        assert float(st["clip_low_min"]) == 0 and 0 < float(st["clip_high_max"]) <= 1 or dual is not None
    if inputs == "all_negative" and level == "token":
        assert 0 < float(st["clip_low_min"]) < 1
    if inputs == "empty":  # token level: TRL's 0/0 rows, NaN; sequence level: exp(0) = 1, not clipped
        assert math.isnan(float(st["clip_low_min"])) == (level == "token")


def test_rloo_sequence_sum_is_trls():
    """importance_sampling_level sequence_sum against TRL's ``RLOOTrainer._compute_loss``
    (trl/trainer/rloo_trainer.py lines 1849-1858): the flags of one ratio per answer."""
    from rlhf_fast.algorithms import policy_losses as pl

    RLOOTrainer = pytest.importorskip("trl.trainer.rloo_trainer").RLOOTrainer
    for all_negative in (False, True):
        logp, old, adv, adv_row, mask = _inputs(all_negative)
        old = torch.where(mask, old + (0.0 if all_negative else -0.15), old)  # sums: ratios on both sides
        B, T = logp.shape
        for clip_low, clip_high in ((0.2, 0.28), (0.5, 2.0)):
            _, st = pl.policy_loss_from_logp(logp, torch.zeros_like(logp), old, adv, mask, clip_low=clip_low,
                                             clip_high=clip_high, agg="seq-mean-token-sum",
                                             importance_sampling_level="sequence_sum")
            stub = _stub(epsilon_low=clip_low, epsilon_high=clip_high, aux_loss_enabled=False)
            stub._get_per_token_logps_and_entropies = lambda *a, **kw: (logp, torch.zeros_like(logp), None)
            m = mask.to(logp.dtype)
            inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long),
                      "prompt_mask": torch.ones(B, 1, dtype=torch.long),
                      "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": m,
                      "advantages": adv_row, "old_logps": (old * m).sum(1)}
            RLOOTrainer._compute_loss(stub, None, inputs)
            for k, trl in EXTREMES:
                assert float(st[k]) == pytest.approx(stub._metrics["train"][trl][0], rel=1e-12, abs=1e-15), k


def test_other_losses_log_none():
    """TRL logs them for its clipped losses only (cispo: cispo_clip_ratio; vespo: phi_seq_mean)."""
    from rlhf_fast.algorithms import policy_losses as pl

    logp, old, adv, _, mask = _inputs()
    for loss, kw in (("cispo", dict(clip_high=5.0)), ("sapo", {}), ("vespo", {})):
        _, st = pl.policy_loss_from_logp(logp, torch.zeros_like(logp), old, adv, mask, policy_loss=loss, **kw)
        assert "clip_low_min" not in st and "clip_high_max" not in st, loss


# --------------------------------------------------------------------------- the trainer


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("ppo", [dict(), dict(importance_sampling_level="sequence"),
                                 dict(top_entropy_quantile=0.5)], ids=["fused", "sequence", "composed"])
def test_trainer_extremes_are_the_mini_batchs(tmp_path, ppo):
    """policy_backward's extremes (the fused kernel's path, the sequence level, the composed path)
    are clip_region_extremes of the model's log-probs over the whole mini-batch, with its 8 rows in
    one micro-batch or in four."""
    from rlhf_fast.algorithms import policy_losses as pl
    from rlhf_fast.models.logprobs import _target_mask, sequence_logprobs
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import PPOConfig, RolloutConfig
    from tests.test_rl_learning import PROMPTS, make_config, make_policy

    pol, tok = make_policy()
    cfg = make_config(tmp_path, "grpo", rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=5),
                      ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8, clip_low=0.02, clip_high=0.01,
                                    **ppo))
    tr = RLTrainer(cfg, pol, tok, reward_fns=[lambda p, c: [float(len(x)) for x in c]], prompts=PROMPTS[:2])
    assert tr.config.ppo.composed_loss == ("top_entropy_quantile" in ppo)
    data, _ = tr.rollout()
    tr.optimizer.zero_grad()
    tr.policy_backward(data)
    tr.optimizer.step()  # off the rollout's parameters, so that ratios are not 1
    s1, s2 = (tr.policy_backward(data, mb) for mb in (8, 2))
    with torch.no_grad():
        mask = _target_mask(data.attention_mask, data.response_mask)
        logp = sequence_logprobs(tr.policy, data.input_ids, data.attention_mask, response_mask=mask)
        want = [float(x) for x in pl.clip_region_extremes(
            logp, data.old_logp, data.advantages, mask, clip_low=0.02, clip_high=0.01,
            importance_sampling_level=tr.config.ppo.importance_sampling_level)]
    assert want[1] > 0
    for (k, _), w in zip(EXTREMES, want):
        assert s1[k] == pytest.approx(w, abs=1e-6) and s2[k] == pytest.approx(w, abs=1e-6), k


# --------------------------------------------------------------------------- two gloo ranks


def test_two_ranks_log_one_process_extremes(tmp_path_factory):
    check_two_ranks_log_one_process_extremes(tmp_path_factory, "clip")
