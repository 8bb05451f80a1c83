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
    "prm": ("rlhf_fast.trainers.prm",
            "train a process reward model (per-step labels): rlhf-fast prm CONFIG.yaml [--key value ...]"),
    "dpo": ("rlhf_fast.trainers.dpo", "DPO-family preference optimisation: rlhf-fast dpo CONFIG.yaml [--key value ...]"),
    "kto": ("rlhf_fast.trainers.kto", "KTO from unpaired thumbs-up/down or scores: rlhf-fast kto CONFIG.yaml [--key value ...]"),
    "label": ("rlhf_fast.feedback.label", "label pairs in the terminal: rlhf-fast label PAIRS.jsonl --out LABELS.jsonl"),
    "judge": ("rlhf_fast.feedback.judge", "AI feedback: label pairs or score responses with a judge model"),
    "ppo": ("rlhf_fast.trainers.rl_cli", "PPO with a critic and GAE: rlhf-fast ppo CONFIG.yaml [--key value ...]"),
    "grpo": ("rlhf_fast.trainers.rl_cli", "GRPO (group-relative, no critic): rlhf-fast grpo CONFIG.yaml"),
    "rloo": ("rlhf_fast.trainers.rl_cli", "RLOO (leave-one-out, no critic): rlhf-fast rloo CONFIG.yaml"),
    "distill": ("rlhf_fast.trainers.rl_cli",
                "on-policy distillation from a teacher: rlhf-fast distill CONFIG.yaml --distill.teacher PATH"),
    "online-dpo": ("rlhf_fast.trainers.rl_cli",
                   "online DPO on pairs of the policy's answers: rlhf-fast online-dpo CONFIG.yaml"),
    "a2po": ("rlhf_fast.trainers.rl_cli",
             "A*-PO, one answer per prompt regressed onto r - V*: rlhf-fast a2po CONFIG.yaml"),
    "sdft": ("rlhf_fast.trainers.rl_cli",
             "self-distillation towards the policy given a privileged context: rlhf-fast sdft CONFIG.yaml"),
    "sdpo": ("rlhf_fast.trainers.rl_cli",
             "SDPO, GRPO plus self-distillation from successful siblings: rlhf-fast sdpo CONFIG.yaml"),
    "plot": ("rlhf_fast.trainers.plot", "write PNG curves of a run: rlhf-fast plot RUN_DIR"),
    "report": ("rlhf_fast.trainers.report", "one Markdown report of a run: rlhf-fast report RUN_DIR [--out REPORT.md]"),
    "eval": ("rlhf_fast.trainers.evaluate", "evaluate a policy: reward, win-rate vs reference, KL, length"),
    "merge": ("rlhf_fast.trainers.merge_cli",
              "merge two model folders (TRL's MergeModelCallback): rlhf-fast merge POLICY TARGET OUT [--method ...]"),
    "generate": ("rlhf_fast.rollout.generate_cli",
                 "responses to a prompts file: rlhf-fast generate --model M --prompts F --out OUT.jsonl"),
    "bench": ("rlhf_fast.benchmarks.cli", "benchmarks: rlhf-fast bench ops|e2e|all [--device cpu|cuda] [--quick]"),
}


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one readable line (once per launch under torchrun), exit 2
        _report(f"{self.prog}: error: {message}", everywhere=True)
        self.exit(2)


