"""`queueguard replay SCENARIO`: replay an incident against real components on loopback.

The scenarios (`queueguard.replay.scenarios`) start real Exim, clamd, SMTP
sinks and `queueguard serve` through `queueguard.harness`, all in the package:
the command runs from an installed wheel as well as from a checkout. It needs
root (a memory cgroup, a tmpfs, Exim's user) and the programs: Exim 4.96
(`--exim-root`, else a checkout's .deps/exim/root, else /usr/sbin/exim4),
clamd, promtool.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from queueguard.harness.exim import EXIM_ROOT_ENV
from queueguard.replay.runner import SCENARIOS, main


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("replay", help="replay an incident with real components on loopback (as root)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=[*SCENARIOS, "all"], help="which incident")
    p.add_argument("--scale", type=float, default=1.0,
                   help="traffic multiplier (1: under 2 minutes on a 2-core machine; 0.2 for a quick look)")
    p.add_argument("--json", type=argparse.FileType("w"), metavar="FILE",
                   help="write the machine-readable summary here ('-' for stdout)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, spools, promtool files)")
    p.add_argument("--exim-root", type=Path, metavar="DIR",
                   help=f"unpacked exim4-daemon-heavy tree (DIR/usr/sbin/exim4); default ${EXIM_ROOT_ENV}, "
                        "then a checkout's .deps/exim/root, then /usr/sbin/exim4")
    p.set_defaults(func=lambda args: main(args.scenario, args.scale, args.json, keep=args.keep,
                                          exim_root=args.exim_root))
