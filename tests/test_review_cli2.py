"""Review of the `rlhf-fast` command line (cli.py, rl_cli.py, the offline trainer commands' argument
handling, config loading) against its standard: bad input gets exit code 2 and one readable line
naming the argument and what was expected — never a traceback, a silent wrong result or lost
work; ``--help`` works where the docs say; Ctrl-C is one line saying how to continue.

Each test names the defect it found; all are in-process calls of :func:`rlhf_fast.cli.main` or
of the functions it calls, with tiny configs, and refuse before any model is built."""

import importlib
import os

import pytest
import yaml

from rlhf_fast import cli
from rlhf_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

GRPO_YAML = """estimator: grpo
steps: 1
progress: false
model: {policy: 'tiny:llama', tiny_vocab_size: 96, tiny_hidden_size: 32, tiny_num_layers: 1}
data: {prompts: ['a:', 'b:']}
rollout: {prompts_per_step: 2, group_size: 2, max_new_tokens: 3}
reward: {functions: ['rlhf_fast.algorithms.rule_rewards:letter_a_fraction']}
ppo: {epochs: 1, mini_batch_size: 4, micro_batch_size: 4}
"""

OFFLINE = ["sft", "reward", "prm", "dpo", "kto"]
RL = [name for name, (module, _) in cli.COMMANDS.items() if module == "rlhf_fast.trainers.rl_cli"]


def _run(argv):
    """``main(argv)``'s exit code; argparse's own exits leave through SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code
    except KeyboardInterrupt:  # (escaping, it would stop pytest itself)
        return "KeyboardInterrupt escaped main()"


def _one_line(capsys, argv, code=2):
    """Run ``argv``; assert exit ``code`` and exactly one stderr line, no traceback. Returns it."""
    capsys.readouterr()
    rc = _run(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == code, (rc, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def rl_run(tmp_path):
    """A folder holding an RL run's config.yaml (what ``--resume`` reads), and the config file."""
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(GRPO_YAML)
    run = tmp_path / "run"
    run.mkdir()
    data = yaml.safe_load(GRPO_YAML)
    data["output_dir"] = str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    return str(run), str(cfg)


@pytest.fixture
def no_training(monkeypatch):
    """Building any RL trainer fails the test: a refusal must come before the models load."""
    from rlhf_fast.trainers import rl

    def built(self, *a, **k):
        raise AssertionError("the trainer was built before the refusal")

    monkeypatch.setattr(rl.RLTrainer, "__init__", built)


# ------------------------------------------------------------ --resume with another output_dir

def test_resume_refuses_another_output_dir_in_any_spelling(rl_run, tmp_path, capsys, no_training):
    """Only the exact spelling --output_dir was compared with --resume: --output-dir (as valid) was
    silently ignored and the run trained on in the resumed folder."""
    run, _ = rl_run
    for flag in (["--output-dir", str(tmp_path / "copy")], [f"--output-dir={tmp_path / 'copy'}"]):
        line = _one_line(capsys, ["grpo", "--resume", run] + flag)
        assert "a resumed run continues in its own folder" in line, line


def test_a_config_files_resume_and_another_output_dir_are_refused(rl_run, tmp_path, capsys, no_training):
    """A config file's resume: RUN beside another output_dir trained in RUN, the output_dir ignored."""
    run, _ = rl_run
    both = tmp_path / "both.yaml"
    both.write_text(GRPO_YAML + f"resume: {run}\noutput_dir: {tmp_path / 'copy'}\n")
    line = _one_line(capsys, ["grpo", str(both)])
    assert "output_dir" in line and "a resumed run continues in its own folder" in line, line
    # the same on the command line
    line = _one_line(capsys, ["grpo", str(tmp_path / "grpo.yaml"), "--resume", run, "--output_dir",
                              str(tmp_path / "copy")])
    assert "a resumed run continues in its own folder" in line, line


def test_a_config_files_resume_alone_or_with_its_own_folder_is_accepted(rl_run, tmp_path):
    """(The refusal above only for a different output_dir: the default one, or the run's own, is fine.)"""
    from rlhf_fast.trainers.rl_cli import build_config

    run, _ = rl_run
    alone = tmp_path / "alone.yaml"
    alone.write_text(GRPO_YAML + f"resume: {run}\n")
    assert build_config("grpo", [str(alone)]).resume == run
    same = tmp_path / "same.yaml"
    same.write_text(GRPO_YAML + f"resume: {run}\noutput_dir: {run}\n")
    assert build_config("grpo", [str(same)]).resume == run
    # a copied run folder (config.yaml naming the old output_dir) still resumes with --resume
    copy = tmp_path / "copied"
    copy.mkdir()
    (copy / "config.yaml").write_text((tmp_path / "run" / "config.yaml").read_text())
    assert build_config("grpo", ["--resume", str(copy)]).resume == str(copy)


