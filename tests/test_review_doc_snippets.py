"""What a user copies from README.md, docs/*.md, benchmarks/README.md and examples/*.yaml works as
written, beyond what test_docs_snippets / test_docs_from_trl / test_docs_kernels_guide /
test_docs_performance / test_review_docs_config check:

* every command the docs show (``bash`` blocks, backticked ``rlhf-fast ...`` / ``python -m
  rlhf_fast...`` / ``torchrun ... -m rlhf_fast.cli ...`` in the prose, the examples' header
  comments) names options the command accepts, with values it accepts (config commands through
  ``--print-config``, nothing trained; the others through their argparse parser, nothing run);
* the YAML blocks of README.md, docs/distributed.md and docs/rlvr.md load with the command their
  section names; docs/rlvr.md's reward function block works as ``reward.functions`` says;
* every backticked ``rlhf_fast.x.y`` name resolves, every backticked call of our trainer / config
  classes takes the keywords it shows, every file path the docs name exists;
* docs/from_trl.md's TRL blocks import and call TRL as written (the installed TRL);
* examples/sft.yaml and examples/reward.yaml, which no other test runs as they are, train a step.

Skipped as not runnable here: the ``torchrun`` / Slurm launches themselves (checked as commands
only), the TRL blocks' runs (they name Hub models), GPU-only benchmark runs (parsed only)."""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import io
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/distributed.md", "docs/performance.md", "docs/rlvr.md",
        "docs/kernels_in_your_trainer.md", "docs/from_trl.md", "benchmarks/README.md"]
CONFIG_COMMANDS = {"sft", "reward", "prm", "dpo", "kto", "ppo", "grpo", "rloo", "distill", "online-dpo", "a2po",
                   "sdft", "sdpo"}


def _text(doc: str) -> str:
    return (ROOT / doc).read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """``text`` with its fenced blocks blanked (line numbers kept), so backticks pair in the prose."""
    return re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.DOTALL)


def _line(text: str, pos: int) -> int:
    return text[:pos].count("\n") + 1


# ----------------------------------------------------------------------------- commands


def _bash_commands(text: str):
    """[(line, command)] of the ``bash`` blocks, continuation lines joined."""
    out = []
    for m in re.finditer(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.DOTALL):
        start, joined, first = _line(text, m.start()) + 1, "", None
        for k, line in enumerate(m.group(1).splitlines()):
            first = start + k if first is None else first
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            out.append((first, joined + line))
            joined, first = "", None
    return out


def _inline_commands(text: str):
    """[(line, command)] of the prose's backticked commands; a benchmark module named alone with its
    options (`bench_rollout.py --device cpu ...`) is its ``python -m rlhf_fast.benchmarks.`` run."""
    prose = _prose(text)
    found = [(_line(prose, m.start()), " ".join(m.group(1).split()))
             for m in re.finditer(r"`((?:rlhf-fast|python -m (?:rlhf_fast|benchmarks)|torchrun)\b[^`]*)`", prose)]
    found += [(_line(prose, m.start()), f"python -m rlhf_fast.benchmarks.{m.group(1)} " + " ".join(m.group(2).split()))
              for m in re.finditer(r"`(bench_\w+)(?:\.py)? (--[^`]*)`", prose)]
    return found


