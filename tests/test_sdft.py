"""SDFTTrainer (TRL 1.16's experimental SDFT): a whole step's loss and gradients against TRL's
_compute_self_distillation_loss math on the models' own logits, the teacher prompt ids, the EMA
teacher's checkpoint and exact resume, rlhf-fast sdft, and refused settings."""

import json
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from rlhf_fast.cli import main  # noqa: E402
from rlhf_fast.trainers.rl_config import OptimConfig, PPOConfig, RLConfig, RolloutConfig, SDFTConfig
from rlhf_fast.trainers.sdft import SDFTTrainer
from tests.conftest import run_rows
from tests.test_rl_learning import make_policy

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

PROMPTS = [{"prompt": "q:", "privileged_context": "a a a"}, {"prompt": "x", "privileged_context": "b c"},
           {"prompt": "0", "privileged_context": "1 2 3"}, {"prompt": "a b", "privileged_context": "z"}]


def make_config(tmp_path, sdft=None, **kw):
    base = dict(estimator="sdft", steps=2, output_dir=str(tmp_path / "run"), progress=False, sample_every=0,
                rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=5, temperature=0.9),
                ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8), optim=OptimConfig(lr=1e-2),
                sdft=sdft or SDFTConfig(distillation_topk=7))
    base.update(kw)
    return RLConfig(**base)


def trainer(tmp_path, sdft=None, **kw):
    pol, tok = make_policy()
    return SDFTTrainer(make_config(tmp_path, sdft, **kw), pol, tok, prompts=PROMPTS)


def completion_logits(model, ids, am, P):
    """[B, R, V] logits at the positions predicting columns P.. (our position ids, as generation used)."""
    pos = (am.long().cumsum(1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=am.long(), position_ids=pos).logits[:, P - 1:-1]


def trl_step_loss(tr, d, P):
    """TRL sdft_trainer.py _compute_teacher_student_logits + _compute_self_distillation_loss on our rows."""
    from trl.experimental.sdft import loss_utils as lu
    from trl.trainer.utils import selective_log_softmax

    s, T = tr.config.sdft, tr.config.rollout.temperature
    Pt = d.teacher_input_ids.shape[1] - (d.input_ids.shape[1] - P)
    zs = completion_logits(tr.policy, d.input_ids, d.attention_mask, P) / T
    with torch.no_grad():
        zt = completion_logits(tr.teacher, d.teacher_input_ids, d.teacher_attention_mask, Pt) / T
    comp, mask = d.input_ids[:, P:], d.response_mask[:, P:].long()
    assert torch.equal(mask, d.teacher_response_mask[:, Pt:].long())
    if s.distillation_mode == "topk_logits":
        ptl = lu.compute_topk_self_distillation_loss(zs, zt, distillation_topk=s.distillation_topk,
                                                     distillation_alpha=s.distillation_alpha,
                                                     distillation_add_tail=s.distillation_add_tail)
    elif s.distillation_mode == "full_logits":
        ptl = lu.compute_full_logit_self_distillation_loss(zs, zt, distillation_alpha=s.distillation_alpha)
    else:
        ptl = lu.compute_sampled_token_self_distillation_loss(zs, zt, comp, distillation_alpha=s.distillation_alpha)
    if tr._keeps_old_logp and s.distillation_is_clip is not None:
        ptl = lu.apply_importance_sampling_clipping(ptl, selective_log_softmax(zs, comp), d.old_logp[:, P:],
                                                    s.distillation_is_clip)
    loss = ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return loss, float((ptl * mask).sum().detach() / mask.sum().clamp(min=1.0))


def grads(tr):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in tr.policy.parameters()]


@pytest.mark.parametrize("sdft,epochs", [
    (SDFTConfig(distillation_topk=7), 2),  # two optimizer steps per rollout: the IS weight applies
    (SDFTConfig(distillation_topk=5, distillation_alpha=1.0, distillation_add_tail=True, num_loss_tokens_to_skip=2), 1),
    (SDFTConfig(distillation_mode="full_logits", distillation_alpha=0.0, teacher_model_kind="ema"), 2),
    (SDFTConfig(distillation_mode="sampled_token", distillation_alpha=1.0, teacher_model_kind="live"), 1),
])
def test_step_loss_and_gradients_equal_trl(tmp_path, sdft, epochs):
    tr = trainer(tmp_path, sdft, ppo=PPOConfig(epochs=epochs, mini_batch_size=8, micro_batch_size=8))
    with torch.no_grad():  # the teacher away from the student, so the loss is not ~0
        for p in (tr.teacher.parameters() if sdft.teacher_model_kind != "live" else []):
            p.add_(torch.randn_like(p) * 0.3)
    data, m = tr.rollout()
    P = tr._rollout_rows[0]
    if tr._keeps_old_logp:  # a policy that has moved since the rollout: ratios past the clip
        g = torch.Generator().manual_seed(0)
        data.old_logp = data.old_logp - torch.rand(data.old_logp.shape, generator=g) * data.response_mask
    tr.policy.zero_grad(set_to_none=True)
    ref, tok_mean = trl_step_loss(tr, data, P)
    ref.backward()
    g_trl = grads(tr)
    tr.policy.zero_grad(set_to_none=True)
    st = tr.policy_backward(data, 3)  # micro-batches of 3 + 3 + 2 rows
    ref = ref.detach()
    assert st["loss"] == pytest.approx(float(ref), rel=1e-5, abs=1e-8)
    assert abs(float(ref)) > 1e-4
    assert st["distillation_loss"] == pytest.approx(tok_mean, rel=1e-5, abs=1e-8)
    for a, b in zip(grads(tr), g_trl):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    if sdft.num_loss_tokens_to_skip:
        assert not data.response_mask[:, P:P + 2].any()


