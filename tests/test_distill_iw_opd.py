"""``distill.objective: iw_opd`` (TRL's experimental IWOPDTrainer, ``distillation_objective="iw_opd"``):
the loss, its gradients and TRL's ``iw_opd/*`` metrics against TRL's own
``IWOPDTrainer._compute_iw_opd_loss`` (called on a stand-in object) — on hand-made ragged batches,
and on a trainer's rollout with the full logits of both models (micro-batches, the loss normaliser,
tool results out of the loss, the sampler's log-probs as TRL's ``rollout_logprobs``, evaluation
with TRL's fallback); ``ppo.prefix_sharing`` against the padded forwards; learning (a teacher that
favours the letter a pulls the student towards it; lr 1e-12 does not); two DDP ranks against one
process; ``rlhf-fast distill CONFIG --distill.objective iw_opd``; the refused settings."""

import json
import math
from collections import defaultdict

import pytest
import torch

from rlhf_fast.cli import main
from rlhf_fast.models import logprobs as L
from rlhf_fast.trainers.distill import IW_OPD_METRICS, DistillationTrainer, iw_opd_loss, iw_opd_token_loss
from rlhf_fast.trainers.rl_config import (DataConfig, DistillConfig, EvalConfig, OptimConfig, PPOConfig, RLConfig,
                                          RolloutConfig)
from tests.test_distill import make_teacher
from tests.test_rl_learning import PROMPTS, frac_a, make_policy

pytestmark = [pytest.mark.usefixtures("one_thread_per_module"),
              pytest.mark.filterwarnings("ignore::UserWarning")]  # (TRL's experimental-import warning)


class _TRLStandIn:
    """What ``IWOPDTrainer._compute_iw_opd_loss`` reads of its ``self``."""

    def __init__(self, temperature, gamma, epsilon, training=True):
        self.temperature, self.iw_opd_gamma, self.iw_opd_epsilon = temperature, gamma, epsilon
        self.model = torch.nn.Linear(1, 1)
        self.model.train(training)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}


def trl_iw_opd(student_logits, tokens, labels, teacher_logp, rollout_logp, num_items, *, temperature, gamma=0.5,
               epsilon=1e-8):
    """TRL's loss and logged metrics (its ``log``: the mean of each ``_metrics`` list)."""
    from trl.experimental.iw_opd.iw_opd_trainer import IWOPDTrainer

    me = _TRLStandIn(temperature, gamma, epsilon)
    loss = IWOPDTrainer._compute_iw_opd_loss(me, student_logits, tokens, labels, teacher_logp,
                                             rollout_logprobs=rollout_logp, num_items_in_batch=num_items)
    return loss, {k: sum(v) / len(v) for k, v in me._metrics["train"].items()}


# ----------------------------------------------------------------------------- the objective itself


@pytest.mark.parametrize("with_rollout", [True, False])
@pytest.mark.parametrize("gamma,epsilon,temperature", [(0.5, 1e-8, 1.0), (2.0, 1e-3, 0.7), (0.0, 1e-8, 1.3)])
def test_token_loss_equals_trl_on_ragged_rows(with_rollout, gamma, epsilon, temperature):
    """Rows of 5, 1 and 3 tokens (right padding, a hole), a row whose rollout equals the teacher
    (Σ|a| = 0: epsilon), a row without tokens; loss, logit gradients and metrics as TRL's."""
    g = torch.Generator().manual_seed(3)
    B, T, V = 5, 6, 11
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).requires_grad_()
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, :5] = True
    mask[1, 0] = True
    mask[2, [0, 1, 3]] = True  # a hole at column 2 (a tool result)
    mask[3, :4] = True
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1).gather(
        -1, tokens[..., None])[..., 0]
    rollout = teacher - torch.randn(B, T, generator=g, dtype=torch.float64).abs()
    rollout[3] = teacher[3]  # a row already at the teacher: its weights divide by epsilon
    labels = torch.where(mask, tokens, torch.full_like(tokens, -100))
    n = torch.tensor(float(mask.sum()))
    r = rollout if with_rollout else None

    ref, trl_m = trl_iw_opd(logits, tokens, labels, teacher, r, n, temperature=temperature, gamma=gamma,
                            epsilon=epsilon)
    (g_ref,) = torch.autograd.grad(ref, logits)
    logp = torch.log_softmax(logits / temperature, -1).gather(-1, tokens[..., None])[..., 0]
    loss_sum, adv, abs_a, w = iw_opd_token_loss(logp, teacher, r, mask, gamma=gamma, epsilon=epsilon)
    loss = loss_sum / n
    (g_ours,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-14)
    assert abs(float(ref)) > 1e-3  # a real comparison
    from rlhf_fast.trainers.distill import iw_opd_metrics

    ours_m = iw_opd_metrics(adv, abs_a, w, mask)
    assert set(ours_m) == set(trl_m) == set(IW_OPD_METRICS)
    for k in IW_OPD_METRICS:
        assert ours_m[k] == pytest.approx(trl_m[k], rel=1e-12, abs=1e-14), k
    if gamma > 0:
        assert trl_m["iw_opd/max_weight"] > trl_m["iw_opd/min_weight"]  # the prefix weights vary


