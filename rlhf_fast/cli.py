"""`rlhf-fast` command line.

Each subcommand lives in the module that owns it, which defines
``add_arguments(parser)`` and ``run(args) -> int``; only that module is imported, so
``rlhf-fast env`` stays fast. Bad input exits with code 2 and one readable line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# name -> (module, one-line help)
COMMANDS = {
    "env": ("rlhf_fast.env_report", "report torch/Triton/CUDA versions and which backends are live"),
    "demo": ("rlhf_fast.demo.cli", "the main job: an end-to-end RLHF run on the CPU in minutes"),
    "sft": ("rlhf_fast.trainers.sft", "supervised fine-tuning: rlhf-fast sft CONFIG.yaml [--key value ...]"),
    "reward": ("rlhf_fast.trainers.reward", "train a reward model: rlhf-fast reward CONFIG.yaml [--key value ...]"),
    "label": ("rlhf_fast.feedback.label", "label pairs in the terminal: rlhf-fast label PAIRS.jsonl --out LABELS.jsonl"),
    "judge": ("rlhf_fast.feedback.judge", "AI feedback: label pairs or score responses with a judge model"),
    "ppo": ("rlhf_fast.trainers.rl_cli", "PPO with a critic and GAE: rlhf-fast ppo CONFIG.yaml [--key value ...]"),
    "grpo": ("rlhf_fast.trainers.rl_cli", "GRPO (group-relative, no critic): rlhf-fast grpo CONFIG.yaml"),
    "rloo": ("rlhf_fast.trainers.rl_cli", "RLOO (leave-one-out, no critic): rlhf-fast rloo CONFIG.yaml"),
    "plot": ("rlhf_fast.trainers.plot", "write PNG curves of a run: rlhf-fast plot RUN_DIR"),
    "eval": ("rlhf_fast.trainers.evaluate", "evaluate a policy: reward, win-rate vs reference, KL, length"),
    "bench": ("rlhf_fast.benchmarks.cli", "benchmarks: rlhf-fast bench ops|e2e|all [--device cpu|cuda] [--quick]"),
}


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one readable line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _usage() -> str:
    lines = ["usage: rlhf-fast COMMAND [args]", "", "commands:"]
    lines += [f"  {name:8s} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rlhf-fast: error: unknown command {name!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = ArgumentParser(prog=f"rlhf-fast {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    args.command = name
    try:
        return int(module.run(args) or 0)
    except (CLIError, ValueError, TypeError, FileNotFoundError, KeyError, PermissionError, IsADirectoryError,
            NotADirectoryError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"rlhf-fast {name}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # checkpoints are written atomically, so what was saved before Ctrl-C is intact
        print(f"rlhf-fast {name}: interrupted; a training run continues from its last checkpoint "
              "(ppo/grpo/rloo: --resume RUN_DIR; sft/reward: the same command)", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``rlhf-fast`` console script and ``python -m rlhf_fast.cli`` (what ``torchrun -m``
    starts): :func:`main`, then, in a process that joined a process group, leave it — a
    barrier and ``destroy_process_group`` after a success; at once after an error, so peers
    waiting in a collective fail instead of hanging — and exit without interpreter
    finalisation (:func:`rlhf_fast.distributed.exit_process` says why)."""
    code = main()
    dist = sys.modules.get("torch.distributed")  # only loaded by commands that can use it
    if dist is not None and dist.is_available() and dist.is_initialized():
        from rlhf_fast.distributed import exit_process, shutdown

        if code == 0:
            shutdown()
        exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
