"""SDPO (rlhf_fast.trainers.sdpo, TRL 1.16's experimental SDPOTrainer): the teacher contexts
against TRL's own ``SuccessfulRolloutTeacherContextBuilder.build`` (text and chat prompts, 0 / 1 /
several successes, self-success, feedback, thinking removal, max_reprompt_len), one step's loss and
gradient against TRL's own ``compute_loss`` on the same tensors (distillation_weight 0, 0.5, 1; the
three modes), weight 0 = our GRPO step, the EMA teacher's sync and exact resume, ``rlhf-fast sdpo``
and the refused settings."""

import json
import os
import types
import warnings
from collections import defaultdict
from dataclasses import asdict

import pytest
import torch

from rlhf_fast.cli import main
from rlhf_fast.trainers.rl import RLTrainer
from rlhf_fast.trainers.rl_config import KLConfig, OptimConfig, PPOConfig, RLConfig, RolloutConfig, SDPOConfig
from rlhf_fast.trainers.sdpo import SDPOTrainer, teacher_contexts
from tests.test_rl_learning import PROMPTS, make_policy

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def starts_digit(prompts, completions):
    """1 when the answer starts with a digit (about a quarter of the tiny model's answers)."""
    return [1.0 if c.lstrip()[:1].isdigit() else 0.0 for c in completions]


def make_config(tmp_path, sdpo=None, steps=2, lr=1e-2, mb=16, **kw):
    base = dict(estimator="sdpo", steps=steps, output_dir=str(tmp_path / "run"), progress=False, sample_every=1,
                rollout=RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=6),
                ppo=PPOConfig(epochs=1, mini_batch_size=16, micro_batch_size=mb), optim=OptimConfig(lr=lr),
                kl=KLConfig(coef=0.0), sdpo=sdpo or SDPOConfig(success_reward_threshold=1.0))
    base.update(kw)
    return RLConfig(**base)


def trainer(tmp_path, chat=False, **kw):
    pol, tok = make_policy()
    if chat:
        from rlhf_fast.models.tiny import CHAT_TEMPLATE

        tok.chat_template = CHAT_TEMPLATE
    return SDPOTrainer(make_config(tmp_path, **kw), pol, tok, prompts=PROMPTS, reward_fns=[starts_digit])


# ----------------------------------------------------------------------------- teacher contexts vs TRL


def trl_stand_in(tr, G):
    """An object with what TRL's builder and compute_loss read off their trainer, over our trainer's
    tokenizer, config and models."""
    from trl.experimental.sdpo.sdpo_trainer import SDPOTrainer as TRLSDPO

    acc = types.SimpleNamespace(device=torch.device("cpu"), process_index=0, gather=lambda t: t,
                                pad_across_processes=lambda t, dim, pad_index: t)
    args = types.SimpleNamespace(**asdict(tr.sd))
    st = types.SimpleNamespace(accelerator=acc, model=types.SimpleNamespace(training=True), num_generations=G,
                               num_generations_eval=G, _tokenizer=tr.tokenizer, processing_class=tr.tokenizer,
                               args=args, chat_template_kwargs={}, _metrics={"train": defaultdict(list)},
                               use_teacher_server=False, current_gradient_accumulation_steps=1, temperature=1.0,
                               importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.2,
                               loss_type="dapo", max_completion_length=6, model_kwarg_keys=(), _name="SDPO")
    for name in ("_tokenize_prompts_untruncated", "_compute_policy_loss", "_compute_self_distillation_loss",
                 "_compute_teacher_student_logits", "_forward_logits", "_log_self_distillation_metric",
                 "compute_loss"):
        setattr(st, name, types.MethodType(getattr(TRLSDPO, name), st))
    st._get_teacher_context_for_self_distillation = lambda: __import__("contextlib").nullcontext()
    return st


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q: a"}]
ANSWERS = ["0 1 2", "a b", "<think>x y</think> 3 4", "q:", "5", "b c", "d", "e f"]