def test_no_token_gives_no_metric():
    z = torch.zeros(2, 3)
    loss, adv, abs_a, w = iw_opd_token_loss(z, z, z, torch.zeros(2, 3, dtype=torch.bool))
    from rlhf_fast.trainers.distill import iw_opd_metrics

    assert float(loss) == 0.0 and iw_opd_metrics(adv, abs_a, w, torch.zeros(2, 3, dtype=torch.bool)) == {}


# ----------------------------------------------------------------------------- the trainer against TRL


def make_config(tmp_path, lr=5e-3, **kw):
    distill = kw.pop("distill", DistillConfig(objective="iw_opd"))
    base = dict(estimator="distill", steps=2, output_dir=str(tmp_path / "run"), progress=False, sample_every=1,
                rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=6, temperature=0.9),
                ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8), optim=OptimConfig(lr=lr),
                distill=distill)
    base.update(kw)
    return RLConfig(**base)


def trainer(tmp_path, lr=5e-3, teacher=None, tok_policy=None, **kw):
    pol, tok = tok_policy or make_policy()
    return DistillationTrainer(make_config(tmp_path, lr, **kw), pol, tok, prompts=PROMPTS,
                               teacher_model=teacher if teacher is not None else make_teacher(tok))


def trl_on_rows(tr, data, rows, num_items, rollout=True, hole_free=None):
    """TRL's ``compute_loss`` (local teacher, iw_opd) on ``data``'s ``rows``: both models' full
    logits from their transformers forwards (our position ids, as generation used them), sliced
    at the prompt width P as TRL slices them, ``labels`` -100 outside the loss mask (TRL's tool
    tokens and padding), the teacher's log-probs at the temperature, ``rollout_logprobs`` the
    sampler's (``data.behaviour_logp``) or None."""
    ids, am, rm = data.input_ids[rows], data.attention_mask[rows], data.response_mask[rows]
    P = int(data.response_mask.float().argmax(1).min())
    pos = (am.long().cumsum(1) - 1).clamp(min=0)
    T = tr.config.rollout.temperature
    zs = tr.policy(input_ids=ids, attention_mask=am.long(), position_ids=pos).logits[:, P - 1:-1]
    with torch.no_grad():
        zt = tr.teacher(input_ids=ids, attention_mask=am.long(), position_ids=pos).logits[:, P - 1:-1]
    tokens = ids[:, P:]
    labels = torch.where(rm[:, P:], tokens, torch.full_like(tokens, -100))
    teacher_logp = torch.log_softmax(zt / T, -1).gather(-1, tokens[..., None])[..., 0]
    r = data.behaviour_logp[rows][:, P:] if rollout else None
    d = tr.config.distill
    return trl_iw_opd(zs, tokens, labels, teacher_logp, r, num_items, temperature=T, gamma=d.iw_opd_gamma,
                      epsilon=d.iw_opd_epsilon)


def student_grads(tr):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in tr.policy.parameters()]