def test_resume_of_a_file_says_it_is_a_file(tmp_path, capsys):
    """(It said "run folder not found" of a path that is there.)"""
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = _one_line(capsys, ["grpo", "--resume", str(afile)])
    assert line == f"rlhf-fast grpo: error: --resume {afile}: expected a run folder, found a file", line


# ------------------------------------------------------------ output_dir under a file

def test_rl_output_dir_below_a_file_is_named_before_the_models_load(tmp_path, capsys, no_training):
    """It failed with '[Errno 20] Not a directory' (no key named), once the models were built."""
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(GRPO_YAML)
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = _one_line(capsys, ["grpo", str(cfg), "--output_dir", str(afile / "sub")])
    assert "output_dir" in line and f"{afile} is a file" in line, line


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_offline_output_dir_below_a_file_is_named(command, tmp_path, capsys):
    """It failed with '[Errno 20] Not a directory' (no key named)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = _one_line(capsys, [command, "none", "--max_steps", "1", "--output_dir", str(afile / "sub")])
    assert "output_dir" in line and f"{afile} is a file" in line, line
    assert not os.path.exists(afile / "sub")


def test_run_dir_below_a_file_from_python_names_output_dir(tmp_path):
    """The trainers' RunDir (every run folder) names the key too."""
    from rlhf_fast.trainers.common import RunDir

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="output_dir"):
        RunDir(str(afile / "sub"))
    with pytest.raises(ValueError, match="output_dir .*expected a folder, found a file"):
        RunDir(str(afile))


# ------------------------------------------------------------ --help after CONFIG

