"""`python -m weights_tools <command>`: checkpoint tools."""

from __future__ import annotations

import argparse
import sys

from kimivl.config import PRESETS
from kimivl.errors import KimiVLError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_tools", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-tiny", help="write a random tiny checkpoint in the official format")
    p.add_argument("out", help="output directory")
    p.add_argument("--preset", default="tiny", choices=sorted(n for n in PRESETS if n != "a3b"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=2, help="split the weights into about this many files")
    args = parser.parse_args(argv)
    try:
        if args.command == "make-tiny":
            from .tiny import make_tiny
            model = make_tiny(args.out, preset=args.preset, seed=args.seed, shards=args.shards)
            n = sum(p.numel() for p in model.parameters())
            print(f"wrote {args.preset} checkpoint ({n:,} parameters) to {args.out}")
    except KimiVLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