def _equal_trl(tr, data, mb):
    """policy_backward in micro-batches of ``mb`` rows against TRL called on the same rows with
    ``num_items_in_batch`` the whole batch's tokens: loss, gradients, metrics."""
    n = torch.tensor(float(data.response_mask.sum()))
    B = data.input_ids.shape[0]
    tr.policy.zero_grad(set_to_none=True)
    ref, lists = 0.0, defaultdict(list)
    for s in range(0, B, mb):
        loss, m = trl_on_rows(tr, data, torch.arange(s, min(B, s + mb)), n)
        loss.backward()
        ref += float(loss)
        for k, v in m.items():
            lists[k].append(v)
    g_trl = student_grads(tr)
    tr.policy.zero_grad(set_to_none=True)
    tr._iw_opd_stats = []
    st = tr.policy_backward(data, mb)
    assert st["loss"] == pytest.approx(ref, rel=1e-5, abs=1e-7)
    for a, b in zip(student_grads(tr), g_trl):
        # atol on the gradient's scale: an entry that cancels to ~1e-4 of it carries the float32
        # noise of the summation order, which differs between CPUs (1.3e-7 on an AMD EPYC)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    ours = tr._iw_opd_means(tr._iw_opd_stats)
    for k in IW_OPD_METRICS:
        assert ours[k] == pytest.approx(sum(lists[k]) / len(lists[k]), rel=1e-5, abs=1e-7), k
    return st, ref


def test_trainer_loss_gradients_and_metrics_equal_trl(tmp_path):
    tr = trainer(tmp_path, distill=DistillConfig(objective="iw_opd", iw_opd_gamma=0.8))
    data, m = tr.rollout()
    assert data.input_ids.shape[0] == 8 and m["completions/mean_length"] > 0
    # the sampler's log-probs on the answer tokens, nothing elsewhere
    assert (data.behaviour_logp[data.response_mask] < 0).all() and (data.behaviour_logp[~data.response_mask] == 0).all()
    st, ref = _equal_trl(tr, data, 8)  # one micro-batch: TRL's one compute_loss
    assert abs(ref) > 1e-3
    _equal_trl(tr, data, 3)  # three (3 + 3 + 2 rows): the metrics are the mean of their values, as TRL logs
    # on-policy at the sampling temperature the sampler's log-probs are the student's own (float rounding)
    P = int(data.response_mask.float().argmax(1).min())
    with torch.no_grad():
        loss_none, _ = trl_on_rows(tr, data, torch.arange(8), torch.tensor(float(data.response_mask.sum())),
                                   rollout=False)
    assert float(loss_none) == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert st["divergence"] != 0 and math.isfinite(st["entropy"])
    assert P > 0


def test_evaluation_uses_the_students_own_logprobs_as_trl(tmp_path):
    """Evaluation has no rollout log-probs (TRL's evaluation neither): the student's own at
    rollout.temperature (0.9; the answers sampled at eval.temperature 0.5), as TRL's
    ``rollout_logprobs is None`` path, on each evaluation batch; eval/loss and eval/iw_opd/* logged."""
    from types import SimpleNamespace

    tr = trainer(tmp_path, data=DataConfig(eval_prompts=["b", "1 2", "x y"]),
                 eval=EvalConfig(group_size=2, temperature=0.5))
    seen, real = [], tr._eval_batch_sums

    def spy(batch, idx, extra, group_size):
        res = real(batch, idx, extra, group_size)
        seen.append((batch, res))
        return res

    tr._eval_batch_sums = spy
    ev = tr.evaluate()
    assert seen
    for batch, res in seen:
        ids, am, rm = tr._batch_masks(batch)
        data = SimpleNamespace(input_ids=ids, attention_mask=am, response_mask=rm,
                               behaviour_logp=batch.behaviour_logp.to(ids.device).float())
        with torch.no_grad():
            ref, trl_m = trl_on_rows(tr, data, torch.arange(ids.shape[0]), None, rollout=False)
            with_sampler, _ = trl_on_rows(tr, data, torch.arange(ids.shape[0]), None, rollout=True)
        assert res["loss"][0] / res["loss"][1] == pytest.approx(float(ref), rel=1e-5, abs=1e-7)
        assert abs(float(with_sampler) - float(ref)) > 1e-3  # the sampler's log-probs would differ
        for k in IW_OPD_METRICS:
            assert res[k] == pytest.approx((trl_m[k], 1.0), rel=1e-5, abs=1e-7)
    for k in ("eval/loss", "eval/entropy", "eval/distill/divergence", *(f"eval/{k}" for k in IW_OPD_METRICS)):
        assert math.isfinite(ev[k]), k


