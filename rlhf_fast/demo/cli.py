"""`rlhf-fast demo`: the main job (see :mod:`rlhf_fast.demo.pipeline`)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--task", choices=("preference", "arithmetic"), default="preference",
                        help="preference (SFT → annotators → reward model → RL) or arithmetic (GRPO, verifiable reward)")
    parser.add_argument("--algo", choices=("ppo", "grpo", "rloo", "dpo"), default=None,
                        help="how the preference task tunes the policy (default ppo; dpo: straight from the "
                        "labelled pairs, no RL); the arithmetic task runs GRPO")
    parser.add_argument("--out", default=None, help="run folder (default runs/demo-TASK-TIMESTAMP)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds; used by the tests)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--ops-report", action="store_true", help="instead: every op on every live backend, "
                        "correctness and speed table")


def run(args) -> int:
    if args.ops_report:
        from rlhf_fast.benchmarks.ops_report import main as ops_report

        return ops_report(quick=args.quick)
    if args.task == "arithmetic" and args.algo not in (None, "grpo"):
        raise ValueError(f"--algo {args.algo} applies to --task preference; the arithmetic task runs GRPO")
    import torch

    from .pipeline import DemoConfig
    from .pipeline import run as run_demo

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    cfg = DemoConfig(task=args.task, algo=args.algo or "ppo", out_dir=args.out, seed=args.seed, quick=args.quick,
                     progress=not args.no_progress)
    from rlhf_fast.trainers.stop import TrainingStopped

    try:
        report = run_demo(cfg)
    except TrainingStopped as e:  # a demo does not resume: say so instead of the trainer's hint
        raise TrainingStopped(e.signum, e.step, e.run_dir, "a new `rlhf-fast demo` (a demo starts afresh)") from None
    ev = report["stages"]["evaluation"]
    print()
    print(f"run folder: {cfg.out_dir}")
    print(f"report:     {cfg.out_dir}/report.md")
    for k, v in ev.items():
        print(f"  {k:34s} {v:.3f}" if isinstance(v, float) else f"  {k:34s} {v}")
    if cfg.task == "preference":
        rm = report["stages"]["reward_model"]
        print(f"  {'rm_heldout_agreement_vs_hidden':34s} {rm['rm_heldout_agreement_vs_hidden']}")
    print(f"  {'wall_seconds':34s} {report['wall_seconds']:.1f}")
    return 0