@pytest.mark.parametrize("case", [
    dict(rewards=[1, 0, 0, 1, 0, 0, 0, 0]),                                     # 2 successes / none
    dict(rewards=[1, 0, 0, 0, 1, 1, 1, 1], dont_reprompt_on_self_success=False),  # self counts
    dict(rewards=[0, 1, 0.5, 1, 1, 0, 1, 0], success_reward_threshold=0.5, remove_thinking_from_demonstration=True),
    dict(rewards=[0, 0, 1, 0, 0, 0, 0, 0], feedback=True, include_environment_feedback=True),
    dict(rewards=[0, 0, 1, 0, 0, 0, 0, 0], feedback=True, include_environment_feedback=True,
         environment_feedback_only_without_solution=True, max_reprompt_len=7),
    dict(rewards=[1, 1, 1, 1, 0, 0, 0, 0], feedback=True, use_successful_as_teacher=False,
         include_environment_feedback=True),  # feedback only (neither source is refused by the config)
    dict(rewards=[1, 0, 0, 0, 0, 1, 0, 0], chat=True),
    dict(rewards=[1, 0, 0, 0, 0, 1, 0, 0], chat=True, feedback=True, include_environment_feedback=True,
         max_reprompt_len=12),
])
def test_teacher_inputs_equal_trls_builder(tmp_path, case):
    from trl.experimental.sdpo.sdpo_trainer import SuccessfulRolloutTeacherContextBuilder

    case = dict(case)
    rewards, chat, feedback = case.pop("rewards"), case.pop("chat", False), case.pop("feedback", False)
    tr = trainer(tmp_path, chat=chat, sdpo=SDPOConfig(**case), rollout=RolloutConfig(prompts_per_step=2, group_size=4,
                                                                                   max_new_tokens=6), steps=1,
                 ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8))
    G = 4
    prompts = [CHAT if chat else "q: a"] * 4 + [[CHAT[1]] if chat else "x y"] * 4
    feedbacks = ["too long", " ", None, "wrong", "try 3", None, "", "no"] if feedback else [None] * 8
    tok = tr.tokenizer
    rows = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in ANSWERS]
    C = max(map(len, rows))
    ids = torch.full((8, C), tok.pad_token_id)
    am = torch.zeros(8, C, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], am[i, :len(r)] = torch.tensor(r), 1
    r = torch.tensor(rewards, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_ids, t_am, mask, metrics = tr.teacher_inputs(prompts, ids, am, r.tolist(), feedbacks)
    builder = SuccessfulRolloutTeacherContextBuilder(trl_stand_in(tr, G))
    ref = builder.build({"completion_ids": ids, "completion_mask": am}, prompts, r, feedbacks=feedbacks)
    assert torch.equal(t_ids, ref["teacher_input_ids"])
    assert torch.equal(t_am.long(), ref["teacher_attention_mask"].long())
    assert torch.equal(mask, ref["self_distillation_mask"].float())
    assert metrics == pytest.approx(builder.last_metrics)


def test_teacher_contexts_by_hand():
    sd = SDPOConfig(success_reward_threshold=1.0)
    ctx = teacher_contexts(["p"] * 4, ["A", "B", "C", "D"], [0.0, 1.0, 1.0, 0.0], [None] * 4, 4, sd)
    # the first other success; B's own success skipped, so C is its demonstration
    sol = lambda s: sd.reprompt_template.format(prompt="p", solution=sd.solution_template.format(  # noqa: E731
        successful_previous_attempt=s), feedback="")
    assert ctx.prompts == [sol("B"), sol("C"), sol("B"), sol("B")]
    assert ctx.mask == [True] * 4
    ctx = teacher_contexts(["p"] * 2, ["A", "B"], [1.0, 0.0], [None] * 2, 2, sd)
    assert ctx.prompts == ["p", sol("A")] and ctx.mask == [False, True]  # a lone success keeps no teacher
    assert ctx.metrics["self_distillation/success_group_fraction"] == 1.0
    assert ctx.metrics["self_distillation/reprompt_sample_fraction"] == 0.5


# ----------------------------------------------------------------------------- the step vs TRL's compute_loss


class _Pos(torch.nn.Module):
    """The model as TRL's ``_forward_logits`` calls it, with the position ids of the attention
    mask (ours, and generation's, on left-padded prompts)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, **kw):
        pos = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        return self.model(input_ids, attention_mask=attention_mask, position_ids=pos)


def grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("weight,mode,kind", [(0.0, "sampled_token", "ema"), (0.5, "sampled_token", "ema"),
                                              (1.0, "sampled_token", "live"), (0.5, "full_logits", "base"),
                                              (1.0, "topk_logits", "ema")])
def test_step_loss_and_gradient_equal_trls_compute_loss(tmp_path, weight, mode, kind):
    extra = {"full_logits": dict(distillation_alpha=0.5), "topk_logits": dict(distillation_topk=5,
                                                                                distillation_add_tail=True)}
    sd = SDPOConfig(distillation_weight=weight, distillation_mode=mode, teacher_model_kind=kind,
                    **extra.get(mode, {}))
    tr = trainer(tmp_path, sdpo=sd)
    if tr.self_teacher is not None and tr.self_teacher.model is not None:  # a teacher unlike the policy
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for p in tr.self_teacher.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data, m = tr.rollout()
    assert 0 < m["self_distillation/reprompt_sample_fraction"] < 1  # rows with and without a teacher
    tr.optimizer.zero_grad(set_to_none=True)
    st = tr.policy_backward(data)
    ours = grads(tr.policy)

    L = data.input_ids.shape[1]
    C = int(data.answer_width[0]) if weight else L - tr._last_engine[1].prompt_length
    P = L - C
    rm = data.response_mask[:, P:]
    adv = (data.advantages[:, P:] * rm).sum(1) / rm.sum(1).clamp(min=1)
    inputs = {"prompt_ids": data.input_ids[:, :P], "prompt_mask": data.attention_mask[:, :P].long(),
              "completion_ids": data.input_ids[:, P:], "completion_mask": rm.long(), "advantages": adv,
              "old_per_token_logps": data.old_logp[:, P:]}
    if weight:
        inputs.update(teacher_input_ids=data.teacher_input_ids, teacher_attention_mask=data.teacher_attention_mask.long(),
                      self_distillation_mask=data.sd_mask)
    stand = trl_stand_in(tr, 4)
    student = _Pos(tr.policy)
    stand.teacher_model = student if kind == "live" or not weight else _Pos(tr.self_teacher.model)
    tr.optimizer.zero_grad(set_to_none=True)
    loss = stand.compute_loss(student, inputs)
    loss.backward()
    assert st["loss"] == pytest.approx(float(loss), rel=1e-5, abs=1e-6)
    for a, b in zip(ours, grads(tr.policy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in ours)


def test_weight_zero_is_our_grpo_step(tmp_path):
    pol, tok = make_policy()
    cfg = make_config(tmp_path, sdpo=SDPOConfig(distillation_weight=0.0), steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = SDPOTrainer(cfg, pol, tok, prompts=PROMPTS, reward_fns=[starts_digit])
        ha = a.train()
        pol2, tok2 = make_policy()
        cfg2 = make_config(tmp_path, sdpo=SDPOConfig(), estimator="grpo", output_dir=str(tmp_path / "grpo"))
        b = RLTrainer(cfg2, pol2, tok2, prompts=PROMPTS, reward_fns=[starts_digit])
        hb = b.train()
    assert a.teacher is None
    for x, y in zip(a.policy.parameters(), b.policy.parameters()):
        assert torch.equal(x, y)
    assert ha[-1]["policy/loss"] == hb[-1]["policy/loss"]


# ----------------------------------------------------------------------------- EMA teacher


def test_ema_teacher_syncs_and_resumes_exactly(tmp_path):
    sd = SDPOConfig(teacher_update_rate=0.25, teacher_sync_steps=2, distillation_weight=0.5)
    kw = dict(sdpo=sd, steps=4, save_every=2, mb=8, ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = trainer(tmp_path / "a", **kw)
        init = [p.detach().clone() for p in tr.self_teacher.model.parameters()]
        tr.train(steps=1)  # two optimizer steps (two mini-batches): one sync, after the second
        assert tr.self_teacher.optimizer_steps == 2
        for t, i, p in zip(tr.self_teacher.model.parameters(), init, tr.policy.parameters()):
            torch.testing.assert_close(t, 0.75 * i + 0.25 * p)
        tr.train()
        straight = tr
        # the same run stopped after step 2 and resumed
        b = trainer(tmp_path / "b", **kw)
        b.train(steps=2)
        c = trainer(tmp_path / "b", resume=str(tmp_path / "b" / "run"), **kw)
        c.train()
    assert c.self_teacher.optimizer_steps == straight.self_teacher.optimizer_steps == 8
    for x, y in zip(straight.self_teacher.model.parameters(), c.self_teacher.model.parameters()):
        assert torch.equal(x, y)
    for x, y in zip(straight.policy.parameters(), c.policy.parameters()):
        assert torch.equal(x, y)


def test_base_teacher_is_the_rebuilt_initial_policy_on_resume(tmp_path):
    """The ``base`` teacher is not checkpointed: a resume builds it again from ``model.policy``
    (here ``tiny:llama`` with its seed), before the checkpoint's weights are loaded into the
    policy, so it is the initial policy again and the resumed run equals the straight one."""
    from tests.test_rl_learning import frac_a

    sd = SDPOConfig(teacher_model_kind="base", distillation_weight=0.5, success_reward_threshold=0.1)

    def run(sub, **kw):
        return SDPOTrainer(make_config(tmp_path / sub, sdpo=sd, steps=4, save_every=2, **kw), prompts=PROMPTS,
                           reward_fns=[frac_a])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = run("a")
        init = [p.detach().clone() for p in a.policy.parameters()]
        hist = a.train()
        b = run("b")
        b.train(steps=2)
        c = run("b", resume=str(tmp_path / "b" / "run"))
        c.train()
    assert all(h["self_distillation/reprompt_sample_fraction"] > 0 for h in hist)
    for t, i in zip(c.self_teacher.model.parameters(), init):
        assert torch.equal(t, i)
    for x, y in zip(a.policy.parameters(), c.policy.parameters()):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- CLI and refusals


def test_cli_sdpo_writes_a_run(tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["sdpo", "none", "--output_dir", run, "--progress", "false", "--steps", "2", "--sample_every", "1",
            "--reward.functions", "tests.test_sdpo:starts_digit", "--rollout.max_new_tokens", "4",
            "--ppo.epochs", "1", "--sdpo.distillation_weight", "0.5"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    assert "rlhf-fast sdpo:" in capsys.readouterr().out
    rows = [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    for k in ("self_distillation/distillation_loss", "sdpo/distillation_loss", "self_distillation/policy_loss",
              "self_distillation/reprompt_sample_fraction", "self_distillation/reward_mean"):
        assert k in rows[-1]
    import yaml

    saved = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    assert saved["estimator"] == "sdpo" and saved["sdpo"]["distillation_weight"] == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["sdpo", "--resume", run, "--steps", "3"]) == 0
    assert [json.loads(ln)["step"] for ln in open(os.path.join(run, "metrics.jsonl"))] == [1, 2, 3]
    assert main(["sdpo", "none", "--output_dir", str(tmp_path / "x"), "--sdpo.distillation_weight", "2"]) == 2
    assert "sdpo.distillation_weight" in capsys.readouterr().err


@pytest.mark.parametrize("kw,key", [
    (dict(distillation_weight=-0.1), "sdpo.distillation_weight"),
    (dict(distillation_weight=float("nan")), "sdpo.distillation_weight"),
    (dict(distillation_alpha=0.5), "sdpo.distillation_alpha"),
    (dict(distillation_mode="kl"), "sdpo.distillation_mode"),
    (dict(distillation_mode="topk_logits"), "sdpo.distillation_topk"),
    (dict(distillation_topk=4), "sdpo.distillation_topk"),
    (dict(distillation_mode="topk_logits", distillation_topk=0), "sdpo.distillation_topk"),
    (dict(distillation_is_clip=0.0), "sdpo.distillation_is_clip"),
    (dict(distillation_add_tail=True), "sdpo.distillation_add_tail"),
    (dict(teacher_model_kind="frozen"), "sdpo.teacher_model_kind"),
    (dict(teacher_update_rate=0.0), "sdpo.teacher_update_rate"),
    (dict(teacher_sync_steps=0), "sdpo.teacher_sync_steps"),
    (dict(success_reward_threshold=float("inf")), "sdpo.success_reward_threshold"),
    (dict(max_reprompt_len=0), "sdpo.max_reprompt_len"),
    (dict(reprompt_template="{question}"), "sdpo.reprompt_template"),
    (dict(solution_template=3), "sdpo.solution_template"),
    (dict(feedback_template="{feedback_raw"), "sdpo.feedback_template"),
    (dict(include_environment_feedback="yes"), "sdpo.include_environment_feedback"),
    (dict(diagnostics_warning_interval=-1), "sdpo.diagnostics_warning_interval"),
    (dict(diagnostics_flat_tolerance=-1.0), "sdpo.diagnostics_flat_tolerance"),
])
def test_bad_values_are_refused(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        SDPOConfig(**kw)


def test_refused_run_settings(tmp_path):
    with pytest.raises(ValueError, match=r"sdpo\.distillation_weight apply to estimator 'sdpo'"):
        RLConfig(estimator="grpo", sdpo=SDPOConfig(distillation_weight=0.5))
    with pytest.raises(ValueError, match=r"rollout\.group_size must be >= 2"):
        RLConfig(estimator="sdpo", rollout=RolloutConfig(group_size=1), ppo=PPOConfig(mini_batch_size=8,
                                                                                     micro_batch_size=8))
    with pytest.raises(ValueError, match=r"rollout\.dynamic_sampling"):
        RLConfig(estimator="sdpo", rollout=RolloutConfig(dynamic_sampling=True))
