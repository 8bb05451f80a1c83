"""What README.md, docs/*.md, benchmarks/README.md and examples/*.yaml tell a user still holds:
every example config loads through the loader its command uses, the README's Python snippets
run on tiny inputs, the op table's signatures match the code, and the option names, defaults,
commands and file names the docs quote exist. Fast (a few seconds): no training beyond one
RL step on a tiny model."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _python_blocks(text: str):
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def _block_with(text: str, needle: str) -> str:
    blocks = [b for b in _python_blocks(text) if needle in b]
    assert len(blocks) == 1, f"expected one README python block containing {needle!r}, found {len(blocks)}"
    return blocks[0]


# ----------------------------------------------------------------------------- examples/*.yaml


def test_there_are_examples():
    assert {p.stem for p in EXAMPLES} >= {"sft", "reward", "ppo", "grpo", "rloo"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_loads(path):
    """Each example through the loader of the command its header names (rlhf-fast sft / reward
    / dpo / kto / ppo / grpo / rloo), with the estimator of that command's family."""
    from rlhf_fast.trainers.config import load_config

    command = path.stem
    header = path.read_text(encoding="utf-8").splitlines()[:3]
    assert any(f"rlhf-fast {command} examples/{path.name}" in line for line in header), header
    if command == "sft":
        from rlhf_fast.trainers.sft import SFTConfig

        cfg = load_config(SFTConfig, str(path))
        assert cfg.data is None  # runs as is on the built-in synthetic task
    elif command == "reward":
        from rlhf_fast.trainers.reward import RewardConfig

        cfg = load_config(RewardConfig, str(path))
        assert cfg.data is None
    elif command == "dpo":
        from rlhf_fast.trainers.dpo import DPOConfig

        cfg = load_config(DPOConfig, str(path))
        assert cfg.data is None
    elif command == "kto":
        from rlhf_fast.trainers.kto import KTOConfig

        cfg = load_config(KTOConfig, str(path))
        assert cfg.data is None
    else:
        from rlhf_fast.trainers.rl_cli import FAMILIES, build_config

        cfg = build_config(command, [str(path)])
        assert cfg.estimator in FAMILIES[command][1]
        # the estimator the file names is the one the command runs (not silently replaced)
        import yaml

        assert yaml.safe_load(path.read_text(encoding="utf-8"))["estimator"] == cfg.estimator
        for spec in cfg.reward.functions:  # every reward function it names imports
            from rlhf_fast.algorithms.rewards import load_callable

            assert callable(load_callable(spec))


def test_ppo_example_runs_reinforce_pp():
    """examples/ppo.yaml's header: --estimator reinforce++ runs through the same command."""
    from rlhf_fast.trainers.rl_cli import build_config

    cfg = build_config("ppo", [str(ROOT / "examples" / "ppo.yaml"), "--estimator", "reinforce++"])
    assert cfg.estimator == "reinforce++"


# ----------------------------------------------------------------------------- README snippets


def test_readme_ops_snippet_runs():
    code = _block_with(README, "from rlhf_fast import ops")
    B, T, V = 2, 5, 11
    g = torch.Generator().manual_seed(0)
    ns = {
        "logits": torch.randn(B, T, V, generator=g),
        "labels": torch.randint(0, V, (B, T), generator=g),
        "rewards": torch.randn(B, T, generator=g),
        "values": torch.randn(B, T, generator=g),
        "mask": torch.ones(B, T, dtype=torch.bool),
        "old_logp": torch.randn(B, T, generator=g) - 2.0,
        "next_logits": torch.randn(B, V, generator=g),
    }
    exec(compile(code, "README.md[ops snippet]", "exec"), ns)  # noqa: S102  (the README's own code)
    assert ns["logp"].shape == (B, T) and ns["ent"].shape == (B, T)
    assert ns["adv"].shape == (B, T) and ns["ret"].shape == (B, T)
    assert ns["loss"].dim() == 0
    assert set(ns["stats"]) >= {"clip_frac", "approx_kl", "ratio_mean", "ratio_max"}
    assert ns["tokens"].shape == (B,) and ns["tok_logp"].shape == (B,)


def test_readme_grpo_snippet_runs(tmp_path, monkeypatch):
    """The minimal GRPO run, with one step into a temporary folder."""
    from rlhf_fast.models.tiny import sample_texts, tiny_causal_lm, train_tokenizer
    from rlhf_fast.trainers import rl, rl_config  # noqa: F401  (rl binds the real RLConfig first)

    code = _block_with(README, "RLTrainer(")
    real = rl_config.RLConfig

    def short(**kw):  # the snippet's config, shortened to one step of 2 × 2 short answers
        kw.update(steps=1, output_dir=str(tmp_path / "run"), progress=False, save_every=0, sample_every=0)
        cfg = real(**kw)
        cfg.rollout = rl_config.RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=4)
        cfg.ppo = rl_config.PPOConfig(epochs=1, mini_batch_size=4, micro_batch_size=4)
        return cfg

    monkeypatch.setattr(rl_config, "RLConfig", short)
    tokenizer = train_tokenizer(sample_texts(32), vocab_size=64)
    policy = tiny_causal_lm(len(tokenizer), hidden_size=16, num_layers=1, num_heads=2)
    ns = {"policy": policy, "tokenizer": tokenizer}
    exec(compile(code, "README.md[GRPO snippet]", "exec"), ns)  # noqa: S102  (the README's own code)
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
    assert (run / "checkpoints").is_dir()


