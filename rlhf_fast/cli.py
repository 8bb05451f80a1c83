"""`rlhf-fast` command line: env, demo, and (as they land) sft / reward / ppo / grpo /
rloo / label / plot / eval / bench. Bad arguments exit with code 2 and one line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Dict, List, Optional


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _cmd_env(args) -> int:
    from rlhf_fast import backends

    info = backends()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k != "backends":
            print(f"{k:12s} {v}")
    print("backends:")
    for name, b in info["backends"].items():
        print(f"  {name:7s} {'live' if b['available'] else 'off ':4s}  {b['reason']}")
    return 0


def _cmd_demo(args) -> int:
    from rlhf_fast.ops_report import run_ops_report

    return run_ops_report(quick=args.quick)


# name -> (help, add_arguments, run); subcommands register here as they land
COMMANDS: Dict[str, tuple] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def deco(fn):
        COMMANDS[name] = (help, add_arguments, fn)
        return fn

    return deco


command("env", "report torch/Triton/CUDA versions and live backends",
        lambda p: p.add_argument("--json", action="store_true", help="print JSON"))(_cmd_env)
command("demo", "run the main job (end-to-end RLHF on the CPU)",
        lambda p: p.add_argument("--quick", action="store_true", help="tiny sizes"))(_cmd_demo)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one readable line, exit 2
        self.exit(2, f"rlhf-fast: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlhf-fast", description="RLHF trainer on fused kernels")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(COMMANDS[args.command][2](args) or 0)
    except CLIError as e:
        print(f"rlhf-fast: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"rlhf-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
