"""On-policy distillation (rlhf_fast.trainers.distill, TRL 1.16's DistillationTrainer): the loss
against TRL's own ``_chunked_divergence_loss`` on the same hidden states, heads and masks (tool
results out), micro-batch invariance, learning (the divergence to the teacher on held-out prompts
falls), exact resume, ``rlhf-fast distill`` and the refused settings."""

import dataclasses
import json
import math
import os

import pytest
import torch

from rlhf_fast.cli import main
from rlhf_fast.models.tiny import tiny_causal_lm
from rlhf_fast.trainers.distill import DistillationTrainer
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import (DataConfig, DistillConfig, EvalConfig, KLConfig, ModelConfig, OptimConfig,
                                          PPOConfig, RLConfig, RolloutConfig)
from tests.conftest import run_rows
from tests.test_rl_learning import PROMPTS, frac_a, make_policy

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

EVAL_PROMPTS = ["b", "1 2", "x y", "q: a", "d e", "7", "w v", "3"]


def make_teacher(tok, hidden=48, seed=7, vocab=None, scale=20.0):
    """A tiny llama wider than the student (48 vs 32), its head scaled so that its next-token
    distributions are peaked (a random head is nearly uniform, as is the student's)."""
    t = tiny_causal_lm(vocab or len(tok), hidden_size=hidden, num_layers=2, num_heads=2, seed=seed,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        t.lm_head.weight.mul_(scale)
    return t


def make_config(tmp_path, beta=1.0, lr=5e-3, **kw):
    base = dict(estimator="distill", steps=2, output_dir=str(tmp_path / "run"), progress=False, sample_every=1,
                rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=6, temperature=0.9),
                ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8),
                optim=OptimConfig(lr=lr), distill=DistillConfig(beta=beta))
    base.update(kw)
    return RLConfig(**base)


def trainer(tmp_path, beta=1.0, lr=5e-3, teacher=None, **kw):
    pol, tok = make_policy()
    return DistillationTrainer(make_config(tmp_path, beta, lr, **kw), pol, tok, prompts=PROMPTS,
                               teacher_model=teacher if teacher is not None else make_teacher(tok))


# ----------------------------------------------------------------------------- TRL parity