def test_tool_results_are_out_of_the_loss(tmp_path):
    """A rollout whose answers call a calculator: TRL with labels -100 on the tool results (its
    tool mask) gives our loss; the prefix weights skip the tool tokens."""
    from tests.test_rl_tools import CHATS, FirstCallScripted, _holes, calculator, make_policy as tool_policy
    from tests.test_rl_tools import tool_tokenizer

    tok = tool_tokenizer()
    cfg = make_config(tmp_path, rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=80),
                      ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4))
    tr = DistillationTrainer(cfg, tool_policy(tok), tok, prompts=CHATS, tools=[calculator],
                             teacher_model=make_teacher(tok))
    tr.engine = FirstCallScripted(tr.engine, tok)
    data, m = tr.rollout()
    holes = _holes(data)
    assert holes.any() and m["tools/call_count"] == 4
    assert (data.behaviour_logp[holes] == 0).all()
    _equal_trl(tr, data, 2)


@pytest.mark.parametrize("student,teacher", [("llama", "gemma2"), ("gemma2", "cohere")])
def test_transformed_heads_take_their_logits_in_chunks(tmp_path, student, teacher):
    """Heads that softcap or scale their logits (Gemma 2, Cohere) go through chunks of 5 rows of
    logits: TRL's loss on the models' own transformers logits, at temperature 0.7."""
    from tests.test_distill_softcap import build

    _, tok = make_policy()
    tr = trainer(tmp_path, tok_policy=(build(student, tok, seed=0), tok),
                 teacher=build(teacher, tok, hidden=48, seed=7, sharpen=20.0),
                 distill=DistillConfig(objective="iw_opd", chunk_size=5),
                 rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=6, temperature=0.7))
    data, _ = tr.rollout()
    _, ref = _equal_trl(tr, data, 3)
    assert abs(ref) > 1e-3


def test_prefix_sharing_equals_the_padded_forwards(tmp_path):
    tr = trainer(tmp_path, rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=6,
                                                 temperature=0.9),
                 ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=4, prefix_sharing=True))
    data, _ = tr.rollout()
    args = (tr.policy, tr.teacher, data.input_ids, data.attention_mask, data.response_mask, data.behaviour_logp)
    out = []
    for groups in (None, L.row_groups(data.group)):
        tr.policy.zero_grad(set_to_none=True)
        loss, st = iw_opd_loss(*args, temperature=0.9, prefix_groups=groups)
        loss.backward()
        out.append((float(loss), st, student_grads(tr)))
    (l0, s0, g0), (l1, s1, g1) = out
    assert l1 == pytest.approx(l0, rel=1e-5) and abs(l0) > 1e-3
    for k in IW_OPD_METRICS:
        assert s1["iw_opd"][k] == pytest.approx(s0["iw_opd"][k], rel=1e-5, abs=1e-7)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    h = tr.step()  # the trainer's own update under prefix sharing
    assert math.isfinite(h["loss"]) and all(math.isfinite(h[k]) for k in IW_OPD_METRICS)


# ----------------------------------------------------------------------------- learning


def a_teacher(tok, push=4.0):
    """A tiny teacher whose head adds ``push`` to the logit of every token that holds an 'a':
    it favours the letter whatever the context."""
    t = make_teacher(tok, scale=1.0)
    head = t.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(torch.tensor([push if "a" in tok.decode([i]) else 0.0 for i in range(len(tok))]))
    t.lm_head = biased
    t.requires_grad_(False)
    return t


