"""`rlhf-fast demo`: the main job (see :mod:`rlhf_fast.demo.pipeline`)."""

from __future__ import annotations

ENSEMBLE_MODES = ("mean", "min", "mean_minus_std", "mean_minus_var")  # the RL config's, less "sum"


def _ensemble_options(args) -> dict:
    """The DemoConfig fields of --reward-ensemble / --ensemble-mode / --ensemble-coef (ValueError
    naming the flag for a bad combination; DemoConfig checks the values)."""
    k, mode, coef = args.reward_ensemble, args.ensemble_mode, args.ensemble_coef
    if k is None:
        if mode is not None or coef is not None:
            raise ValueError(f"{'--ensemble-mode' if mode is not None else '--ensemble-coef'} applies with "
                             "--reward-ensemble K")
        return {}
    if k < 2:
        raise ValueError(f"--reward-ensemble K must be an int >= 2 (the number of reward models), got {k}")
    mode = mode or "mean_minus_std"
    if coef is not None and mode not in ("mean_minus_std", "mean_minus_var"):
        raise ValueError(f"--ensemble-coef applies to --ensemble-mode mean_minus_std or mean_minus_var, not {mode}")
    return {"reward_ensemble": k, "ensemble_mode": mode, "ensemble_coef": 1.0 if coef is None else coef}


def add_arguments(parser) -> None:
    parser.add_argument("--task", choices=("preference", "arithmetic"), default=None,
                        help="preference (SFT → annotators → reward model → RL; the default) or arithmetic "
                        "(GRPO, verifiable reward)")
    parser.add_argument("--algo", choices=("ppo", "grpo", "rloo", "dpo"), default=None,
                        help="how the preference task tunes the policy (default ppo; dpo: straight from the "
                        "labelled pairs, no RL); the arithmetic task runs GRPO")
    parser.add_argument("--out", default=None, help="run folder (default runs/demo-TASK-TIMESTAMP)")
    parser.add_argument("--seed", type=int, default=None, help="an int in [0, 2**63) (default 0)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds; used by the tests)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--reward-ensemble", type=int, default=None, metavar="K",
                        help="K >= 2 reward models trained on the same labelled pairs with different seeds; RL "
                        "against their combination (--ensemble-mode), against over-optimisation (--algo ppo, grpo "
                        "or rloo; default: one reward model)")
    parser.add_argument("--ensemble-mode", choices=ENSEMBLE_MODES, default=None,
                        help="how the K scores combine: mean, min (worst case), mean_minus_std (default) or "
                        "mean_minus_var (Coste et al.'s UWO)")
    parser.add_argument("--ensemble-coef", type=float, default=None, metavar="LAMBDA",
                        help="the std / variance penalty of mean_minus_std / mean_minus_var (default 1.0)")
    parser.add_argument("--ops-report", action="store_true", help="instead: every op on every live backend, "
                        "correctness and speed table")


# the options of a demo run, which --ops-report (a table, no run) would ignore
_RUN_OPTIONS = ("task", "algo", "out", "seed", "reward_ensemble", "ensemble_mode", "ensemble_coef")


def run(args) -> int:
    if args.ops_report:
        given = [f"--{k.replace('_', '-')}" for k in _RUN_OPTIONS if getattr(args, k) is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise ValueError(f"{', '.join(given)} {verb} to a demo run, not --ops-report (which takes --quick)")
        from rlhf_fast.benchmarks.ops_report import main as ops_report

        return ops_report(quick=args.quick)
    from rlhf_fast.trainers.common import check_seed

    args.task = args.task or "preference"
    args.seed = 0 if args.seed is None else args.seed
    check_seed("--seed", args.seed)  # before minutes of work and an --out folder, naming the flag
    ensemble = _ensemble_options(args)
    import torch

    from .pipeline import DemoConfig
    from .pipeline import run as run_demo

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    # DemoConfig refuses an --algo or an ensemble the task does not take, before any work
    cfg = DemoConfig(task=args.task, algo=args.algo, out_dir=args.out, seed=args.seed, quick=args.quick,
                     progress=not args.no_progress, **ensemble)
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
        agree = rm["rm_heldout_agreement_vs_hidden"]  # None without a strictly ordered held-out pair
        print(f"  {'rm_heldout_agreement_vs_hidden':34s} " + (f"{agree:.3f}" if isinstance(agree, float)
                                                              else f"{agree}"))
        ens = report["stages"].get("reward_ensemble", {})
        if ens:
            print("  reward-model ensemble (see the report):")
        for k, v in ens.items():
            if k != "training":
                print(f"    {k:38s} {v:.3f}" if isinstance(v, float) else f"    {k:38s} {v}")
    print(f"  {'wall_seconds':34s} {report['wall_seconds']:.1f}")
    return 0
