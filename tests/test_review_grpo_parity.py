"""Review of the GRPO parity with TRL 1.16's GRPOTrainer (docs/from_trl.md, GRPOTrainer / GRPOConfig
table): TRL's own ``GRPOTrainer._compute_loss`` on a stub ``self`` (one process, the per-token
log-probs and entropies given) against ours on the same small tensors for a setting the table maps
(the entropy bonus under the high-entropy mask), the rows that must say where the two differ (delta,
dapo's and bnpo's normalisers, GSPO's gradient, the off-policy mask's log-probs, step counts,
steps_per_generation), the section's YAML example against its TRL example, and ``is_weight/mean``
of the sequence importance-sampling modes against TRL's per-answer mean."""

import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from rlhf_fast.algorithms import policy_losses as pl
from tests.test_rl_loss_variants import _inputs

pytestmark = pytest.mark.usefixtures("one_thread")

DOC = Path(__file__).resolve().parent.parent / "docs" / "from_trl.md"


class _Accel:
    """What ``_compute_loss`` and ``get_high_entropy_mask`` use of an Accelerator, one process."""

    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def pad_across_processes(x, dim=0, pad_index=0):
        return x


def trl_loss(loss_type, logp, ent, old, adv_row, mask, *, eps_low=0.2, eps_high=0.28, level="token", delta=None,
             q=1.0, entropy_coef=0.0, ga=1, spg=1, num_items=None, is_ratio=None, metrics=False):
    """TRL 1.16 ``GRPOTrainer._compute_loss`` itself on a stub: ``logp`` / ``ent`` ``[B, T]`` are the
    policy's per-token log-probs and entropies (the completion is the whole row), ``adv_row`` ``[B]``;
    ``ga`` / ``spg`` its gradient-accumulation steps and steps_per_generation, ``num_items`` the
    generation batch's loss tokens (default: this batch's); ``is_ratio`` its vLLM importance-sampling
    ratios (None: off). With ``metrics``: (loss, the metrics it logged, last value each)."""
    GRPOTrainer = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer
    B, T = logp.shape
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_Accel(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, beta=0.0, top_entropy_quantile=q, off_policy_mask_threshold=None,
        importance_sampling_level=level, use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=is_ratio is not None,
        current_gradient_accumulation_steps=ga, max_completion_length=T, _entropy_bonus_enabled=entropy_coef != 0,
        entropy_coef=entropy_coef, use_adaptive_entropy=False, aux_loss_enabled=False,
        args=types.SimpleNamespace(delta=delta, use_bias_correction_kl=False, steps_per_generation=spg))
    stub.get_high_entropy_mask = lambda e, m, thr: GRPOTrainer.get_high_entropy_mask(stub, e, m, thr)
    stub._get_per_token_logps_and_entropies = lambda *a, **kw: (logp, ent, None)
    m = mask.to(logp.dtype)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": m, "advantages": adv_row,
              "old_per_token_logps": old, "num_items_in_batch": m.sum() if num_items is None else num_items}
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return (loss, {k: v[-1] for k, v in stub._metrics["train"].items()}) if metrics else loss


def _case():
    """tests/test_rl_loss_variants.py's awkward inputs (holes in the mask, a row without loss
    tokens, ratios on both sides of the clip); ours per token, TRL's advantages one per row."""
    logp, old, _, ent, adv, mask = _inputs()
    adv_row = adv[:, 1].clone()
    adv_row[2] = 0.0
    return logp, old, ent, adv, adv_row, mask


def _row(trl_cell: str) -> str:
    """The notes of the GRPOTrainer table's row whose TRL cell is ``trl_cell``."""
    text = DOC.read_text()
    section = text[text.index("### GRPOTrainer / GRPOConfig"):]
    section = section[:section.index("\n### ", 10)]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] == trl_cell:
            return cells[2]
    raise AssertionError(f"no row {trl_cell}")


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


# --------------------------------------------------------------------------- 1. entropy bonus