def trl_loss(tr, data, loss_mask_tail=None, num_items=None):
    """TRL's loss and entropy sum of the student on ``data``: hidden states from the models' own
    transformers forward (TRL's ``_get_last_hidden_state``: the states at columns P − 1 … L − 2
    predict the completion tokens at P … L − 1) — with our position ids, as generation used
    them —, and TRL's ``_chunked_divergence_loss`` on them with the completion mask
    ``attention_mask[:, P:]`` (times ``loss_mask_tail``, TRL's tool_mask, when given)."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    ids, am = data.input_ids, data.attention_mask
    P = int(data.response_mask.float().argmax(1).min())  # every row here answers something
    pos = (am.long().cumsum(1) - 1).clamp(min=0)

    def last_hidden(model):
        h = model.model(input_ids=ids, attention_mask=am.long(), position_ids=pos).last_hidden_state
        return h[:, P - 1:-1]

    hs = last_hidden(tr.policy)
    with torch.no_grad():
        ht = last_hidden(tr.teacher)
    mask = am[:, P:].long()
    if loss_mask_tail is not None:
        mask = mask * loss_mask_tail.long()
    loss, ent, n = _chunked_divergence_loss(hs, ht, tr.policy.lm_head.weight, tr.teacher.lm_head.weight, mask,
                                            tr.config.distill.beta, num_items_in_batch=num_items,
                                            temperature=tr.config.rollout.temperature)
    return loss, float(ent), int(n)


def student_grads(tr):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in tr.policy.parameters()]


def divergence_backends():
    """The backends of fused_linear_divergence that run CPU tensors here."""
    from rlhf_fast.ops import _dispatch, use_backend

    out = []
    for b in ("torch", "cpp"):
        try:
            with use_backend(b):
                _dispatch.select("fused_linear_divergence", torch.device("cpu"))
            out.append(b)
        except (RuntimeError, ValueError, KeyError):
            pass
    return out


@pytest.mark.parametrize("backend", divergence_backends())
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_loss_and_gradients_equal_trl(tmp_path, beta, backend):
    from rlhf_fast.ops import use_backend

    with use_backend(backend):
        _loss_and_gradients_equal_trl(tmp_path, beta)


def _loss_and_gradients_equal_trl(tmp_path, beta):
    tr = trainer(tmp_path, beta=beta)
    data, m = tr.rollout()
    assert data.input_ids.shape[0] == 8 and m["completions/mean_length"] > 0
    n = int(data.response_mask.sum())
    tr.policy.zero_grad(set_to_none=True)
    ref, ent, n_trl = trl_loss(tr, data, num_items=torch.tensor(float(n)))
    ref.backward()
    ref = ref.detach()
    g_trl = student_grads(tr)
    assert n_trl == n  # the same tokens count
    tr.policy.zero_grad(set_to_none=True)
    st = tr.policy_backward(data, 3)  # three micro-batches (3 + 3 + 2 rows), one mini-batch
    assert st["loss"] == pytest.approx(float(ref), rel=1e-5)
    assert st["loss"] > 0.05  # the sharpened teacher is far from the student: a real comparison
    assert st["entropy"] == pytest.approx(ent / n, rel=1e-5)
    assert st["divergence"] == pytest.approx(float(ref), rel=1e-5)
    for a, b in zip(student_grads(tr), g_trl):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None and not p.requires_grad for p in tr.teacher.parameters())  # a constant


def test_micro_batching_and_ranks_of_rows_give_the_same_gradient(tmp_path):
    tr = trainer(tmp_path, beta=0.5)
    data, _ = tr.rollout()
    out = []
    for mb in (8, 1, 5):
        tr.policy.zero_grad(set_to_none=True)
        st = tr.policy_backward(data, mb)
        out.append((st, student_grads(tr)))
    for st, g in out[1:]:
        assert st["loss"] == pytest.approx(out[0][0]["loss"], rel=1e-5)
        assert st["entropy"] == pytest.approx(out[0][0]["entropy"], rel=1e-5)
        for a, b in zip(g, out[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_tool_results_are_out_of_the_loss(tmp_path):
    """A rollout whose answers call a calculator: the loss equals TRL's with its tool_mask (0 on
    the appended tool results), which differs from the loss over every completion token."""
    from tests.test_rl_tools import CHATS, FirstCallScripted, _holes, calculator, make_policy as tool_policy
    from tests.test_rl_tools import tool_tokenizer

    tok = tool_tokenizer()
    cfg = make_config(tmp_path, beta=1.0, rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=80),
                      ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4))
    tr = DistillationTrainer(cfg, tool_policy(tok), tok, prompts=CHATS, tools=[calculator],
                             teacher_model=make_teacher(tok))
    tr.engine = FirstCallScripted(tr.engine, tok)
    data, m = tr.rollout()
    holes = _holes(data)
    assert holes.any() and m["tools/call_count"] == 4
    P = int(data.response_mask.float().argmax(1).min())
    n = int(data.response_mask.sum())
    ref, _, n_trl = trl_loss(tr, data, loss_mask_tail=~holes[:, P:], num_items=torch.tensor(float(n)))
    ref = ref.detach()
    assert n_trl == n
    st = tr.policy_backward(data, 2)
    assert st["loss"] == pytest.approx(float(ref), rel=1e-5)
    everything = trl_loss(tr, data, num_items=torch.tensor(float(n)))[0].detach()
    assert abs(float(everything) - float(ref)) > 1e-3 * float(ref)  # the tool tokens would have counted
    # TRL's completion lengths count the tool results; response_length the student's own tokens
    assert m["completions/mean_length"] > m["response_length/mean"]


# ----------------------------------------------------------------------------- learning


TRAIN_PROMPTS = PROMPTS + ["c", "5 6", "y z", "q: b"]


def eval_divergence(tmp_path, lr, beta=1.0, steps=20):
    """The per-token divergence to the teacher on the held-out EVAL_PROMPTS (4 answers each at
    the rollout's temperature: 8 × 4 × 6 tokens) before and after ``steps`` steps."""
    pol, tok = make_policy()
    cfg = make_config(tmp_path, beta, lr, steps=steps, eval_every=steps, data=DataConfig(eval_prompts=EVAL_PROMPTS),
                      eval=EvalConfig(group_size=4, temperature=0.9),
                      rollout=RolloutConfig(prompts_per_step=8, group_size=2, max_new_tokens=6, temperature=0.9),
                      ppo=PPOConfig(epochs=1, mini_batch_size=16, micro_batch_size=16))
    tr = DistillationTrainer(cfg, pol, tok, prompts=TRAIN_PROMPTS, teacher_model=make_teacher(tok))
    before = tr.evaluate()["eval/distill/divergence"]
    hist = tr.train()
    assert len(hist) == steps
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["entropy"]) for h in hist)
    return before, hist[-1]["eval/distill/divergence"], hist


