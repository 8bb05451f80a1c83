"""Review of every `rlhf-fast` command against the bad-input standard: bad input gets exit code 2
and one readable line on stderr naming the argument / key and what was expected (no traceback),
never a silent wrong result or lost work, and nothing half-written when refused before training.

The first part is a sample of cases that behaved when the review was made; the second the bugs
it found, each test now checking the fix."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from rlhf_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "tiny:llama:hidden_size=32,num_layers=1,num_heads=2,vocab_size=128"
GRPO_YAML = """estimator: grpo
steps: 1
progress: false
model: {policy: 'tiny:llama', tiny_vocab_size: 96, tiny_hidden_size: 32, tiny_num_layers: 1}
data: {prompts: ['a:', 'b:']}
rollout: {prompts_per_step: 2, group_size: 2, max_new_tokens: 3}
reward: {functions: ['rlhf_fast.algorithms.rule_rewards:letter_a_fraction']}
ppo: {epochs: 1, mini_batch_size: 4, micro_batch_size: 4}
"""


def _run(argv):
    """``main(argv)``'s exit code; argparse's own errors leave through SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _refused(capsys, argv, *needles):
    """Run ``argv``; assert exit 2 and one 'rlhf-fast CMD: error: ...' line holding every needle.
    Returns that line."""
    capsys.readouterr()
    rc = _run(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    prefix = "rlhf-fast: error: " if argv[0] == "grpoo" else f"rlhf-fast {argv[0]}: error: "
    assert lines[0].startswith(prefix), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _names_key(line, key, path):
    """Whether ``line`` names the config key ``key`` other than inside ``path`` (tmp paths may
    hold the key's word)."""
    return re.search(rf"(?<![\w/.-]){re.escape(key)}(?![\w/.-])", line.replace(str(path), "<path>")) is not None


@pytest.fixture
def files(tmp_path):
    """Small data / config files, good and bad, in tmp_path."""
    d = {}

    def put(name, text):
        p = tmp_path / name
        p.write_text(text)
        d[name] = str(p)

    put("sft.yaml", f"model: '{TINY}'\nmax_steps: 1\nbatch_size: 2\neval_fraction: 0\n")
    put("grpo.yaml", GRPO_YAML)
    put("good.jsonl", "".join(json.dumps({"prompt": f"say {x}", "completion": x}) + "\n" for x in "abcd"))
    put("badjson.jsonl", json.dumps({"prompt": "a", "completion": "b"}) + "\n{not json\n")
    put("wrongtype.jsonl", json.dumps({"prompt": 1, "completion": ["x"]}) + "\n")
    put("pairs_bad.jsonl", json.dumps({"prompt": "p", "chosen": 1, "rejected": "x"}) + "\n")
    put("empty.jsonl", "")
    put("list.yaml", "- a\n- b\n")
    put("prompts.txt", "a:\nb:\n")
    (tmp_path / "folder").mkdir()
    d["folder"] = str(tmp_path / "folder")
    d["missing"] = str(tmp_path / "nope.jsonl")
    return d


# ---------------------------------------------------------------- behaves already (a sample)

def test_unknown_command_and_argparse_errors(capsys):
    _refused(capsys, ["grpoo"], "unknown command 'grpoo'")
    _refused(capsys, ["report"], "run_dir")  # argparse: required argument
    _refused(capsys, ["generate", "--model", TINY, "--prompts", "p.txt", "--out", "o.jsonl", "--n", "abc"], "--n")
    _refused(capsys, ["bench", "bogus"], "suite")


@pytest.mark.parametrize("cmd", ["sft", "grpo"])
def test_config_file_shape_and_keys(cmd, files, tmp_path, capsys):
    cfg = files["sft.yaml" if cmd == "sft" else "grpo.yaml"]
    _refused(capsys, [cmd, files["list.yaml"]], "expected a mapping of config keys at the top level, got list")
    _refused(capsys, [cmd, str(tmp_path / "none.yaml")], "config file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    _refused(capsys, [cmd, str(bad)], "invalid YAML")
    _refused(capsys, [cmd, cfg, "--lrr", "1"], "unknown config key 'lrr'")
    steps = "max_steps" if cmd == "sft" else "steps"
    _refused(capsys, [cmd, cfg, f"--{steps}", "abc"], f"config key '{steps}': expected int")
    _refused(capsys, [cmd, cfg, f"--{steps}"], f"--{steps} needs a value")
    _refused(capsys, [cmd, cfg, f"--{steps}", "--seed", "1"], f"--{steps} needs a value")
    _refused(capsys, [cmd, cfg, "lr", "1"], "expected '--key value' pairs")


def test_nested_section_given_a_scalar(files, capsys):
    _refused(capsys, ["grpo", files["grpo.yaml"], "--rollout", "5"], "config key 'rollout': expected a mapping")
    p = os.path.join(os.path.dirname(files["grpo.yaml"]), "scalar.yaml")
    with open(p, "w") as f:
        f.write("rollout: 5\n")
    _refused(capsys, ["grpo", p], "config key 'rollout': expected a mapping")
    _refused(capsys, ["dpo", "none", "--lora", "5"], "config key 'lora'")


def test_repeated_override_last_wins(files, capsys):
    capsys.readouterr()
    assert main(["sft", files["sft.yaml"], "--lr", "1e-3", "--lr", "2e-3", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["lr"] == 2e-3


@pytest.mark.parametrize("argv,needle", [
    (["sft", "{sft}", "--max_steps", "-1"], "max_steps must be an int >= 1"),
    (["sft", "{sft}", "--lr", "0"], "lr must be a finite number > 0"),
    (["sft", "{sft}", "--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (["sft", "{sft}", "--grad_clip", "inf"], "grad_clip must be a finite number"),
    (["grpo", "{grpo}", "--rollout.group_size", "0"], "rollout.group_size must be an int > 0"),
    (["grpo", "{grpo}", "--optim.lr", "inf"], "optim.lr must be a finite number > 0"),
    (["grpo", "{grpo}", "--rollout.temperature", "nan"], "rollout.temperature must be a finite number > 0"),
    (["grpo", "{grpo}", "--kl.coef", "-1"], "kl.coef must be a finite number >= 0"),
    (["dpo", "none", "--beta", "nan"], "beta must be a finite number > 0"),
    (["generate", "--model", TINY, "--prompts", "{prompts.txt}", "--out", "o.jsonl", "--top_p", "nan"], "--top_p"),
    (["eval", "--policy", "{folder}", "--n", "0"], "--n must be an int >= 1"),
])
def test_numbers_out_of_range(argv, needle, files, capsys):
    subst = {"{folder}": files["folder"], "{sft}": files["sft.yaml"], "{grpo}": files["grpo.yaml"],
             "{prompts.txt}": files["prompts.txt"]}
    argv = [subst.get(a, a) for a in argv]
    _refused(capsys, argv, needle)


@pytest.mark.parametrize("cmd,name,needle", [
    ("sft", "badjson.jsonl", "line 2: <line>: invalid JSON"),
    ("sft", "wrongtype.jsonl", "prompt: expected text or a list of chat messages, got int"),
    ("sft", "empty.jsonl", "holds no records"),
    ("dpo", "pairs_bad.jsonl", "chosen: expected text, got int"),
    ("reward", "good.jsonl", "chosen: missing field"),
    ("kto", "empty.jsonl", "holds no records"),
])
def test_offline_data_file_contents(cmd, name, needle, files, tmp_path, capsys):
    _refused(capsys, [cmd, files["sft.yaml"] if cmd == "sft" else "none", "--model", TINY, "--max_steps", "1",
                      "--data", files[name], "--output_dir", str(tmp_path / "out")], needle)


@pytest.mark.parametrize("value,needle", [
    ("missing", "data.prompts_file not found"),
    ("folder", "data.prompts_file {} is a folder"),
    ("empty.jsonl", "holds no prompts"),
    ("badjson.jsonl", "line 2: not a JSON object"),
])
def test_rl_prompts_file(value, needle, files, tmp_path, capsys):
    cfg = tmp_path / "noprompts.yaml"
    cfg.write_text(GRPO_YAML.replace("data: {prompts: ['a:', 'b:']}", "data: {}"))
    out = tmp_path / "run"
    _refused(capsys, ["grpo", str(cfg), "--output_dir", str(out), "--data.prompts_file", files[value]],
             needle.format(files[value]))
    assert not out.exists()  # refused before the run folder is made


def test_model_paths(files, tmp_path, capsys):
    nowhere = str(tmp_path / "nomodel")
    _refused(capsys, ["grpo", files["grpo.yaml"], "--model.policy", nowhere], "model.policy: no such path")
    _refused(capsys, ["grpo", files["grpo.yaml"], "--model.policy", files["folder"]], "no config.json there")
    _refused(capsys, ["sft", files["sft.yaml"], "--model", files["folder"]], "no config.json there")
    _refused(capsys, ["generate", "--model", nowhere, "--prompts", files["prompts.txt"], "--out",
                      str(tmp_path / "g.jsonl")], nowhere)
    assert not (tmp_path / "g.jsonl").exists()
    _refused(capsys, ["kto", "none", "--ref_model", nowhere], "ref_model")
    _refused(capsys, ["grpo", files["grpo.yaml"], "--reward.reward_model", nowhere], "reward.reward_model")
    _refused(capsys, ["grpo", files["grpo.yaml"], "--reward.functions", "nosuchmod:f"], "nosuchmod")


def test_report_plot_eval_generate_bench_wrong_runs(files, tmp_path, capsys):
    nowhere = str(tmp_path / "nothere")
    _refused(capsys, ["report", nowhere], "no such folder")
    _refused(capsys, ["report", files["folder"]], "not a run folder (no config.yaml")
    _refused(capsys, ["report", files["good.jsonl"]], "expected a run folder, found a file")
    _refused(capsys, ["plot", nowhere], "no metrics.jsonl")
    _refused(capsys, ["eval", "--run", nowhere], "--run: no such local folder")
    _refused(capsys, ["eval", "--run", files["folder"]], "not an RL run folder")
    _refused(capsys, ["generate", "--model", TINY, "--prompts", files["missing"], "--out", str(tmp_path / "g.jsonl")],
             "--prompts not found")
    _refused(capsys, ["generate", "--model", TINY, "--prompts", files["prompts.txt"], "--out", files["folder"]],
             "--out", "expected a file, found a folder")
    _refused(capsys, ["label", files["empty.jsonl"], "--out", str(tmp_path / "l.jsonl")], "no items to label")
    import torch
    if not torch.cuda.is_available():
        _refused(capsys, ["bench", "ops", "--device", "cuda"], "--device cuda")


@pytest.fixture
def grpo_run(files, tmp_path):
    run = str(tmp_path / "grpo_run")
    assert main(["grpo", files["grpo.yaml"], "--output_dir", run]) == 0
    return run


def test_resume_wrong_or_missing_run(grpo_run, files, tmp_path, capsys):
    _refused(capsys, ["grpo", files["grpo.yaml"], "--resume"], "--resume needs the run folder")
    _refused(capsys, ["grpo", "--resume", str(tmp_path / "nothere")], "--resume: run folder not found")
    _refused(capsys, ["rloo", "--resume", grpo_run], f"--resume {grpo_run}: that run used estimator 'grpo'")
    _refused(capsys, ["ppo", "--resume", grpo_run], "resume it with rlhf-fast grpo")
    _refused(capsys, ["grpo", files["grpo.yaml"], "--output_dir", grpo_run],
             f"output_dir {grpo_run} already holds a run")


def test_crash_mid_run_keeps_last_checkpoint(files, tmp_path, capsys, monkeypatch):
    """A reward function raising on step 2: one readable line naming it, step 1's checkpoint
    complete, and the run continues from it once the function is fixed."""
    mod = tmp_path / "review_boom_rewards.py"
    mod.write_text("calls = [0]\n"
                   "def boom(prompts, completions, **kw):\n"
                   "    calls[0] += 1\n"
                   "    if calls[0] >= 2:\n"
                   "        raise RuntimeError('reward exploded')\n"
                   "    return [0.5] * len(completions)\n"
                   "def fine(prompts, completions, **kw):\n"
                   "    return [0.5] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = str(tmp_path / "crash")
    _refused(capsys, ["grpo", files["grpo.yaml"], "--steps", "3", "--save_every", "1", "--output_dir", run,
                      "--reward.functions", "review_boom_rewards:boom"], "'boom' raised RuntimeError: reward exploded")
    ck = os.path.join(run, "checkpoints")
    assert sorted(os.listdir(ck)) == ["step_00000001"]
    assert os.path.exists(os.path.join(ck, "step_00000001", "COMPLETE"))
    assert main(["grpo", "--resume", run, "--reward.functions", "review_boom_rewards:fine"]) == 0
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert [json.loads(ln)["step"] for ln in f] == [1, 2, 3]


@pytest.mark.parametrize("args,needle", [
    (["grpoo"], "unknown command"),
    (["sft", "{list.yaml}"], "expected a mapping of config keys"),
])
def test_console_script_one_line(args, needle, files):
    exe = os.path.join(os.path.dirname(sys.executable), "rlhf-fast")
    if not os.path.exists(exe):
        pytest.skip("rlhf-fast console script not installed")
    r = subprocess.run([exe] + [a.replace("{list.yaml}", files["list.yaml"]) for a in args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


# ---------------------------------------------------------------- bugs found (fixed)

@pytest.fixture
def sft_run(files, tmp_path):
    run = str(tmp_path / "sft_run")
    assert main(["sft", files["sft.yaml"], "--output_dir", run]) == 0
    return run


def _snapshot(folder):
    """{relative path: (bytes, mtime_ns)} of every file under ``folder``."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = (f.read(), os.stat(p).st_mtime_ns)
    return out


@pytest.mark.parametrize("cmd", ["dpo", "kto", "reward"])
def test_offline_trainer_into_a_run_of_another_kind(cmd, sft_run, capsys):
    before = _snapshot(sft_run)
    assert {"config.yaml", "metrics.jsonl"} <= set(before) and any(k.startswith("final") for k in before)
    line = _refused(capsys, [cmd, "none", "--model", TINY, "--max_steps", "2", "--batch_size", "2",
                             "--output_dir", sft_run], "output_dir", "rlhf-fast sft", f"rlhf-fast {cmd};")
    assert _snapshot(sft_run) == before, line  # the SFT run is left as it was, byte for byte


def test_sft_into_a_dpo_run_and_same_kind_resumes(files, tmp_path, capsys):
    """The kind check both ways: sft into a DPO run is refused; DPO (a CPO loss is a DPO config too)
    continues its own run."""
    run = str(tmp_path / "dpo_run")
    dpo = ["dpo", "none", "--model", TINY, "--batch_size", "2", "--eval_fraction", "0", "--output_dir", run]
    assert main(dpo + ["--max_steps", "1"]) == 0
    before = _snapshot(run)
    _refused(capsys, ["sft", files["sft.yaml"], "--max_steps", "2", "--output_dir", run], "rlhf-fast dpo")
    assert _snapshot(run) == before
    assert main(dpo + ["--max_steps", "2", "--loss_type", "cpo"]) == 0
    with open(os.path.join(run, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    assert saved["max_steps"] == 2 and saved["loss_type"] == "cpo"
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_00000001", "step_00000002"]


def test_old_run_still_resumes_into_its_own_trainer(sft_run, files, capsys):
    """A run made before the SFT config had completion_only_loss / assistant_only_loss (its first
    version had packing) is still an SFT run: sft continues it, dpo refuses it."""
    p = os.path.join(sft_run, "config.yaml")
    with open(p) as f:
        cfg = yaml.safe_load(f)
    for k in ("completion_only_loss", "assistant_only_loss"):
        del cfg[k]
    with open(p, "w") as f:
        yaml.safe_dump(cfg, f)
    _refused(capsys, ["dpo", "none", "--model", TINY, "--max_steps", "2", "--output_dir", sft_run], "rlhf-fast sft")
    assert main(["sft", files["sft.yaml"], "--max_steps", "2", "--output_dir", sft_run]) == 0
    with open(os.path.join(sft_run, "metrics.jsonl")) as f:
        assert [json.loads(ln)["step"] for ln in f if "loss" in json.loads(ln)] == [1, 2]


def test_saved_run_kind(sft_run, files, tmp_path):
    from rlhf_fast.trainers.config import saved_run_kind

    assert saved_run_kind(sft_run) == "sft"
    assert saved_run_kind(files["folder"]) is None  # no config.yaml
    assert saved_run_kind(str(tmp_path / "nothere")) is None
    for text in ("a: [1,\n", "- a\n", "model: x\nlr: 1\n"):  # no YAML, no mapping, no rlhf-fast config
        (tmp_path / "folder" / "config.yaml").write_text(text)
        assert saved_run_kind(files["folder"]) is None, text


def test_rl_resume_of_an_sft_run(sft_run, capsys):
    line = _refused(capsys, ["grpo", "--resume", sft_run])
    assert "--resume" in line and "sft" in line.replace(sft_run, "")


def test_eval_run_of_an_sft_run(sft_run, capsys):
    line = _refused(capsys, ["eval", "--run", sft_run])
    assert "--run" in line and "--policy" in line


@pytest.mark.parametrize("cmd,key", [("sft", "data"), ("dpo", "data"), ("reward", "eval_data"), ("kto", "data")])
def test_data_path_is_a_folder(cmd, key, files, tmp_path, capsys):
    line = _refused(capsys, [cmd, files["sft.yaml"] if cmd == "sft" else "none", "--model", TINY, "--max_steps", "1",
                             f"--{key}", files["folder"], "--output_dir", str(tmp_path / "out")])
    assert "folder" in line.replace(files["folder"], "<path>") and _names_key(line, key, files["folder"]), line


@pytest.mark.parametrize("cmd", ["sft", "dpo"])
def test_missing_data_file_names_the_key(cmd, files, tmp_path, capsys):
    line = _refused(capsys, [cmd, files["sft.yaml"] if cmd == "sft" else "none", "--model", TINY, "--max_steps", "1",
                             "--data", files["missing"], "--output_dir", str(tmp_path / "out")])
    assert _names_key(line, "data", files["missing"]) and "feedback" not in line, line


def test_label_pairs_is_a_folder(files, tmp_path, capsys):
    line = _refused(capsys, ["label", files["folder"], "--out", str(tmp_path / "l.jsonl")])
    assert "folder" in line.replace(files["folder"], "<path>"), line


@pytest.mark.parametrize("cmd", ["sft", "dpo", "kto", "reward"])
@pytest.mark.parametrize("bad", [["--data", "{missing}"], ["--model", "{folder}"]])
def test_refused_offline_run_leaves_no_folder(cmd, bad, files, tmp_path, capsys):
    out = tmp_path / "out"
    _refused(capsys, [cmd, files["sft.yaml"] if cmd == "sft" else "none", "--output_dir", str(out)]
             + [b.format(**files) for b in bad])
    assert not out.exists(), os.listdir(out)


def test_refused_run_keeps_the_log_of_an_interrupted_one(files, tmp_path, capsys):
    """A folder holding only the log of a run stopped before its first checkpoint is started over
    (resume: true), but a start refused before training leaves that log and config.yaml alone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / "config.yaml").write_text(open(files["sft.yaml"]).read())
    before = _snapshot(str(out))
    _refused(capsys, ["sft", files["sft.yaml"], "--output_dir", str(out), "--data", files["missing"]], "data")
    assert _snapshot(str(out)) == before
    assert main(["sft", files["sft.yaml"], "--output_dir", str(out), "--max_steps", "2"]) == 0
    with open(out / "metrics.jsonl") as f:
        recs = [json.loads(ln) for ln in f]
    assert {"step": 1, "loss": 1.0} not in recs and recs[-1]["step"] == 2  # the old log dropped, as before
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 2


def test_config_path_is_a_folder(files, capsys):
    line = _refused(capsys, ["sft", files["folder"]])
    assert "folder" in line.replace(files["folder"], "<path>"), line


@pytest.mark.parametrize("cmd", ["sft", "grpo"])
def test_empty_output_dir_names_the_key(cmd, files, capsys):
    _refused(capsys, [cmd, files[f"{cmd}.yaml"], "--output_dir", "", "--print-config"],
             "output_dir must be a non-empty path")


@pytest.mark.parametrize("cls", ["sft.SFTConfig", "reward.RewardConfig", "dpo.DPOConfig", "kto.KTOConfig"])
def test_empty_output_dir_in_python(cls):
    import importlib

    mod, name = cls.split(".")
    with pytest.raises(ValueError, match="^output_dir must be a non-empty path, got ''$"):
        getattr(importlib.import_module(f"rlhf_fast.trainers.{mod}"), name)(output_dir="")


def test_duplicate_key_in_config_file(files, tmp_path, capsys):
    p = tmp_path / "dup.yaml"
    p.write_text(GRPO_YAML + "steps: 3\n")
    _refused(capsys, ["grpo", str(p), "--print-config"], "steps")


def test_duplicate_keys_nested_and_merges(tmp_path):
    from rlhf_fast.trainers.config import DuplicateKeyError, load_config, unique_key_loader
    from rlhf_fast.trainers.rl_config import RLConfig

    p = tmp_path / "c.yaml"
    p.write_text(GRPO_YAML.replace("group_size: 2,", "group_size: 2, group_size: 4,"))
    with pytest.raises(ValueError, match=r"c.yaml: key 'group_size' is given twice \(lines 6 and 6\); keep one$"):
        load_config(RLConfig, str(p))
    # a key beside a merge overrides the merged one, as YAML has it: no duplicate
    text = "base: &b {x: 1, y: 2}\nc: {<<: *b, x: 3}\n"
    assert yaml.load(text, Loader=unique_key_loader()) == {"base": {"x": 1, "y": 2}, "c": {"x": 3, "y": 2}}
    with pytest.raises(DuplicateKeyError, match="'x' is given twice"):
        yaml.load(text.replace("x: 3}", "x: 3, x: 4}"), Loader=unique_key_loader())
    assert yaml.load("a: 1\nb: {a: 2}\n", Loader=unique_key_loader()) == {"a": 1, "b": {"a": 2}}


def test_missing_input_files_name_key_or_path(files, tmp_path, capsys):
    line = _refused(capsys, ["label", files["missing"], "--out", str(tmp_path / "l.jsonl")], files["missing"])
    assert "no such file" in line and "feedback" not in line
    _refused(capsys, ["reward", "none", "--model", TINY, "--eval_data", files["missing"], "--output_dir",
                      str(tmp_path / "out")], f"eval_data {files['missing']}: no such file")


def test_rl_config_refuses_an_empty_output_dir_in_python():
    """RLConfig(output_dir="") from Python names the key, as the offline configs do."""
    from rlhf_fast.trainers.rl_config import RLConfig

    with pytest.raises(ValueError, match="output_dir must be a non-empty path"):
        RLConfig(output_dir="")
