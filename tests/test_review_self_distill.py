"""Review of SDFT, SDPO and IW-OPD (rev1): behaviours checked through public results (trainer
metrics, config errors, the CLI), and the gaps it found (SDPO keys accepted where they do
nothing), now refused."""

import json
import os
import warnings

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from rlhf_fast.cli import main  # noqa: E402
from rlhf_fast.trainers.rl_config import (DistillConfig, OptimConfig, PPOConfig, RLConfig,  # noqa: E402
                                          RolloutConfig, SDFTConfig, SDPOConfig)
from tests.test_rl_learning import PROMPTS as PLAIN, make_policy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

RECORDS = [{"prompt": "q:", "privileged_context": "a a a"}, {"prompt": "x", "privileged_context": "b c"},
           {"prompt": "0", "privileged_context": "1 2 3"}, {"prompt": "a b", "privileged_context": "z"}]


def sdft_trainer(tmp_path, sdft, **kw):
    from rlhf_fast.trainers.sdft import SDFTTrainer

    base = dict(estimator="sdft", steps=1, output_dir=str(tmp_path / "run"), progress=False, sample_every=0,
                rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=4, temperature=0.9),
                ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8), optim=OptimConfig(lr=1e-2), sdft=sdft)
    base.update(kw)
    pol, tok = make_policy()
    return SDFTTrainer(RLConfig(**base), pol, tok, prompts=RECORDS, eval_prompts=RECORDS[:2])


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, model):
    return all(torch.equal(x, y) for x, y in zip(a, model.parameters()))


# ----------------------------------------------------------------------------- SDFT: verified behaviours


def test_sdft_evaluation_moves_neither_the_policy_nor_the_ema_teacher(tmp_path):
    tr = sdft_trainer(tmp_path, SDFTConfig(teacher_model_kind="ema", distillation_topk=7))
    with torch.no_grad():  # a teacher away from the student: a non-zero loss
        for p in tr.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    pol, teach, n = snapshot(tr.policy), snapshot(tr.teacher), tr.self_teacher.optimizer_steps
    ev = tr.evaluate()
    assert same(pol, tr.policy) and same(teach, tr.teacher) and tr.self_teacher.optimizer_steps == n
    assert ev["eval/loss"] > 1e-4
    # TRL logs the token-mean loss under both names
    assert ev["eval/sdft/distillation_loss"] == ev["eval/self_distillation/distillation_loss"]


def test_sdft_skipping_more_tokens_than_any_answer_gives_a_zero_step(tmp_path):
    tr = sdft_trainer(tmp_path, SDFTConfig(distillation_topk=7, num_loss_tokens_to_skip=50))
    before = snapshot(tr.policy)
    m = tr.train()[-1]
    assert m["loss"] == 0.0 and m["sdft/distillation_loss"] == 0.0 and m["grad_norm"] == 0.0
    assert same(before, tr.policy)