@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_the_student_moves_towards_the_teacher(tmp_path, beta):
    """Held-out divergence after 20 steps / before, measured over seeds 0–3: 0.48–0.62 (both
    betas); with lr ≈ 0 (the config refuses 0) 0.96–1.02, the evaluation's sampling noise (its
    answers are seeded by step)."""
    before, after, hist = eval_divergence(tmp_path / "a", 1e-2, beta)
    assert after < 0.75 * before, (before, after)
    assert sum(h["loss"] for h in hist[-5:]) < 0.8 * sum(h["loss"] for h in hist[:5])
    before0, after0, hist0 = eval_divergence(tmp_path / "b", 1e-12, beta)
    assert before0 == pytest.approx(before)  # the same student, teacher and answers at step 0
    assert after0 > 0.9 * before0, (before0, after0)
    assert abs(hist0[-1]["loss"] - hist0[0]["loss"]) < 0.2 * hist0[0]["loss"]


# ----------------------------------------------------------------------------- run folder


def test_resume_equals_uninterrupted_and_keeps_no_teacher(tmp_path):
    def fresh(name, **kw):
        pol, tok = make_policy()
        cfg = make_config(tmp_path / name, steps=4, save_every=2, ppo=PPOConfig(epochs=2, mini_batch_size=4,
                                                                                 micro_batch_size=2), **kw)
        return DistillationTrainer(cfg, pol, tok, prompts=PROMPTS, teacher_model=make_teacher(tok),
                                   reward_fns=[frac_a])

    a = fresh("a")
    a.train()
    b = fresh("b")
    b.train(steps=2)
    ck = os.path.join(b.config.output_dir, "checkpoints")
    assert not any("teacher" in p for _, dirs, files in os.walk(ck) for p in dirs + files)
    c = fresh("b", resume=b.config.output_dir)
    c.train()
    rows = run_rows  # metrics.jsonl without the wall-clock timings

    ra, rc = rows(a.config.output_dir), rows(c.config.output_dir)
    assert [r["step"] for r in rc] == [1, 2, 3, 4]
    assert ra == rc
    assert "reward/frac_a" in ra[-1] and "loss" in ra[-1]  # rewards are logged, not trained on
    for p, q in zip(a.policy.parameters(), c.policy.parameters()):
        assert torch.equal(p, q)
    assert os.path.isfile(os.path.join(a.config.output_dir, "final", "policy", "config.json"))


