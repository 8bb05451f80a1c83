"""Timing, peak-memory and results helpers shared by every benchmark of rlhf_fast.

Timing follows ``triton.testing.do_bench`` / pytest-benchmark: warm-up calls, then timed
samples reported as the median with the 20th and 80th percentiles. On the CPU a sample is
one call's wall time; on a GPU a burst of back-to-back calls between two CUDA events,
divided by the burst length, so a microsecond kernel is not timed with a host sync.

Peak memory is the *extra* memory one call needs on top of its inputs:

* CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before;
* CPU: measured in a fresh subprocess that builds the inputs, runs one warm-up call, resets
  the kernel's peak-RSS counter (``/proc/self/clear_refs``) and reads ``VmHWM − VmRSS``
  around one more call. That counts every byte the call touches (torch tensors, C++
  ``std::vector`` scratch, OpenMP stacks), not only the torch allocator's. glibc is told to
  serve blocks ≥ 64 KiB with mmap and to give freed memory back at once, so memory freed
  by the warm-up call is not silently reused and hidden. Where ``clear_refs`` is not
  writable, the torch profiler's allocation events are used instead (torch allocations only).

Rows are written with device name, torch/Triton/CUDA versions, peer versions and the git
commit to ``benchmarks/results/<device>-<date>.json`` (a list, appended) and ``.md``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Packages whose versions are recorded with every result (the peers we compare against
# and the libraries the numbers depend on); absent ones are recorded as None.
PEERS = ("trl", "transformers", "accelerate", "peft", "liger_kernel", "flash_attn", "flashinfer", "vllm",
         "deepspeed", "openrlhf", "verl", "numpy", "tokenizers")
# distributions published under another name than the import name (flashinfer: bench_gae_sampling's GPU
# sampling peer, on PyPI as flashinfer-python)
_DIST_NAMES = {"flashinfer": ("flashinfer-python",)}


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Per-call time in milliseconds over ``n`` timed samples of ``burst`` calls each."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int
    burst: int = 1

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ms [{self.p20_ms:.3f}, {self.p80_ms:.3f}]"


def _sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def bench(
    fn: Callable[[], object],
    *,
    warmup: int = 1,
    rep: int = 5,
    max_time_s: float = 2.0,
    device: Optional[str] = "cpu",
    min_rep: int = 1,
) -> Timing:
    """Time ``fn()`` (no arguments): ``warmup`` untimed calls, then up to ``rep`` timed samples.

    CPU: a sample is the wall time of one call. CUDA: a sample is a burst of back-to-back calls
    between two CUDA events, divided by the burst length (as ``triton.testing.do_bench``): the
    time per call of a stream of calls — the kernels' time, or the host's dispatch time where
    that is longer — without the host-device sync that a per-call wall time adds to a
    microsecond kernel. The burst is sized from the last warm-up call to last about 1 ms (one
    call for slow ones, and without warm-up). Stops once ``max_time_s`` of samples have run
    and at least ``min_rep`` are timed, so a slow reference does not blow the budget. Returns a
    :class:`Timing` in ms per call.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if warmup < 0 or rep < 1 or not 1 <= min_rep <= rep:
        raise ValueError(f"warmup must be >= 0 and 1 <= min_rep <= rep, got warmup={warmup}, rep={rep}, "
                         f"min_rep={min_rep}")
    cuda = device is not None and torch.device(device).type == "cuda"
    burst = 1
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if cuda:  # sized by the last warm-up call (an overestimate: it includes the sync)
            burst = max(1, min(100, int(1e-3 / max(time.perf_counter() - t0, 1e-6))))
    _sync(device)
    times: List[float] = []
    spent = 0.0
    for _ in range(rep):
        t0 = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(burst):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / burst)
        else:
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        spent += time.perf_counter() - t0
        if spent >= max_time_s and len(times) >= min_rep:
            break
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times), burst)


# --------------------------------------------------------------------------- memory


