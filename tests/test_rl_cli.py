"""`rlhf-fast grpo|ppo|rloo`, `--resume`, `rlhf-fast plot` and `rlhf-fast eval` end to end on a
tiny policy built from a `tiny:` spec, plus the rule-based example rewards."""

import json
import os

import pytest
import yaml

from rlhf_fast.algorithms.rule_rewards import ascending_digits, letter_a_fraction
from rlhf_fast.cli import main

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


pytestmark = pytest.mark.usefixtures("one_thread")


def _small(path, src="grpo.yaml", **over):
    with open(os.path.join(EXAMPLES, src)) as f:
        cfg = yaml.safe_load(f)
    cfg.update(progress=False, steps=3, save_every=2, sample_every=1)
    cfg["rollout"].update(prompts_per_step=2, max_new_tokens=4)
    cfg["ppo"].update(mini_batch_size=8, micro_batch_size=4, epochs=1)
    cfg.update(over)
    p = path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def _steps(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(ln)["step"] for ln in f]


def test_grpo_cli_resume_plot_eval(tmp_path, capsys):
    run = str(tmp_path / "run")
    cfg = _small(tmp_path)
    assert main(["grpo", cfg, "--output_dir", run, "--rollout.temperature", "0.9"]) == 0
    assert _steps(run) == [1, 2, 3]
    with open(os.path.join(run, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    assert saved["estimator"] == "grpo" and saved["rollout"]["temperature"] == 0.9
    # continue the same run to step 5 from its own config
    assert main(["grpo", "--resume", run, "--steps", "5"]) == 0
    assert _steps(run) == [1, 2, 3, 4, 5]
    with open(os.path.join(run, "config.yaml")) as f:
        assert yaml.safe_load(f)["steps"] == 5  # the resolved config of the resumed run
    assert main(["plot", run]) == 0
    pngs = sorted(os.listdir(os.path.join(run, "plots")))
    assert "reward.png" in pngs and "kl.png" in pngs
    out = str(tmp_path / "eval.json")
    assert main(["eval", "--run", run, "--max-new-tokens", "4", "--out", out]) == 0
    with open(out) as f:
        res = json.load(f)
    assert 0.0 <= res["win_rate"] <= 1.0 and res["kl"] == res["kl"]  # finite
    assert "reward/letter_a_fraction" in res and res["num_prompts"] == 4
    assert res["split"] == "train"  # the run has no evaluation prompts: its training prompts
    # a new run into the folder of this one is refused (it would mix their checkpoints and logs)
    capsys.readouterr()
    assert main(["grpo", cfg, "--output_dir", run]) == 2
    assert f"output_dir {run} already holds a run" in capsys.readouterr().err and _steps(run) == [1, 2, 3, 4, 5]
    # outputs that cannot be written are refused before the work whose results they would hold
    assert main(["eval", "--run", run, "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path}: expected a file, found a folder" in capsys.readouterr().err
    assert main(["plot", run, "--out", out]) == 2
    assert f"--out {out}: expected a folder, found a file" in capsys.readouterr().err


def test_eval_run_takes_the_runs_held_out_prompts(tmp_path, capsys):
    """`rlhf-fast eval --run` evaluates on the prompts the run held out (data.eval_fraction), split
    exactly as the trainer split them, by default; --split train takes the others; --split needs
    --run, and --split eval a run with evaluation prompts."""
    from rlhf_fast.trainers.evaluate import run_prompt_records
    from rlhf_fast.trainers.rl import split_eval_records
    from rlhf_fast.trainers.rl_cli import build_config

    prompts = [f"prompt number {i}" for i in range(10)]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    cfg = _small(tmp_path, steps=1, seed=3, data={"prompts_file": str(tmp_path / "p.txt"), "eval_fraction": 0.3})
    run = str(tmp_path / "run")
    argv = [cfg, "--output_dir", run]
    assert main(["grpo", *argv]) == 0
    rc = build_config("grpo", argv)
    train, held = split_eval_records(rc, [(p, {}) for p in prompts])
    assert len(held) == 3 and len(train) == 7 and {p for p, _ in held} | {p for p, _ in train} == set(prompts)
    assert run_prompt_records(rc) == ("eval", held) and run_prompt_records(rc, "train") == ("train", train)
    outs = {}
    for split in ("auto", "train"):
        out = str(tmp_path / f"{split}.json")
        assert main(["eval", "--run", run, "--max-new-tokens", "2", "--split", split, "--out", out]) == 0
        outs[split] = json.load(open(out))
    assert (outs["auto"]["split"], outs["auto"]["num_prompts"]) == ("eval", 3)
    assert (outs["train"]["split"], outs["train"]["num_prompts"]) == ("train", 7)
    capsys.readouterr()
    assert main(["eval", "--policy", run, "--prompts", str(tmp_path / "p.txt"), "--split", "eval",
                 "--reward-fn", "rlhf_fast.algorithms.rule_rewards:letter_a_fraction"]) == 2
    assert "--split eval picks a --run's prompts: give --run RUN_DIR and no --prompts" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--split eval: the run has no evaluation prompts"):
        run_prompt_records(build_config("grpo", [_small(tmp_path / "run", "ppo.yaml")]), "eval")


def test_plot_draws_every_metric_of_any_run(tmp_path, capsys):
    """An SFT / reward log (loss, eval_loss, lr) and metrics of no known family are plotted too;
    a log with nothing numeric, or a broken line, is one error naming the file."""
    run = tmp_path / "sft"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0 / i, "lr": 1e-3, "custom": i})
                                               + "\n" for i in range(1, 4)))
    assert main(["plot", str(run)]) == 0
    assert sorted(os.listdir(run / "plots")) == ["other.png", "training.png"]
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "note": "x"}) + "\n")
    assert main(["plot", str(run)]) == 2
    assert "holds no numeric metrics" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n{torn\n")
    assert main(["plot", str(run)]) == 2
    assert f"{run / 'metrics.jsonl'}:2: invalid JSON" in capsys.readouterr().err
    for bad in ("[1, 2]", '{"step": true, "loss": 1.0}', '{"step": NaN, "loss": 1.0}'):
        (run / "metrics.jsonl").write_text(bad + "\n")
        assert main(["plot", str(run)]) == 2
        assert "1: expected a JSON object with a numeric 'step'" in capsys.readouterr().err


@pytest.mark.parametrize("command,src,estimator", [("ppo", "ppo.yaml", "gae"), ("rloo", "rloo.yaml", "rloo")])
def test_ppo_and_rloo_commands(tmp_path, command, src, estimator):
    run = str(tmp_path / "run")
    # the command fixes the family: a grpo estimator in the file becomes the command's own
    cfg = _small(tmp_path, src, estimator="grpo", steps=2)
    assert main([command, cfg, "--output_dir", run]) == 0
    with open(os.path.join(run, "config.yaml")) as f:
        assert yaml.safe_load(f)["estimator"] == estimator
    assert _steps(run) == [1, 2]
    if command == "ppo":
        assert os.path.isdir(os.path.join(run, "final", "critic"))


def test_cli_errors(tmp_path, capsys):
    cfg = _small(tmp_path)
    assert main(["grpo", cfg, "--ppo.dual_clip", "0.5"]) == 2
    assert "dual_clip" in capsys.readouterr().err
    assert main(["grpo", cfg, "--no_such_key", "1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert main(["grpo", cfg, "--reward.functions", "no_such_mod_xyz:f", "--output_dir", str(tmp_path / "r")]) == 2
    assert "no_such_mod_xyz" in capsys.readouterr().err
    assert main(["rloo", "--resume", str(tmp_path / "missing")]) == 2
    for argv in (["grpo", cfg, "--resume"], ["grpo", "--resume", "--steps", "2"], ["grpo", "--resume="]):
        assert main(argv) == 2
        assert "--resume needs the run folder to continue" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing")]) == 2
    # an estimator of another family asked for on the command line, or the resumed run's own,
    # is refused rather than silently replaced by the command's
    assert main(["grpo", cfg, "--estimator", "rloo"]) == 2
    assert "rlhf-fast rloo" in capsys.readouterr().err
    assert main(["grpo", cfg, "--estimator=gae"]) == 2
    assert "rlhf-fast ppo" in capsys.readouterr().err
    run = tmp_path / "ppo_run"
    run.mkdir()
    (run / "config.yaml").write_text(open(cfg).read().replace("estimator: grpo", "estimator: gae"))
    assert main(["grpo", "--resume", str(run)]) == 2
    assert "that run used estimator 'gae'" in capsys.readouterr().err
    # a resumed run continues in its own folder: another --output_dir is refused, not ignored
    (run / "config.yaml").write_text(open(cfg).read())
    assert main(["grpo", "--resume", str(run), "--output_dir", str(tmp_path / "copy")]) == 2
    assert "a resumed run continues in its own folder" in capsys.readouterr().err
    # eval checks every path and number before loading a model (a missing --reference went to the hub)
    for argv, msg in (
            (["--policy", str(tmp_path), "--reference", str(tmp_path / "nowhere")], "--reference: no such local folder"),
            (["--run", str(tmp_path)], f"--run {tmp_path}: not an RL run folder (no config.yaml)"),
            (["--policy", str(tmp_path), "--n", "0"], "--n must be an int >= 1, got 0"),
            (["--policy", str(tmp_path), "--temperature", "nan"], "--temperature must be a finite number >= 0"),
            (["--policy", str(tmp_path), "--prompts", str(tmp_path)], f"--prompts {tmp_path} is a folder")):
        assert main(["eval", "--reward-fn", "rlhf_fast.algorithms.rule_rewards:letter_a_fraction"] + argv) == 2
        assert msg in capsys.readouterr().err
    # 'none' is the defaults, as for sft and reward
    from rlhf_fast.trainers.rl_cli import build_config

    assert build_config("grpo", ["none", "--steps", "2"]).steps == 2
    assert build_config("ppo", ["-"]).estimator == "gae"


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    """Ctrl-C during a command prints one line (how to continue) instead of a traceback."""
    import rlhf_fast.env_report

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(rlhf_fast.env_report, "run", interrupted)
    assert main(["env"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rlhf-fast env: interrupted;") and "--resume RUN_DIR" in err


def test_rule_rewards():
    assert letter_a_fraction(["p"] * 3, ["aa a", "ab", ""]) == [1.0, 0.5, 0.0]
    assert ascending_digits(["p"] * 3, ["1 2 3", "3 2 1", "x"]) == [1.0, 0.0, 0.0]
    assert ascending_digits(["p"], ["1 2 x"]) == [pytest.approx(2 / 3)]


def test_plot_takes_a_crashed_runs_log_and_skips_never_finite_metrics(tmp_path, capsys):
    """A last record cut short (no newline: a crash, or the run writing now) is left out, not an
    error; a metric that is never finite gets no empty figure; non-UTF-8 names the file."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "reward/x": float("nan")}) + "\n"
                                       + '{"step": 2, "lo')
    assert main(["plot", str(run)]) == 0
    assert sorted(os.listdir(run / "plots")) == ["training.png"]
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": float("nan")}) + "\n")
    assert main(["plot", str(run)]) == 2
    assert "holds no numeric metrics to plot (none with a finite value)" in capsys.readouterr().err
    (run / "metrics.jsonl").write_bytes(b"\xff\xfe{}\n")
    assert main(["plot", str(run)]) == 2
    assert f"{run / 'metrics.jsonl'}: not UTF-8 text" in capsys.readouterr().err


def test_the_commands_estimator_is_set_before_the_config_is_checked(tmp_path):
    """`rlhf-fast ppo` with a GRPO config of group_size 1 is a valid gae run (it failed: "group_size
    must be >= 2 for estimator 'grpo'"); `rlhf-fast rloo` names rloo in that error, not grpo."""
    from rlhf_fast.trainers.rl_cli import build_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"estimator": "grpo", "rollout": {"group_size": 1, "prompts_per_step": 8}}))
    assert build_config("ppo", [str(cfg)]).estimator == "gae"
    with pytest.raises(ValueError, match="group_size must be >= 2 for estimator 'rloo'"):
        build_config("rloo", ["none", "--rollout.group_size", "1"])
    with pytest.raises(ValueError, match="estimator must be one of"):
        build_config("grpo", ["none", "--estimator", "nope"])
    (tmp_path / "bad.yaml").write_text("estimator: nope\n")
    with pytest.raises(ValueError, match="estimator must be one of"):
        build_config("grpo", [str(tmp_path / "bad.yaml")])


def test_model_folders_are_checked_naming_the_key(tmp_path, capsys):
    """A policy folder without a tokenizer, a non-model folder and a causal LM given as
    reward.reward_model are one line naming the config key (they were transformers' own
    "Couldn't instantiate the backend tokenizer", "Unrecognized model" and "num_labels=1, got 2")."""
    from rlhf_fast.models import tiny_causal_lm, train_tokenizer

    tok = train_tokenizer(["hello world"] * 4, 64)
    lm, no_tok = tmp_path / "lm", tmp_path / "no_tok"
    model = tiny_causal_lm(len(tok), hidden_size=16, num_layers=1, num_heads=2)
    model.save_pretrained(lm)
    model.save_pretrained(no_tok)
    tok.save_pretrained(lm)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("hi")
    base = ["grpo", "none", "--steps", "1", "--progress", "false", "--output_dir", str(tmp_path / "run")]
    fn = ["--reward.functions", "rlhf_fast.algorithms.rule_rewards:letter_a_fraction"]
    cases = [(fn + ["--model.policy", str(no_tok)], "model.policy .*: no tokenizer files there .*set model.tokenizer"),
             (fn + ["--model.policy", str(notes)], "model.policy .*: no config.json there"),
             (["--reward.reward_model", str(notes)], "reward.reward_model .*: no config.json there")]
    cases.append((["--reward.reward_model", str(lm)], r"reward.reward_model .* holds a causal LM \(\w+ForCausalLM\), "
                                                      "not a reward model"))
    import re

    capsys.readouterr()  # (the saves' progress bars)
    for extra, msg in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "\n".join(err) and re.search("^rlhf-fast grpo: error: " + msg, err[-1]), err


def test_grpo_cli_evaluates_during_training(tmp_path):
    """``--eval_every`` with a held-out fraction, two answers per prompt and TRL's
    ``vllm_importance_sampling_clip_min`` as ``--ppo.is_cap_min``: eval/* at steps 2 and 3 (the
    last), is_weight/min / max at every step, all saved in config.yaml."""
    run = str(tmp_path / "run")
    cfg = _small(tmp_path)
    assert main(["grpo", cfg, "--output_dir", run, "--eval_every", "2", "--data.eval_fraction", "0.25",
                 "--eval.group_size", "2", "--eval.temperature", "0.7", "--ppo.is_cap", "2.0",
                 "--ppo.is_cap_min", "0.5", "--ppo.is_mode", "token_mask"]) == 0
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(ln) for ln in f]
    assert [r["step"] for r in rows if "eval/reward/total" in r] == [2, 3]
    assert all("eval/reward/letter_a_fraction" in r and "eval/reward_std" in r for r in rows if r["step"] >= 2)
    assert all(0.5 <= r["is_weight/min"] <= r["is_weight/max"] <= 2.0 or r["is_weight/min"] == 0.0 for r in rows)
    with open(os.path.join(run, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    assert saved["eval_every"] == 2 and saved["data"]["eval_fraction"] == 0.25
    assert saved["eval"] == {"group_size": 2, "temperature": 0.7, "max_prompts": None}
    assert saved["ppo"]["is_cap_min"] == 0.5
