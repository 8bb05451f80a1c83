"""The peers of the CPU op benchmark (benchmarks/bench_cpu_ops.py): each computes what our op
computes on the benchmark's own inputs (a wrong wiring fails here, not silently in a table),
the table carries the peer rows and the ratios against the best peer, and a peer that cannot
run is reported on its row."""

import math
import subprocess
import sys

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.benchmarks import bench_cpu_ops as B
from rlhf_fast.ops import reference

TINY = "0.004"  # N = 16 rows, T = 8 steps, B·T = 256 for the PPO loss


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_BENCH_SCALE", TINY)


def _close(a, b, atol, rtol=0.0):
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=atol, rtol=rtol), (a - b).abs().max().item()


def _peer(key, name_start):
    return next(p for p in B.CASES_BY_KEY[key].peers if p.name.startswith(name_start))


@pytest.fixture
def no_compile(monkeypatch):
    # the torch.compile peers' wiring (argument order, settings) without paying for a compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)


@pytest.mark.parametrize("key", ["token_logprobs_fp32", "token_logprobs_bf16", "token_logprobs_entropy"])
def test_token_logprobs_peers_match_ours(tiny, no_compile, key):
    pytest.importorskip("trl")
    case = B.CASES_BY_KEY[key]
    x = case.inputs()
    ours = case.ours(x)()
    for peer in case.peers:
        got = peer.make(x)()
        pairs = list(zip(ours, got)) if x["entropy"] else [(ours, got)]
        assert len(pairs) == (2 if x["entropy"] else 1)
        for o, g in pairs:
            if x["logits"].dtype == torch.bfloat16 and not peer.compiled:
                # TRL keeps bf16 logits in bf16: its log-probs carry bf16 rounding (2^-8 relative)
                _close(g, o, atol=1e-3, rtol=2 ** -7)
            else:
                _close(g, o, atol=1e-4)


def test_fused_linear_peers_match_ours(tiny, no_compile):
    pytest.importorskip("trl")
    case = B.CASES_BY_KEY["fused_linear_logprobs"]
    x = case.inputs()
    ours = case.ours(x)()
    for peer in case.peers:
        _close(peer.make(x)(), ours, atol=1e-4)