def cuda_extra_peak_bytes(fn: Callable[[], object]) -> int:
    """Extra CUDA memory one call of ``fn`` allocates at its peak (bytes)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


def profiler_extra_peak_bytes(fn: Callable[[], object]) -> int:
    """Extra peak bytes of torch CPU allocations during one call of ``fn`` (profiler events).

    Walks the allocation/free events in time order and returns the highest running total.
    Sees only the torch allocator (not C++ scratch outside it): the fallback when the
    RSS-based measure is not possible.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = []
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]":
            nbytes = 0
            try:
                nbytes = int(e.nbytes())
            except Exception:
                pass
            events.append((e.start_ns(), nbytes))
    events.sort()
    cur = peak = 0
    for _, b in events:
        cur += b
        peak = max(peak, cur)
    return int(peak)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def tighten_malloc() -> bool:
    """From now on, have glibc mmap every block >= 64 KiB and return freed heap at once (the
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` settings, applied with ``mallopt``
    in a running process), then trim what is cached: the RSS then follows live memory, so a
    peak-RSS measurement sees every allocation. It slows allocation-heavy code, so time before
    calling it. False where the C library has no ``mallopt`` (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    ok = mallopt(M_MMAP_THRESHOLD, 65536) == 1 and mallopt(M_TRIM_THRESHOLD, 0) == 1
    gc.collect()
    trim(0)
    return ok


def rss_extra_peak_bytes_here(fn: Callable[[], object]) -> Optional[int]:
    """Extra peak resident memory of one call of ``fn`` in *this* process (bytes), or None
    where the peak-RSS counter cannot be reset. Run it in a fresh process (see
    :func:`extra_peak_bytes_subprocess`) so that cached heap does not hide allocations."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return None
    before = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM")
    del out
    return max(0, peak - before) * 1024


