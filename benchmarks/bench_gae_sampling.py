"""Benchmark: GAE and sampling, ours against the ways peers do them.

GAE at (B, T) in {(512, 4096), (64, 32768), (1, 131072), (16, 1024)}:
  ours (cuda on a GPU, the cpp kernel on CPU) · ours (triton) on a GPU (the fallback when the
  extension has no CUDA kernels) · cpp (the C++ CPU kernel) · python-loop (a
  Python loop over T on tensors, as TRL / verl / OpenRLHF compute it).
Sampling at B in {1, 128, 256}, V in {32000, 151936}, for plain temperature, top-p 0.9 and
top-k 50 + top-p 0.9:
  ours · ours (triton) on a GPU · reference (our sort-based oracle) · torch-sort (transformers' TopK/TopP logits
  processors: full sort, cumsum, mask, softmax, multinomial) · multinomial (softmax +
  torch.multinomial, plain temperature only) · flashinfer / vllm when importable.

``--quick`` shrinks the shapes and runs the CPU backends (the CPU default). On CUDA the full
shapes run and each row also gives the fraction of the measured device-copy bandwidth.
Prints a table (median ms with 20th/80th percentiles, ratio to ours) and appends JSON rows
with device, versions and commit to ``--out`` when given.

    python -m benchmarks.bench_gae_sampling --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch

from rlhf_fast import ops
from rlhf_fast.benchmarks import common
from rlhf_fast.ops import _dispatch, reference

# the three shapes, and a small batch for its "<= 20 us for small batches" goal
GAE_SHAPES = [(512, 4096), (64, 32768), (1, 131072), (16, 1024)]
GAE_SHAPES_QUICK = [(64, 512), (8, 4096), (1, 16384)]
SAMPLE_B = [1, 128, 256]
SAMPLE_B_QUICK = [1, 64]
SAMPLE_V = [32000, 151936]
MODES = {
    "temp1.0": dict(temperature=1.0),
    "top_p0.9": dict(temperature=1.0, top_p=0.9),
    "top_k50+top_p0.9": dict(temperature=1.0, top_k=50, top_p=0.9),
}


# ----------------------------------------------------------------------------- timing


def bench(fn: Callable[[], object], device: torch.device, *, budget_s: float, max_reps: int = 50) -> Dict[str, float]:
    """Median / p20 / p80 time per call in ms of ``fn`` after one warm-up call
    (:func:`rlhf_fast.benchmarks.common.bench`: bursts between CUDA events on a GPU), until
    ``budget_s`` is spent, at least 3 and at most ``max_reps`` samples."""
    t = common.bench(fn, warmup=1, rep=max_reps, max_time_s=budget_s, device=device.type, min_rep=min(3, max_reps))
    return {"median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "reps": t.n, "burst": t.burst}


def copy_bandwidth(device: torch.device) -> Optional[float]:
    """Measured device-to-device copy bandwidth in GB/s (read + write), the roofline we
    compare against; None on CPU."""
    if device.type != "cuda":
        return None
    x = torch.empty(256 * 1024 * 1024 // 4, device=device)
    y = torch.empty_like(x)
    r = bench(lambda: y.copy_(x), device, budget_s=0.5)
    return 2 * x.numel() * 4 / (r["median_ms"] * 1e-3) / 1e9


# ----------------------------------------------------------------------------- peers


def gae_python_loop(rewards, values, mask, gamma=1.0, lam=0.95):
    """GAE as TRL's PPOTrainer / verl's compute_gae_advantage_return: a Python loop over T
    (masked positions are zeroed, not skipped — the peers' semantics on right padding)."""
    B, T = rewards.shape
    lastgaelam = torch.zeros(B, device=rewards.device, dtype=rewards.dtype)
    out = []
    values = values * mask
    rewards = rewards * mask
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        out.append(lastgaelam)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + values


def sample_torch_sort(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator=None):
    """transformers' TemperatureLogitsWarper + TopKLogitsWarper + TopPLogitsWarper, then
    softmax + multinomial: sorts the whole vocabulary."""
    scores = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(scores, top_k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sample_multinomial(logits, temperature=1.0, generator=None, **_):
    return torch.multinomial((logits.float() / temperature).softmax(-1), 1, generator=generator).squeeze(1)


def _peer_samplers():
    peers = {}
    try:
        import flashinfer  # noqa: F401

        def fi(logits, temperature=1.0, top_k=0, top_p=1.0, **_):
            from flashinfer.sampling import top_k_top_p_sampling_from_logits

            return top_k_top_p_sampling_from_logits(logits / temperature, top_k if top_k > 0 else logits.shape[-1],
                                                    top_p)

        peers["flashinfer"] = fi
    except Exception:
        pass
    try:
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p  # noqa: F401

        def vl(logits, temperature=1.0, top_k=0, top_p=1.0, **_):
            B = logits.shape[0]
            k = torch.full((B,), top_k, device=logits.device) if top_k > 0 else None
            p = torch.full((B,), top_p, device=logits.device) if top_p < 1.0 else None
            z = apply_top_k_top_p(logits.float() / temperature, k, p)
            return torch.multinomial(z.softmax(-1), 1).squeeze(1)

        peers["vllm"] = vl
    except Exception:
        pass
    return peers


# ----------------------------------------------------------------------------- runs


def _ours_backend(device):
    return "cuda" if device.type == "cuda" else "cpp"


def run_gae(device, shapes, budget_s, bw) -> List[dict]:
    rows = []
    ours = _ours_backend(device)
    for B, T in shapes:
        g = torch.Generator().manual_seed(0)
        r = torch.randn(B, T, generator=g).to(device)
        v = torch.randn(B, T, generator=g).to(device)
        m = torch.ones(B, T, dtype=torch.bool, device=device)
        providers: Dict[str, Callable] = {}
        if _dispatch.backend_available(ours)[0]:
            providers["ours"] = lambda: _with(ours, lambda: ops.gae(r, v, m, gamma=1.0, lam=0.95))
        if device.type == "cuda" and _dispatch.backend_available("triton")[0]:
            # the GPU path where rlhf_fast._C has no CUDA kernels
            providers["ours (triton)"] = lambda: _with("triton", lambda: ops.gae(r, v, m, gamma=1.0, lam=0.95))
        if device.type == "cuda" and _dispatch.backend_available("cpp")[0] and "cpp" in _dispatch.implemented("gae"):
            rc, vc, mc = r.cpu(), v.cpu(), m.cpu()  # our C++ CPU kernel, on host copies
            providers["cpp (host)"] = lambda: _with("cpp", lambda: ops.gae(rc, vc, mc, gamma=1.0, lam=0.95))
        providers["python-loop"] = lambda: gae_python_loop(r, v, m.float())
        nbytes = B * T * (4 + 4 + 1 + 4 + 4)  # r, v, mask in; adv, ret out
        rows += _measure("gae", f"B={B} T={T}", providers, device, budget_s, bw, nbytes)
    return rows


def _with(backend, fn):
    with ops.use_backend(backend):
        return fn()


def run_sampling(device, bs, vs, budget_s, bw) -> List[dict]:
    rows = []
    ours = _ours_backend(device)
    peers = _peer_samplers() if device.type == "cuda" else {}
    for V in vs:
        for B in bs:
            logits = (torch.randn(B, V, generator=torch.Generator().manual_seed(1)) * 3).to(device)
            for mode, kw in MODES.items():
                providers: Dict[str, Callable] = {}
                if _dispatch.backend_available(ours)[0]:
                    providers["ours"] = lambda kw=kw: _with(ours, lambda: ops.sample(logits, **kw))
                if device.type == "cuda":  # what ops.sample picks by itself (the reference for some shapes)
                    providers["ours (auto)"] = lambda kw=kw: ops.sample(logits, **kw)
                if device.type == "cuda" and _dispatch.backend_available("triton")[0]:
                    providers["ours (triton)"] = lambda kw=kw: _with("triton", lambda: ops.sample(logits, **kw))
                providers["reference"] = lambda kw=kw: reference.sample(logits, **kw)
                providers["torch-sort"] = lambda kw=kw: sample_torch_sort(logits, **kw)
                if mode == "temp1.0":
                    providers["multinomial"] = lambda kw=kw: sample_multinomial(logits, **kw)
                for name, fn in peers.items():
                    providers[name] = lambda kw=kw, fn=fn: fn(logits, **kw)
                rows += _measure("sample", f"B={B} V={V} {mode}", providers, device, budget_s, bw, B * V * 4)
    return rows


def _measure(op, shape, providers, device, budget_s, bw, nbytes) -> List[dict]:
    out = []
    for name, fn in providers.items():
        try:
            r = bench(fn, device, budget_s=budget_s)
        except Exception as e:  # a peer that rejects the shape is reported, not fatal
            print(f"  {op} {shape} {name}: failed ({type(e).__name__}: {e})")
            continue
        row = {"op": op, "shape": shape, "provider": name, **r}
        if bw:
            row["bw_frac"] = nbytes / (r["median_ms"] * 1e-3) / 1e9 / bw
        out.append(row)
    base = next((x["median_ms"] for x in out if x["provider"] == "ours"), None)
    for x in out:
        x["vs_ours"] = x["median_ms"] / base if base else float("nan")
    return out


def rows_table(rows: List[dict], where: str) -> common.Table:
    """The rows of :func:`run_gae` / :func:`run_sampling` as a results :class:`common.Table` (``where``:
    the device's name, in the title)."""
    t = common.Table(f"GAE and sampling, ours vs the peers' ways ({where})",
                     ["op", "shape", "provider", "median_ms", "p20_ms", "p80_ms", "vs_ours", "bw_frac", "reps", "burst"])
    for r in rows:
        t.add(**{k: r.get(k) for k in t.columns})
    t.notes += ["median / p20 / p80: ms per call (on a GPU, bursts of back-to-back calls between CUDA events)",
                "vs_ours = this provider's median ÷ ours (> 1: ours is faster)",
                "bw_frac = the minimum bytes the op moves ÷ its time ÷ the measured device-copy bandwidth"]
    return t


def run_suite(device: str = "cpu", quick: bool = False) -> List[common.Table]:
    """Entry point of `rlhf-fast bench ops --device cuda` (``quick``: the quick shapes): GAE and
    sampling on the GPU, one table. On the CPU nothing: bench_cpu_ops measures both there against
    the same peers."""
    if device != "cuda" or not torch.cuda.is_available():
        return []
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    budget = 0.3 if quick else 1.0
    rows = run_gae(dev, GAE_SHAPES_QUICK if quick else GAE_SHAPES, budget, bw)
    rows += run_sampling(dev, SAMPLE_B_QUICK if quick else SAMPLE_B, SAMPLE_V, budget, bw)
    return [rows_table(rows, torch.cuda.get_device_name(dev) + (f", copy bandwidth {bw:.0f} GB/s" if bw else ""))]


def print_table(rows: List[dict]) -> None:
    has_bw = any("bw_frac" in r for r in rows)
    head = f"{'op':7s} {'shape':36s} {'provider':14s} {'median ms':>10s} {'p20':>9s} {'p80':>9s} {'x ours':>8s}"
    print(head + (f" {'bw frac':>8s}" if has_bw else ""))
    print("-" * (len(head) + (9 if has_bw else 0)))
    for r in rows:
        line = (f"{r['op']:7s} {r['shape']:36s} {r['provider']:14s} {r['median_ms']:10.3f} {r['p20_ms']:9.3f} "
                f"{r['p80_ms']:9.3f} {r['vs_ours']:8.2f}")
        if has_bw:
            line += f" {r.get('bw_frac', float('nan')):8.3f}"
        print(line)


def _commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except Exception:
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, CPU backends (for CI / laptops)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available and not --quick)")
    p.add_argument("--only", choices=["gae", "sample"], default=None)
    p.add_argument("--budget", type=float, default=None, help="seconds per measurement (default 0.3 quick, 1 full)")
    p.add_argument("--out", default=None, help="append JSON rows to this file")
    args = p.parse_args(argv)
    dev = args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    device = torch.device(dev)
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 1.0)
    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; commit {_commit()}" +
          (f"; copy bandwidth {bw:.0f} GB/s" if bw else "") +
          ("; time per call of back-to-back bursts between CUDA events" if device.type == "cuda" else
           "; wall time per call"))
    rows = []
    if args.only in (None, "gae"):
        rows += run_gae(device, GAE_SHAPES_QUICK if args.quick else GAE_SHAPES, budget, bw)
    if args.only in (None, "sample"):
        rows += run_sampling(device, SAMPLE_B_QUICK if args.quick else SAMPLE_B, SAMPLE_V, budget, bw)
    print_table(rows)
    if args.out:
        env = common.environment(device.type)  # versions of Triton, CUDA and every peer (flashinfer, vllm) too
        meta = {"device": name, "torch": torch.__version__, "commit": _commit(), "time": time.time(),
                **{k: env[k] for k in ("triton", "cuda", "rlhf_fast", "peers", "load_avg_1m")}}
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**meta, **r}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