def test_teacher_prompt_ids_equal_trl_tokenization(tmp_path):
    tr = trainer(tmp_path)
    for i, r in enumerate(PROMPTS):
        text = f"{r['prompt']}\n\n{r['privileged_context']}"  # TRL's default template; _tokenize_prompts
        assert tr._teacher_ids["train"][i] == tr.tokenizer(text=[text])["input_ids"][0]


def test_a_record_without_privileged_context_is_refused(tmp_path):
    pol, tok = make_policy()
    with pytest.raises(ValueError, match="training prompt 1 has no 'privileged_context'"):
        SDFTTrainer(make_config(tmp_path), pol, tok, prompts=[PROMPTS[0], {"prompt": "y"}])


def test_ema_teacher_resume_equals_uninterrupted(tmp_path):
    sdft = SDFTConfig(teacher_model_kind="ema", teacher_update_rate=0.5, teacher_sync_steps=3, distillation_topk=7)

    def fresh(name, **kw):
        pol, tok = make_policy()
        cfg = make_config(tmp_path / name, sdft, steps=4, save_every=2,
                          ppo=PPOConfig(epochs=2, mini_batch_size=4, micro_batch_size=2), **kw)
        return SDFTTrainer(cfg, pol, tok, prompts=PROMPTS)

    a = fresh("a")
    a.train()
    assert a.self_teacher.optimizer_steps == 16
    b = fresh("b")
    b.train(steps=2)
    assert b.self_teacher.optimizer_steps == 8
    c = fresh("b", resume=b.config.output_dir)
    c.train()  # (loads the checkpoint of step 2: the EMA weights and the count, 8)
    assert c.self_teacher.optimizer_steps == 16

    rows = run_rows  # metrics.jsonl without the wall-clock timings

    assert rows(a.config.output_dir) == rows(c.config.output_dir)
    for p, q, t in zip(a.teacher.parameters(), c.teacher.parameters(), a.policy.parameters()):
        assert torch.equal(p, q)
    assert not all(torch.equal(p, q) for p, q in zip(a.teacher.parameters(), a.policy.parameters()))


def test_cli_sdft_runs_with_an_ema_teacher(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    run = str(tmp_path / "run")
    args = ["sdft", "none", "--output_dir", run, "--progress", "false", "--steps", "2", "--sdft.teacher_model_kind",
            "ema", "--sdft.distillation_topk", "8", "--rollout.max_new_tokens", "4", "--ppo.epochs", "1",
            "--data.prompts_file", str(tmp_path / "p.jsonl"), "--eval_every", "2", "--data.eval_fraction", "0.25"]
    assert main(args) == 0
    assert "rlhf-fast sdft:" in capsys.readouterr().out
    rows = [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    for k in ("loss", "sdft/distillation_loss", "self_distillation/distillation_loss", "entropy",
              "completions/mean_length", "sdft/teacher_syncs", "eval/loss", "eval/sdft/distillation_loss"):
        assert k in rows[-1], k
    assert main(["report", run]) == 0
    assert "- **Kind**: sdft\n" in open(os.path.join(run, "report.md")).read()


@pytest.mark.parametrize("kw,match", [
    (dict(distillation_alpha=1.5), "sdft.distillation_alpha"),
    (dict(distillation_mode="sampled_token"), "sdft.distillation_alpha must be 1.0"),
    (dict(distillation_mode="nope"), "sdft.distillation_mode"),
    (dict(teacher_model_kind="frozen"), "sdft.teacher_model_kind"),
    (dict(teacher_model_kind="ema", teacher_update_rate=0.0), "sdft.teacher_update_rate"),
    (dict(teacher_sync_steps=2), "sdft.teacher_sync_steps apply to sdft.teacher_model_kind 'ema'"),
    (dict(distillation_topk=0), "sdft.distillation_topk"),
    (dict(distillation_topk=None), "sdft.distillation_topk"),
    (dict(distillation_is_clip=-1.0), "sdft.distillation_is_clip"),
    (dict(num_loss_tokens_to_skip=-1), "sdft.num_loss_tokens_to_skip"),
    (dict(teacher_prompt_template="{prompt} only"), "sdft.teacher_prompt_template"),
    (dict(teacher_prompt_template="{prompt}{privileged_context}{other}"), "sdft.teacher_prompt_template"),
    (dict(chunk_size=0), "sdft.chunk_size"),
])
def test_bad_values_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        SDFTConfig(**kw)


def test_keys_of_other_objectives_are_refused(tmp_path):
    from rlhf_fast.trainers.rl_config import KLConfig

    with pytest.raises(ValueError, match="ppo.clip_low"):
        make_config(tmp_path, ppo=PPOConfig(clip_low=0.1, mini_batch_size=8, micro_batch_size=8))
    with pytest.raises(ValueError, match="kl.coef"):
        make_config(tmp_path, kl=KLConfig(coef=0.1))
    make_config(tmp_path, kl=KLConfig(coef=0.0))  # no KL: accepted
    with pytest.raises(ValueError, match="sdft.teacher_model_kind apply to estimator 'sdft'"):
        RLConfig(sdft=SDFTConfig(teacher_model_kind="live"))
    with pytest.raises(ValueError, match="sdft.distillation_topk .* is more than the vocabulary"):
        trainer(tmp_path, SDFTConfig(distillation_topk=10_000))
