"""`queueguard replay SCENARIO`: replay an incident against real components on loopback.

A development and operations tool: the scenarios live in the source checkout
(bench/scenarios/) and start real Exim, clamd, smtp-sink and `queueguard serve`
through the test harness (tests/components/), so the command runs from a
checkout with `./setup.sh --no-run` done, not from an installed wheel.
"""

from __future__ import annotations

import argparse

from queueguard.replay.runner import SCENARIOS, main


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("replay", help="replay an incident with real components (from a source checkout)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=[*SCENARIOS, "all"], help="which incident")
    p.add_argument("--scale", type=float, default=1.0,
                   help="traffic multiplier (1: under 2 minutes on a 2-core machine; 0.2 for a quick look)")
    p.add_argument("--json", type=argparse.FileType("w"), metavar="FILE",
                   help="write the machine-readable summary here ('-' for stdout)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, spools, promtool files)")
    p.set_defaults(func=lambda args: main(args.scenario, args.scale, args.json, keep=args.keep))