def extra_peak_bytes_subprocess(case: str, backend: str, *, threads: Optional[int] = None,
                                timeout_s: float = 300.0) -> Dict[str, object]:
    """Extra peak memory of one call of a benchmark case, measured in a fresh interpreter.

    ``case`` is ``"module:function"``; the function takes no arguments, builds its inputs
    and returns the zero-argument callable to measure. ``backend`` is forced with
    ``rlhf_fast.ops.use_backend``. Returns ``{"bytes": int, "method": "rss"|"profiler"}``.
    """
    if ":" not in case:
        raise ValueError(f"case must be 'module:function', got {case!r}")
    env = dict(os.environ)
    # glibc: mmap every block >= 64 KiB and trim the heap eagerly, so freed memory goes back
    # to the OS and the measured call cannot reuse memory that an earlier call left cached.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["MALLOC_TRIM_THRESHOLD_"] = "0"
    cmd = [sys.executable, "-m", "rlhf_fast.benchmarks.common", "--memory-case", case, "--backend", backend]
    if threads:
        cmd += ["--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    if res.returncode != 0:
        raise RuntimeError(f"memory subprocess for {case} [{backend}] failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _memory_case_main(case: str, backend: str, threads: Optional[int]) -> None:
    if threads:
        torch.set_num_threads(threads)
    from rlhf_fast.ops import use_backend

    mod, _, attr = case.partition(":")
    with use_backend(backend):
        fn = getattr(importlib.import_module(mod), attr)()
        fn()  # warm-up: lazy library loads, OpenMP pool, first-call caches
        b = rss_extra_peak_bytes_here(fn)
        method = "rss"
        if b is None:
            b, method = profiler_extra_peak_bytes(fn), "profiler"
    print(json.dumps({"bytes": int(b), "method": method}))


# --------------------------------------------------------------------------- environment


def device_name(device: str = "cpu") -> str:
    """A readable name of the device: the GPU's name, or the CPU model."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device: str = "cpu") -> str:
    """``cpu`` or the GPU name made file-safe, e.g. ``nvidia-h100-80gb-hbm3``."""
    if torch.device(device).type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def git_commit() -> Optional[str]:
    """The short commit of the checkout (with ``+dirty`` when there are local changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                           timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return None
    return (c + ("+dirty" if dirty else "")) or None


def _version(pkg: str) -> Optional[str]:
    from importlib import metadata

    for name in (pkg, pkg.replace("_", "-"), *_DIST_NAMES.get(pkg, ())):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def environment(device: str = "cpu") -> Dict[str, object]:
    """Device name, versions of torch / Triton / CUDA / every peer installed, commit, threads."""
    import rlhf_fast

    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "cpu_threads": torch.get_num_threads(),
        # other processes competing for the cores make CPU timings noisy: record how busy it was
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "rlhf_fast": rlhf_fast.__version__,
        "git_commit": git_commit(),
        "peers": {p: _version(p) for p in PEERS},
        "time_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# --------------------------------------------------------------------------- results


@dataclass
class Table:
    """A titled table of result rows (dicts with the same keys), printable as Markdown; ``meta``:
    what the rows were measured with (e.g. the e2e step's configuration), kept in the results
    JSON, not printed."""

    title: str
    columns: List[str]
    rows: List[Dict[str, object]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    meta: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        if not self.columns:
            raise ValueError("columns must be a non-empty list of column names")

    def add(self, **row) -> None:
        self.rows.append(row)

    def markdown(self) -> str:
        def cell(v):
            if v is None:
                return "–"
            if isinstance(v, float):
                if v != v:
                    return "nan"
                return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e4) and v != 0 else f"{v:.3f}".rstrip("0").rstrip(".")
            return str(v)

        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        for r in self.rows:
            lines.append("| " + " | ".join(cell(r.get(c)) for c in self.columns) + " |")
        if self.notes:
            lines.append("")
            lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)


def fmt_bytes(n: Optional[float]) -> Optional[str]:
    """``1.5 MiB``-style size, or None."""
    if n is None:
        return None
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return None


def results_paths(device: str = "cpu", out_dir: Optional[Path] = None) -> Dict[str, Path]:
    """``{"json", "md"}``: the results files of a run today, ``<out_dir>/<device>-<date>.*``."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    stem = f"{device_slug(device)}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d')}"
    return {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}


def read_results(path: Path) -> List[object]:
    """The runs an existing results JSON holds ([] when absent). ValueError naming the file
    when it cannot be read as results: a new run is appended to them, never written over."""
    path = Path(path)
    if not path.exists():
        return []
    how = "move it aside or give another --out (bench appends to it and will not write over it)"
    try:
        runs = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"results file {path}:{e.lineno}: invalid JSON ({e.msg}); {how}") from None
    except UnicodeDecodeError:
        raise ValueError(f"results file {path}: not UTF-8 text; {how}") from None
    if isinstance(runs, dict):  # a single run
        runs = [runs]
    if not isinstance(runs, list):
        raise ValueError(f"results file {path}: holds a JSON {type(runs).__name__}, expected a list of runs; {how}")
    return runs


def check_results_paths(paths: Dict[str, Path], option: str = "--out") -> None:
    """Before a benchmark runs: each results file can be written and an existing JSON one can
    be appended to (ValueError naming ``option`` and the file otherwise)."""
    from rlhf_fast.trainers.config import check_output_path

    for p in paths.values():
        check_output_path(p, f"{option} {p.parent}: results file")
    read_results(paths["json"])


def write_results(tables: Sequence[Table], *, device: str = "cpu", out_dir: Optional[Path] = None,
                  suite: str = "", paths: Optional[Dict[str, Path]] = None) -> Dict[str, Path]:
    """Append ``tables`` with the environment to ``<out_dir>/<device>-<date>.json`` and ``.md``
    (or to ``paths``, from :func:`results_paths`).

    The JSON file holds a list of runs (each ``{"suite", "env", "tables"}``); a new run is
    appended and the file rewritten atomically. An existing JSON file that cannot be read as
    results is moved aside to ``<name>.unreadable-<time>`` (with a warning), not written
    over. The Markdown file gets one more section per run. Returns the two paths.
    """
    from rlhf_fast.trainers.config import atomic_write_text

    paths = paths or results_paths(device, out_dir)
    jpath, mpath = paths["json"], paths["md"]
    jpath.parent.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    try:
        runs = read_results(jpath)
    except ValueError as e:
        aside = jpath.with_name(f"{jpath.name}.unreadable-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
        os.replace(jpath, aside)
        print(f"warning: {str(e).split(';')[0]}; moved it to {aside}", file=sys.stderr)
        runs = []
    runs.append({"suite": suite, "env": env, "tables": [asdict(t) for t in tables]})
    atomic_write_text(str(jpath), json.dumps(runs, indent=1, default=str))
    peers = ", ".join(f"{k} {v}" for k, v in env["peers"].items() if v)
    header = (f"## {suite or 'bench'} — {env['time_utc']}\n\n"
              f"device: {env['device']} ({env['cpu_threads']} threads, load avg {env['load_avg_1m']}) · torch {env['torch']} · "
              f"triton {env['triton']} · cuda {env['cuda']} · commit {env['git_commit']}\n\npeers: {peers}\n")
    with open(mpath, "a", encoding="utf-8") as f:  # the tables hold ×, ÷, – whatever the locale
        f.write(header + "\n" + "\n\n".join(t.markdown() for t in tables) + "\n\n")
    return {"json": jpath, "md": mpath}


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="internal: measure one benchmark case's extra peak memory")
    p.add_argument("--memory-case", required=True)
    p.add_argument("--backend", required=True)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    _memory_case_main(a.memory_case, a.backend, a.threads)
