"""Review of the benchmark suite (`rlhf-fast bench ops|e2e|all`): fairness of the e2e comparison,
what the results record, and the ops tables' failure reporting and bandwidth fractions."""

import json
from dataclasses import asdict

import pytest
import torch

from rlhf_fast.benchmarks import common, e2e, ops_report


def test_e2e_rlhf_fast_phase_timers_synchronise_like_the_trl_side(monkeypatch):
    # The TRL side synchronises the device at every phase boundary; rlhf_fast's phases come from the
    # trainer's own perf_counter calls (time/generate, time/logprobs, time/update). On CUDA those must
    # wait for the queued kernels too, or the logprobs / update work lands in reward_adv (the H200 run:
    # GRPO logprobs 0.018 s and reward_adv 0.048 s on our side, 0.060 / 0.006 s on TRL's).
    # They do through the trainer's own switch (phase_clock / sync_phase_timers), not by patching modules.
    syncs, clock_syncs = [], []
    monkeypatch.setattr(e2e, "_sync", lambda device: syncs.append(device))
    runner = e2e.RLHFFastStep(e2e.E2EConfig.quick(), "grpo")
    assert runner.trainer.phase_clock.synchronize is False  # off until the benchmark times a step
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: clock_syncs.append(device))
    runner.trainer.phase_clock.device = torch.device("cuda")  # the clock's CUDA path on this CPU run
    syncs.clear()
    runner.step()
    assert len(syncs) == 2, syncs  # _timed_step's own two
    # one wait per trainer timer read (rollout start, generate, logprobs, update, step)
    assert runner.trainer.phase_clock.synchronize is True and len(clock_syncs) >= 5, clock_syncs


def test_e2e_table_records_the_step_configuration(monkeypatch, tmp_path):
    # epochs, mini-batch, learning rate, KL, clip, temperature, group size, seed... decide what a row
    # means; the results JSON must hold them, not only the title's B / new tokens / model shape.
    monkeypatch.setattr(e2e, "_add_algo_rows", lambda *a, **k: None)
    cfg = e2e.replace(e2e.E2EConfig.quick(), epochs=2, mini_batch_size=8, kl_coef=0.1, tokenizer_dir="/tmp/x")
    table = e2e._step_table(cfg, "one RL step (B=16", e2e.PHASES, [("ppo", "TRL")], 1.0, 1, what="w")
    paths = common.write_results([table], out_dir=tmp_path, suite="t")
    saved = json.loads(paths["json"].read_text())[0]["tables"][0]
    conf = saved["meta"]["config"]
    for k in ("epochs", "mini_batch_size", "lr", "kl_coef", "clip", "temperature", "group_size",
              "prompts_per_step", "max_new_tokens", "seed", "trl_logprobs"):
        assert conf[k] == getattr(cfg, k), k
    assert conf["dtype"] == "float32" and conf["gradient_checkpointing"] is False
    assert "tokenizer_dir" not in conf  # a temporary folder, meaningless in a results file
    assert asdict(table)["meta"]["repeats"] == 1


def test_ops_report_main_fails_on_a_backend_returning_nan(monkeypatch, capsys):
    from rlhf_fast.ops import _dispatch

    def nan_kl(logp, ref_logp, kind="k1"):
        return logp * float("nan")  # differentiable: the backward runs, the values are NaN

    monkeypatch.setitem(_dispatch._REGISTRY["kl_penalty"], "torch", nan_kl)
    collect = ops_report.collect
    monkeypatch.setattr(ops_report, "collect", lambda quick=False: collect(quick=True, ops=["kl_penalty"]))
    assert ops_report.main(quick=True) == 1
    row = next(r for r in collect(quick=True, ops=["kl_penalty"]).rows if r["backend"] == "torch")
    assert "non-finite fwd_err / bwd_err" in row["error"]  # `rlhf-fast bench ops` exits 1 on it too


def test_bench_ops_reports_an_optional_suite_that_raises_type_error(monkeypatch):
    from rlhf_fast.benchmarks import bench_triton, cli

    def broken(device="cpu", quick=False):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(bench_triton, "run_suite", broken)
    tables = cli._optional_suites("cpu", True)
    failed = [t for t in tables if t.title == "bench_triton failed"]
    assert failed and "unsupported operand" in failed[0].rows[0]["error"]
    # a run_suite of another signature is still left alone
    monkeypatch.setattr(bench_triton, "run_suite", lambda scale: pytest.fail("called"))
    assert not [t for t in cli._optional_suites("cpu", True) if t.title.startswith("bench_triton")]


def test_bench_triton_bytes_moved_counts_inputs_and_outputs_once():
    from rlhf_fast.benchmarks import bench_triton

    BT = 4096
    kl = bench_triton._make_inputs("kl_penalty", BT, 1, 1, torch.bfloat16, "cpu", grad=False)
    # forward: read logp and ref_logp (fp32), write the [B, T] fp32 penalty
    assert bench_triton._bytes_moved("kl_penalty", kl, backward=False) == 3 * BT * 4
    kl = bench_triton._make_inputs("kl_penalty", BT, 1, 1, torch.bfloat16, "cpu", grad=True)
    assert bench_triton._bytes_moved("kl_penalty", kl, backward=True) == 4 * BT * 4  # + the gradient of logp
    pl = bench_triton._make_inputs("ppo_policy_loss", BT, 1, 1, torch.bfloat16, "cpu", grad=True)
    # forward + backward: read logp, old_logp, advantages (fp32) and the bool mask once; write the
    # gradient of logp (the loss is a scalar)
    assert bench_triton._bytes_moved("ppo_policy_loss", pl, backward=True) == BT * (4 + 4 + 4 + 1) + BT * 4