def test_cli_distill_writes_a_run(tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["distill", "none", "--output_dir", run, "--progress", "false", "--steps", "2", "--sample_every", "1",
            "--distill.teacher", "tiny:llama", "--distill.beta", "0.5", "--rollout.max_new_tokens", "4",
            "--ppo.epochs", "1"]
    assert main(args) == 0
    assert "rlhf-fast distill:" in capsys.readouterr().out
    rows = [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    for k in ("loss", "entropy", "distill/divergence", "completions/mean_length", "step_time"):
        assert k in rows[-1]
    import yaml

    saved = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    assert saved["distill"]["teacher"] == "tiny:llama" and saved["distill"]["beta"] == 0.5
    assert os.path.isfile(os.path.join(run, "samples.jsonl"))
    # the run resumes with the same command; a config without a teacher is one line, exit 2
    assert main(["distill", "--resume", run, "--steps", "3"]) == 0
    assert [json.loads(ln)["step"] for ln in open(os.path.join(run, "metrics.jsonl"))] == [1, 2, 3]
    # rlhf-fast report reads a distillation run: its kind, the teacher, the loss and divergence rows
    assert main(["report", run]) == 0
    capsys.readouterr()
    page = open(os.path.join(run, "report.md")).read()
    assert "- **Kind**: distill\n" in page and "| `distill.teacher` | tiny:llama |" in page
    assert "| `loss` |" in page and "| `distill/divergence` |" in page
    assert main(["distill", "none", "--output_dir", str(tmp_path / "x")]) == 2
    assert "distill.teacher" in capsys.readouterr().err
    # an RL command does not silently drop the teacher of a distillation config
    assert main(["grpo", os.path.join(run, "config.yaml"), "--output_dir", str(tmp_path / "y")]) == 2
    assert "distill.teacher, distill.beta apply to estimator 'distill'" in capsys.readouterr().err


def fsdp2_matches_one_process(tmp_path, prompts: str, extra=()):
    """Runs ``rlhf-fast distill`` (2 steps, a tiny teacher, ``extra`` arguments) as one process and
    under ``torchrun`` with 2 gloo ranks and FSDP2, and asserts both log the same numbers."""
    from tests.torchrun_launch import torchrun

    (tmp_path / "prompts.txt").write_text(prompts)
    common = ["none", "--progress", "false", "--steps", "2", "--distill.teacher", "tiny:llama", "--distill.beta", "0.5",
              "--rollout.max_new_tokens", "4", "--rollout.per_sample_seeds", "true", "--ppo.epochs", "1",
              "--ppo.micro_batch_size", "2", "--eval_every", "2", "--data.eval_fraction", "0.25",
              "--data.prompts_file", str(tmp_path / "prompts.txt"), "--sample_every", "0", *extra]
    assert main(["distill", *common, "--output_dir", str(tmp_path / "one")]) == 0
    r = torchrun(["-m", "rlhf_fast.cli"], "distill", *common, "--output_dir", str(tmp_path / "two"),
                 "--distributed.strategy", "fsdp2")
    assert r.returncode == 0, r.stderr[-3000:]

    def rows(run):
        keys = ("loss", "entropy", "distill/divergence", "grad_norm", "completions/mean_length",
                "completions/max_length", "eval/loss", "eval/entropy")
        return [{k: v for k, v in json.loads(ln).items() if k in keys}
                for ln in open(tmp_path / run / "metrics.jsonl")]

    one, two = rows("one"), rows("two")
    assert len(one) == len(two) == 2 and "eval/loss" in one[-1]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-8), k


def test_two_fsdp2_ranks_match_one_process(tmp_path):
    """``torchrun`` with 2 gloo ranks and FSDP2 (student and teacher sharded; a rank whose share
    of a mini-batch runs out feeds blank micro-batches) logs the numbers of one process: the
    normaliser and the completion statistics are global. (DDP measured equal too.)"""
    fsdp2_matches_one_process(tmp_path, "count:\nlist:\ngo:\nwrite:\na b\nc d\nthe cat\nhello\n")


# ----------------------------------------------------------------------------- refused settings


@pytest.mark.parametrize("bad,match", [
    (dict(kl=KLConfig(coef=0.1)), "kl.coef.*no reference model"),
    (dict(kl=KLConfig(coef=0.0, controller="adaptive")), "kl.controller"),
    (dict(kl=KLConfig(ref_sync_steps=4)), "kl.ref_sync_steps"),
    (dict(model=ModelConfig(reference="some/folder")), "model.reference"),
    (dict(estimator="gae", distill=DistillConfig(beta=0.5)), "distill.beta apply to estimator 'distill'"),
    (dict(ppo=PPOConfig(clip_low=0.1, mini_batch_size=8, micro_batch_size=8)), "ppo.clip_low"),
    (dict(scale_rewards="batch"), "scale_rewards 'batch' applies to estimator 'grpo'"),
    (dict(model=ModelConfig(critic="some/folder")), "model.critic"),
])
def test_rl_objective_keys_are_refused(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, **bad)


def test_kl_coef_zero_and_group_size_one_are_accepted(tmp_path):
    cfg = make_config(tmp_path, kl=KLConfig(coef=0.0),
                      rollout=RolloutConfig(prompts_per_step=8, group_size=1, max_new_tokens=4))
    assert cfg.distill.beta == 1.0 and cfg.batch_size == 8


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan"), True, "1"])
def test_beta_outside_zero_one_is_refused(beta):
    with pytest.raises(ValueError, match="distill.beta must be a number in \\[0, 1\\]"):
        DistillConfig(beta=beta)


def test_teacher_and_vocabulary_errors(tmp_path):
    pol, tok = make_policy()
    with pytest.raises(ValueError, match="distill.teacher: no teacher"):
        DistillationTrainer(make_config(tmp_path), pol, tok, prompts=PROMPTS)
    with pytest.raises(ValueError, match="distill.teacher .*expected a local model folder"):
        DistillationTrainer(make_config(tmp_path, distill=DistillConfig(teacher=str(tmp_path / "nope"))), pol, tok,
                            prompts=PROMPTS)
    with pytest.raises(ValueError, match="both set"):
        DistillationTrainer(make_config(tmp_path, distill=DistillConfig(teacher="tiny:llama")), pol, tok,
                            prompts=PROMPTS, teacher_model=make_teacher(tok))
    with pytest.raises(ValueError, match="teacher's vocabulary \\(40 LM-head rows\\) differs from the student's"):
        DistillationTrainer(make_config(tmp_path), pol, tok, prompts=PROMPTS, teacher_model=make_teacher(tok, vocab=40))
    with pytest.raises(ValueError, match="reference=...: distillation has no reference"):
        DistillationTrainer(make_config(tmp_path), pol, tok, prompts=PROMPTS, teacher_model=make_teacher(tok),
                            reference=make_teacher(tok))
    with pytest.raises(ValueError, match="estimator 'distill': distillation trains with .*DistillationTrainer"):
        RLTrainer(make_config(tmp_path), pol, tok, prompts=PROMPTS, reward_fns=[frac_a])


def test_a_teacher_folder_loads_and_its_tokenizer_must_match(tmp_path):
    from rlhf_fast.models.tiny import train_tokenizer

    pol, tok = make_policy()
    teacher = make_teacher(tok)
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    cfg = make_config(tmp_path, distill=DistillConfig(teacher=str(tmp_path / "teacher"), beta=0.5))
    tr = DistillationTrainer(cfg, pol, tok, prompts=PROMPTS)
    for p, q in zip(tr.teacher.parameters(), teacher.parameters()):
        assert torch.equal(p, q) and not p.requires_grad
    other = train_tokenizer(["z y x w v u"] * 4 + ["0 1 2 3"], len(tok))
    other.save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match="distill.teacher .*its tokenizer differs from the student's"):
        DistillationTrainer(cfg, pol, tok, prompts=PROMPTS)