def test_sdft_chat_prompt_with_message_context_equals_trls_teacher_prompt(tmp_path):
    from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder

    from rlhf_fast.models.tiny import CHAT_TEMPLATE
    from rlhf_fast.trainers.sdft import SDFTTrainer

    chat = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q: a"}],
             "privileged_context": [{"role": "user", "content": "x y"},
                                    {"role": "assistant", "content": [{"type": "text", "text": "0 1"}]}]},
            {"prompt": [{"role": "user", "content": "a b"}], "privileged_context": "c d"}]
    pol, tok = make_policy()
    tok.chat_template = CHAT_TEMPLATE
    cfg = RLConfig(estimator="sdft", steps=1, output_dir=str(tmp_path / "run"), progress=False, sample_every=0,
                   rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=4),
                   ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4), sdft=SDFTConfig(distillation_topk=7))
    tr = SDFTTrainer(cfg, pol, tok, prompts=chat)

    class _Args:
        teacher_prompt_template = cfg.sdft.teacher_prompt_template

    builder = DemonstrationTeacherContextBuilder(type("T", (), {"args": _Args})())
    for i, r in enumerate(chat):  # TRL's _compose_teacher_prompt, then its _tokenize_prompts (chat)
        tp = builder._compose_teacher_prompt(r["prompt"], r["privileged_context"])
        want = tok.apply_chat_template(tp, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert tr._teacher_ids["train"][i] == list(want)
    assert torch.isfinite(torch.tensor(tr.train()[-1]["loss"]))


# ----------------------------------------------------------------------------- SDPO: verified behaviours


def _one(prompts, completions, **kw):
    return [1.0] * len(completions)


def _zero(prompts, completions, **kw):
    return [0.0] * len(completions)


def _half(prompts, completions, **kw):
    return [0.5] * len(completions)


def sdpo_step(tmp_path, fns, sd=None, weights=None, prompts=PLAIN):
    from rlhf_fast.trainers.sdpo import SDPOTrainer

    cfg = RLConfig(estimator="sdpo", steps=1, output_dir=str(tmp_path / "run"), progress=False, sample_every=0,
                   rollout=RolloutConfig(prompts_per_step=2, group_size=4, max_new_tokens=4),
                   ppo=PPOConfig(epochs=1, mini_batch_size=8, micro_batch_size=8), optim=OptimConfig(lr=1e-2),
                   sdpo=sd or SDPOConfig())
    pol, tok = make_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = SDPOTrainer(cfg, pol, tok, prompts=prompts, reward_fns=fns, reward_weights=weights)
        before = snapshot(tr.policy)
        m = tr.train()[-1]
    return m, not same(before, tr.policy)


@pytest.mark.parametrize("case,fns,weights,frac,moves", [
    ("every answer succeeds", [_one], None, 1.0, True),
    ("none succeeds", [_zero], None, 0.0, False),
    # 1.5·0.5 + 0.5·0.5 = 1.0 reaches the threshold 1 only through the weights (TRL's weighted nansum)
    ("weighted sources", [_half, _half], [1.5, 0.5], 1.0, True),
])
def test_sdpo_success_fractions_and_step(tmp_path, case, fns, weights, frac, moves):
    m, moved = sdpo_step(tmp_path, fns, weights=weights)
    assert m["self_distillation/success_group_fraction"] == frac
    assert m["self_distillation/success_sample_fraction"] == frac
    assert m["self_distillation/reprompt_sample_fraction"] == frac
    assert moved == moves  # weight 1: no teacher context, no loss, no step
    if not moves:
        assert m["self_distillation/distillation_loss"] == 0.0


def test_sdpo_feedback_only_distils_every_answer(tmp_path):
    recs = [{"prompt": p, "privileged_context": "fb " + p} for p in PLAIN]
    m, moved = sdpo_step(tmp_path, [_zero], SDPOConfig(include_environment_feedback=True,
                                                       use_successful_as_teacher=False), prompts=recs)
    assert m["self_distillation/feedback_used_fraction"] == 1.0
    assert m["self_distillation/reprompt_sample_fraction"] == 1.0 and moved


# ----------------------------------------------------------------------------- IW-OPD: verified behaviour


@pytest.mark.parametrize("filt", [dict(top_k=5), dict(top_p=0.5)])
def test_iw_opd_sampler_logprobs_are_the_processed_distributions(tmp_path, filt):
    """The advantage's sampler log-prob is the token's under the filtered, renormalised
    distribution (TRL's vLLM processed_logprobs), not the raw softmax."""
    from tests.test_distill_iw_opd import trainer

    T = 0.9
    tr = trainer(tmp_path, rollout=RolloutConfig(prompts_per_step=4, group_size=2, max_new_tokens=5, temperature=T,
                                                 **filt))
    data, _ = tr.rollout()
    ids, am, rm = data.input_ids, data.attention_mask, data.response_mask
    pos = (am.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        z = tr.policy(input_ids=ids, attention_mask=am.long(), position_ids=pos).logits[:, :-1].float() / T
    if "top_k" in filt:
        z = z.masked_fill(z < z.topk(filt["top_k"], -1).values[..., -1:], float("-inf"))
    else:  # the smallest set of most likely tokens whose mass reaches p
        p = torch.softmax(z, -1)
        sp, si = p.sort(-1, descending=True)
        drop = torch.zeros_like(p, dtype=torch.bool).scatter(-1, si, (sp.cumsum(-1) - sp) >= filt["top_p"])
        z = z.masked_fill(drop, float("-inf"))
    want = torch.log_softmax(z, -1).gather(-1, ids[:, 1:, None])[..., 0]
    mk = rm[:, 1:]
    torch.testing.assert_close(data.behaviour_logp[:, 1:][mk], want[mk], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("args,key", [
    (["sdft", "none", "--sdft.distillation_topk", "abc"], "sdft.distillation_topk"),
    (["sdft", "none", "--sdft.num_loss_tokens_to_skip", "-1"], "sdft.num_loss_tokens_to_skip"),
    (["sdpo", "none", "--sdpo.max_reprompt_len", "1.5"], "sdpo.max_reprompt_len"),
    (["sdpo", "none", "--sdpo.success_reward_threshold", "nan"], "sdpo.success_reward_threshold"),
    (["distill", "none", "--distill.objective", "iw_opd", "--distill.iw_opd_gamma", "-1"], "distill.iw_opd_gamma"),
    (["distill", "none", "--distill.iw_opd_epsilon", "0.1"], "distill.iw_opd_epsilon"),
])
def test_cli_bad_values_exit_2_with_one_line_naming_the_key(tmp_path, capsys, args, key):
    assert main(args + ["--output_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err


# ----------------------------------------------------------------------------- gaps found in review, fixed


@pytest.mark.parametrize("kw", [dict(teacher_model_kind="live", teacher_update_rate=0.5),
                                dict(teacher_model_kind="base", teacher_sync_steps=3)])
def test_sdpo_ema_keys_without_an_ema_teacher_are_refused(kw):
    with pytest.raises(ValueError, match="sdpo.teacher_(update_rate|sync_steps)"):
        SDPOConfig(**kw)


def test_sdpo_without_any_teacher_source_is_refused():
    with pytest.raises(ValueError, match="sdpo.use_successful_as_teacher"):
        SDPOConfig(use_successful_as_teacher=False, include_environment_feedback=False)


def test_sdpo_feedback_keys_without_feedback_are_refused():
    with pytest.raises(ValueError, match="sdpo.environment_feedback_only_without_solution"):
        SDPOConfig(environment_feedback_only_without_solution=True)


def test_sdpo_distillation_keys_with_weight_zero_are_refused(tmp_path):
    with pytest.raises(ValueError, match="sdpo.distillation_mode"):
        RLConfig(estimator="sdpo", output_dir=str(tmp_path), rollout=RolloutConfig(group_size=2),
                 sdpo=SDPOConfig(distillation_weight=0.0, distillation_mode="full_logits", distillation_alpha=0.3))


def test_iw_opd_keys_need_the_objective():
    with pytest.raises(ValueError, match="distill.iw_opd_gamma"):
        DistillConfig(iw_opd_gamma=0.3)


def test_report_on_an_sdpo_run(tmp_path):
    run = str(tmp_path / "run")
    args = ["sdpo", "none", "--output_dir", run, "--progress", "false", "--steps", "1",
            "--reward.functions", "tests.test_sdpo:starts_digit", "--rollout.max_new_tokens", "3",
            "--rollout.prompts_per_step", "2", "--rollout.group_size", "2", "--ppo.mini_batch_size", "4",
            "--ppo.micro_batch_size", "4", "--ppo.epochs", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    assert main(["report", run]) == 0
    text = open(os.path.join(run, "report.md")).read()
    assert "sdpo" in text
    rows = [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl"))]
    assert "self_distillation/distillation_loss" in rows[-1]