# ----------------------------------------------------------------------------- op table


def _op_table_signatures():
    section = README.split("## The op API", 1)[1].split("###", 1)[0]
    sigs = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cell = line.split("|")[1]
        sigs += re.findall(r"`([a-z_]+\(.*?\))`", cell)
    return sigs


def test_op_table_lists_every_public_op():
    from rlhf_fast import ops

    documented = {s.split("(", 1)[0] for s in _op_table_signatures()}
    public = {n for n in ops.__all__ if callable(getattr(ops, n)) and n not in ("use_backend",)}
    public.discard("BACKENDS")
    assert documented == public


@pytest.mark.parametrize("sig", _op_table_signatures(), ids=lambda s: s.split("(", 1)[0])
def test_op_table_signature_matches_code(sig):
    """Every parameter the README's op table shows exists in rlhf_fast.ops with the same kind
    (positional / keyword-only) and default; positional parameters in the same order."""
    from rlhf_fast import ops

    name = sig.split("(", 1)[0]
    doc = ast.parse(f"def {sig}: pass").body[0].args
    real = inspect.signature(getattr(ops, name)).parameters
    real_pos = [p for p in real.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    pos_defaults = [None] * (len(doc.args) - len(doc.defaults)) + list(doc.defaults)
    assert [a.arg for a in doc.args] == [p.name for p in real_pos][: len(doc.args)], sig
    for arg, default in zip(doc.args, pos_defaults):
        if default is not None:
            assert real[arg.arg].default == ast.literal_eval(default), (sig, arg.arg)
    for arg, default in zip(doc.kwonlyargs, doc.kw_defaults):
        assert arg.arg in real, (sig, arg.arg)
        assert real[arg.arg].kind is inspect.Parameter.KEYWORD_ONLY, (sig, arg.arg)
        if default is not None:
            assert real[arg.arg].default == ast.literal_eval(default), (sig, arg.arg)


def test_every_loss_takes_normalizer():
    from rlhf_fast import ops

    for name in ("ppo_policy_loss", "ppo_value_loss", "fused_linear_policy_loss"):
        assert "normalizer" in inspect.signature(getattr(ops, name)).parameters, name


def test_documented_kinds():
    from rlhf_fast.ops.reference import AGG_MODES, GROUP_KINDS, KL_KINDS

    assert set(KL_KINDS) == {"k1", "k2", "k3", "abs", "mse"}
    assert set(GROUP_KINDS) == {"grpo", "rloo", "dr_grpo"}
    assert "seq-mean-token-sum-norm" in AGG_MODES


# ----------------------------------------------------------------------------- commands and keys


def test_readme_commands_exist():
    from rlhf_fast.cli import COMMANDS

    quoted = set(re.findall(r"`rlhf-fast ([a-z0-9-]+)", README))
    assert quoted <= set(COMMANDS), quoted - set(COMMANDS)


def test_demo_flags_parse():
    import argparse

    from rlhf_fast.demo import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    for argv in (["--algo", "grpo"], ["--algo", "rloo"], ["--task", "arithmetic"],
                 ["--quick", "--no-progress"], ["--ops-report", "--quick"]):
        p.parse_args(argv)


def test_documented_config_keys_and_defaults():
    from rlhf_fast.trainers.config import load_config
    from rlhf_fast.trainers.reward import RewardConfig
    from rlhf_fast.trainers.rl_config import RLConfig
    from rlhf_fast.trainers.sft import SFTConfig

    rl = RLConfig()
    assert rl.ppo.whiten_advantages is False
    assert rl.kl.placement == "reward"
    assert rl.rollout.cuda_graphs is True
    assert rl.rollout.per_sample_seeds is None
    assert rl.distributed.timeout_s == 1800
    assert rl.distributed.offload_reference is False
    assert rl.model.gradient_checkpointing is False
    assert rl.ppo.importance_sampling_level == "token" and rl.reward.overlong_penalty == 1.0
    assert rl.rollout.max_sampling_rounds == 3 and rl.kl.ref_sync_alpha == 0.6
    for cls in (SFTConfig, RewardConfig):
        cfg = cls()
        assert cfg.resume is True and cfg.gradient_checkpointing is False
    # keys quoted in README / docs/distributed.md, set the way the docs set them
    load_config(RLConfig, None, [
        "--kl.placement", "loss", "--kl.kind", "k3", "--ppo.agg", "seq-mean-token-sum-norm",
        "--ppo.whiten_advantages", "true", "--ppo.trpo", "true", "--reward.whiten", "true",
        "--rollout.per_sample_seeds", "true", "--model.gradient_checkpointing", "true",
        "--ppo.old_logp", "behaviour", "--distributed.strategy", "fsdp2",
        "--distributed.offload_reference", "true", "--distributed.reshard_after_forward", "false",
        "--distributed.mixed_precision", "false", "--distributed.backend", "gloo",
        "--distributed.timeout_s", "60", "--ppo.importance_sampling_level", "sequence",
        "--reward.overlong_buffer", "4", "--reward.overlong_penalty", "1", "--rollout.mask_truncated", "true",
        "--rollout.dynamic_sampling", "true", "--rollout.max_sampling_rounds", "3", "--kl.ref_sync_steps", "2",
        "--kl.ref_sync_alpha", "0.6", "--estimator", "grpo",
    ])
    load_config(SFTConfig, None, ["--gradient_checkpointing", "true", "--resume", "false"])


def test_peer_grace_constant():
    from rlhf_fast import cli

    assert cli.PEER_GRACE_S == 3.0


# ----------------------------------------------------------------------------- benchmarks/README.md


def test_bench_results_file_names():
    from rlhf_fast.benchmarks.common import results_paths

    paths = results_paths("cpu", ROOT / "x")
    assert re.fullmatch(r"cpu-\d{4}-\d{2}-\d{2}\.json", paths["json"].name)
    assert paths["md"].name == paths["json"].name[:-5] + ".md"


def test_bench_readme_module_options():
    """The module flags benchmarks/README.md lists are accepted."""
    import argparse

    from rlhf_fast.benchmarks import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    for suite in ("ops", "e2e", "all"):
        p.parse_args([suite, "--device", "cpu", "--quick", "--out", "d", "--threads", "1"])
    src = (ROOT / "benchmarks" / "bench_cpu_ops.py").read_text(encoding="utf-8")
    for flag in ("--scale", "--no-memory", "--compile", "--cases", "--write"):
        assert f'"{flag}"' in src, flag
    src = (ROOT / "benchmarks" / "e2e.py").read_text(encoding="utf-8")
    for flag in ("--device", "--quick", "--threads", "--repeats", "--write"):
        assert f'"{flag}"' in src, flag
    src = (ROOT / "benchmarks" / "bench_rollout.py").read_text(encoding="utf-8")
    for flag in ("--family", "--kv-heads", "--intermediate", "--profile", "--skip-generate", "--gen-batch",
                 "--prompt-len", "--max-new", "--vocab", "--hidden", "--layers", "--heads"):
        assert f'"{flag}"' in src, flag


# ----------------------------------------------------------------------------- links


@pytest.mark.parametrize("doc", ["README.md", "benchmarks/README.md", *[str(p.relative_to(ROOT))
                                                                      for p in (ROOT / "docs").glob("*.md")]])
def test_relative_links_and_paths_exist(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    base = (ROOT / doc).parent
    for target in re.findall(r"\]\(([^)#:]+)\)", text):
        assert (base / target).exists(), f"{doc}: link to {target}"
    # example configs the commands quote
    for cfg in re.findall(r"\b((?:examples|configs)/[\w.-]+\.yaml)", text):
        assert (ROOT / cfg).is_file(), f"{doc}: {cfg}"


# ----------------------------------------------------------------------------- docs/rlvr.md


def test_rlvr_guide_config_and_records_train(tmp_path):
    """docs/rlvr.md's records and DAPO-style config, shortened to one small step, train."""
    from rlhf_fast.trainers.rl import RLTrainer
    from rlhf_fast.trainers.rl_cli import build_config

    text = (ROOT / "docs" / "rlvr.md").read_text(encoding="utf-8")
    records = re.findall(r"```json\n(.*?)```", text, flags=re.DOTALL)[0]
    config = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)[0]
    (tmp_path / "train.jsonl").write_text(records, encoding="utf-8")
    (tmp_path / "rlvr.yaml").write_text(config, encoding="utf-8")
    cfg = build_config("grpo", [str(tmp_path / "rlvr.yaml"), "--data.prompts_file", str(tmp_path / "train.jsonl"),
                                "--output_dir", str(tmp_path / "run"), "--steps", "1", "--progress", "false",
                                "--rollout.prompts_per_step", "2", "--rollout.group_size", "2",
                                "--rollout.max_new_tokens", "8", "--reward.overlong_buffer", "4",
                                "--ppo.mini_batch_size", "4", "--ppo.micro_batch_size", "2"])
    assert cfg.rollout.dynamic_sampling and cfg.rollout.mask_truncated and cfg.ppo.clip_high == 0.28
    tr = RLTrainer(cfg)
    assert tr.prompt_fields == [{"answer": "7"}, {"answer": "36"}]
    m = tr.train()[-1]
    assert "reward/answer_match" in m and "reward/overlong_penalty" in m and "rollout/sampling_rounds" in m