def frac_a_after(tmp_path, lr, steps=16):
    pol, tok = make_policy()
    cfg = make_config(tmp_path, lr, steps=steps, eval_every=steps, sample_every=0,
                      data=DataConfig(eval_prompts=["b", "1 2", "x y", "q: a", "d e", "7", "w v", "3"]),
                      eval=EvalConfig(group_size=4, temperature=0.9),
                      rollout=RolloutConfig(prompts_per_step=8, group_size=2, max_new_tokens=6, temperature=0.9),
                      ppo=PPOConfig(epochs=1, mini_batch_size=16, micro_batch_size=16))
    tr = DistillationTrainer(cfg, pol, tok, prompts=PROMPTS + ["c", "5 6", "y z", "q: b"], reward_fns=[frac_a],
                             teacher_model=a_teacher(tok))
    before = tr.evaluate()["eval/reward/frac_a"]
    hist = tr.train()
    assert len(hist) == steps and all(math.isfinite(h["loss"]) for h in hist)
    return before, hist[-1]["eval/reward/frac_a"], hist


def test_the_student_learns_the_teachers_letter(tmp_path):
    """Held-out share of 'a' (8 prompts × 4 answers) before → after 16 steps at lr 1e-2, measured
    over policy seeds 0–3: 0.006–0.022 → 0.66–0.79, the mean |a| 1.44–1.48 → 0.17–0.33; with
    lr 1e-12 it stays (0.005–0.036, |change| ≤ 0.02: the evaluation's answers are seeded by step)."""
    before, after, hist = frac_a_after(tmp_path / "a", 1e-2)
    assert after > before + 0.4, (before, after)
    # |teacher − sampler log-prob| shrinks as the student nears the teacher
    assert hist[-1]["iw_opd/mean_abs_advantage"] < 0.5 * hist[0]["iw_opd/mean_abs_advantage"]
    before0, after0, _ = frac_a_after(tmp_path / "b", 1e-12)
    assert before0 == pytest.approx(before)
    assert abs(after0 - before0) < 0.05, (before0, after0)


# ----------------------------------------------------------------------------- DDP and the CLI


def test_two_ddp_ranks_match_one_process(tmp_path):
    """``torchrun`` with 2 gloo ranks (DDP) logs the loss, entropy, divergence and grad norm of one
    process: the normaliser is the tokens of every rank. TRL's iw_opd/* are means over micro-batches,
    which the ranks split differently: logged and finite."""
    from tests.torchrun_launch import torchrun

    (tmp_path / "prompts.txt").write_text("count:\nlist:\ngo:\nwrite:\na b\nc d\nthe cat\nhello\n")
    common = ["none", "--progress", "false", "--steps", "2", "--distill.teacher", "tiny:llama",
              "--distill.objective", "iw_opd", "--distill.iw_opd_gamma", "1.0", "--rollout.max_new_tokens", "4",
              "--rollout.per_sample_seeds", "true", "--rollout.prompts_per_step", "4", "--rollout.group_size", "2",
              "--ppo.epochs", "1", "--ppo.mini_batch_size", "8", "--ppo.micro_batch_size", "2",
              "--eval_every", "2", "--data.eval_fraction", "0.25", "--data.prompts_file", str(tmp_path / "prompts.txt"),
              "--sample_every", "0"]
    assert main(["distill", *common, "--output_dir", str(tmp_path / "one")]) == 0
    r = torchrun(["-m", "rlhf_fast.cli"], "distill", *common, "--output_dir", str(tmp_path / "two"),
                 "--distributed.strategy", "ddp")
    assert r.returncode == 0, r.stderr[-3000:]

    def rows(run):
        return [json.loads(ln) for ln in open(tmp_path / run / "metrics.jsonl")]

    one, two = rows("one"), rows("two")
    assert len(one) == len(two) == 2 and "eval/loss" in one[-1]
    assert abs(one[-1]["loss"]) > 1e-3
    for a, b in zip(one, two):
        for k in ("loss", "entropy", "distill/divergence", "grad_norm", "eval/loss", "eval/entropy"):
            if k in a:
                # (the divergence is a difference of log-prob sums, near 0 here: an absolute floor)
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
        for k in IW_OPD_METRICS:
            assert math.isfinite(a[k]) and math.isfinite(b[k]), k