def _usage() -> str:
    lines = ["usage: rlhf-fast COMMAND [args]", "", "commands:"]
    lines += [f"  {name:8s} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


# Under torchrun every rank runs the same command; a failure most often happens on all of them
# at once (the same config, data and checkpoint). Rank 0 reports it at once; another rank waits
# this long first, by which time torchrun, seeing rank 0 fail, has stopped it — so the launch
# prints one line — and prints its own line only when it alone failed.
PEER_GRACE_S = 3.0
# A failure every local rank meets alike before joining (a bad option, a missing file) is
# printed by local rank 0 alone; the others stay quiet but must not exit first: torchrun stops
# the remaining ranks as soon as one exits, which could kill local rank 0 before it printed
# (it may reach the error later, e.g. importing more slowly on a loaded machine). They wait up
# to this long — torchrun stops them once rank 0 exits — then print the line themselves.
QUIET_RANK_WAIT_S = 60.0


def _launch_env():
    """(world size, rank, local rank) from torchrun's environment ((1, 0, 0) without it)."""
    import os

    def get(key, default):
        try:
            return int(os.environ.get(key, default))
        except ValueError:
            return int(default)

    return get("WORLD_SIZE", "1"), get("RANK", "0"), get("LOCAL_RANK", "0")


def _group_joined() -> bool:
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def _lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is how a collective (or joining the group) fails because another rank
    died, was stopped or never came: a consequence, not the cause, of a failed launch."""
    # (torch.distributed's errors are RuntimeErrors; other failures inside a collective, e.g. a
    # CUDA error, are their own cause and keep their traceback)
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Gloo connectFullMesh failed",
        "Timed out waiting", "Socket Timeout", "NCCL communicator was aborted"))


def _report(line: str, *, everywhere: bool = False, consequence: bool = False) -> None:
    """Print the one-line message ``line`` of a failed command once per launch. One process:
    at once. Under torchrun: a failure every rank of a machine meets alike, before the ranks
    joined their process group (``everywhere``: the same command line and files), only from
    each machine's local rank 0 (the others wait :data:`QUIET_RANK_WAIT_S` first, so that
    torchrun does not stop rank 0 before it printed); another failure from rank 0 at once,
    and from another rank after :data:`PEER_GRACE_S`, naming it, unless torchrun has stopped
    it by then. A
    ``consequence`` of another rank's failure (a collective that lost its peer) always waits
    :data:`PEER_GRACE_S` first, so the line of the rank that failed first is the one shown."""
    world, rank, local = _launch_env()
    if world > 1:
        if everywhere and not consequence:
            if local != 0:
                import time

                time.sleep(QUIET_RANK_WAIT_S)
                line = line.replace(": error: ", f": error (local rank {local}): ", 1)
        elif rank != 0 or consequence:
            import time

            time.sleep(PEER_GRACE_S)
            line = line.replace(": error: ", f": error (rank {rank}): ", 1)
    print(line, file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        # asked for: the help on stdout, exit 0; no command: a usage error, on stderr (as argparse's)
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        _report(f"rlhf-fast: error: unknown command {name!r} (choose from {', '.join(COMMANDS)})", everywhere=True)
        return 2
    world, rank, _ = _launch_env()
    if world > 1 and rank != 0:
        # under torchrun, rank 0 prints what the command prints (every rank computes the same
        # results); errors and warnings still go to stderr
        import contextlib
        import os

        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            return _main(name, rest)
    return _main(name, rest)


def _main(name: str, rest: List[str]) -> int:
    try:  # (importing a command's module takes seconds: torch, transformers)
        module = importlib.import_module(COMMANDS[name][0])
        parser = ArgumentParser(prog=f"rlhf-fast {name}", description=COMMANDS[name][1])
        module.add_arguments(parser)
        args = parser.parse_args(rest)
    except KeyboardInterrupt:
        return _interrupted(name)
    args.command = name
    from rlhf_fast.trainers.stop import TrainingStopped

    try:
        return int(module.run(args) or 0)
    except TrainingStopped as e:  # SIGTERM / SIGUSR1: the step ended and a checkpoint was saved
        if _launch_env()[1] == 0:
            print(f"rlhf-fast {name}: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    except (CLIError, ValueError, TypeError, FileNotFoundError, KeyError, PermissionError, IsADirectoryError,
            NotADirectoryError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _report(f"rlhf-fast {name}: error: {msg}", everywhere=not _group_joined())
        return 2
    except KeyboardInterrupt:
        return _interrupted(name)
    except Exception as e:
        if not (_launch_env()[0] > 1 and _lost_peer(e)):
            raise
        # another rank failed first (its own error is its line) or stopped answering
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first.split("] ", 1)[-1][:200]  # gloo's messages start with its source path
        why = ("another rank did not answer within distributed.timeout_s (it hangs, or is much slower)"
               if "Timed out" in first or "timeout" in first.lower() else
               "lost contact with another rank, which failed or was stopped (see its error above, or torchrun's "
               "summary)")
        _report(f"rlhf-fast {name}: error: {why}: {first}", consequence=True)
        return 1


# the training commands whose run continues with the same command (resume: true by default);
# those of rlhf_fast.trainers.rl_cli continue with --resume RUN_DIR
OFFLINE_TRAINERS = ("sft", "reward", "prm", "dpo", "kto")


def _interrupted(name: str) -> int:
    """Exit code 130 after Ctrl-C, with one line saying how ``rlhf-fast name`` continues."""
    # checkpoints are written atomically, so what was saved before Ctrl-C is intact; under
    # torchrun the launcher passes Ctrl-C to every rank, and rank 0 says so for all
    if _launch_env()[1] != 0:
        return 130
    intact = "the checkpoints saved so far are intact"
    if COMMANDS[name][0] == "rlhf_fast.trainers.rl_cli":
        how = f"{intact}: rlhf-fast {name} --resume RUN_DIR continues the run from the last one"
    elif name in OFFLINE_TRAINERS:
        how = (f"{intact}: rlhf-fast {name} continues the run from the last one with the same command "
               "(with --resume true for a run started with resume: false)")
    elif name == "demo":
        how = "a demo starts afresh: run rlhf-fast demo again"
    else:
        rl = "/".join(n for n, (module, _) in COMMANDS.items() if module == "rlhf_fast.trainers.rl_cli")
        how = (f"a training run continues from its last checkpoint ({rl}: --resume RUN_DIR; "
               f"{'/'.join(OFFLINE_TRAINERS)}: the same command)")
    print(f"rlhf-fast {name}: interrupted; {how}", file=sys.stderr)
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