def test_e2e_too_short_rl_prompt_tokens_is_refused_before_the_subprocesses(monkeypatch):
    ran = []

    def subprocess(*a, **k):
        ran.append(a)
        raise RuntimeError("a subprocess was started")

    monkeypatch.setattr(e2e, "_subprocess", subprocess)
    cfg = e2e.replace(e2e.E2EConfig.quick(), rl_prompt_tokens=2)
    with pytest.raises(ValueError, match="rl_prompt_tokens"):
        e2e.run_table(cfg, algos=("grpo",))
    assert not ran


def test_environment_records_the_flashinfer_peer_version(monkeypatch):
    from importlib import metadata

    real = metadata.version

    def version(name):
        if name == "flashinfer-python":  # the distribution's name on PyPI (import name flashinfer)
            return "0.2.5"
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    assert common.environment("cpu")["peers"].get("flashinfer") == "0.2.5"


def test_bench_ops_runs_the_gae_sampling_suite(monkeypatch):
    from rlhf_fast.benchmarks import bench_gae_sampling, cli

    # on the CPU bench_cpu_ops already measures GAE and sampling against the same peers: nothing more
    assert bench_gae_sampling.run_suite(device="cpu", quick=True) == []
    # on a GPU its rows become a table (here: rows measured on the CPU, turned into the table)
    rows = bench_gae_sampling.run_gae(torch.device("cpu"), [(4, 16)], 0.01, None)
    t = bench_gae_sampling.rows_table(rows, "CPU")
    assert {r["provider"] for r in t.rows} >= {"ours", "python-loop"}
    assert "vs_ours" in t.columns and "bw_frac" in t.columns
    seen = []
    monkeypatch.setattr(bench_gae_sampling, "run_suite", lambda device="cpu", quick=False: seen.append(device) or [t])
    assert t in cli._optional_suites("cuda", True) and seen == ["cuda"]


def test_bench_packing_refuses_zero_steps_before_measuring(monkeypatch):
    from rlhf_fast.benchmarks import bench_packing

    monkeypatch.setattr(bench_packing, "run", lambda args: pytest.fail("measured with --steps 0"))
    with pytest.raises(SystemExit) as e:
        bench_packing.main(["--steps", "0"])
    assert e.value.code == 2


def test_ops_report_times_the_op_not_the_input_copy(monkeypatch):
    # `ms` is one forward (+ backward) of the op; copying the inputs (a [N, V] clone for token_logprobs:
    # 10 of cpp's 36 ms at the full sizes) must stay out of the timed call, or the speed-up shrinks
    copies = []
    prepare = ops_report._prepare
    monkeypatch.setattr(ops_report, "_prepare", lambda *a: copies.append(1) or prepare(*a))
    bench = ops_report.bench
    timed = []

    def counting_bench(fn, **kw):
        def wrapped():
            n = len(copies)
            out = fn()
            timed.append(len(copies) - n)
            return out
        return bench(wrapped, **kw)

    monkeypatch.setattr(ops_report, "bench", counting_bench)
    ops_report.collect(quick=True, ops=["masked_mean"])
    assert timed and not any(timed), timed


def test_bench_all_refuses_too_short_rl_prompt_tokens_before_the_op_benchmarks(monkeypatch, tmp_path, capsys):
    from rlhf_fast.benchmarks import cli as bench_cli

    from rlhf_fast.cli import main

    monkeypatch.setattr(bench_cli, "ops_tables", lambda *a: pytest.fail("the op benchmarks ran"))
    monkeypatch.setattr(e2e, "_subprocess", lambda *a, **k: pytest.fail("a subprocess was started"))
    code = main(["bench", "all", "--quick", "--algos", "grpo", "--rl-prompt-tokens", "3", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--rl-prompt-tokens" in err[0] and "V=256" in err[0], err
    assert not list(tmp_path.iterdir())


def test_gae_sampling_out_records_triton_cuda_and_peer_versions(tmp_path, capsys):
    from rlhf_fast.benchmarks import bench_gae_sampling as bgs

    out = tmp_path / "gae.jsonl"
    bgs.main(["--quick", "--only", "gae", "--budget", "0.01", "--out", str(out)])
    row = json.loads(out.read_text().splitlines()[0])
    assert row["torch"] == torch.__version__ and "triton" in row and "cuda" in row
    assert {"flashinfer", "vllm"} <= set(row["peers"])  # its sampling peers, None when not installed


def test_bench_triton_rows_give_the_ratio_against_the_best_peer_measured_with_them():
    from rlhf_fast.benchmarks import bench_triton

    rows = [dict(provider="rlhf_fast-triton", median_ms=1.0), dict(provider="reference", median_ms=8.0),
            dict(provider="torch.compile(reference)", median_ms=3.0), dict(provider="liger x", median_ms=2.0),
            dict(provider="trl y", median_ms=None, peak_mem="OOM"),
            dict(provider="rlhf_fast-triton (backward=triton, atomics)", median_ms=4.0)]
    bench_triton._add_ratios(rows)
    ours, atomics = rows[0], rows[-1]
    assert ours["vs_reference"] == pytest.approx(8.0) and ours["vs_best_peer"] == pytest.approx(2.0)
    assert ours["best_peer"] == "liger x" and atomics["vs_best_peer"] == pytest.approx(0.5)
    assert all("vs_best_peer" not in r for r in rows[1:-1])  # peers' rows: their own times only
    assert {"vs_reference", "vs_best_peer", "best_peer"} <= set(bench_triton.COLUMNS)
    # the inputs' dtype in the title: kl_penalty and the PPO losses take fp32 log-probs
    assert bench_triton.op_dtype("kl_penalty") == "fp32" and bench_triton.op_dtype("token_logprobs") == "bf16"