def test_a_padded_teacher_head_is_compared_over_the_tokenizer(tmp_path):
    """A teacher whose head has 8 padding rows past the tokenizer (as real checkpoints pad to
    a multiple): the divergence is that of the tokenizer's rows, as with the head cut there."""
    pol, tok = make_policy()
    padded = make_teacher(tok, vocab=len(tok) + 8)
    cut = make_teacher(tok)
    with torch.no_grad():
        cut.load_state_dict({k: v[:len(tok)] if v.shape[:1] == (len(tok) + 8,) else v
                             for k, v in padded.state_dict().items()})
    a = DistillationTrainer(make_config(tmp_path / "a"), pol, tok, prompts=PROMPTS, teacher_model=padded)
    data, _ = a.rollout()
    b = DistillationTrainer(make_config(tmp_path / "b"), *make_policy(), prompts=PROMPTS, teacher_model=cut)
    assert a._vocab_rows == len(tok) and b._vocab_rows is None
    la, _ = a.distill_loss(data.input_ids, data.attention_mask, data.response_mask)
    lb, _ = b.distill_loss(data.input_ids, data.attention_mask, data.response_mask)
    assert float(la.detach()) == pytest.approx(float(lb.detach()), rel=1e-6)


def test_rewards_when_given_do_not_change_training(tmp_path):
    """Reward sources are scored and logged only: the weights after a step equal those of the
    same run without them."""
    runs = []
    for name, fns in (("a", [frac_a]), ("b", [])):
        pol, tok = make_policy()
        tr = DistillationTrainer(make_config(tmp_path / name, steps=1), pol, tok, prompts=PROMPTS,
                                 teacher_model=make_teacher(tok), reward_fns=fns)
        runs.append((tr, tr.train()[-1]))
    (a, ma), (b, mb) = runs
    assert "reward/frac_a" in ma and "reward/total" in ma and not any(k.startswith("reward/") for k in mb)
    for p, q in zip(a.policy.parameters(), b.policy.parameters()):
        assert torch.equal(p, q)
    assert dataclasses.asdict(a.config.distill) == dataclasses.asdict(b.config.distill)
