"""Regression review of the fix commits of 8a22a06..HEAD (282644e reward-model prompts, a5558a2 /
b823ef5 / 47fa467 process reward models, 9b3e17c generation, f26322e llama_forward hooks, 6bea4e6
checkpoint / resume, 56cb50c torchrun, 49f312d feedback). Each test pins one defect a fix
introduced (a regression) or left reachable by another path (an incomplete fix), since fixed; the
docstring names the commit. Tiny models, one thread, no download."""

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_fast.trainers import checkpoint as ckpt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SFT_TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=300"


def _held_run(folder, cfg):
    """``folder`` as a run of ``cfg`` with a complete checkpoint at step 2."""
    from rlhf_fast.trainers.config import save_config

    os.makedirs(folder, exist_ok=True)
    save_config(cfg, os.path.join(folder, "config.yaml"))
    ckpt.save_checkpoint(ckpt.checkpoint_dir(str(folder), 2), models={"m": torch.nn.Linear(2, 2)},
                         extra={"step": 2})


# --------------------------------------------------------------------------- 6bea4e6: check_same_run


def test_resume_naming_the_same_data_file_by_its_absolute_path_goes_on(tmp_path, monkeypatch):
    """6bea4e6: a run started with ``data: a.jsonl`` from its folder, resumed with the absolute path
    of that very file (a script that resolves paths, another shell), is refused: "holds a run
    with data 'a.jsonl' ... but this one has data '/.../a.jsonl'". _same_value compares
    os.path.normpath of the texts; os.path.abspath / realpath (relative to the cwd, as the
    trainer opens the file) would see one file. Before 6bea4e6 the resume went on."""
    from rlhf_fast.trainers.common import open_supervised_run
    from rlhf_fast.trainers.dpo import DPOConfig

    (tmp_path / "a.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    _held_run(run, DPOConfig(output_dir=str(run), data="a.jsonl"))
    _, ck = open_supervised_run(DPOConfig(output_dir=str(run), data=str(tmp_path / "a.jsonl")), True)
    assert ck == ckpt.checkpoint_dir(str(run), 2)


# --------------------------------------------------------------------------- 6bea4e6: recover_replaced


def test_report_during_a_checkpoint_resave_does_not_break_the_save(tmp_path, monkeypatch):
    """6bea4e6: latest_checkpoint now calls recover_replaced, which renames folders, and
    ``rlhf-fast report`` calls latest_checkpoint (report.py _header). The offline loop re-saves its
    last checkpoint at every run's end (training_loop's final ``trainer._save()`` after a step
    that save_every already saved), through replace_folder: step_N aside to .old-step_N-*, then
    the new one in. A report rendered between the two renames (a user watching the run) sees
    .old-step_N-* with COMPLETE and no step_N, and moves it back; the run's own
    os.replace(tmp, step_N) then fails (ENOTEMPTY) and the run dies before final/. A read-only
    command should not rename (recovery belongs to the run that resumes or prunes)."""
    from rlhf_fast.trainers.report import render_report
    from rlhf_fast.trainers.sft import SFTConfig

    run = tmp_path / "run"
    _held_run(run, SFTConfig(model=SFT_TINY, output_dir=str(run), max_steps=2))
    real, seen = os.replace, []

    def replace(src, dst, *a, **kw):
        if os.path.basename(str(src)).startswith(".tmp-step_") and not seen:
            seen.append(render_report(str(run), str(tmp_path), plot=False))  # the watcher's report
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    ckpt.save_checkpoint(ckpt.checkpoint_dir(str(run), 2), models={"m": torch.nn.Linear(2, 2)},
                         extra={"step": 2, "again": True})
    monkeypatch.setattr(os, "replace", real)
    assert seen
    with open(os.path.join(ckpt.checkpoint_dir(str(run), 2), "extra.json")) as f:
        assert json.load(f)["again"] is True


# --------------------------------------------------------------------------- 6bea4e6: staged final folders


def test_a_failed_bema_model_save_leaves_no_torn_bema_folder(tmp_path):
    """6bea4e6 stages final/ (SFT, RL, reward merge) so that a failed write (a full disk, a
    Ctrl-C) leaves no torn model; bema.save_bema_model, the other model folder the offline loop
    writes at the end (run_dir/bema), still saves straight into place: a tokenizer save that
    fails after the weights leaves bema/ holding weights without a tokenizer."""
    from types import SimpleNamespace

    from rlhf_fast.models.tiny import tiny_causal_lm
    from rlhf_fast.trainers.bema import save_bema_model

    class FailingTokenizer:
        def save_pretrained(self, folder):
            raise OSError(28, "No space left on device")

    model = tiny_causal_lm(64, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    trainer = SimpleNamespace(ctx=SimpleNamespace(is_main=True, barrier=lambda: None), model=model,
                              run=SimpleNamespace(path=str(tmp_path)), tokenizer=FailingTokenizer(),
                              _bema=SimpleNamespace(model_state_dict=lambda m: m.state_dict()))
    with pytest.raises(OSError):
        save_bema_model(trainer)
    assert not os.path.exists(tmp_path / "bema"), os.listdir(tmp_path / "bema")


# --------------------------------------------------------------------------- 49f312d: switches given as text


@pytest.mark.parametrize("module,cls,key", [("sft", "SFTConfig", "resume"), ("sft", "SFTConfig", "dedup"),
                                            ("dpo", "DPOConfig", "resume"), ("dpo", "DPOConfig", "dedup"),
                                            ("prm", "PRMConfig", "resume")])
def test_offline_switches_given_as_text_are_refused(module, cls, key):
    """49f312d made RewardConfig refuse non-bool ``resume`` / ``dedup`` (check_bool_fields), and
    KTOConfig checks them too; SFTConfig, DPOConfig and PRMConfig accept ``resume: "false"``
    (a quoted YAML value, a Python caller), which is truthy: the run resumes / dedups though told
    not to."""
    import importlib

    Config = getattr(importlib.import_module(f"rlhf_fast.trainers.{module}"), cls)
    with pytest.raises(ValueError, match=key):
        Config(**{key: "false"})


@pytest.mark.parametrize("section,key", [("ppo", "trpo"), ("reward", "whiten"), ("data", "shuffle")])
def test_rl_switches_given_as_text_are_refused(section, key):
    """The same defect as above in the RL config (49f312d left it): ``ppo.trpo: "false"`` turns
    the TRPO line search on, ``reward.whiten: "false"`` whitens the rewards, ``data.shuffle:
    "false"`` shuffles. Other RL switches (rollout.mask_truncated, ppo.whiten_advantages, ...)
    are refused with the key named."""
    from rlhf_fast.trainers.rl_config import RLConfig

    base = RLConfig()
    with pytest.raises(ValueError, match=rf"{section}\.{key}"):
        RLConfig(**{section: dataclasses.replace(getattr(base, section), **{key: "false"})})


# --------------------------------------------------------------------------- 9b3e17c: rollout numbers


def test_rollout_top_p_and_min_p_take_numpy_scalars():
    """9b3e17c: ``isinstance(self.top_p, (int, float))`` is False for np.float32 (np.float64 is a
    float subclass, np.float32 is not), so RolloutConfig(top_p=np.float32(0.9)) is now refused
    ("must be in (0, 1] (a number)"), where the comparison before it accepted it; the same
    commit makes SamplingParams take numpy scalars (_as_float), which the check could use."""
    from rlhf_fast.trainers.rl_config import RolloutConfig

    ro = RolloutConfig(top_p=np.float32(0.9), min_p=np.float32(0.05))
    assert ro.top_p == pytest.approx(0.9) and ro.min_p == pytest.approx(0.05)


@pytest.mark.parametrize("where", ["yaml", "cli"])
def test_rollout_min_p_null_from_a_config_file_or_the_command_line_is_off(tmp_path, where):
    """9b3e17c made ``min_p: None`` TRL's "off" in RolloutConfig.__post_init__ and documents it
    (docs/from_trl.md, GRPO / RLOO / ... tables: "TRL None = our 0.0 (`null` accepted)"), but
    load_config converts the key by its annotation (float) first and refuses null, so only the
    Python API and generation_kwargs take it; a TRL config ported as YAML (min_p: null) fails."""
    from rlhf_fast.trainers.config import load_config
    from rlhf_fast.trainers.rl_config import RLConfig

    if where == "yaml":
        path = tmp_path / "c.yaml"
        path.write_text("rollout:\n  min_p: null\n")
        cfg = load_config(RLConfig, str(path), [])
    else:
        cfg = load_config(RLConfig, None, ["--rollout.min_p", "null"])
    assert cfg.rollout.min_p == 0.0


# --------------------------------------------------------------------------- b823ef5: the PRM's empty answer


@pytest.fixture(scope="module")
def prm():
    """An untrained PRM (a 2-label token classifier over a tiny Llama backbone) and its tokenizer."""
    from rlhf_fast.algorithms.process_rewards import ProcessRewardModel
    from rlhf_fast.models.tiny import sample_texts, tiny_causal_lm, train_tokenizer
    from rlhf_fast.trainers.prm import token_classifier_from

    tok = train_tokenizer(sample_texts(32), 300)
    causal = tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2, seed=1, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return ProcessRewardModel(token_classifier_from(causal), tok, "\n")


def test_prm_empty_answer_scores_lowest_under_both_conventions(prm):
    """b823ef5 gives an answer with no step NaN so that it no longer escapes the PRM ("an empty
    answer gets NaN, a bad reward", README; "which reward.on_bad_reward raises or drops",
    process_rewards' docstring). Under calling_convention trl a NaN is TRL's None, "this source
    does not apply": the empty answer is left unscored (GRPO: advantage 0, kept) while its
    siblings with doubtful steps get negative advantages, and with other sources it is scored by
    them alone — the escape the fix closed, reopened. Fixed by scoring an answer with no step 0,
    the lowest score, under both conventions (and no run stops on an empty answer)."""
    from rlhf_fast.algorithms import CombinedReward, RewardContext

    prompts, answers = ["the cat", "the cat"], ["", "a b\nc d\n"]
    for convention in ("ours", "trl"):
        out = CombinedReward([prm], convention=convention)(prompts, answers, RewardContext())
        assert out.valid.all() and float(out.total[0]) == 0.0 < float(out.total[1]), convention


# --------------------------------------------------------------------------- 282644e: the reward model's template


def test_reward_models_template_gets_the_runs_chat_template_kwargs(tmp_path, monkeypatch):
    """282644e renders a chat prompt for a reward model with the reward tokenizer's template
    (reward_input_ids -> render_prompt(prompt, tokenizer)), as TRL's GRPO does; TRL calls it
    ``apply_chat_template(x, reward_processing_class, **self.chat_template_kwargs)``
    (trl/trainer/grpo_trainer.py, _calculate_rewards), and docs/from_trl.md says
    data.chat_template_kwargs reach "every apply_chat_template of chat prompts". Ours drops
    them (``{enable_thinking: false}`` for a Qwen3 reward model is lost); before 282644e they
    reached the reward model through the policy's rendered prompt."""
    import copy

    from rlhf_fast.models.tiny import tiny_reward_model
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_config import DataConfig, PPOConfig, RLConfig, RolloutConfig
    from tests.test_rl_learning import make_policy

    pol, tok = make_policy()
    rm_tok = copy.deepcopy(tok)
    rm_tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                            "{% if flag %}[flag] {% endif %}{% if add_generation_prompt %}[assistant] {% endif %}")
    calls = []
    real = rm_tok.apply_chat_template

    def spy(*a, **kw):
        calls.append(kw.get("flag"))
        return real(*a, **kw)

    rm_tok.apply_chat_template = spy
    rm = tiny_reward_model(len(tok), hidden_size=32, num_layers=1, num_heads=2, seed=3, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).eval()
    chats = [[{"role": "user", "content": "q: a"}], [{"role": "user", "content": "x y"}]]
    cfg = RLConfig(estimator="grpo", steps=1, output_dir=str(tmp_path / "run"), progress=False,
                   data=DataConfig(chat_template_kwargs={"flag": True}),
                   rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=4),
                   ppo=PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4))
    RLTrainer(cfg, pol, tok, reward_models=[(rm, rm_tok)], prompts=chats).train()
    assert calls and all(f is True for f in calls), calls


