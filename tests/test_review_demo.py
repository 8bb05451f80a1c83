"""Review of `rlhf-fast demo`: the figures its report and printout state, its options, README's
description of it. Built on tests/test_demo.py's quick runs."""

import contextlib
import io
import os
import random

import pytest

from rlhf_fast.demo import world
from rlhf_fast.demo.pipeline import DemoConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `rlhf-fast demo --quick` (PPO): (its folder, what it printed)."""
    from rlhf_fast import cli

    out = tmp_path_factory.mktemp("demo") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    return out, buf.getvalue()


def test_readme_does_not_call_the_trained_sums_held_out():
    # the arithmetic task draws its SFT problems, its GRPO prompts and its evaluation sums from the
    # same 100 sums of two operands 0-9: every evaluation sum is in both training sets
    cfg = DemoConfig(task="arithmetic", out_dir="unused")
    trained = set(world.arithmetic_problems(cfg.sft_examples, seed=cfg.seed))
    trained |= set(world.arithmetic_problems(512, seed=cfg.seed + 21))
    evaluated = world.arithmetic_problems(cfg.eval_prompts, seed=cfg.seed + 31)
    assert all(p in trained for p in evaluated)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    row = next(line for line in readme.splitlines() if line.startswith("| `demo --task arithmetic`"))
    assert "held-out" not in row and "held out" not in row, row


def test_demo_runs_with_the_largest_seed_it_accepts(tmp_path, capsys):
    # --seed's help and check say [0, 2**63); seeds past ~1.8e13 failed after the model was built with
    # "Overflow when unpacking long long" (the trainers' batch order seeds seed * 1000003 + epoch), and
    # an ensemble member's seed + 1000·k went past 2**63 (RewardConfig refused it after member 0 trained)
    from rlhf_fast import cli

    out = tmp_path / "run"
    rc = cli.main(["demo", "--quick", "--no-progress", "--seed", str(2**63 - 1), "--reward-ensemble", "2",
                   "--out", str(out)])
    assert rc == 0, capsys.readouterr().err


def test_ensemble_member_seeds_stay_in_range(tmp_path):
    from rlhf_fast.demo.pipeline import _train_rm
    from rlhf_fast.feedback.formats import PairRecord
    from rlhf_fast.models.tiny import train_tokenizer

    cfg = DemoConfig(quick=True, seed=2**63 - 1, reward_ensemble=2, out_dir=str(tmp_path), progress=False)
    cfg.rm_steps, cfg.rm_batch_size = 1, 4
    rng = random.Random(0)
    records = []
    for p in world.prompts(12, seed=0):
        a, b = world.make_response(p, rng), world.make_response(p, rng)
        records.append(PairRecord(p, a, b))
    tok = train_tokenizer([r.prompt + r.chosen + r.rejected for r in records], 200, padding_side="right")
    rm, trainer = _train_rm(cfg, tok, records, 4, str(tmp_path), k=1)
    assert trainer.step == 1 and 0 <= trainer.cfg.seed < 2**63


def test_printout_formats_the_rm_agreement_like_the_other_figures(quick_run):
    out, printed = quick_run
    lines = [line for line in printed.splitlines() if line.strip().startswith(("true_win_rate",
                                                                              "rm_heldout_agreement"))]
    assert len(lines) == 2
    values = [line.split()[-1] for line in lines]
    assert all(len(v.split(".")[-1]) == 3 for v in values), lines


def test_report_says_how_the_win_rate_and_the_kl_are_measured(quick_run):
    md = open(quick_run[0] / "report.md", encoding="utf-8").read()
    # one answer per evaluation prompt from each policy, sampled at temperature 1, ties half; the KL
    # the sequence log-ratio over the tuned policy's own samples
    for phrase in ("sampled at temperature 1", "ties count half", "log π_tuned − log π_SFT"):
        assert phrase in md, phrase


@pytest.fixture(scope="module")
def arithmetic_run(tmp_path_factory):
    """One quick arithmetic demo's folder."""
    from rlhf_fast.demo.pipeline import run

    out = tmp_path_factory.mktemp("demo") / "arith"
    run(DemoConfig(task="arithmetic", quick=True, out_dir=str(out), progress=False))
    return out


def test_arithmetic_report_states_the_sizes_it_ran(arithmetic_run):
    # the arithmetic task runs a shorter SFT (a sixth, >= 20 steps), GRPO for arithmetic_rl_steps with
    # 4 new tokens (group of >= 8 at full size); report.json's config said sft_steps 300, rl_steps 40,
    # group_size 4, max_new_tokens 24 at full size (40 / 4 / 2 / 14 with --quick)
    import json

    from rlhf_fast.trainers.common import read_metrics

    config = json.load(open(arithmetic_run / "report.json"))["config"]
    (sft_ckpt,) = os.listdir(arithmetic_run / "sft" / "checkpoints")
    assert config["sft_steps"] == int(sft_ckpt.split("_")[-1])
    assert config["rl_steps"] == read_metrics(str(arithmetic_run / "rl"))[-1]["step"]
    assert config["max_new_tokens"] == 4


def test_arithmetic_report_says_what_its_accuracies_measure(arithmetic_run):
    # greedy vs 8 samples at temperature 1, and that the evaluation sums are trained on
    md = open(arithmetic_run / "report.md", encoding="utf-8").read()
    for phrase in ("8 answers per sum sampled at temperature 1", "greedy", "not generalising to unseen sums"):
        assert phrase in md, phrase


def test_win_rate_compares_independent_draws_of_the_two_policies(tmp_path):
    # a win-rate is P(U(a) > U(b)) for a, b drawn independently from the two policies (AlpacaEval, TRL's
    # WinRateCallback). The same sampling seed for both couples the draws: two equal policies gave the
    # very same answers (a win-rate of exactly 0.5 by ties), and a moderately better one measured
    # 0.72 against 0.67 with independent draws (full-size SFT, warm-adjective logits scaled by 1.15)
    from rlhf_fast.demo.pipeline import run

    cfg = DemoConfig(quick=True, algo="dpo", out_dir=str(tmp_path / "run"), progress=False)
    cfg.dpo_lr = 1e-30  # the "tuned" policy is the SFT policy, to the bit
    report = run(cfg)
    assert report["stages"]["evaluation"]["kl_tuned_vs_sft_per_sequence"] == 0.0
    assert any(ex["sft"] != ex["tuned"] for ex in report["examples"])


def test_democonfig_algo_defaults_by_task_and_refuses_what_the_arithmetic_task_ignores():
    """DemoConfig(task="arithmetic", algo="ppo") built in Python ran GRPO silently (only the CLI refused it)."""
    from rlhf_fast.demo.pipeline import DemoConfig

    assert DemoConfig(out_dir="x").algo == "ppo"
    assert DemoConfig(task="arithmetic", out_dir="x").algo == "grpo"
    for algo in ("ppo", "rloo", "dpo"):
        with pytest.raises(ValueError, match=f"--algo {algo} applies to --task preference"):
            DemoConfig(task="arithmetic", algo=algo, out_dir="x")
