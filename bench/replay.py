"""Incident replays from the checkout: `.venv/bin/python -m bench.replay SCENARIO [--scale N] [--json FILE]`.

The same as `queueguard replay`; see docs/replay.md.
"""

from __future__ import annotations

import argparse
import sys

from queueguard.replay import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.replay")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["replay", *(sys.argv[1:] if argv is None else argv)])
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