def test_divergence_peers_match_ours(tiny, no_compile):
    # TRL's ChunkedDivergenceFunction and the reference: the same summed divergence and the same
    # gradients to the student's hidden states and weight
    pytest.importorskip("trl")
    case = B.CASES_BY_KEY["fused_linear_divergence"]
    x = case.inputs()
    assert not x["teacher_hidden"].requires_grad and 0 < x["beta"] < 1
    loss = case.ours(x)()
    grads = [x[k].grad.clone() for k in ("student_hidden", "student_weight")]
    assert all(g.abs().sum() > 0 for g in grads)
    for peer in case.peers:
        got = peer.make(x)()
        _close(got, loss, atol=1e-5, rtol=1e-5)
        for k, g in zip(("student_hidden", "student_weight"), grads):
            _close(x[k].grad, g, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("key", ["gae", "discounted_returns"])
def test_advantage_peers_match_ours(tiny, no_compile, key):
    case = B.CASES_BY_KEY[key]
    x = case.inputs()
    m = x["mask"]
    assert (~m).any() and m[:, 0].all()  # right padding, and some of it
    ours = case.ours(x)()
    ours = ours if isinstance(ours, tuple) else (ours,)
    for peer in case.peers:
        got = peer.make(x)()
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == len(ours)
        for g, o in zip(got, ours):
            _close(g, o, atol=1e-5)


def test_ppo_peers_match_ours(tiny, no_compile):
    case = B.CASES_BY_KEY["ppo_policy_loss"]
    x = case.inputs()
    loss = case.ours(x)()
    grad = x["logp"].grad.clone()
    for peer in case.peers:
        got = peer.make(x)()
        _close(got, loss, atol=1e-6)
        _close(x["logp"].grad, grad, atol=1e-8, rtol=1e-5)
    # the statistics the TRL-style peer logs are ours as well
    _, stats = ops.ppo_policy_loss(x["logp"], x["old_logp"], x["advantages"], x["mask"], clip_low=x["clip"])
    _, peer_stats = B.ppo_policy_loss_composed(x["logp"], x["old_logp"], x["advantages"], x["mask"],
                                               clip=x["clip"])
    assert set(peer_stats) <= set(stats)
    for k, v in peer_stats.items():
        _close(v, stats[k], atol=1e-6)


@pytest.mark.parametrize("key", ["sample_top_p", "sample_temperature"])
def test_sample_peers_draw_from_our_distribution(tiny, key):
    # samplers share no random stream: compare the token frequencies of many draws of one row
    case = B.CASES_BY_KEY[key]
    kw = case.inputs()["kw"]
    row = torch.randn(16, generator=torch.Generator().manual_seed(3)) * 2
    p = reference.process_logits(row[None], **kw).exp()[0]
    if kw.get("top_p", 1.0) < 1.0:
        assert (p == 0).any()  # the filter removes tokens here, so a peer that ignores it fails
    n = 20000
    for make in [case.ours] + [peer.make for peer in case.peers]:
        x = dict(logits=row.expand(n, 16).contiguous(), generator=torch.Generator().manual_seed(0), kw=kw)
        out = make(x)()
        tokens = out[0] if isinstance(out, tuple) else out
        freq = torch.bincount(tokens, minlength=16).double() / n
        assert (freq[p == 0] == 0).all(), make
        _close(freq, p.double(), atol=0.02)  # > 5 standard deviations of a frequency


def _rows(table, case_name):
    return {r["backend"]: r for r in table.rows if r["case"] == case_name}


def test_table_has_peer_rows_and_ratios_against_the_best_peer():
    pytest.importorskip("trl")
    table = B.run_suite(scale=float(TINY), memory=False, rep=2, max_time_s=0.05,
                        cases=["gae", "token_logprobs"])
    for c in ("speedup", "mem_ratio", "best_peer", "goal", "verdict", "note"):
        assert c in table.columns
    assert not [r for r in table.rows if r.get("error")]
    for case in B.CASES:
        if case.op not in ("gae", "token_logprobs"):
            continue
        rows = _rows(table, case.name)
        assert {"torch", "cpp", "cpp vs torch", "cpp vs best peer"} <= set(rows)
        cpp_ms = rows["cpp"]["ms"]
        measured = {}
        for peer in case.peers:
            r = rows[f"peer: {peer.name}"]
            if peer.compiled:  # small scale: compile is skipped, and says so
                assert r["note"].startswith("skipped") and r.get("ms") is None
                continue
            assert r["ms"] > 0 and math.isclose(r["speedup"], r["ms"] / cpp_ms)
            measured[peer.name] = r["ms"]
        best = min(measured, key=measured.get)
        summary = rows["cpp vs best peer"]
        assert summary["best_peer"] == f"fastest: {best}"
        assert math.isclose(summary["speedup"], measured[best] / cpp_ms)
        assert summary["goal"] == case.goal_text
    assert any("skipped in this run" in n for n in table.notes)
    assert "peer: trl selective_log_softmax" in table.markdown()


def test_missing_and_failing_peers_are_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl now raises ImportError

    def fail(*a, **k):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(B, "run_peer_subprocess", fail)
    table = B.run_suite(scale=float(TINY), memory=False, rep=1, max_time_s=0.05, cases=["token_logprobs"],
                        with_compile=True)
    rows = _rows(table, B.CASES[0].name)
    assert rows["peer: trl selective_log_softmax"]["note"] == "not installed (pip install trl)"
    assert rows["peer: torch.compile(reference)"]["note"] == "failed: RuntimeError: compiler exploded"
    assert rows["peer: torch.compile(reference)"].get("ms") is None
    assert rows["cpp vs best peer"]["verdict"] == "no peer measured"
    assert not [r for r in table.rows if r.get("error")]  # peers are not our failures


def test_peer_subprocess_measures_time_and_memory_and_times_out(tiny):
    r = B.run_peer_subprocess("gae", _peer("gae", "python loop").name, time_it=True, memory=True, rep=2,
                              max_time_s=0.05, timeout_s=120)
    assert r["median_ms"] > 0 and r["n"] >= 1 and r["bytes"] >= 0 and r["method"] in ("rss", "profiler")
    with pytest.raises(subprocess.TimeoutExpired):
        B.run_peer_subprocess("gae", B.COMPILE_NAME, time_it=True, memory=False, timeout_s=0.3)
