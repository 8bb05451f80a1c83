"""`rlhf-fast bench ops|e2e|all [--device cpu|cuda] [--quick] [--out DIR]`.

* ``ops``: on the CPU, the ops report (every op × live backend: error, time, speed-up)
  and the C++-vs-reference foundation benchmark (bench_cpu_ops); with ``--device cuda``
  the GPU op benchmarks other modules of this package expose as ``run_suite(device=, quick=)``
  (bench_triton: the Triton kernels vs peers; bench_gae_sampling: GAE and sampling vs the
  peers' ways, with the fraction of the copy bandwidth).
* ``e2e``: one PPO, one GRPO and one DPO step of rlhf_fast against TRL's (``--algos`` picks;
  KTO, SimPO, distillation, online DPO, SFT, the reward model, SDFT, SDPO and IW-OPD too).
* ``all``: both.

Prints every table and appends them, with the device name, versions of torch / Triton /
CUDA / every peer installed and the git commit, to ``<out>/<device>-<date>.json`` and
``.md`` (``<out>`` defaults to benchmarks/results). Those files are checked before any
benchmark runs: a results path that cannot be written, or an existing JSON file that cannot
be read as results (it would otherwise be written over), is refused with exit code 2.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import List

import torch

from rlhf_fast.trainers.config import check_output_path

from .common import RESULTS_DIR, Table, check_results_paths, results_paths, write_results

SUITES = ("ops", "e2e", "all")
# Benchmarks written in other modules of this package; each is used when it exists and
# exposes `run_suite(device=..., quick=...) -> Table | list[Table]`.
OPTIONAL_OP_SUITES = ("bench_triton", "bench_gae_sampling", "bench_rollout")


def add_arguments(parser) -> None:
    """Arguments of `rlhf-fast bench`."""
    parser.add_argument("suite", choices=SUITES, help="which benchmarks to run")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to benchmark (cpu)")
    parser.add_argument("--quick", action="store_true", help="small sizes, no subprocess memory runs")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS_DIR})")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and the C++ kernels (default: torch's; subprocesses inherit it)")
    parser.add_argument("--algos", default=None,
                        help="e2e / all: algorithms to run, comma-separated among ppo, grpo, dpo, kto, simpo, "
                             "distill, online_dpo, sft, reward, sdft, sdpo, iw_opd (default: ppo,grpo,dpo)")
    from .e2e import add_step_arguments

    add_step_arguments(parser, "e2e: ")  # (our side's switches and prompt lengths: E2EConfig fields)


def _as_tables(x) -> List[Table]:
    if x is None:
        return []
    if isinstance(x, Table):
        return [x]
    return [t for t in x if isinstance(t, Table)]


def _takes_device_and_quick(fn) -> bool:
    """Whether ``fn`` can be called as ``fn(device=..., quick=...)``."""
    import inspect

    try:
        inspect.signature(fn).bind(device="cpu", quick=False)
    except (TypeError, ValueError):
        return False
    return True


def _optional_suites(device: str, quick: bool) -> List[Table]:
    tables: List[Table] = []
    for name in OPTIONAL_OP_SUITES:
        try:
            mod = importlib.import_module(f"rlhf_fast.benchmarks.{name}")
        except ModuleNotFoundError:
            continue
        fn = getattr(mod, "run_suite", None)
        if fn is None or not _takes_device_and_quick(fn):
            continue  # a different signature: not ours to guess
        try:
            tables += _as_tables(fn(device=device, quick=quick))
        except Exception as e:  # (a TypeError from inside the suite too: reported, not taken for a signature)
            t = Table(f"{name} failed", ["error"])
            t.add(error=f"{type(e).__name__}: {e}")
            tables.append(t)
    return tables


def ops_tables(device: str = "cpu", quick: bool = False) -> List[Table]:
    """The op benchmark tables for ``device``."""
    tables: List[Table] = []
    if device == "cpu":
        from . import bench_cpu_ops, ops_report

        tables.append(ops_report.collect(quick=quick))
        # quick: a small-scale smoke run of the foundation benchmark without memory subprocesses
        tables.append(bench_cpu_ops.run_suite(scale=0.02 if quick else 1.0, memory=not quick,
                                              rep=3 if quick else 50, max_time_s=0.2 if quick else 3.0))
    tables += _optional_suites(device, quick)
    return tables


def _algos(args):
    """The e2e algorithms ``--algos`` picks (None for the ops suite, which has none); a selection
    the suite would ignore, or an unknown algorithm, is a ValueError naming --algos."""
    given = getattr(args, "algos", None)
    if args.suite == "ops":
        if given is not None:
            raise ValueError("--algos applies to the e2e and all suites, not ops")
        return None
    from . import e2e

    try:
        return e2e._check_algos(e2e.ALGOS if given is None else given)
    except ValueError as e:
        raise ValueError(f"--{e}") from None


def _e2e_overrides(args) -> dict:
    """The E2EConfig fields the e2e options set (those given: a switch on, a number); with the ops
    suite, which has no steps, any of them is a ValueError naming it, and a value E2EConfig
    refuses is a ValueError naming the option."""
    from . import e2e

    over = e2e.step_overrides(args)
    given = {flag: name for flag, name, _, _ in e2e.STEP_OPTIONS if name in over}
    if given and args.suite == "ops":
        raise ValueError(f"{next(iter(given))} applies to the e2e and all suites, not ops")
    try:
        e2e.E2EConfig(**over)
    except ValueError as e:
        opt = next((o for o, f in given.items() if str(e).startswith(f)), None)
        raise ValueError(f"{opt}: {e}" if opt else str(e)) from None
    return over


def run(args) -> int:
    """Run the chosen suites, print the tables, write the results files."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but torch sees no CUDA device; use --device cpu")
    check_output_path(args.out if args.out is not None else RESULTS_DIR, "--out", folder=True)
    # the results files too, before the long work: writable, and an existing JSON one readable
    # (a new run is appended to it; one that cannot be read is refused, not written over)
    paths = results_paths(args.device, args.out)
    check_results_paths(paths, "--out")
    algos = _algos(args)  # a wrong --algos is refused before the long work
    overrides = _e2e_overrides(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.suite == "all" and overrides.get("rl_prompt_tokens") and any(a in ("ppo", "grpo") for a in algos):
        # (the e2e suite checks it before its own runs; here before the op benchmarks too)
        from . import e2e

        for c in e2e.suite_configs(args.device, args.quick, overrides=overrides):
            try:
                e2e.check_rl_prompt_tokens(c)
            except ValueError as e:
                raise ValueError(f"--rl-prompt-tokens: {e}") from None
    t0 = time.perf_counter()
    tables: List[Table] = []
    if args.suite in ("ops", "all"):
        tables += ops_tables(args.device, args.quick)
    if args.suite in ("e2e", "all"):
        from . import e2e

        tables += _as_tables(e2e.run_suite(device=args.device, quick=args.quick, algos=algos,
                                           overrides=overrides or None))
    for t in tables:
        print(t.markdown() + "\n")
    from .e2e import STEP_OPTIONS

    suite = f"bench {args.suite}" + (" --quick" if args.quick else "") + "".join(
        f" {opt}" + ("" if overrides[field] is True else f" {overrides[field]}")
        for opt, field, _, _ in STEP_OPTIONS if field in overrides)
    paths = write_results(tables, device=args.device, suite=suite, paths=paths)
    print(f"wrote {paths['json']} and {paths['md']} ({time.perf_counter() - t0:.1f} s)")
    failed = [r for t in tables for r in t.rows if r.get("error")]
    return 1 if failed else 0
