"""``rlhf-fast plot RUN_DIR``: PNG curves of a run's metrics.jsonl (matplotlib, Agg backend).

One figure per metric family (reward, kl, policy, value, entropy/length, time), each metric
of the family a line against the step; written to ``RUN_DIR/plots`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Dict, List

GROUPS = {
    "reward": ("reward/",),
    "kl": ("kl/",),
    "policy": ("policy/", "logprob_gap/", "is_weight/"),
    "value": ("value/",),
    "generation": ("entropy", "response_length/", "tokens_per_second"),
    "time": ("time/",),
    "training": ("loss", "eval_", "grad_norm", "lr", "accuracy", "margin"),  # SFT and reward runs
}


def read_records(run_dir: str) -> List[Dict]:
    """The records of ``run_dir/metrics.jsonl`` (FileNotFoundError naming it if absent)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    recs = []
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (expected JSON lines)") from None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if i == len(lines) - 1 and not text.endswith("\n"):
                    break  # a record cut short by a crash (or being written now): plot the rest
                raise ValueError(f"{path}:{i + 1}: invalid JSON ({e.msg})") from None
            step = rec.get("step") if isinstance(rec, dict) else None
            if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
                raise ValueError(f"{path}:{i + 1}: expected a JSON object with a numeric 'step'")
            recs.append(rec)
    return recs


def plot_run(run_dir: str, out_dir: str = None) -> List[str]:
    """Write one PNG per metric family; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_records(run_dir)
    if not recs:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no records")
    from rlhf_fast.trainers.config import check_output_path

    out_dir = out_dir or os.path.join(run_dir, "plots")
    check_output_path(out_dir, "--out", folder=True)
    # a metric that is never finite (all nan/inf) would be an empty plot: left out
    keys = sorted({k for r in recs for k, v in r.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
    if not keys:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no numeric metrics to plot (none with a finite value)")
    os.makedirs(out_dir, exist_ok=True)
    grouped = {g: [k for k in keys if any(k.startswith(p) for p in prefixes)] for g, prefixes in GROUPS.items()}
    seen = {k for ks in grouped.values() for k in ks}
    grouped["other"] = [k for k in keys if k not in seen]  # nothing logged goes unplotted
    written = []
    for group, ks in grouped.items():
        if not ks:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in ks:
            pts = [(r["step"], r[k]) for r in recs
                   if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k)
        ax.set_xlabel("step")
        ax.set_title(f"{os.path.basename(os.path.abspath(run_dir))}: {group}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        path = os.path.join(out_dir, f"{group}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default RUN_DIR/plots)")


def run(args) -> int:
    for p in plot_run(args.run_dir, args.out):
        print(p)
    return 0