def test_entropy_bonus_with_the_high_entropy_mask_is_trls():
    """TRL's bonus is the mean entropy over the tokens it acts on (loss tokens × high-entropy
    mask); under ``ppo.agg: token-mean`` (TRL's dapo) ours must be the same, value and gradient."""
    logp, old, ent, adv, adv_row, mask = _case()
    lo, eo = logp.clone().requires_grad_(True), ent.clone().requires_grad_(True)
    lt, et = logp.clone().requires_grad_(True), ent.clone().requires_grad_(True)
    ours, st = pl.policy_loss_from_logp(lo, eo, old, adv, mask, clip_high=0.28, top_entropy_quantile=0.3,
                                        entropy_coef=0.1)
    want = trl_loss("dapo", lt, et, old, adv_row, mask, q=0.3, entropy_coef=0.1)
    assert 0 < float(st["entropy_mask_frac"]) < 0.5
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(ours, lo, eo), _grads(want, lt, et)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- 2. delta (two-sided clip)


def test_delta_row_says_where_dual_clip_is_trls():
    """TRL clamps the ratio at δ before its min (for both signs of A); our (verl's) dual clip bounds
    the A < 0 loss at −δ·A. The two agree for δ ≥ 1 + ε_high — TRL's recommended range — and
    not below it, which the row must say."""
    logp, old, ent, adv, adv_row, mask = _case()
    for delta, same in ((3.0, True), (1.28, True), (1.05, False)):
        lo, lt = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
        ours, _ = pl.policy_loss_from_logp(lo, ent, old, adv, mask, clip_high=0.28, dual_clip=delta)
        want = trl_loss("dapo", lt, ent, old, adv_row, mask, delta=delta)
        (go,), (gt,) = _grads(ours, lo), _grads(want, lt)
        assert (torch.allclose(ours, want, rtol=1e-12, atol=1e-12) and torch.allclose(go, gt, atol=1e-12)) == same
    row = _row("`delta`")
    assert "1 + ε_high" in row, row


# --------------------------------------------------------------------------- 3. dapo's normaliser


