"""Smoke tests of the benchmark suite: the ops report covers every public op with small
errors on every live CPU backend, `rlhf-fast bench ops --quick` writes its result files,
and the timing / memory helpers measure what they claim."""

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf_fast.benchmarks import common, ops_report

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_OPS = {"token_logprobs", "fused_linear_logprobs", "fused_linear_policy_loss", "fused_linear_divergence",
              "kl_penalty", "gae", "discounted_returns", "group_advantages", "masked_mean", "masked_whiten",
              "ppo_policy_loss", "ppo_value_loss", "sample"}


@pytest.fixture(scope="module")
def quick_table():
    return ops_report.collect(quick=True)


def test_public_op_list_is_complete():
    import rlhf_fast.ops as ops

    ops_in_api = {n for n in ops.__all__ if n not in ("use_backend", "BACKENDS", "reference")}
    assert ops_in_api == PUBLIC_OPS
    assert {c.op for c in ops_report._cases()} == PUBLIC_OPS


def test_ops_report_covers_every_op_and_backend(quick_table):
    rows = quick_table.rows
    assert {r["op"].split()[0] for r in rows} == PUBLIC_OPS
    for case in ops_report._cases():
        got = {r["backend"] for r in rows if r["op"] == case.label}
        assert got == set(ops_report.live_cpu_backends(case.op)), case.label
        assert "torch" in got
    for r in rows:
        assert not r.get("error"), r
        assert r["ms"] > 0 and r["p20"] <= r["ms"] <= r["p80"], r


def test_ops_report_errors_are_small(quick_table):
    # The torch row's error is PyTorch's own rounding against float64; every backend must be
    # within about twice that plus a small atol (flash-attn style tolerance).
    by_label = {}
    for r in quick_table.rows:
        by_label.setdefault(r["op"], {})[r["backend"]] = r
    for label, rows in by_label.items():
        torch_row = rows["torch"]
        for backend, r in rows.items():
            for key in ("fwd_err", "bwd_err"):
                if r.get(key) is None:
                    continue
                assert math.isfinite(r[key]), (label, backend, key, r[key])
                bound = 2 * torch_row[key] + 1e-4
                assert r[key] <= bound, (label, backend, key, r[key], bound)
            # the float64 oracle itself: fp32 rounding, not a semantic difference
            assert torch_row["fwd_err"] < 1e-3 or "bf16" in label, (label, torch_row)


def test_ops_report_detects_a_wrong_backend(monkeypatch):
    # The report must be able to fail: a backend that returns a perturbed result shows a large error.
    from rlhf_fast.ops import _dispatch, reference

    def wrong(logp, ref_logp, kind="k1"):
        return reference.kl_penalty(logp, ref_logp, kind) + 0.5

    monkeypatch.setitem(_dispatch._REGISTRY["kl_penalty"], "torch", wrong)
    table = ops_report.collect(quick=True, ops=["kl_penalty"])
    row = next(r for r in table.rows if r["backend"] == "torch")
    assert row["fwd_err"] == pytest.approx(0.5, abs=1e-6)


def test_main_quick_returns_zero(capsys, monkeypatch, quick_table):
    # reuse the module's table: collect() itself is tested above, main() only prints it
    monkeypatch.setattr(ops_report, "collect", lambda quick=False: quick_table)
    assert ops_report.main(quick=True) == 0
    out = capsys.readouterr().out
    assert "token_logprobs" in out and "speedup" in out


def test_bench_cli_writes_results(tmp_path, monkeypatch, quick_table):
    from rlhf_fast.cli import main

    monkeypatch.setattr(ops_report, "collect", lambda quick=False: quick_table)

    assert main(["bench", "ops", "--quick", "--out", str(tmp_path)]) == 0
    jsons = list(tmp_path.glob("cpu-*.json"))
    mds = list(tmp_path.glob("cpu-*.md"))
    assert len(jsons) == 1 and len(mds) == 1
    runs = json.loads(jsons[0].read_text())
    assert isinstance(runs, list) and len(runs) == 1
    env = runs[0]["env"]
    assert env["torch"] == torch.__version__
    assert "triton" in env and "cuda" in env and "trl" in env["peers"] and "git_commit" in env
    labels = {r["op"].split()[0] for r in runs[0]["tables"][0]["rows"]}
    assert labels == PUBLIC_OPS
    assert "token_logprobs" in mds[0].read_text()
    # the foundation benchmark ran (small scale) on both providers without a failure
    cpu_ops = next(t for t in runs[0]["tables"] if t["title"].startswith("C++ CPU kernels"))
    assert not [r for r in cpu_ops["rows"] if r.get("error")]
    assert {r["backend"] for r in cpu_ops["rows"]} >= {"torch"}