def _example_header_commands(path: Path):
    return [(n, line.lstrip("# ").strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if line.startswith("#") and "rlhf-fast " in line]


# usage placeholders → a value of the right shape
PLACEHOLDERS = {"N": "2", "K": "2", "DIR": "d", "FILE": "f.jsonl", "PATH": "p", "P": "p", "F": "f.jsonl",
                "RUN_DIR": "r", "OUT": "o", "NAME": "a", "POLICY": "a", "TARGET": "b", "PAIRS.jsonl": "p.jsonl",
                "LABELS.jsonl": "l.jsonl", "OUT.jsonl": "o.jsonl", "CONFIG.yaml": "CONFIG.yaml"}


def _argvs(command: str):
    """The ``rlhf-fast`` / ``python -m`` argvs of one shell line (``&&``-joined commands split):
    comments dropped, a usage's ``[optional]`` parts taken, ``a|b`` as its first choice,
    ``--[no-]x`` as ``--x``, placeholders filled; ``torchrun ... -m rlhf_fast.cli X`` is
    ``rlhf-fast X``; ``python -m M`` is ``["python -m", M, ...]`` for our modules only."""
    command = re.sub(r"(^|\s)#.*$", "", command).replace("\\|", "|").replace("…", "...")
    command = re.sub(r"--\[no-\]", "--", command)
    command = re.sub(r"\[([^\[\]]*)\]", r"\1", command)
    out = []
    for part in command.split("&&"):
        try:
            toks = shlex.split(part)
        except ValueError:
            continue
        toks = [t.split("|")[0] if "|" in t and not t.startswith("-") else t for t in toks]
        toks = [PLACEHOLDERS.get(t, t) for t in toks if t != "..."]
        for generic in ("--section.key", "--key"):  # a usage's `--key value ...`
            if generic in toks:
                i = toks.index(generic)
                del toks[i:i + 2]
        if "-m" in toks and toks[0] in ("torchrun", "srun", "python"):
            i = toks.index("-m")
            module = toks[i + 1] if i + 1 < len(toks) else ""
            if module == "rlhf_fast.cli":
                out.append(["rlhf-fast", *toks[i + 2:]])
            elif toks[0] == "python" and module.startswith(("rlhf_fast.", "benchmarks.")):
                out.append(["python -m", re.sub(r"^benchmarks\.", "rlhf_fast.benchmarks.", module), *toks[i + 2:]])
        elif toks[:1] == ["rlhf-fast"] and len(toks) > 1:
            out.append(toks)
    return out


def _alternatives(command: str):
    """A usage's alternatives, each in some command: the k-th command takes the k-th choice of
    every `a|b|c` (its first where it has fewer) — `rlhf-fast ppo|grpo|rloo CONFIG.yaml`,
    `rlhf-fast bench ops|e2e|all`, `--method linear|ties|dare_ties|slerp`, `--device cpu|cuda`."""
    pattern = r"(?<![\w-])([\w.-]+(?:\\?\|[\w.-]+)+)"
    command = re.sub(r"(^|\s)#.*$", "", command)  # (a comment's `|` is prose)
    choices = [re.split(r"\\?\|", m.group(1)) for m in re.finditer(pattern, command)]
    if not choices:
        return [command]
    out = []
    for k in range(max(len(c) for c in choices)):
        picks = iter([c[k] if k < len(c) else c[0] for c in choices])
        out.append(re.sub(pattern, lambda m, picks=picks: next(picks), command))
    return out


def _documented_commands():
    """[(where, argv, complete)]: bash blocks and the examples' headers are complete commands;
    backticked ones in the prose may be fragments (``rlhf-fast eval --run``)."""
    found = []
    for doc in DOCS:
        text = _text(doc)
        for complete, items in ((True, _bash_commands(text)), (False, _inline_commands(text))):
            for line, command in items:
                found += [(f"{doc}:{line}", argv, complete) for alt in _alternatives(command) for argv in _argvs(alt)]
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for line, command in _example_header_commands(path):
            found += [(f"examples/{path.name}:{line}", argv, True) for argv in _argvs(command)]
    return found


def _error_line(err: io.StringIO) -> str:
    """The error line of a command's stderr (argparse prints its usage first), shortened."""
    lines = err.getvalue().strip().splitlines() or [""]
    return lines[-1][:300]


class _Parsed(Exception):
    """Raised after a module's argparse parser accepted its arguments: nothing runs."""


def _run_module_parse(module: str, args, monkeypatch) -> str:
    """'' when ``python -m module args`` gets past its argument parser, else the parser's error."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, a=None, namespace=None):
        original(self, a, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [module, *args])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is imported already
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    except _Parsed:
        return ""
    except SystemExit as e:
        return f"exit {e.code}: {_error_line(err)}"
    finally:
        monkeypatch.undo()
    return "the module never parsed its arguments"


def _check_command(argv, monkeypatch) -> str:
    """'' when the command accepts ``argv``'s options and values, else why not."""
    from rlhf_fast import cli

    if argv[0] == "python -m":
        return _run_module_parse(argv[1], argv[2:], monkeypatch)
    name, rest = argv[1], argv[2:]
    if name not in cli.COMMANDS:
        return f"no command {name!r}"
    if name in CONFIG_COMMANDS:
        # the config file: an example that exists, else the defaults (a placeholder or the user's file)
        if rest and not rest[0].startswith("-"):
            rest = rest[1:] if not (ROOT / rest[0]).is_file() else [str(ROOT / rest[0]), *rest[1:]]
            rest = rest if rest[:1] and not rest[0].startswith("-") else ["none", *rest]
        else:
            rest = ["none", *rest]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli.main([name, *rest, "--print-config"])
            except SystemExit as e:
                code = e.code
        return "" if code == 0 else f"exit {code}: {_error_line(err)}"
    module = importlib.import_module(cli.COMMANDS[name][0])
    parser = cli.ArgumentParser(prog=f"rlhf-fast {name}")
    module.add_arguments(parser)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(rest)
    except SystemExit as e:
        return f"exit {e.code}: {_error_line(err)}"
    return ""


# what a fragment of a command in the prose may lack (its values, its required arguments), and the
# checks a placeholder config cannot pass (`--distill.objective iw_opd` wants the config's ppo keys)
_FRAGMENT_ERRORS = ("expected one argument", "the following arguments are required", "needs a value",
                    "takes one optimizer step per rollout")
# what no command line in a doc can satisfy here: the run folder an earlier command would have made
_ANY_ERRORS = ("--resume: run folder not found",)


def test_the_command_extraction_finds_the_commands():
    found = _documented_commands()
    wheres = {w.split(":")[0] for w, _, _ in found}
    assert {"README.md", "docs/distributed.md", "docs/rlvr.md", "docs/performance.md", "benchmarks/README.md",
            "examples/grpo.yaml"} <= wheres, wheres
    assert len(found) > 100
    assert ["rlhf-fast", "sft", "examples/sft.yaml", "--distributed.strategy", "fsdp2"] in [a for _, a, _ in found]
    assert any(a[:2] == ["python -m", "rlhf_fast.benchmarks.bench_cpu_ops"] and "--compile" in a for _, a, _ in found)
    assert any(a[:2] == ["python -m", "rlhf_fast.benchmarks.bench_rollout"] and "--skip-generate" in a for _, a, _ in found)
    readme = [a[:3] for w, a, _ in found if w.startswith("README.md:")]
    assert ["rlhf-fast", "rloo", "CONFIG.yaml"] in readme and ["rlhf-fast", "bench", "all"] in readme


@pytest.mark.parametrize("doc", [*DOCS, "examples"])
def test_every_documented_command_takes_its_options(doc, monkeypatch, tmp_path):
    """A renamed option or config key, or a value the command refuses, in any command a doc shows."""
    monkeypatch.chdir(tmp_path)  # (nothing is written; a relative path the doc names is not there)
    bad = []
    for where, argv, complete in _documented_commands():
        if not where.startswith(doc + ":") and not (doc == "examples" and where.startswith("examples/")):
            continue
        why = _check_command(argv, monkeypatch)
        if why and not any(e in why for e in _ANY_ERRORS) and (complete or not any(e in why for e in _FRAGMENT_ERRORS)):
            bad.append(f"{where}: {' '.join(argv)}\n    {why}")
    assert not bad, "\n".join(bad)


def test_the_command_check_catches_a_wrong_option(monkeypatch):
    """The guard against a checker that accepts anything."""
    assert _check_command(["rlhf-fast", "eval", "--policy", "p", "--prompts", "f", "--pass-k", "1"], monkeypatch) == ""
    assert "unrecognized" in _check_command(["rlhf-fast", "eval", "--policy", "p", "--prompts", "f", "--passk", "1"],
                                            monkeypatch)
    assert "distill.betta" in _check_command(["rlhf-fast", "distill", "none", "--distill.betta", "0.5"], monkeypatch)
    assert _check_command(["python -m", "rlhf_fast.benchmarks.bench_packing", "--prompt", "8"], monkeypatch) == ""
    assert "unrecognized" in _check_command(["python -m", "rlhf_fast.benchmarks.bench_packing", "--prompts", "8"],
                                            monkeypatch)


# ----------------------------------------------------------------------------- YAML blocks


def _yaml_blocks(doc: str):
    text = _text(doc)
    return [(_line(text, m.start()), m.group(1)) for m in re.finditer(r"```yaml\n(.*?)```", text, flags=re.DOTALL)]


def _offline_classes():
    from rlhf_fast.trainers.dpo import DPOConfig
    from rlhf_fast.trainers.kto import KTOConfig
    from rlhf_fast.trainers.prm import PRMConfig
    from rlhf_fast.trainers.reward import RewardConfig
    from rlhf_fast.trainers.sft import SFTConfig

    return {"sft": SFTConfig, "reward": RewardConfig, "prm": PRMConfig, "dpo": DPOConfig, "kto": KTOConfig}


def test_readme_yaml_block_loads_with_the_command_it_names(tmp_path):
    """README's one YAML block is the config of the `rlhf-fast ppo prm_rl.yaml` run the text
    describes just above it: REINFORCE++ with a PRM and three named reward functions."""
    from rlhf_fast.algorithms.rewards import load_callable
    from rlhf_fast.trainers.rl_cli import build_config

    text = _text("README.md")
    blocks = _yaml_blocks("README.md")
    assert len(blocks) == 1, "a new README YAML block: check it here"
    line, src = blocks[0]
    before = _prose(text)[: sum(len(x) + 1 for x in text.splitlines()[: line - 1])]
    command, name = re.findall(r"`rlhf-fast ([a-z0-9-]+) ([\w.-]+\.yaml)`", before)[-1]
    path = tmp_path / name
    path.write_text(src, encoding="utf-8")
    cfg = build_config(command, [str(path)])
    assert cfg.estimator == yaml.safe_load(src)["estimator"] == "reinforce++"
    assert cfg.reward.process_model == "runs/prm/final" and len(cfg.reward.weights) == len(cfg.reward.functions)
    for spec in cfg.reward.functions:
        assert callable(load_callable(spec))


def test_distributed_yaml_block_loads_into_every_trainer(tmp_path):
    """docs/distributed.md: "pick a strategy in the `distributed` section of the config" — of
    every trainer's config (its block is the same for all)."""
    from rlhf_fast.trainers.config import load_config
    from rlhf_fast.trainers.rl_config import RLConfig

    blocks = _yaml_blocks("docs/distributed.md")
    assert len(blocks) == 1
    path = tmp_path / "distributed.yaml"
    path.write_text(blocks[0][1], encoding="utf-8")
    for cls in (RLConfig, *_offline_classes().values()):
        cfg = load_config(cls, str(path))
        assert cfg.distributed.strategy == "fsdp2" and cfg.distributed.mixed_precision is True, cls.__name__


def test_rlvr_policy_loss_block_and_gspo_sentence_load_into_the_dapo_config(tmp_path):
    """docs/rlvr.md's second YAML block (cispo, entropy quantile, off-policy mask) and its GSPO
    and reference-sync sentences, each applied to the guide's DAPO-style config, load with
    `rlhf-fast grpo` (test_docs_snippets trains the DAPO config itself)."""
    from rlhf_fast.trainers.rl_cli import build_config

    blocks = [src for _, src in _yaml_blocks("docs/rlvr.md")]
    assert len(blocks) == 2
    text = " ".join(_text("docs/rlvr.md").split())
    gspo = re.search(r"add `importance_sampling_level: sequence` under `ppo` with `clip_low: ([\d.]+)` and "
                     r"`clip_high: ([\d.]+)`", text)
    assert gspo and "`kl.ref_sync_steps` (and `kl.ref_sync_alpha`)" in text
    variants = {"policy_loss": {"ppo": yaml.safe_load(blocks[1])["ppo"]},
                "gspo": {"ppo": {"importance_sampling_level": "sequence", "clip_low": float(gspo.group(1)),
                                 "clip_high": float(gspo.group(2))}},
                "ref_sync": {"kl": {"coef": 0.01, "ref_sync_steps": 10, "ref_sync_alpha": 0.6}}}
    for name, change in variants.items():
        cfg = yaml.safe_load(blocks[0])
        for section, keys in change.items():
            cfg[section].update(keys)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        built = build_config("grpo", [str(path)])
        for section, keys in change.items():
            for k, v in keys.items():
                assert getattr(getattr(built, section), k) == v, (name, section, k)


def test_rlvr_reward_function_block_works_as_a_file_reward(tmp_path):
    """docs/rlvr.md's `correct` function, saved as `my_rewards.py` and given as
    `reward.functions: ["my_rewards.py:correct"]`, scores the guide's records (the `answer`
    field by name); a function asking for a field the prompts lack stops with its name."""
    from rlhf_fast.algorithms.rewards import CallableReward, RewardContext, RewardError, load_callable

    text = _text("docs/rlvr.md")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 1
    spec = re.search(r'`reward\.functions: \["([\w.]+\.py):(\w+)"\]`', text)
    assert spec, "the guide names the file and function of its block"
    (tmp_path / spec.group(1)).write_text(blocks[0], encoding="utf-8")
    records = [yaml.safe_load(line) for line in re.findall(r"```json\n(.*?)```", text, flags=re.DOTALL)[0].splitlines()]
    fn = CallableReward(load_callable(f"{tmp_path / spec.group(1)}:{spec.group(2)}"))
    ctx = RewardContext(fields={"answer": [r["answer"] for r in records]})
    assert fn([r["prompt"] for r in records], ["7", "the result is \\boxed{35}"], ctx) == [1.0, 0.0]
    with pytest.raises(RewardError, match="answer"):
        fn(["p"], ["c"], RewardContext(fields={"solution": ["7"]}))


# ----------------------------------------------------------------------------- Python names and calls


def _backticked(doc: str):
    prose = _prose(_text(doc))
    return [(_line(prose, m.start()), m.group(1)) for m in re.finditer(r"`([^`\n]+)`", prose)]


def _resolve(dotted: str) -> str:
    """'' when ``dotted`` is an importable module or an attribute path from one, else why not."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for j, part in enumerate(parts[i:]):
            if not hasattr(obj, part):
                return f"{'.'.join(parts[:i + j])} has no {part!r}"
            obj = getattr(obj, part)
        return ""
    return "no such module"


def test_every_backticked_rlhf_fast_name_resolves():
    bad, n = [], 0
    for doc in DOCS:
        for line, item in _backticked(doc):
            for name in re.findall(r"\b(rlhf_fast(?:\.[A-Za-z_]\w*)+)", item):
                if name == "rlhf_fast._C":  # the compiled extension: loaded by rlhf_fast.ops, not imported
                    continue
                n += 1
                why = _resolve(name)
                if why:
                    bad.append(f"{doc}:{line}: `{name}`: {why}")
    assert n > 40 and not bad, "\n".join(bad)


# the classes whose calls the docs show in backticks, and where they live
OUR_CLASSES = {
    "RLTrainer": "rlhf_fast.trainers.rl", "RLConfig": "rlhf_fast.trainers.rl_config",
    "DistillConfig": "rlhf_fast.trainers.rl_config", "DistillationTrainer": "rlhf_fast.trainers.distill",
    "OnlineDPOTrainer": "rlhf_fast.trainers.online_dpo", "A2POTrainer": "rlhf_fast.trainers.a2po",
    "SDFTTrainer": "rlhf_fast.trainers.sdft", "SDPOTrainer": "rlhf_fast.trainers.sdpo",
    "SFTTrainer": "rlhf_fast.trainers.sft", "SFTConfig": "rlhf_fast.trainers.sft",
    "RewardTrainer": "rlhf_fast.trainers.reward", "RewardConfig": "rlhf_fast.trainers.reward",
    "PRMTrainer": "rlhf_fast.trainers.prm", "PRMConfig": "rlhf_fast.trainers.prm",
    "DPOTrainer": "rlhf_fast.trainers.dpo", "DPOConfig": "rlhf_fast.trainers.dpo",
    "KTOTrainer": "rlhf_fast.trainers.kto", "KTOConfig": "rlhf_fast.trainers.kto",
}


def _parameters(cls) -> set:
    """The keyword names ``cls(...)`` takes; a subclass's ``**kwargs`` are its base's (RLTrainer)."""
    names = set()
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def _documented_calls():
    """[(where, source, class, positional count, keywords)] of backticked calls of OUR_CLASSES
    (``...`` / ``[...]`` / ``{...}`` read as a value; ``a|b`` alternatives as the first)."""
    out = []
    for doc in DOCS:
        for line, item in _backticked(doc):
            src = re.sub(r"\[\.\.\.\]|\{\.\.\.\}|\.\.\.|…", "None", item.replace("\\|", "|"))
            try:
                tree = ast.parse(src, mode="eval")
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if name in OUR_CLASSES:
                    module = ast.unparse(f.value) if isinstance(f, ast.Attribute) else OUR_CLASSES[name]
                    out.append((f"{doc}:{line}", item, module, name, len(node.args),
                                [k.arg for k in node.keywords if k.arg]))
    return out


def test_every_backticked_call_of_our_classes_takes_its_arguments():
    """`DistillationTrainer(cfg, teacher_model=model)`, `RLTrainer(tools=[...])`,
    `DistillConfig(objective="iw_opd")`, ...: the class is where the doc says and takes those
    keywords (and as many positional arguments)."""
    calls = _documented_calls()
    assert len(calls) > 30 and any(c[3] == "DistillConfig" for c in calls)
    bad = []
    for where, src, module, name, n_args, keywords in calls:
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            bad.append(f"{where}: `{src}`: {e}")
            continue
        missing = [k for k in keywords if k not in _parameters(cls)]
        positional = [p for p in inspect.signature(cls).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if missing or n_args > len(positional):
            bad.append(f"{where}: `{src}`: {name} takes no {missing or f'{n_args} positional arguments'}")
    assert not bad, "\n".join(bad)


def test_from_trl_trl_blocks_import_and_call_trl_as_written():
    """Each TRL block of docs/from_trl.md imports names the installed TRL has, and its trainer
    call passes arguments the trainer takes (test_docs_from_trl checks the config's)."""
    pytest.importorskip("trl")
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    text = _text("docs/from_trl.md")
    heads = [(m.start(), re.findall(r"`(trl\.[\w.]+)`", m.group(0))) for m in re.finditer(r"^### .*$", text, re.MULTILINE)]
    bad, trainers = [], 0
    for m in re.finditer(r"```python\n(.*?)```", text, flags=re.DOTALL):
        where = f"docs/from_trl.md:{_line(text, m.start())}"
        module_name = [h for start, h in heads if start < m.start() and h][-1][0].rsplit(".", 1)[0]
        tree = ast.parse(m.group(1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            heading_module = importlib.import_module(module_name)  # (trl's is a lazy module)
            names = {}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    mod = importlib.import_module(node.module)
                    for alias in node.names:
                        if not hasattr(mod, alias.name):
                            bad.append(f"{where}: {node.module} has no {alias.name}")
                        else:
                            names[alias.name] = getattr(mod, alias.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.endswith("Trainer"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    trainer = names.get(node.func.id) or getattr(heading_module, node.func.id, None)
                if trainer is None:
                    bad.append(f"{where}: {node.func.id} is not in {module_name}")
                    continue
                trainers += 1
                try:
                    inspect.signature(trainer).bind_partial(*node.args, **{k.arg: None for k in node.keywords})
                except TypeError as e:
                    bad.append(f"{where}: {node.func.id}: {e}")
    assert trainers >= 15 and not bad, "\n".join(bad)


# ----------------------------------------------------------------------------- file paths


_PATH = re.compile(r"(?<![\w/.])((?:rlhf_fast|tests|benchmarks|tools|csrc|examples|docs)/[\w/*.{},-]*"
                   r"\.(?:py|md|yaml|json|sh|cu|cpp|h|jsonl)(?:\.\{[\w,]+\})?|"
                   r"(?:rlhf_fast|tests|benchmarks|tools|csrc|examples|docs)/[\w/.-]*\{[\w,]+\})(?:::(\w+))?")


def _expand(path: str):
    """``a.{json,md}`` → [a.json, a.md]."""
    m = re.search(r"\{([\w,]+)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",") for p in _expand(path[:m.start()] + alt + path[m.end():])]


def test_every_file_path_the_docs_name_exists():
    """`tests/test_distill_gkd.py`, `rlhf_fast/models/lm_head.py`,
    `tests/test_prm_lora.py::test_rl_with_...`, `benchmarks/results/cpu-2026-12-06.md`: a moved
    or renamed file (or test) the docs still send the reader to fails here. Not TRL's paths
    (`examples/scripts/...` in TRL's own repository) nor placeholders (`<date>`)."""
    bad, n = [], 0
    for doc in DOCS:
        text = _text(doc)
        for m in _PATH.finditer(text):
            path, test = m.group(1), m.group(2)
            where = f"{doc}:{_line(text, m.start())}"
            if path.startswith("examples/scripts/") or "<" in text[m.end():m.end() + 1]:
                continue
            for p in _expand(path):
                n += 1
                # (from the repository's root; benchmarks/README.md also from its own folder)
                bases = [ROOT / p] + ([ROOT / "benchmarks" / p] if doc.startswith("benchmarks/") else [])
                matches = [f for base in bases for f in (sorted(base.parent.glob(base.name)) if "*" in p
                                                         else [base] if base.exists() else [])]
                if not matches:
                    bad.append(f"{where}: {p} does not exist")
                elif test:
                    defined = {node.name for node in ast.walk(ast.parse(matches[0].read_text(encoding="utf-8")))
                               if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
                    if test not in defined:
                        bad.append(f"{where}: {p} has no {test}")
    assert n > 100 and not bad, "\n".join(bad)


# ----------------------------------------------------------------------------- examples that run


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("command", ["sft", "reward"])
def test_example_trains_one_step_as_it_is(command, tmp_path, capsys):
    """examples/sft.yaml and examples/reward.yaml (the other examples are run by test_dpo,
    test_kto and test_rl_cli) train on their built-in synthetic data as their header says."""
    from rlhf_fast import cli

    out = tmp_path / "run"
    assert cli.main([command, str(ROOT / "examples" / f"{command}.yaml"), "--max_steps", "1", "--output_dir", str(out),
                     "--device", "cpu", "--eval_every", "0", "--save_every", "0"]) == 0
    assert f"{command}: 1 steps" in capsys.readouterr().out
    assert (out / "final" / "config.json").is_file()


# ----------------------------------------------------------------------------- imports, selections, install


def test_the_python_blocks_import_public_names():
    """Every ``from rlhf_fast... import X`` of a Python block (README, docs; TRL's blocks aside)
    names a public X that exists, and is in the module's ``__all__`` where it has one."""
    bad, n = [], 0
    for doc in DOCS:
        text = _text(doc)
        for m in re.finditer(r"```python\n(.*?)```", text, flags=re.DOTALL):
            for node in ast.walk(ast.parse(m.group(1))):
                if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "rlhf_fast":
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        n += 1
                        public = getattr(module, "__all__", None)
                        value = getattr(module, alias.name, None)
                        if (alias.name.startswith("_") or value is None
                                or (public is not None and alias.name not in public and not inspect.ismodule(value))):
                            bad.append(f"{doc}:{_line(text, m.start())}: from {node.module} import {alias.name}")
    assert n >= 4 and not bad, "\n".join(bad)


def test_every_benchmark_selection_the_docs_name_is_accepted():
    """`--algos kto,simpo`, `--algos sdft,sdpo,iw_opd`, ...: each selection a doc shows (commands
    and prose) is one `rlhf-fast bench e2e` accepts, not refused after the parser."""
    from rlhf_fast.benchmarks import e2e

    found = []
    for doc in DOCS:
        text = " ".join(_text(doc).split())
        found += [(doc, v) for v in re.findall(r"--algos[ =]([a-z_,]+)", text)]
    assert len(found) > 10 and any("iw_opd" in v for _, v in found)
    bad = []
    for doc, value in found:
        try:
            e2e._check_algos(value)
        except ValueError as e:
            bad.append(f"{doc}: --algos {value}: {e}")
    assert not bad, "\n".join(bad)


def test_the_install_extras_and_build_switches_exist():
    """README's Install section: each extra it names is one of pyproject's optional dependencies,
    and each RLHF_FAST_* build switch is read by the build."""
    text = _text("README.md")
    section = text[text.index("## Install"):text.index("## ", text.index("## Install") + 3)]
    sentence = section[section.index("Extras:"):section.index("Environment switches")]
    extras = {w for w in re.findall(r"`(\w+)`", sentence) if "_" not in w}  # (not `report_to`, a config key)
    assert {"triton", "peft", "eval", "bench", "test"} <= extras, extras
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        pytest.skip("tomllib needs Python 3.11")
    declared = tomllib.loads(_text("pyproject.toml"))["project"]["optional-dependencies"]
    assert extras <= set(declared), extras - set(declared)
    build = _text("setup.py") + _text("csrc_flags.py")
    switches = set(re.findall(r"\b(RLHF_FAST_\w+)=", section))
    assert {"RLHF_FAST_NO_EXT", "RLHF_FAST_FORCE_CUDA"} <= switches, switches
    assert all(f'"{s}"' in build for s in switches), [s for s in switches if f'"{s}"' not in build]


def _options(command: str) -> set:
    """The option strings ``rlhf-fast COMMAND`` (an argparse command) accepts, its suites' too."""
    from rlhf_fast import cli

    parser = cli.ArgumentParser(prog=f"rlhf-fast {command}")
    importlib.import_module(cli.COMMANDS[command][0]).add_arguments(parser)
    options = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(getattr(action, "choices", None), dict):  # sub-commands
            for sub in action.choices.values():
                options |= set(sub._option_string_actions)
    return options


def test_every_option_a_command_row_of_the_readme_table_names_exists():
    """README's command table describes `rlhf-fast generate` / `eval` / `report` / ... with their
    options in backticks (`--num_beams`, `--no_repeat_ngram_size`, `--pass-k 1,N`,
    `--correct-threshold`, `--split eval|train`, `--no-plots`, ...): each is an option of the
    row's command (the config commands' keys are checked by test_review_docs_config)."""
    text = _prose(_text("README.md"))
    checked, bad = 0, []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.startswith("| `rlhf-fast "):
            continue
        # the row's commands: those its first cell names (`rlhf-fast plot RUN_DIR` / `rlhf-fast eval ...`)
        commands = re.findall(r"`rlhf-fast ([a-z0-9-]+)", line.split("|")[1])
        if any(c in CONFIG_COMMANDS for c in commands):
            continue
        options = set().union(*(_options(c) for c in commands))
        for cell in line.split("|")[1:]:
            for item in re.findall(r"`([^`]+)`", cell):
                for opt in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", item):
                    checked += 1
                    if opt not in options:
                        bad.append(f"README.md:{n}: rlhf-fast {' / '.join(commands)} has no {opt}")
    assert checked > 20 and not bad, "\n".join(bad)


def test_every_inline_mapping_setting_loads():
    """The prose's `key: {...}` settings (`merge: {method: slerp, t_values: 0.5}`, `lora: {r: 16}`,
    `model_init_kwargs: {trust_remote_code: true}`, `lr_scheduler_kwargs: {min_lr_rate: 0}` with the
    schedule its sentence names, ...) load into a trainer config that has the key (the dotted
    `section.key: value` form is test_review_docs_config's)."""
    from rlhf_fast.trainers.config import load_config
    from rlhf_fast.trainers.rl_config import RLConfig

    classes = [RLConfig, *_offline_classes().values()]
    found, bad = 0, []
    for doc in DOCS:
        prose = _prose(_text(doc))
        lines = prose.splitlines()
        for m in re.finditer(r"`([a-z_]+): (\{[^`]*\})`", prose):
            key, mapping = m.groups()
            line = _line(prose, m.start())
            owners = [c for c in classes if key in c.__dataclass_fields__]
            if not owners:
                bad.append(f"{doc}:{line}: {key!r} is no trainer config key")
                continue
            if re.search(r":\s*[a-zA-Z]\s*[,}]", mapping):  # a placeholder value (`{name: w}`)
                continue
            found += 1
            # lr_scheduler_kwargs: with the schedule its sentence names (`cosine_with_min_lr` with ...)
            near = lines[line - 1][max(0, m.start() - prose.rfind("\n", 0, m.start()) - 80):]
            schedules = [[]] + ([["--lr_schedule", s] for s in re.findall(r"`([a-z_]+)`", near)[:3]]
                                if key == "lr_scheduler_kwargs" else [])
            errors = []
            for cls in owners:
                for extra in schedules:
                    try:
                        load_config(cls, None, [f"--{key}", mapping, *extra])
                        break
                    except ValueError as e:
                        errors.append(str(e))
                else:
                    continue
                break
            else:
                bad.append(f"{doc}:{line}: `{key}: {mapping}`: {errors[0]}")
    assert found > 10 and not bad, "\n".join(bad)