def test_dapo_row_says_trls_normaliser_over_several_optimizer_steps():
    """TRL's dapo divides by num_items_in_batch (the whole generation batch's loss tokens) ×
    gradient_accumulation_steps / steps_per_generation: with two optimizer steps per generation
    each step's token sum is divided by the *mean* token count of the two, where ours
    (``ppo.agg: token-mean``, the mini-batch's own count) divides by its own."""
    logp, old, ent, adv, adv_row, mask = _case()
    halves = (slice(0, 2), slice(2, 5))  # 2 optimizer steps of one micro-batch (rows 0-1: many tokens)
    n_gen = mask.sum().double()
    for rows in halves:
        ours, _ = pl.policy_loss_from_logp(logp[rows], ent[rows], old[rows], adv[rows], mask[rows], clip_high=0.28)
        want = trl_loss("dapo", logp[rows], ent[rows], old[rows], adv_row[rows], mask[rows], ga=1, spg=2,
                        num_items=n_gen)
        n = mask[rows].sum().double()
        torch.testing.assert_close(want, ours * n / (n_gen / 2), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(want, ours)
    row = _row('`loss_type="dapo"`')
    assert "steps_per_generation" in row, row


# --------------------------------------------------------------------------- 4. GSPO's gradient


def test_sequence_level_row_says_the_gradient_is_gspo_tokens():
    """Same loss as TRL's, but under ``ppo.top_entropy_quantile`` only the kept tokens carry a
    gradient (TRL differentiates the row's ratio through every token)."""
    logp, old, ent, adv, adv_row, mask = _case()
    lo, lt = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    ours, _ = pl.policy_loss_from_logp(lo, ent, old, adv, mask, clip_high=0.28, agg="seq-mean-token-mean",
                                       importance_sampling_level="sequence", top_entropy_quantile=0.5)
    want = trl_loss("grpo", lt, ent, old, adv_row, mask, level="sequence", q=0.5)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(_grads(ours, lo)[0], _grads(want, lt)[0])
    row = _row("`importance_sampling_level`")
    assert "GSPO-token" in row and "top_entropy_quantile" in row, row


# --------------------------------------------------------------------------- 5. the section's example


def test_the_example_yaml_is_the_trl_example(tmp_path):
    """The GRPO section's YAML is its TRL example translated by the table's rows, TRL's defaults
    included for the fields the example leaves out (``use_bias_correction_kl``: true)."""
    import ast
    import dataclasses

    from rlhf_fast.trainers.config import load_config
    from rlhf_fast.trainers.rl_config import RLConfig
    from tests.test_docs_from_trl import SECTIONS

    GRPOConfig = pytest.importorskip("trl").GRPOConfig
    sec = next(s for s in SECTIONS if s["heading"].startswith("### GRPOTrainer"))
    call = next(n for n in ast.walk(ast.parse(sec["python"][0]))
                if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "GRPOConfig")
    trl = {f.name: f.default for f in dataclasses.fields(GRPOConfig) if f.default is not dataclasses.MISSING}
    trl.update({k.arg: ast.literal_eval(k.value) for k in call.keywords})
    path = tmp_path / "grpo.yaml"
    path.write_text(sec["yaml"][0], encoding="utf-8")
    cfg = load_config(RLConfig, str(path))
    assert trl["loss_type"] == "dapo" and cfg.ppo.agg == "token-mean"
    assert trl["scale_rewards"] == "group" and cfg.estimator == "grpo"
    pairs = [("learning_rate", cfg.optim.lr), ("num_generations", cfg.rollout.group_size),
             ("max_completion_length", cfg.rollout.max_new_tokens), ("num_iterations", cfg.ppo.epochs),
             ("per_device_train_batch_size", cfg.ppo.micro_batch_size), ("epsilon", cfg.ppo.clip_low),
             ("epsilon_high", cfg.ppo.clip_high), ("temperature", cfg.rollout.temperature), ("seed", cfg.seed),
             ("mask_truncated_completions", cfg.rollout.mask_truncated), ("beta", cfg.kl.coef),
             ("use_bias_correction_kl", cfg.kl.use_bias_correction_kl)]
    assert trl["beta"] != 0 and cfg.kl.placement == "loss" and cfg.kl.kind == "k3"
    assert trl["per_device_train_batch_size"] * trl["gradient_accumulation_steps"] == cfg.ppo.mini_batch_size
    assert [(k, trl[k]) for k, _ in pairs] == [(k, v) for k, v in pairs]


# --------------------------------------------------------------------------- 6. reference sync


def test_ref_sync_row_says_which_steps_it_counts():
    """TRL's SyncRefModelCallback syncs when ``state.global_step`` (optimizer steps) is a multiple
    of ``ref_model_sync_steps``; ours when the rollout step count is (``RLTrainer.step``), so the
    row has to give the conversion as ``max_steps``' does."""
    import inspect

    from rlhf_fast.trainers.rl import RLTrainer

    cb = pytest.importorskip("trl.trainer.callbacks").SyncRefModelCallback
    assert "state.global_step % args.ref_model_sync_steps" in inspect.getsource(cb.on_step_end)
    src = inspect.getsource(RLTrainer.step)
    assert "self.global_step += 1" in src and "self.global_step % every == 0" in src
    row = _row("`ref_model_sync_steps`")
    assert "rollout steps" in row and "ppo.epochs" in row, row


# --------------------------------------------------------------------------- 7. steps_per_generation


def test_steps_per_generation_row_counts_trls_micro_steps(tmp_path):
    """TRL's steps_per_generation = generation_batch_size / (per_device_train_batch_size ×
    processes): forward-backward steps per device, gradient_accumulation_steps of them per
    optimizer step. In our keys: rollout rows / (``ppo.micro_batch_size`` × ranks), not rollout rows
    / ``ppo.mini_batch_size`` (the optimizer steps per rollout)."""
    GRPOConfig = pytest.importorskip("trl").GRPOConfig
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                      generation_batch_size=64, num_generations=8, report_to="none", use_cpu=True, bf16=False)
    rows, ranks = args.generation_batch_size, 1
    micro, mini = args.per_device_train_batch_size, args.per_device_train_batch_size * args.gradient_accumulation_steps
    assert args.steps_per_generation == rows // (micro * ranks) == 8 and rows // mini == 4
    text = DOC.read_text()
    intro = text[text.index("- TRL's `steps_per_generation`"):]
    intro = intro[:intro.index("\n\n")]
    for notes in (intro, _row("`steps_per_generation`")):
        assert "`ppo.micro_batch_size` × ranks" in notes, notes


# --------------------------------------------------------------------------- 8. off-policy mask's KL


