"""`rlhf-fast demo`: until the trainers land, runs every op on every live backend and
prints a correctness and speed table (rlhf_fast.benchmarks.ops_report)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes")


def run(args) -> int:
    from rlhf_fast.benchmarks.ops_report import main as ops_report

    return ops_report(quick=args.quick)