def test_cli_config_with_objective_iw_opd(tmp_path, capsys):
    import yaml

    cfg = tmp_path / "distill.yaml"
    cfg.write_text(yaml.safe_dump({"estimator": "distill", "steps": 2, "progress": False, "sample_every": 0,
                                   "output_dir": str(tmp_path / "run"),
                                   "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4},
                                   "ppo": {"epochs": 1, "mini_batch_size": 4, "micro_batch_size": 2},
                                   "distill": {"teacher": "tiny:llama"}}))
    assert main(["distill", str(cfg), "--distill.objective", "iw_opd", "--distill.iw_opd_gamma", "0.25"]) == 0
    run = tmp_path / "run"
    rows = [json.loads(ln) for ln in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for k in ("loss", "entropy", "distill/divergence", *IW_OPD_METRICS):
        assert math.isfinite(rows[-1][k]), k
    assert rows[-1]["iw_opd/min_weight"] >= 1.0 and rows[-1]["iw_opd/max_weight"] <= 1.25 + 1e-6
    saved = yaml.safe_load(open(run / "config.yaml"))["distill"]
    assert saved["objective"] == "iw_opd" and saved["iw_opd_gamma"] == 0.25
    capsys.readouterr()
    assert main(["distill", str(cfg), "--distill.objective", "iw_opd", "--distill.iw_opd_gamma", "-1",
                 "--output_dir", str(tmp_path / "x")]) == 2
    assert "distill.iw_opd_gamma" in capsys.readouterr().err


# ----------------------------------------------------------------------------- refused settings


@pytest.mark.parametrize("kw,match", [
    (dict(objective="kl"), r"distill.objective must be one of \('jsd', 'iw_opd'\)"),
    (dict(objective="iw_opd", iw_opd_gamma=-0.5), "distill.iw_opd_gamma must be a finite number >= 0"),
    (dict(objective="iw_opd", iw_opd_gamma="big"), "distill.iw_opd_gamma must be a finite number"),
    (dict(objective="iw_opd", iw_opd_gamma=True), "distill.iw_opd_gamma must be a finite number"),
    (dict(objective="iw_opd", iw_opd_gamma=float("nan")), "distill.iw_opd_gamma"),
    (dict(objective="iw_opd", iw_opd_epsilon=0.0), "distill.iw_opd_epsilon must be a finite number > 0"),
    (dict(objective="iw_opd", iw_opd_epsilon=-1e-8), "distill.iw_opd_epsilon"),
    (dict(iw_opd_gamma=1.0), "distill.iw_opd_gamma apply to distill.objective 'iw_opd' only"),
    (dict(iw_opd_epsilon=1e-6), "distill.iw_opd_epsilon apply to distill.objective 'iw_opd' only"),
    (dict(objective="iw_opd", lmbda=0.5), r"distill.lmbda \(0.5\) < 1: distill.objective 'iw_opd' is on-policy"),
    (dict(objective="iw_opd", lmbda=0.5, seq_kd=True), "distill.lmbda"),
    (dict(objective="iw_opd", beta=0.5), r"distill.beta \(0.5\) has no effect"),
])
def test_bad_distill_values_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kw)


@pytest.mark.parametrize("ppo", [PPOConfig(epochs=2, mini_batch_size=8, micro_batch_size=8),
                                 PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4)])
def test_stale_rollouts_are_refused(tmp_path, ppo):
    with pytest.raises(ValueError, match=r"distill.objective 'iw_opd' takes one optimizer step per rollout.*"
                                         r"ppo.epochs 1.*= 8"):
        make_config(tmp_path, ppo=ppo)


def test_jsd_default_is_unchanged(tmp_path):
    """The default objective is jsd and its rollout carries no sampler log-probs (nothing reads them)."""
    assert DistillConfig().objective == "jsd"
    tr = trainer(tmp_path, distill=DistillConfig(), ppo=PPOConfig(epochs=2, mini_batch_size=4, micro_batch_size=4))
    data, _ = tr.rollout()
    assert (data.behaviour_logp == 0).all()
    h = tr.step()
    assert not any(k.startswith("iw_opd/") for k in h)
