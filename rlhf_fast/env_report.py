"""`rlhf-fast env`: versions and live backends (see :func:`rlhf_fast.backends`)."""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    from rlhf_fast import backends
    from rlhf_fast.ops import _dispatch

    # an invalid RLHF_FAST_BACKEND makes every op raise: a ValueError naming it (exit 2), not a
    # healthy-looking report
    forced = _dispatch.forced_backend()
    info = backends()
    info["forced_backend"] = forced
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k not in ("backends", "forced_backend"):
            print(f"{k:12s} {v}")
    print("backends:")
    for name, b in info["backends"].items():
        print(f"  {name:7s} {'live' if b['available'] else 'off ':4s}  {b['reason']}")
    print(f"forced:      {forced} (RLHF_FAST_BACKEND)" if forced else
          "forced:      none (RLHF_FAST_BACKEND unset: each op picks its backend per device)")
    return 0