# --------------------------------------------------------------------------- 49f312d: the judge's verdict


@pytest.mark.parametrize("answer", ["Answer: b", "I prefer b", "Response b is better."])
def test_judge_verdict_reads_a_lower_case_b_in_a_sentence(answer):
    """49f312d stops reading the article "a" as a vote for A by taking only a capital A / B
    standing alone (or the bare letter). A lower-case "b" standing alone is no English word,
    but it is now ignored too: these verdicts scored 0.0 (B) before the fix (the answer was
    upper-cased) and 0.5 (a non-vote) after it. Only a lower-case "a" is ambiguous."""
    from rlhf_fast.feedback.judge import _verdict

    assert _verdict(answer) == 0.0


def test_eval_run_renders_chat_prompts_with_the_runs_chat_template_kwargs(tmp_path, monkeypatch):
    """Outside the reviewed commits (found by the regression review): `rlhf-fast eval --run`
    rendered the run's chat prompts without its data.chat_template_kwargs, for the policy and for
    the reward models; training renders them with (RLTrainer._render, RewardContext)."""
    import shutil

    from rlhf_fast import cli
    from rlhf_fast.feedback import formats
    from rlhf_fast.models.tiny import sample_texts, tiny_causal_lm, train_tokenizer
    from rlhf_fast.trainers.config import load_config, save_config
    from rlhf_fast.trainers.rl_config import RLConfig

    tok = train_tokenizer(sample_texts(32), 300)
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if flag %}[flag] {% endif %}{% if add_generation_prompt %}[assistant] {% endif %}")
    pol = tmp_path / "policy"
    tiny_causal_lm(len(tok), hidden_size=32, num_layers=1, num_heads=2, seed=0, pad_token_id=tok.pad_token_id,
                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).save_pretrained(str(pol))
    tok.save_pretrained(str(pol))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": c}]}) + "\n"
                               for c in ("the cat", "a dog")))
    (tmp_path / "rw.py").write_text("def one(prompts, completions):\n    return [1.0 for _ in completions]\n")
    run = tmp_path / "run"
    cfg = load_config(RLConfig, None, ["--model.policy", str(pol), "--data.prompts_file", str(prompts),
                                       "--steps", "1", "--output_dir", str(run),
                                       "--reward.functions", f"{tmp_path / 'rw.py'}:one"])
    cfg.data.chat_template_kwargs = {"flag": True}
    run.mkdir()
    save_config(cfg, str(run / "config.yaml"))
    shutil.copytree(pol, run / "final" / "policy")
    seen, real = [], formats.render_prompt

    def spy(prompt, tokenizer=None, tools=None, chat_template_kwargs=None):
        if isinstance(prompt, list):
            seen.append(chat_template_kwargs)
        return real(prompt, tokenizer, tools, chat_template_kwargs)

    monkeypatch.setattr(formats, "render_prompt", spy)
    out = tmp_path / "res.json"
    assert cli.main(["eval", "--run", str(run), "--max-new-tokens", "2", "--out", str(out)]) == 0
    assert seen and all(kw == {"flag": True} for kw in seen), seen
