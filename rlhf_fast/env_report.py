"""`rlhf-fast env`: versions and live backends (see :func:`rlhf_fast.backends`)."""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
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