@pytest.mark.parametrize("command", OFFLINE)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_after_the_config_prints_the_help(command, flag, capsys):
    """`rlhf-fast sft CONFIG --help` failed with "unknown config key 'help'" (the overrides took it),
    where `rlhf-fast grpo CONFIG --help` prints the help."""
    assert _run([command, "none", "--lr", "1e-3", flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rlhf-fast {command}") and "config keys" in out, out[:300]


@pytest.mark.parametrize("command", ["grpo", "distill"])
def test_rl_help_after_the_config_prints_the_help(command, capsys):
    """(The RL commands' behaviour, which the offline ones now share.)"""
    assert _run([command, "none", "--steps", "2", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rlhf-fast") and "config keys" in out


# ------------------------------------------------------------ Ctrl-C

@pytest.mark.parametrize("when", ["import", "arguments"])
def test_ctrl_c_while_the_command_loads_is_one_line(when, monkeypatch, capsys):
    """Ctrl-C while the command's module was imported (torch, transformers: seconds on a loaded
    machine) or its arguments built printed a ~50-line traceback."""
    real = importlib.import_module

    def interrupted_import(name, *a, **k):
        if name == "rlhf_fast.trainers.rl_cli":
            raise KeyboardInterrupt
        return real(name, *a, **k)

    if when == "import":
        monkeypatch.setattr(cli.importlib, "import_module", interrupted_import)
    else:
        from rlhf_fast.trainers import rl_cli

        def interrupted(parser):
            raise KeyboardInterrupt

        monkeypatch.setattr(rl_cli, "add_arguments", interrupted)
    line = _one_line(capsys, ["grpo", "none"], code=130)
    assert line.startswith("rlhf-fast grpo: interrupted"), line


def _interrupted_line(command, monkeypatch, capsys):
    """The line ``rlhf-fast COMMAND`` prints when Ctrl-C falls inside its run()."""
    module = importlib.import_module(cli.COMMANDS[command][0])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "run", interrupted)
    argv = [command] + (["none"] if command in OFFLINE or command in RL else [])
    return _one_line(capsys, argv, code=130)


@pytest.mark.parametrize("command", OFFLINE + RL)
def test_ctrl_c_says_how_this_command_continues(command, monkeypatch, capsys):
    """The Ctrl-C line said how ppo/grpo/rloo and sft/reward/dpo/kto continue, not prm, distill,
    online-dpo, a2po, sdft or sdpo."""
    line = _interrupted_line(command, monkeypatch, capsys)
    hint = line.split("interrupted", 1)[1]
    assert f"rlhf-fast {command}" in hint, line
    if command in RL:
        assert "--resume RUN_DIR" in hint and "the same command" not in hint, line
    else:
        assert "the same command" in hint and "--resume RUN_DIR" not in hint, line


def test_ctrl_c_of_the_demo_says_it_starts_afresh(monkeypatch, capsys):
    """A demo was told it continues from its last checkpoint; a demo starts afresh."""
    line = _interrupted_line("demo", monkeypatch, capsys)
    assert "afresh" in line and "--resume" not in line, line


# ------------------------------------------------------------ rlhf-fast merge names its options

# (the key stays named too: a trainer config's merge section has it; the first option the message names leads)
@pytest.mark.parametrize("argv,flag,key", [
    (["--method", "ties", "--t", "0.3"], "--t", "t_values"),
    (["--target-density", "0.5"], "--target-density", "target_model_density"),
    (["--method", "ties", "--target-density", "2"], "--target-density", "target_model_density"),
    (["--policy-weight", "1", "--target-weight", "-1"], "--policy-weight", "policy_model_weight"),
    (["--method", "slerp", "--t", "nan"], "--t", "t_values"),
    (["--seed", "-1"], "--seed", "seed"),
])
def test_merge_errors_name_the_options(argv, flag, key, tmp_path, capsys):
    """merge's errors named only MergeConfig keys (merge.t_values, 'leave it null'), not the options typed."""
    # (the settings are checked before the folders, which need not exist)
    line = _one_line(capsys, ["merge", str(tmp_path / "p"), str(tmp_path / "t"), str(tmp_path / "o")] + argv)
    assert line.startswith(f"rlhf-fast merge: error: {flag}") and "merge." + key in line and "null" not in line, line
    assert not os.path.exists(tmp_path / "o")


# ------------------------------------------------------------ a reward file that does not import

@pytest.mark.parametrize("as_module", [False, True])
@pytest.mark.parametrize("source,needle", [("def f(:\n", "invalid syntax"),
                                           ("import no_such_module_q\n", "no_such_module_q")])
def test_a_reward_file_that_does_not_import_is_one_line(source, needle, as_module, tmp_path, capsys, monkeypatch):
    """(A reward module path whose import failed was one line already; a file's and a syntax error were
    a traceback.)"""
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(GRPO_YAML)
    name = f"myreward_{abs(hash(source)) % 10**6}{'_m' if as_module else ''}"
    bad = tmp_path / f"{name}.py"
    bad.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = f"{name}:f" if as_module else f"{bad}:f"
    line = _one_line(capsys, ["grpo", str(cfg), "--output_dir", str(tmp_path / "r"), "--reward.functions", spec])
    assert spec in line and needle in line, line


# ------------------------------------------------------------ a command's rollout defaults and a whole section

@pytest.mark.parametrize("command,want", [("a2po", {"group_size": 1, "prompts_per_step": 8}),
                                          ("online-dpo", {"group_size": 2})])
def test_a_whole_rollout_section_keeps_the_commands_defaults(command, want):
    """--rollout '{...}' (a section given whole) dropped the command's own rollout defaults: a2po /
    online-dpo refused the RLConfig group_size 4 nobody asked for."""
    from rlhf_fast.trainers.rl_cli import build_config

    for tokens in (["--rollout", "{max_new_tokens: 5}"], ["--rollout={max_new_tokens: 5}"],
                   ["--rollout.group_size", "3", "--rollout", "{max_new_tokens: 5}"]):
        rollout = build_config(command, ["none"] + tokens).rollout
        assert rollout.max_new_tokens == 5
        assert {k: getattr(rollout, k) for k in want} == want, tokens


@pytest.mark.parametrize("command", ["a2po", "online-dpo"])
def test_what_the_command_line_sets_after_or_inside_a_whole_section_wins(command):
    from rlhf_fast.trainers.rl_cli import build_config

    group, prompts = (1, 16) if command == "a2po" else (2, 8)  # (rows a multiple of ppo.mini_batch_size 8)
    cfg = build_config(command, ["none", "--rollout", f"{{group_size: {group}, prompts_per_step: {prompts}}}"])
    assert (cfg.rollout.group_size, cfg.rollout.prompts_per_step) == (group, prompts)
    cfg = build_config(command, ["none", "--rollout", "{max_new_tokens: 5}", "--rollout.prompts_per_step",
                                 str(prompts)])
    assert (cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens) == (group, prompts, 5)
    # a group size the command refuses, set in the mapping, is the user's: refused, not replaced
    with pytest.raises(ValueError, match="rollout.group_size must be"):
        build_config(command, ["none", "--rollout", "{group_size: 4}"])


def test_no_command_is_a_usage_error_on_stderr(capsys):
    """``rlhf-fast`` alone is a usage error: exit 2 with the usage on stderr (as argparse reports
    one), while ``rlhf-fast --help`` prints it on stdout with exit 0."""
    from rlhf_fast.cli import main

    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "usage" in err.lower()
    assert main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert "usage" in out.lower() and err == ""


def test_rl_output_dir_holding_a_run_is_refused_before_the_models_load(tmp_path, capsys, no_training):
    """A new RL run into a folder that already holds one was refused only once the policy,
    reference and reward models were built; now before, with the same message."""
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(GRPO_YAML)
    held = tmp_path / "run"
    held.mkdir()
    (held / "metrics.jsonl").write_text('{"step": 1}\n')
    line = _one_line(capsys, ["grpo", str(cfg), "--output_dir", str(held)])
    assert "already holds a run" in line and f"--resume {held}" in line, line