def test_bench_cli_rejects_cuda_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from rlhf_fast.cli import main

    assert main(["bench", "ops", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_bench_cli_e2e_algos(tmp_path, capsys, monkeypatch):
    """`rlhf-fast bench e2e --algos` reaches the suite (default: ppo, grpo and dpo); an unknown
    algorithm is refused before anything runs."""
    from rlhf_fast.benchmarks import e2e
    from rlhf_fast.cli import main

    got = []
    monkeypatch.setattr(e2e, "run_suite", lambda **kw: got.append(kw["algos"]) or [])
    assert main(["bench", "e2e", "--quick", "--out", str(tmp_path)]) == 0
    assert main(["bench", "e2e", "--quick", "--algos", "dpo", "--out", str(tmp_path)]) == 0
    # KTO and SimPO are accepted, though not in the default selection
    assert main(["bench", "e2e", "--quick", "--algos", "simpo,kto", "--out", str(tmp_path)]) == 0
    assert [e2e._check_algos(a) for a in got] == [("ppo", "grpo", "dpo"), ("dpo",), ("kto", "simpo")]
    assert main(["bench", "e2e", "--algos", "ppo,nope", "--out", str(tmp_path / "x")]) == 2
    assert "algos" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_bench_cli_e2e_step_options(tmp_path, capsys, monkeypatch):
    """`rlhf-fast bench e2e`'s step options (those docs/performance.md names) reach the suite as
    E2EConfig overrides and the results' suite line; with ops, or with a value E2EConfig refuses,
    they are refused naming the option, before anything runs."""
    import json

    from rlhf_fast.benchmarks import e2e
    from rlhf_fast.cli import main

    got = []
    monkeypatch.setattr(e2e, "run_suite", lambda **kw: got.append(kw["overrides"]) or [])
    assert main(["bench", "e2e", "--quick", "--out", str(tmp_path)]) == 0
    assert main(["bench", "e2e", "--quick", "--rl-padding-free", "--rl-prompt-tokens", "64", "--dpo-prefix-sharing",
                 "--out", str(tmp_path)]) == 0
    assert got == [None, {"rl_padding_free": True, "rl_prompt_tokens": 64, "dpo_prefix_sharing": True}]
    runs = json.loads(next(tmp_path.glob("*.json")).read_text())
    runs = runs if isinstance(runs, list) else runs.get("runs", [runs])
    assert any("--rl-prompt-tokens 64 --rl-padding-free --dpo-prefix-sharing" in json.dumps(r) for r in runs)
    capsys.readouterr()
    for argv, opt in ((["bench", "ops", "--rl-prefix-sharing"], "--rl-prefix-sharing"),
                      (["bench", "e2e", "--dpo-prompt-tokens", "0"], "--dpo-prompt-tokens")):
        assert main(argv + ["--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and opt in err[0], err
    assert len(got) == 2 and not (tmp_path / "x").exists()


def test_e2e_rl_step_takes_padding_free():
    """E2EConfig.rl_padding_free sets our PPO / GRPO step's ppo.padding_free (and only ours)."""
    from dataclasses import replace

    from rlhf_fast.benchmarks import e2e

    with pytest.raises(ValueError, match="rl_padding_free"):
        e2e.E2EConfig(rl_padding_free=1)
    cfg = e2e.E2EConfig.quick()
    for algo in ("grpo", "ppo"):
        on = e2e.RLHFFastStep(replace(cfg, rl_padding_free=True), algo).trainer.config.ppo
        off = e2e.RLHFFastStep(cfg, algo).trainer.config.ppo
        assert on.padding_free and not off.padding_free


def test_bench_timing_percentiles():
    calls = []
    t = common.bench(lambda: calls.append(1), warmup=2, rep=7, max_time_s=10)
    assert len(calls) == 9 and t.n == 7
    assert 0 <= t.p20_ms <= t.median_ms <= t.p80_ms
    with pytest.raises(ValueError, match="rep"):
        common.bench(lambda: None, rep=0)
    with pytest.raises(TypeError, match="fn"):
        common.bench(None)


def _case_alloc_48mib():
    # a call that touches a known amount of fresh memory: 48 MiB of float32
    return lambda: torch.ones(48 * 1024 * 1024 // 4)


def test_subprocess_peak_memory_sees_a_known_allocation(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    m = common.extra_peak_bytes_subprocess("tests.test_benchmarks:_case_alloc_48mib", "torch", threads=1)
    mib = m["bytes"] / 2**20
    if m["method"] == "rss":
        assert 46 <= mib <= 64, m
    else:
        assert 47.9 <= mib <= 48.1, m


def test_profiler_peak_memory_sees_a_known_allocation():
    b = common.profiler_extra_peak_bytes(lambda: torch.ones(1 << 20).sum())  # 4 MiB, freed at once
    assert b == pytest.approx(4 * 2**20, rel=0.01)


def test_results_append(tmp_path):
    t = common.Table("t", ["a", "b"])
    t.add(a=1, b=0.5)
    common.write_results([t], out_dir=tmp_path, suite="x")
    paths = common.write_results([t], out_dir=tmp_path, suite="y")
    runs = json.loads(paths["json"].read_text())
    assert [r["suite"] for r in runs] == ["x", "y"]
    assert paths["md"].read_text().count("| 1 | 0.5 |") == 2
    with pytest.raises(ValueError, match="columns"):
        common.Table("empty", [])


def test_e2e_config_validation():
    from rlhf_fast.benchmarks.e2e import E2EConfig

    assert E2EConfig().batch_size == 16
    with pytest.raises(ValueError, match="group_size"):
        E2EConfig(group_size=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        E2EConfig(max_new_tokens=0)


def test_e2e_long_rl_prompts_are_the_same_on_both_sides():
    """``rl_prompt_tokens``: every PPO / GRPO prompt that many tokens, the same text on both
    sides (TRL's step samples from it, rlhf_fast's trainer reads it); the default keeps PROMPTS."""
    from rlhf_fast.benchmarks import e2e

    with pytest.raises(ValueError, match="rl_prompt_tokens"):
        e2e.E2EConfig(rl_prompt_tokens=-1)
    cfg = e2e.E2EConfig(prompts_per_step=2, group_size=2, max_new_tokens=3, hidden_size=32, mini_batch_size=4,
                        steps=1, rl_prompt_tokens=24, rl_prefix_sharing=True)
    model, tok = e2e.build_model(cfg)
    prompts = e2e.rl_prompts(cfg, tok)
    assert [len(tok(p)["input_ids"]) for p in prompts] == [24] * len(e2e.PROMPTS)
    assert all(p.startswith(q) for p, q in zip(prompts, e2e.PROMPTS))
    assert e2e.rl_prompts(e2e.E2EConfig(), tok) == list(e2e.PROMPTS)
    with pytest.raises(ValueError, match="shorter than the prompt"):
        e2e.rl_prompts(e2e.E2EConfig(rl_prompt_tokens=1), tok)
    trl = e2e.TRLStep(cfg, "grpo")
    assert trl._prompts() == [p for p in prompts[:2] for _ in range(2)]
    ours = e2e.RLHFFastStep(cfg, "ppo")
    assert ours.trainer.config.data.prompts == prompts and ours.trainer.config.ppo.prefix_sharing
    assert ours.step()["step"] > 0


def test_e2e_trl_step_runs_and_reports_missing_trainer(monkeypatch):
    pytest.importorskip("trl")
    from rlhf_fast.benchmarks import e2e

    cfg = e2e.E2EConfig(prompts_per_step=2, group_size=2, max_new_tokens=3, hidden_size=16, steps=1,
                        mini_batch_size=4)
    rec = e2e.TRLStep(cfg, "ppo").step()
    assert all(rec[p] >= 0 for p in e2e.PHASES) and rec["step"] >= sum(rec[p] for p in e2e.PHASES) * 0.99
    assert 0 < rec["tokens"] <= cfg.batch_size * cfg.max_new_tokens

    def fake(framework, algo, c, timeout_s):
        if framework == "rlhf_fast":
            raise RuntimeError("ImportError: no trainer")
        return dict(generate=1.0, logprobs=1.0, reward_adv=0.1, update=1.0, step=3.1, tokens=10.0, reference=1.0,
                    tokens_per_s=3.2, extra_peak_bytes=1 << 20, rss_bytes=1 << 30)

    monkeypatch.setattr(e2e, "_subprocess", fake)
    rl, dpo = e2e.run_suite(cfg=cfg)
    ours = [r for t in (rl, dpo) for r in t.rows if r["framework"] == "rlhf_fast"]
    assert [r["algo"] for r in ours] == ["ppo", "grpo", "dpo"]
    for r in ours:
        assert "rlhf_fast side failed" in r["error"] and r.get("step_s") is None  # (an error: the run exits 1)


def test_e2e_trl_side_uses_trls_own_logprob_path_and_optimiser():
    """Fairness: both TRL log-prob paths give the same numbers; 'auto' picks TRL 1.x's fused LM
    head for GRPO on CUDA only; the TRL side's AdamW is transformers' Trainer default (fused, no
    weight decay), as rlhf_fast's."""
    pytest.importorskip("trl")
    from rlhf_fast.benchmarks import e2e

    with pytest.raises(ValueError, match="trl_logprobs"):
        e2e.E2EConfig(trl_logprobs="liger")
    assert not e2e.E2EConfig().trl_fused_head("grpo") and not e2e.E2EConfig().trl_fused_head("ppo")
    assert e2e.E2EConfig(device="cuda").trl_fused_head("grpo")
    assert not e2e.E2EConfig(device="cuda").trl_fused_head("ppo")
    kw = dict(prompts_per_step=2, group_size=2, max_new_tokens=4, hidden_size=16, steps=1, mini_batch_size=4)
    fused = e2e.TRLStep(e2e.E2EConfig(trl_logprobs="fused_head", **kw), "grpo")
    plain = e2e.TRLStep(e2e.E2EConfig(trl_logprobs="selective", **kw), "grpo")
    assert fused.fused_head and not plain.fused_head
    for side in (fused, plain):
        g = side.opt.param_groups[0]
        assert g["fused"] and g["weight_decay"] == 0.0
    ids = torch.randint(3, len(plain.tok), (4, 9))
    am = torch.ones_like(ids)
    am[0, :2] = 0  # a left-padded row
    with torch.no_grad():
        a, ent = fused._logps(fused.model, ids, am, 5, entropy=True)
        b = plain._logps(plain.model, ids, am, 5)
        c = fused._logps(fused.ref, ids, am, 5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5)
    assert ent is not None and ent.shape == a.shape
    rec = fused.step()
    assert rec["step"] > 0 and 0 < rec["tokens"] <= kw["prompts_per_step"] * 2 * kw["max_new_tokens"]


def test_e2e_suite_trains_the_tokenizer_once_and_prints_each_finished_run(monkeypatch, capsys):
    from rlhf_fast.benchmarks import e2e

    cfg = e2e.E2EConfig(prompts_per_step=2, group_size=2, max_new_tokens=3, hidden_size=16, steps=1,
                        mini_batch_size=4, vocab_size=2048)
    fresh = e2e.build_tokenizer(cfg)
    trained = []
    real_build = e2e.build_tokenizer
    monkeypatch.setattr(e2e, "build_tokenizer", lambda c: trained.append(c) or real_build(c))
    seen = []

    def fake(framework, algo, c, timeout_s):
        # what a subprocess gets: a saved tokenizer that encodes, pads and specials as the fresh one
        _, tok = e2e.build_model(c)
        seen.append(c.tokenizer_dir)
        text = [e2e.PROMPTS[0], "0 1 2 3 zq9 x"]
        assert tok(text, padding=True)["input_ids"] == fresh(text, padding=True)["input_ids"]
        assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.padding_side, len(tok)) == \
            (fresh.pad_token_id, fresh.eos_token_id, fresh.bos_token_id, fresh.padding_side, len(fresh))
        if (framework, algo) == ("trl", "grpo"):
            raise RuntimeError("boom")
        return dict(generate=1.0, logprobs=1.0, reward_adv=0.1, update=1.0, step=3.1, tokens=10.0, reference=0.5,
                    tokens_per_s=3.2, extra_peak_bytes=1 << 20, rss_bytes=1 << 30)

    monkeypatch.setattr(e2e, "_subprocess", fake)
    e2e.run_suite(cfg=cfg)
    assert len(trained) == 1 and len(seen) == 6 and len(set(seen)) == 1 and seen[0] is not None
    assert not os.path.exists(seen[0])  # the temporary tokenizer is removed with the suite
    err = capsys.readouterr().err.splitlines()
    lines = [ln for ln in err if ln.startswith("e2e ")]
    assert len(lines) == 6 and "e2e ppo trl" in lines[0] and "step 3.100 s" in lines[0]
    assert "e2e grpo trl" in lines[2] and "failed: boom" in lines[2]
    assert "e2e dpo trl" in lines[4] and "(reference 0.500 update 1.000)" in lines[4]


def test_e2e_device_is_checked():
    from rlhf_fast.benchmarks import e2e

    with pytest.raises(ValueError, match="device"):
        e2e.E2EConfig(device="tpu")
    with pytest.raises(ValueError, match="device"):
        e2e.run_suite(device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="GPU"):
            e2e.run_suite(device="cuda")
    big = e2e.E2EConfig.gpu_0p5b()
    assert (big.device, big.family, big.num_kv_heads, big.batch_size) == ("cuda", "qwen2", 2, 64)


def test_e2e_sides_run_a_gqa_qwen2_step_with_a_large_vocabulary():
    """The configuration path the GPU run takes (GQA Qwen2, BPE vocabulary filled from a
    synthetic corpus), on the CPU at toy size, for both frameworks and every algorithm."""
    from rlhf_fast.benchmarks import e2e

    cfg = e2e.E2EConfig(prompts_per_step=2, group_size=2, max_new_tokens=3, hidden_size=32, num_heads=4,
                        num_kv_heads=2, intermediate_size=48, family="qwen2", vocab_size=2048, mini_batch_size=4,
                        steps=1, dpo_pairs=2, dpo_prompt_tokens=8, dpo_min_response=4, dpo_max_response=8)
    model, tok = e2e.build_model(cfg)
    assert len(tok) > 1024 and model.config.num_key_value_heads == 2
    for algo in ("ppo", "grpo", "dpo", "kto", "simpo"):
        for fw in ("trl", "rlhf_fast"):
            rec = e2e.measure(fw, algo, cfg)
            assert rec["step"] > 0 and rec["tokens"] > 0, (algo, fw)
            # a step allocates activations: the torch allocator's peak is positive
            assert rec["extra_peak_bytes"] > 0, (algo, fw)
            assert rec["extra_rss_bytes"] is None or rec["extra_rss_bytes"] >= 0


def test_e2e_ratio_row_reports_both_memory_measures(monkeypatch):
    from rlhf_fast.benchmarks import e2e

    cfg = e2e.E2EConfig(prompts_per_step=2, group_size=2, max_new_tokens=3, hidden_size=16, steps=1,
                        mini_batch_size=4, tokenizer_dir="unused")

    def fake(framework, algo, c, timeout_s):
        trl = framework == "trl"
        return dict(generate=1.0, logprobs=1.0, reward_adv=0.1, update=1.0, step=3.0 if trl else 1.5, tokens=10.0,
                    reference=1.2 if trl else 0.4, tokens_per_s=3.2, extra_peak_bytes=(3 if trl else 2) << 20,
                    extra_rss_bytes=(8 if trl else 2) << 20, rss_bytes=1 << 30)

    monkeypatch.setattr(e2e, "_subprocess", fake)
    tables = e2e.run_suite(cfg=cfg)
    assert [t.title.split(" on ")[0] for t in tables] == ["one RL step", "one DPO step"]
    ratio = [r for t in tables for r in t.rows if r["framework"] == "TRL ÷ rlhf_fast"]
    assert [(r["algo"], r["step_s"], r["extra_peak"], r["extra_rss"]) for r in ratio] == \
        [(a, 2.0, "1.50×", "4.00×") for a in ("ppo", "grpo", "dpo")]
    assert ratio[2]["reference_s"] == pytest.approx(3.0) and ratio[2]["update_s"] == 1.0
    for table in tables:
        ours = [r for r in table.rows if r["framework"] == "rlhf_fast"]
        assert ours[0]["extra_peak"] == "2.0 MiB" and ours[0]["extra_rss"] == "2.0 MiB"
        assert any("torch allocator's peak" in n for n in table.notes)
    # --algos: one table per family of algorithms, only when asked for
    (only_dpo,) = e2e.run_suite(cfg=cfg, algos="dpo")
    assert {r["algo"] for r in only_dpo.rows} == {"dpo"} and "reference_s" in only_dpo.columns
    (only_ppo,) = e2e.run_suite(cfg=cfg, algos=("ppo",))
    assert {r["algo"] for r in only_ppo.rows} == {"ppo"}
    with pytest.raises(ValueError, match="algos"):
        e2e.run_suite(cfg=cfg, algos="ppo,nope")


def test_e2e_kto_and_simpo_tables(monkeypatch, capsys):
    """`--algos kto,simpo`: a KTO table (reference / update phases) and a SimPO one (reference-free:
    the step only), each with its TRL ÷ rlhf_fast row; neither is in the default selection."""
    from rlhf_fast.benchmarks import e2e

    assert "kto" not in e2e.ALGOS and "simpo" not in e2e.ALGOS
    assert e2e._check_algos("simpo,kto,dpo") == ("dpo", "kto", "simpo")
    cfg = e2e.E2EConfig.quick()
    cfg = replace(cfg, tokenizer_dir="unused")

    def fake(framework, algo, c, timeout_s):
        trl = framework == "trl"
        rec = dict(step=3.0 if trl else 1.0, tokens=10.0, tokens_per_s=3.2, extra_peak_bytes=(4 if trl else 2) << 20,
                   extra_rss_bytes=(6 if trl else 2) << 20, rss_bytes=1 << 30)
        if algo == "kto":
            rec.update(reference=1.0 if trl else 0.5, update=2.0 if trl else 0.5)
        return rec

    monkeypatch.setattr(e2e, "_subprocess", fake)
    kto, simpo = e2e.run_suite(cfg=cfg, algos="simpo,kto")
    assert kto.title.startswith("one KTO step") and simpo.title.startswith("one SimPO step (reference-free)")
    assert "reference_s" in kto.columns and "reference_s" not in simpo.columns and "update_s" not in simpo.columns
    for table, algo in ((kto, "kto"), (simpo, "simpo")):
        assert [r["algo"] for r in table.rows] == [algo] * 3
        ratio = table.rows[-1]
        assert (ratio["framework"], ratio["step_s"], ratio["extra_peak"], ratio["extra_rss"]) == \
            ("TRL ÷ rlhf_fast", 3.0, "2.00×", "3.00×")
    assert kto.rows[-1]["reference_s"] == 2.0 and kto.rows[-1]["update_s"] == 4.0
    assert "KTOTrainer" in kto.rows[0]["framework"] and "CPOTrainer" in simpo.rows[0]["framework"]
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("e2e ")]
    assert "e2e kto trl" in err[0] and "(reference 1.000 update 2.000)" in err[0]
    assert "e2e simpo trl" in err[2] and "step 3.000 s, 3 tokens/s" in err[2]


def test_e2e_dpo_sides_compute_the_same_step():
    """The DPO comparison compares like with like: on the quick config both sides train on the
    same token rows, and from the same (perturbed, so that policy != reference) weights their
    loss and logged log-probs agree, and still after one optimizer step of each (same gradients,
    same fused AdamW); TRL 1.x's fused head and the CPU rendering give the same numbers."""
    pytest.importorskip("trl")
    from rlhf_fast.benchmarks import e2e

    cfg = e2e.E2EConfig.quick()
    trl_side, ours = e2e.TRLDPOStep(cfg), e2e.RLHFFastDPOStep(cfg)
    fused = e2e.TRLDPOStep(replace(cfg, trl_logprobs="fused_head"))
    assert not trl_side.fused_head and fused.fused_head
    rows = sorted(trl_side.rows())
    assert rows == sorted(ours.rows()) == sorted(fused.rows()) and len(rows) == cfg.dpo_pairs
    eos = ours.trainer.tokenizer.eos_token_id
    for p, c, r in rows:
        assert len(p) == cfg.dpo_prompt_tokens and c[-1] == eos and r[-1] == eos
        assert cfg.dpo_min_response <= len(c) - 1 <= cfg.dpo_max_response
    assert {len(c) - 1 for _, c, _ in rows} == {cfg.dpo_min_response, cfg.dpo_max_response}
    for opt in (trl_side.trainer.optimizer, ours.trainer.optimizer):
        g = opt.param_groups[0]
        assert g["fused"] and g["weight_decay"] == 0.0 and g["lr"] == cfg.lr
    # the same perturbation of each policy (each reference stays the initial weights)
    for side in (trl_side.trainer.model, ours.trainer.model, fused.trainer.model):
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, prm in sorted(side.named_parameters()):
                prm.add_(0.05 * torch.randn(prm.shape, generator=gen))
    for i in range(2):
        a, b, f = trl_side.step(), ours.step(), fused.step()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and f["loss"] == pytest.approx(a["loss"], rel=1e-4)
        if i == 0:
            assert abs(a["loss"] - math.log(2)) > 1e-3  # the policy differs from the reference
        for key in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected"):
            want = trl_side.last_metrics[key]
            assert ours.last_metrics[key] == pytest.approx(want, rel=1e-4, abs=1e-6), key
            assert fused.last_metrics[key] == pytest.approx(want, rel=1e-4, abs=1e-6), key
        for rec in (a, b, f):
            assert rec["reference"] > 0 and rec["update"] > 0
            assert rec["step"] == pytest.approx(rec["reference"] + rec["update"])
            assert rec["tokens"] == a["tokens"] == sum(2 * len(p) + len(c) + len(r) for p, c, r in rows)


def _perturb(model, seed, scale):
    """The same seeded perturbation of every parameter, whichever side holds the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, prm in sorted(model.named_parameters()):
            prm.add_(scale * torch.randn(prm.shape, generator=gen))


def test_e2e_kto_sides_compute_the_same_step():
    """The KTO comparison compares like with like: on the quick config both sides train on the
    same example rows in the same order with the same KL rows (each the previous example's
    completion after its prompt), and from the same perturbed policy and reference (the reference
    moved so that z0 > 0, not clamped) their loss, z0 and logged rewards / log-probs agree, and
    still after one optimizer step of each; TRL 1.x's fused head gives the same numbers."""
    pytest.importorskip("trl")
    from rlhf_fast.benchmarks import e2e

    cfg = e2e.E2EConfig.quick()
    trl_side, ours = e2e.TRLKTOStep(cfg), e2e.RLHFFastKTOStep(cfg)
    fused = e2e.TRLKTOStep(replace(cfg, trl_logprobs="fused_head"))
    assert not trl_side.fused_head and fused.fused_head
    rows = ours.rows()
    assert trl_side.rows() == rows == fused.rows() and len(rows) == 2 * cfg.dpo_pairs
    assert [k for _, _, k, _ in rows] == [rows[-1][1]] + [c for _, c, _, _ in rows[:-1]]  # the KL rotation
    assert sorted(lab for *_, lab in rows) == [False] * cfg.dpo_pairs + [True] * cfg.dpo_pairs
    assert ours.trainer.cfg.batch_size == len(rows) and trl_side.trainer.args.per_device_train_batch_size == len(rows)
    for opt in (trl_side.trainer.optimizer, ours.trainer.optimizer):
        g = opt.param_groups[0]
        assert g["fused"] and g["weight_decay"] == 0.0 and g["lr"] == cfg.lr
    for side in (trl_side, fused):
        _perturb(side.trainer.model, 1, 0.05)
        _perturb(side.trainer.ref_model, 2, 0.2)
    _perturb(ours.trainer.model, 1, 0.05)
    _perturb(ours.trainer.reference, 2, 0.2)
    for _ in range(2):
        a, b, f = trl_side.step(), ours.step(), fused.step()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and f["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert trl_side.last_metrics["kl"] > 0.1  # z0 from the KL rows, not the clamp
        for key in ("kl", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected"):
            want = trl_side.last_metrics[key]
            assert ours.last_metrics[key] == pytest.approx(want, rel=1e-4, abs=1e-6), key
            assert fused.last_metrics[key] == pytest.approx(want, rel=1e-4, abs=1e-6), key
        assert ours.last_metrics["rewards/margin"] == pytest.approx(trl_side.last_metrics["rewards/margins"],
                                                                    rel=1e-4, abs=1e-6)
        for rec in (a, b, f):
            assert rec["reference"] > 0 and rec["update"] > 0
            assert rec["step"] == pytest.approx(rec["reference"] + rec["update"])
            assert rec["tokens"] == a["tokens"] == sum(len(p) + len(c) for p, c, _, _ in rows)


def test_e2e_simpo_sides_compute_the_same_step():
    """The SimPO comparison: TRL's CPOTrainer (loss_type simpo, cpo_alpha 1) and rlhf_fast's
    reference-free DPOTrainer (no reference model at all) train on the same token rows (bos first
    in every prompt), and from the same perturbed weights their loss, NLL and logged rewards /
    token-mean log-probs agree, and still after one optimizer step of each."""
    pytest.importorskip("trl")
    from rlhf_fast.benchmarks import e2e

    cfg = e2e.E2EConfig.quick()
    trl_side, ours = e2e.TRLSimPOStep(cfg), e2e.RLHFFastDPOStep(cfg, loss_type="simpo")
    assert ours.trainer.reference is None and ours.trainer.cfg.reference_free
    t = trl_side.trainer
    assert (t.loss_type, t.cpo_alpha, t.simpo_gamma, t.beta) == ("simpo", 1.0, 0.5, cfg.dpo_beta)
    assert (ours.trainer.cfg.cpo_alpha, ours.trainer.cfg.simpo_gamma) == (1.0, 0.5)
    rows = sorted(trl_side.rows())
    assert rows == sorted(ours.rows()) and len(rows) == cfg.dpo_pairs
    tok = ours.trainer.tokenizer
    for p, c, r in rows:
        assert p[0] == tok.bos_token_id and len(p) == cfg.dpo_prompt_tokens
        assert c[-1] == tok.eos_token_id and r[-1] == tok.eos_token_id
    for opt in (t.optimizer, ours.trainer.optimizer):
        g = opt.param_groups[0]
        assert g["fused"] and g["weight_decay"] == 0.0 and g["lr"] == cfg.lr
    _perturb(t.model, 1, 0.05)
    _perturb(ours.trainer.model, 1, 0.05)
    for _ in range(2):
        a, b = trl_side.step(), ours.step()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert ours.last_metrics["nll"] == pytest.approx(trl_side.last_metrics["nll_loss"], rel=1e-4)
        for key in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected"):
            assert ours.last_metrics[key] == pytest.approx(trl_side.last_metrics[key], rel=1e-4, abs=1e-6), key
        assert ours.last_metrics["rewards/accuracy"] == trl_side.last_metrics["rewards/accuracies"]
        assert a["step"] > 0 and b["step"] > 0 and b["reference"] == 0.0
        assert a["tokens"] == b["tokens"] == sum(2 * len(p) + len(c) + len(r) for p, c, r in rows)


def test_bench_rollout_profile_names_where_generate_spends_its_time(capsys):
    from rlhf_fast.benchmarks import bench_rollout

    bench_rollout.main(["--device", "cpu", "--vocab", "300", "--hidden", "32", "--layers", "1", "--heads", "2",
                        "--batch", "2", "--seq", "16", "--resp", "8", "--gen-batch", "2", "--prompt-len", "4",
                        "--max-new", "3", "--repeats", "1", "--profile"])
    out = capsys.readouterr().out
    assert "profile of one generate call" in out
    assert "Self CPU time total" in out and "aten::" in out  # the profiler's op table
    assert "ours (HFRolloutEngine + ops.sample)" in out


def test_bench_times_bursts_of_calls_between_cuda_events(monkeypatch):
    """The CUDA timing path of common.bench (and bench_gae_sampling.bench over it), with
    stand-in events on the CPU: a fast call is timed as a burst divided by its length; a slow
    one as single calls; the CPU path times single calls."""
    import time

    from rlhf_fast.benchmarks import bench_gae_sampling as bgs
    from rlhf_fast.benchmarks import common

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = common.time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    class SimulatedClock:  # the fast case on a clock its calls advance: no dependence on load
        now = 0.0

        @classmethod
        def perf_counter(cls):
            return cls.now

    def fast_call():
        calls.append(1)
        SimulatedClock.now += 1e-6  # 1 µs per call

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(common, "_sync", lambda device: None)
    calls = []
    monkeypatch.setattr(common, "time", SimulatedClock)
    fast = bgs.bench(fast_call, torch.device("cuda"), budget_s=0.01, max_reps=5)
    assert fast["burst"] == 100 and fast["reps"] == 5 and len(calls) == 1 + 100 * fast["reps"]
    assert fast["median_ms"] == pytest.approx(1e-3)  # per call, not per burst
    calls.clear()
    t = common.bench(fast_call, warmup=2, rep=4, device="cuda")
    assert (t.burst, t.n, len(calls)) == (100, 4, 2 + 400) and t.median_ms == pytest.approx(1e-3)
    monkeypatch.setattr(common, "time", time)

    slow = bgs.bench(lambda: time.sleep(0.003), torch.device("cuda"), budget_s=0.0, max_reps=3)
    assert slow["burst"] == 1 and slow["reps"] == 3 and 2.5 < slow["median_ms"] < 50

    cpu = bgs.bench(lambda: time.sleep(0.002), torch.device("cpu"), budget_s=0.0)
    assert cpu["burst"] == 1 and cpu["reps"] == 3 and 1.5 < cpu["median_ms"] < 50


def test_gae_sampling_bench_quick_run_prints_a_table(capsys):
    from rlhf_fast.benchmarks import bench_gae_sampling as bgs

    bgs.main(["--quick", "--only", "gae", "--budget", "0.01"])
    out = capsys.readouterr().out
    assert "wall time per call" in out and "python-loop" in out and "B=64 T=512" in out


def test_bench_refuses_an_out_it_cannot_write_before_measuring(tmp_path, capsys):
    from rlhf_fast import cli

    taken = tmp_path / "results.md"
    taken.write_text("earlier results")
    assert cli.main(["bench", "ops", "--quick", "--out", str(taken)]) == 2
    assert f"--out {taken}: expected a folder, found a file" in capsys.readouterr().err
    assert cli.main(["bench", "ops", "--quick", "--out", str(taken / "sub")]) == 2
    assert f"{taken} is a file, not a folder" in capsys.readouterr().err
    assert taken.read_text() == "earlier results"


def test_bench_refuses_results_files_it_would_lose_or_cannot_write_before_measuring(tmp_path, capsys, monkeypatch):
    from rlhf_fast import cli
    from rlhf_fast.benchmarks import cli as bench_cli

    def must_not_run(*a, **k):
        raise AssertionError("benchmarks ran before the results files were checked")

    monkeypatch.setattr(bench_cli, "ops_tables", must_not_run)
    paths = common.results_paths("cpu", tmp_path)
    # an existing results file that cannot be parsed is refused, not written over
    paths["json"].write_text("{oops")
    assert cli.main(["bench", "ops", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"results file {paths['json']}:1: invalid JSON" in err and "move it aside" in err
    assert len(err.strip().splitlines()) == 1 and paths["json"].read_text() == "{oops"
    paths["json"].write_text("7")
    assert cli.main(["bench", "ops", "--quick", "--out", str(tmp_path)]) == 2
    assert "holds a JSON int, expected a list of runs" in capsys.readouterr().err
    # a results path that is a folder
    paths["json"].unlink()
    paths["md"].mkdir()
    assert cli.main(["bench", "ops", "--quick", "--out", str(tmp_path)]) == 2
    assert f"results file {paths['md']}: expected a file, found a folder" in capsys.readouterr().err
    assert not paths["json"].exists()


def test_write_results_moves_an_unreadable_file_aside(tmp_path, capsys):
    # after a long run the new results are written and the old file is kept under another name
    t = common.Table("t", ["a"])
    t.add(a=1)
    paths = common.results_paths("cpu", tmp_path)
    paths["json"].write_text("{oops")
    assert common.write_results([t], out_dir=tmp_path, suite="x") == paths
    assert [r["suite"] for r in json.loads(paths["json"].read_text())] == ["x"]
    aside = list(tmp_path.glob(paths["json"].name + ".unreadable-*"))
    assert len(aside) == 1 and aside[0].read_text() == "{oops"
    assert "moved it to" in capsys.readouterr().err


def test_bench_packing_times_both_layouts_on_the_same_losses(capsys):
    """benchmarks/bench_packing.py: a padded and a padding-free row per trainer, their first
    steps' losses equal (the same model and batch), and bad options exit with a usage error."""
    from rlhf_fast.benchmarks import bench_packing

    argv = ["--hidden", "32", "--layers", "1", "--heads", "2", "--vocab", "300", "--steps", "1", "--pairs", "2",
            "--max-response", "24"]
    assert bench_packing.main(argv) == 0
    out = capsys.readouterr().out
    rows = [ln.split("|")[1:-1] for ln in out.splitlines() if ln.startswith("| dpo") or ln.startswith("| sft")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("dpo", "padded"), ("dpo", "padding_free: true"),
                                                            ("sft", "padded"), ("sft", "packing: true")]
    for a, b in (rows[0:2], rows[2:4]):
        assert float(a[6]) == pytest.approx(float(b[6]), rel=1e-4)
    with pytest.raises(SystemExit):
        bench_packing.main(["--trainers", "ppo"])


def test_e2e_distill_sides_run_the_same_configuration(monkeypatch, capsys):
    """The distillation comparison (`--algos distill`): both sides start from the same student and
    the same teacher weights, with TRL's beta / temperature / completion length equal to ours and
    the same fused AdamW; each step splits into generate + update, counts its generated tokens
    and logs a finite loss. (The loss itself is checked against TRL's in tests/test_distill.py.)"""
    pytest.importorskip("trl")
    from rlhf_fast.benchmarks import e2e

    assert "distill" in e2e.ALL_ALGOS and "distill" not in e2e.ALGOS
    with pytest.raises(ValueError, match="distill_beta"):
        e2e.E2EConfig(distill_beta=1.5)
    cfg = e2e.E2EConfig.quick()
    trl_side, ours = e2e.TRLDistillStep(cfg), e2e.RLHFFastDistillStep(cfg)
    t, o = trl_side.trainer, ours.trainer
    for a, b in ((t.model, o.policy), (t.teacher_model, o.teacher)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert t.teacher_model.config.hidden_size == cfg.teacher_hidden_size != cfg.hidden_size
    assert (t.args.beta, t.args.temperature, t.args.max_completion_length) == \
        (o.config.distill.beta, o.config.rollout.temperature, o.config.rollout.max_new_tokens)
    assert len(trl_side.examples) == cfg.batch_size == o.config.rollout.prompts_per_step * o.config.rollout.group_size
    for opt in (t.optimizer, o.optimizer):
        g = opt.param_groups[0]
        assert g["fused"] and g["weight_decay"] == 0.0 and g["lr"] == cfg.lr
    for rec in (trl_side.step(), ours.step()):
        assert rec["generate"] > 0 and rec["update"] > 0 and rec["step"] == pytest.approx(rec["generate"] + rec["update"])
        assert 0 < rec["tokens"] <= cfg.batch_size * cfg.max_new_tokens and math.isfinite(rec["loss"])


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_e2e_sdft_sides_run_the_same_step():
    """The SDFT comparison (`--algos sdft`): TRL's experimental SDFTTrainer and ours start from the same
    policy and the same base teacher (TRL's loaded from the initial policy saved to disk), with the same
    teacher prompts, divergence settings, sampling, answers per prompt and fused AdamW; each step reads
    the same records on both sides, splits into generate + update, counts its generated tokens and logs a
    finite loss. (The loss itself is checked against TRL's in tests/test_sdft*.py.)"""
    pytest.importorskip("trl")
    from rlhf_fast.benchmarks import e2e

    assert "sdft" in e2e.ALL_ALGOS and "sdft" not in e2e.ALGOS
    assert e2e._check_algos("iw_opd,sdft,distill") == ("distill", "sdft", "iw_opd")
    cfg = e2e.E2EConfig.quick()
    trl_side, ours = e2e.TRLSDFTStep(cfg), e2e.RLHFFastSDFTStep(cfg)
    t, o = trl_side.trainer, ours.trainer
    assert _same_weights(t.model, o.policy) and _same_weights(t.teacher_model, o.teacher)
    assert t.teacher_model is not t.model and o.teacher is not o.policy
    recs = e2e.self_distill_records()
    assert [t.teacher_context_builder._compose_teacher_prompt(r["prompt"], r["privileged_context"]) for r in recs] \
        == o._teacher_text["train"]
    a, s, ro = t.args, o.config.sdft, o.config.rollout
    assert (a.teacher_model_kind, a.distillation_mode, a.distillation_topk, a.distillation_alpha,
            a.distillation_is_clip, a.distillation_add_tail, a.num_loss_tokens_to_skip) == \
        (s.teacher_model_kind, s.distillation_mode, s.distillation_topk, s.distillation_alpha, s.distillation_is_clip,
         s.distillation_add_tail, s.num_loss_tokens_to_skip) == ("base", "topk_logits", 100, 0.5, 2.0, False, 0)
    g = t.generation_config
    assert (t.num_generations, a.per_device_train_batch_size, g.temperature, g.max_new_tokens, g.top_p, g.top_k) == \
        (ro.group_size, cfg.batch_size, ro.temperature, ro.max_new_tokens, ro.top_p, ro.top_k) == \
        (cfg.group_size, cfg.batch_size, cfg.temperature, cfg.max_new_tokens, 1.0, 0)
    assert not o._keeps_old_logp  # one optimizer step per rollout: no importance weight, as TRL (no old log-probs)
    for opt in (t.optimizer, o.optimizer):
        pg = opt.param_groups[0]
        assert pg["fused"] and pg["weight_decay"] == 0.0 and pg["lr"] == cfg.lr
    for i in range(2):
        recs_t, rec_o = trl_side.step(), ours.step()
        assert trl_side.examples == e2e.self_distill_step_records(cfg, i)
        assert [e["prompt"] for e in trl_side.examples][::cfg.group_size] == \
            [e2e.PROMPTS[j] for j in o._step_prompts] == e2e.online_dpo_prompts(cfg, i)
        for rec in (recs_t, rec_o):
            assert rec["generate"] > 0 and rec["update"] > 0
            assert rec["step"] == pytest.approx(rec["generate"] + rec["update"])
            assert 0 < rec["tokens"] <= cfg.batch_size * cfg.max_new_tokens and math.isfinite(rec["loss"])


def test_e2e_sdpo_sides_run_the_same_step():
    """The SDPO comparison (`--algos sdpo`): TRL's experimental SDPOTrainer and ours start from the
    same policy and the same EMA teacher (TRL's loaded from the initial policy saved to disk), with the
    same loss settings, success threshold, sampling, answers per prompt and fused AdamW; each step reads
    the same prompts, moves the EMA teacher on both sides (TRL's by its callback), splits into generate +
    update, counts its generated tokens and logs a finite loss. (The loss itself is checked against
    TRL's in tests/test_sdpo*.py.)"""
    pytest.importorskip("trl")
    from rlhf_fast.benchmarks import e2e

    assert "sdpo" in e2e.ALL_ALGOS and "sdpo" not in e2e.ALGOS
    cfg = e2e.E2EConfig.quick()
    trl_side, ours = e2e.TRLSDPOStep(cfg), e2e.RLHFFastSDPOStep(cfg)
    t, o = trl_side.trainer, ours.trainer
    assert _same_weights(t.model, o.policy) and _same_weights(t.teacher_model, o.teacher)
    assert t.teacher_model is not t.model and o.teacher is not o.policy
    a, s, ro = t.args, o.config.sdpo, o.config.rollout
    keys = ("distillation_weight", "distillation_mode", "distillation_alpha", "distillation_is_clip",
            "teacher_model_kind", "teacher_update_rate", "teacher_sync_steps", "success_reward_threshold",
            "dont_reprompt_on_self_success", "reprompt_template", "solution_template")
    assert [getattr(a, k) for k in keys] == [getattr(s, k) for k in keys]
    assert (a.distillation_weight, a.teacher_model_kind, a.success_reward_threshold) == (1.0, "ema", 0.0)
    g = t.generation_config
    assert (t.num_generations, a.per_device_train_batch_size, g.temperature, g.max_new_tokens, g.top_p, g.top_k) == \
        (ro.group_size, cfg.batch_size, ro.temperature, ro.max_new_tokens, ro.top_p, ro.top_k) == \
        (cfg.group_size, cfg.batch_size, cfg.temperature, cfg.max_new_tokens, 1.0, 0)
    for opt in (t.optimizer, o.optimizer):
        pg = opt.param_groups[0]
        assert pg["fused"] and pg["weight_decay"] == 0.0 and pg["lr"] == cfg.lr
    w_t, w_o = ({k: v.clone() for k, v in m.state_dict().items()} for m in (t.teacher_model, o.teacher))
    for i in range(2):
        rec_t, rec_o = trl_side.step(), ours.step()
        assert [e["prompt"] for e in trl_side.examples] == \
            [p for p in e2e.online_dpo_prompts(cfg, i) for _ in range(cfg.group_size)]
        for rec in (rec_t, rec_o):
            assert rec["generate"] > 0 and rec["update"] > 0
            assert rec["step"] == pytest.approx(rec["generate"] + rec["update"])
            assert 0 < rec["tokens"] <= cfg.batch_size * cfg.max_new_tokens and math.isfinite(rec["loss"])
    assert trl_side.teacher_syncs == 2 and o.self_teacher.optimizer_steps == 2
    for w0, m in ((w_t, t.teacher_model), (w_o, o.teacher)):  # the EMA teachers moved
        assert any(not torch.equal(w0[k], v) for k, v in m.state_dict().items())
    assert trl_side.last_metrics["self_distillation/reprompt_sample_fraction"] == 1.0  # threshold 0: every answer


def test_e2e_iw_opd_sides_run_the_same_step():
    """The IW-OPD comparison (`--algos iw_opd`): TRL's experimental IWOPDTrainer and our
    DistillationTrainer with distill.objective iw_opd start from the same student and teacher, read the
    same chat-rendered prompts, sample without a filter on both sides (TRL's top_p default is 0.95),
    with the same gamma / epsilon and fused AdamW; each step splits into generate + update, counts its
    generated tokens and logs a finite loss. (The loss is checked against TRL's in
    tests/test_distill_iw_opd.py.)"""
    pytest.importorskip("trl")
    from rlhf_fast.benchmarks import e2e

    assert "iw_opd" in e2e.ALL_ALGOS and "iw_opd" not in e2e.ALGOS
    cfg = e2e.E2EConfig.quick()
    trl_side, ours = e2e.TRLIWOPDStep(cfg), e2e.RLHFFastIWOPDStep(cfg)
    t, o = trl_side.trainer, ours.trainer
    assert _same_weights(t.model, o.policy) and _same_weights(t.teacher_model, o.teacher)
    assert t.teacher_model.config.hidden_size == cfg.teacher_hidden_size != cfg.hidden_size
    tok = t.processing_class
    rendered = [tok.apply_chat_template(e["messages"], tokenize=False, add_generation_prompt=True)
                for e in trl_side.examples[::cfg.group_size]]
    assert rendered == o.prompts[:cfg.prompts_per_step] and rendered[0].startswith(tok.bos_token)
    a, d, ro = t.args, o.config.distill, o.config.rollout
    assert (a.distillation_objective, a.iw_opd_gamma, a.iw_opd_epsilon, a.lmbda) == \
        (d.objective, d.iw_opd_gamma, d.iw_opd_epsilon, d.lmbda) == ("iw_opd", 0.5, 1e-8, 1.0)
    assert (a.temperature, a.max_completion_length, a.top_p, a.top_k) == \
        (ro.temperature, ro.max_new_tokens, ro.top_p, ro.top_k) == (cfg.temperature, cfg.max_new_tokens, 1.0, 0)
    assert len(trl_side.examples) == cfg.batch_size == ro.prompts_per_step * ro.group_size
    for opt in (t.optimizer, o.optimizer):
        pg = opt.param_groups[0]
        assert pg["fused"] and pg["weight_decay"] == 0.0 and pg["lr"] == cfg.lr
    for rec in (trl_side.step(), ours.step()):
        assert rec["generate"] > 0 and rec["update"] > 0
        assert rec["step"] == pytest.approx(rec["generate"] + rec["update"])
        assert 0 < rec["tokens"] <= cfg.batch_size * cfg.max_new_tokens and math.isfinite(rec["loss"])


@pytest.mark.parametrize("algo,title,trl_name", [
    ("sdft", "one SDFT (self-distillation) step", "TRL SDFTTrainer (experimental)"),
    ("sdpo", "one SDPO (self-distillation policy optimisation) step", "TRL SDPOTrainer (experimental)"),
    ("iw_opd", "one IW-OPD (importance-weighted on-policy distillation) step", "TRL IWOPDTrainer (experimental)")])
def test_e2e_self_distillation_tables(monkeypatch, capsys, algo, title, trl_name):
    """`--algos sdft` / `sdpo` / `iw_opd`: a table each with generate / update columns, a TRL row, an rlhf_fast
    row and the TRL ÷ rlhf_fast ratios (time, tokens/s, extra memory), rendered to markdown."""
    from rlhf_fast.benchmarks import e2e

    cfg = replace(e2e.E2EConfig.quick(), tokenizer_dir="unused")

    def fake(framework, a, c, timeout_s):
        assert a == algo
        trl = framework == "trl"
        return dict(generate=1.0 if trl else 0.5, update=2.0 if trl else 0.5, step=3.0 if trl else 1.0, tokens=60.0,
                    tokens_per_s=20.0 if trl else 60.0, extra_peak_bytes=(6 if trl else 2) << 20,
                    extra_rss_bytes=(4 if trl else 2) << 20, rss_bytes=1 << 30, loss=0.5)

    monkeypatch.setattr(e2e, "_subprocess", fake)
    (table,) = e2e.run_suite(cfg=cfg, algos=algo)
    assert table.title.startswith(title) and f"≤{cfg.max_new_tokens} new tokens" in table.title
    assert table.columns[2:5] == ["generate_s", "update_s", "step_s"]
    assert [(r["algo"], r["framework"]) for r in table.rows] == \
        [(algo, trl_name), (algo, "rlhf_fast"), (algo, "TRL ÷ rlhf_fast")]
    ratio = table.rows[-1]
    assert (ratio["generate_s"], ratio["update_s"], ratio["step_s"], ratio["tokens_per_s"], ratio["extra_peak"],
            ratio["extra_rss"]) == (2.0, 4.0, 3.0, 3.0, "3.00×", "2.00×")
    assert f"| {algo} | rlhf_fast |" in table.markdown()
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("e2e ")]
    assert f"e2e {algo} trl" in err[0] and "(generate 1.000 update 2.000)" in err[0]


def test_e2e_online_dpo_sides_run_the_same_step():
    """The online DPO comparison (`--algos online_dpo`): TRL's experimental OnlineDPOTrainer and
    ours start from the same policy (each reference a copy of it), with the same beta, loss type,
    sampling settings, prompts per step, answers per prompt and fused AdamW; each step reads the same
    prompts, generates the same number of answers of the same width (max_new_tokens), splits into
    generate + logprobs + update, and its loss is ln 2 on the first step on both sides (the policy is
    still the reference) and moves after the first update. (The loss and statistics are checked
    against TRL's training_step in tests/test_online_dpo.py.)"""
    pytest.importorskip("trl")
    from rlhf_fast.benchmarks import e2e

    assert "online_dpo" in e2e.ALL_ALGOS and "online_dpo" not in e2e.ALGOS
    assert e2e._check_algos("online_dpo,dpo") == ("dpo", "online_dpo")
    cfg = e2e.E2EConfig.quick()
    trl_side, ours = e2e.TRLOnlineDPOStep(cfg), e2e.RLHFFastOnlineDPOStep(cfg)
    t, o = trl_side.trainer, ours.trainer
    for a, b in ((t.model, o.policy), (t.ref_model, o.policy), (o.reference, o.policy)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    g, ro = t.generation_config, o.config.rollout
    assert (t.beta, t.args.loss_type, t.num_generations, t.args.per_device_train_batch_size) == \
        (o._beta, o.config.online_dpo.loss_type, ro.group_size, ro.prompts_per_step) == (cfg.dpo_beta, "sigmoid", 2, 4)
    assert (g.temperature, g.max_new_tokens, g.top_p, g.top_k or 0) == \
        (ro.temperature, ro.max_new_tokens, ro.top_p, ro.top_k) == (cfg.temperature, cfg.max_new_tokens, 1.0, 0)
    assert (t.args.max_grad_norm, o.config.ppo.max_grad_norm, o.config.ppo.mini_batch_size) == (1.0, 1.0, 8)
    for opt in (t.optimizer, o.optimizer):
        pg = opt.param_groups[0]
        assert pg["fused"] and pg["weight_decay"] == 0.0 and pg["lr"] == cfg.lr
    n = 2 * cfg.prompts_per_step
    for i in range(2):
        a, b = trl_side.step(), ours.step()
        want = e2e.online_dpo_prompts(cfg, i)
        assert [e["prompt"] for e in trl_side.examples] == want == [p for p, _, _ in o._last_texts][::2]
        assert tuple(trl_side.generated.shape) == ours.generated == (n, cfg.max_new_tokens)
        for rec in (a, b):
            assert rec["generate"] > 0 and rec["logprobs"] > 0 and rec["update"] > 0
            assert rec["step"] == pytest.approx(rec["generate"] + rec["logprobs"] + rec["update"])
            assert 0 < rec["tokens"] <= n * cfg.max_new_tokens and math.isfinite(rec["loss"])
            if i == 0:
                assert rec["loss"] == pytest.approx(math.log(2), rel=1e-6)
            else:
                assert abs(rec["loss"] - math.log(2)) > 1e-6
    assert trl_side.last_metrics["beta"] == ours.last_metrics["beta"] == cfg.dpo_beta
    with pytest.raises(RuntimeError, match="expected 8 \\(2 per prompt\\) of up to 8"):
        e2e._check_online_dpo_rollout(cfg, n - 1, cfg.max_new_tokens, "TRL")
    with pytest.raises(RuntimeError, match="rlhf_fast: .* 8 answers of up to 9 tokens"):
        e2e._check_online_dpo_rollout(cfg, n, cfg.max_new_tokens + 1, "rlhf_fast")


def test_e2e_online_dpo_table(monkeypatch, capsys):
    """`--algos online_dpo`: its own table with generate / logprobs / update columns, a TRL row, an
    rlhf_fast row and the TRL ÷ rlhf_fast ratios, rendered to markdown."""
    from rlhf_fast.benchmarks import e2e

    cfg = replace(e2e.E2EConfig.quick(), tokenizer_dir="unused")

    def fake(framework, algo, c, timeout_s):
        assert algo == "online_dpo"
        trl = framework == "trl"
        return dict(generate=1.0 if trl else 0.5, logprobs=0.6 if trl else 0.2, update=1.4 if trl else 0.3,
                    step=3.0 if trl else 1.0, tokens=60.0, tokens_per_s=20.0 if trl else 60.0,
                    extra_peak_bytes=(6 if trl else 2) << 20, extra_rss_bytes=(4 if trl else 2) << 20,
                    rss_bytes=1 << 30, loss=0.69)

    monkeypatch.setattr(e2e, "_subprocess", fake)
    (table,) = e2e.run_suite(cfg=cfg, algos="online_dpo")
    assert table.title.startswith("one online DPO step") and "4 prompts × 2 answers = 8 sequences" in table.title
    assert table.columns[2:6] == ["generate_s", "logprobs_s", "update_s", "step_s"]
    assert [(r["algo"], r["framework"]) for r in table.rows] == \
        [("online_dpo", "TRL OnlineDPOTrainer (experimental)"), ("online_dpo", "rlhf_fast"),
         ("online_dpo", "TRL ÷ rlhf_fast")]
    ratio = table.rows[-1]
    assert (ratio["generate_s"], ratio["logprobs_s"], ratio["step_s"], ratio["tokens_per_s"], ratio["extra_peak"],
            ratio["extra_rss"]) == (2.0, pytest.approx(3.0), 3.0, 3.0, "3.00×", "2.00×")
    assert ratio["update_s"] == pytest.approx(1.4 / 0.3)
    md = table.markdown()
    assert "| online_dpo | rlhf_fast |" in md and "OnlineDPOTrainer itself" in md
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("e2e ")]
    assert "e2e online_dpo trl" in err[0] and "(generate 1.000 logprobs 0.600 update 1.400)" in err[0]