def test_off_policy_mask_row_says_which_log_probs_it_measures():
    """TRL's off-policy mask measures KL(sampler ‖ current) with the vLLM sampler's log-probs when
    it has them (the vLLM case, whatever its importance-sampling correction), else against the
    old ones; ours against the loss's old_logp (the recomputed ones, the sampler's under
    ``ppo.old_logp: behaviour``), so with ``ppo.is_cap`` (recompute) the sampler's mismatch is not
    in it: the row has to say so."""
    import inspect

    GRPOTrainer = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer
    assert 'inputs.get("sampling_per_token_logps", old_per_token_logps)' in inspect.getsource(
        GRPOTrainer._compute_loss)
    row = _row("`off_policy_mask_threshold`")
    assert "ppo.old_logp: behaviour" in row and "ppo.is_cap" in row, row


# --------------------------------------------------------------------------- 9. bnpo on several processes


def test_bnpo_row_says_one_process():
    """TRL's bnpo is each process's micro-batch token mean (over its gradient-accumulation steps),
    and DDP averages the processes' gradients: with one micro-batch per step on two processes the
    loss is the mean of the two token means, not ours (``ppo.agg: token-mean``), the token mean of
    every rank's tokens."""
    logp, old, ent, adv, adv_row, mask = _case()
    ranks = (slice(0, 2), slice(2, 5))  # two processes' micro-batches: rows 0-1 hold most tokens
    trl = sum(trl_loss("bnpo", logp[r], ent[r], old[r], adv_row[r], mask[r]) for r in ranks) / len(ranks)
    ours, _ = pl.policy_loss_from_logp(logp, ent, old, adv, mask, clip_high=0.28)
    assert not torch.allclose(trl, ours)
    one, _ = pl.policy_loss_from_logp(logp[ranks[1]], ent[ranks[1]], old[ranks[1]], adv[ranks[1]], mask[ranks[1]],
                                      clip_high=0.28)
    torch.testing.assert_close(one, trl_loss("bnpo", logp[ranks[1]], ent[ranks[1]], old[ranks[1]],
                                             adv_row[ranks[1]], mask[ranks[1]]), rtol=1e-12, atol=1e-12)
    row = _row('`loss_type="bnpo"`')
    assert "one process" in row, row


# --------------------------------------------------------------------------- 10. is_weight/mean


def test_sequence_is_weight_mean_is_over_answers(tmp_path):
    """TRL logs ``sampling/importance_sampling_ratio/mean`` of the sequence modes as the mean of the
    (B, 1) per-answer weights; ``is_weight/mean`` (its counterpart) must not weigh answers by length."""
    from rlhf_fast.ops import reference
    from rlhf_fast.trainers.rl_config import PPOConfig, RolloutConfig
    from tests.test_rl_grpo_options import _trainer, n_chars

    tr = _trainer(tmp_path, rewards=(n_chars,), rollout=RolloutConfig(prompts_per_step=2, group_size=4,
                                                                     max_new_tokens=16, top_k=3),
                  ppo=PPOConfig(mini_batch_size=8, micro_batch_size=8, is_cap=50.0, is_mode="sequence_truncate"))
    data, m = tr.rollout()
    rm = data.response_mask
    w, _ = tr._is_weights(data.old_logp, data.behaviour_logp, rm)
    rows = rm.any(1)
    per_answer = (w * rm).sum(1)[rows] / rm.sum(1)[rows]
    assert float(per_answer.std() / per_answer.mean()) > 1e-2 and rm.sum(1)[rows].unique().numel() > 1
    assert m["is_weight/mean"] == pytest.approx(float(per_answer.mean()), rel=1e-6)
    assert m["is_weight/mean"] != pytest.approx(float(reference.masked_mean(w, rm)), rel=1e-6)
    # the ranks' path (its sums and counts, here with one rank's reductions) says the same
    from rlhf_fast.distributed import DistContext

    stub = types.SimpleNamespace(ctx=DistContext(), device=torch.device("cpu"), critic=None)
    z, B = torch.zeros_like(w), rm.shape[0]
    out = type(tr)._global_rollout_metrics(stub, {}, torch.ones(B), torch.ones(B), z, rm, z, z, z, z, None, w,
                                           torch.zeros(B, dtype=torch.bool), is_per_answer=True)
    assert out["is_weight/mean"] == pytest.approx(m["is_weight/mean"], rel=1e-9)
