"""`queueguard queue status`: one queue-watch round, printed as a table or JSON.

One round sees sizes, ages, filesystems, processes and probes; "stuck" needs
a history (30 minutes of rounds), so here it reads "n/a": the daemon's status
page and metrics carry it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TextIO

from queueguard.queuewatch.service import QueueWatch
from queueguard.settings import load_settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    queue = sub.add_parser("queue", help="watched MTA and Mailman queues")
    qsub = queue.add_subparsers(dest="queue_command", required=True)
    status = qsub.add_parser("status", help="queue sizes, oldest ages, spool filesystems, runners, downstreams")
    status.add_argument("--settings", type=Path, help="settings file; its queuewatch section is used")
    status.add_argument("--exim-spool", type=Path, metavar="DIR", help="Exim spool_directory (has input/)")
    status.add_argument("--postfix-queue", type=Path, metavar="DIR", help="Postfix queue_directory")
    status.add_argument("--mailman-queue", type=Path, metavar="DIR", help="Mailman 3 var/queue")
    status.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    status.set_defaults(func=run_status)


def run_status(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Exit 0 when every watcher worked, 1 when one failed (the table says which)."""
    overrides: dict[str, object] = {}
    for flag in ("exim_spool", "postfix_queue", "mailman_queue"):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[f"queuewatch.{flag}"] = str(value)
    settings = load_settings(args.settings, overrides)
    watch = QueueWatch.from_settings(settings) if args.settings else QueueWatch(settings.queuewatch)
    asyncio.run(watch.collect())
    snap = watch.snapshot()
    watchers = _rows(snap.get("watchers"))
    if not watchers:
        print("queueguard: nothing to watch: give --settings with a queuewatch section, or "
              "--exim-spool / --postfix-queue / --mailman-queue", file=sys.stderr)
        return 2
    if args.json:
        json.dump(snap, out, indent=2, default=str)
        out.write("\n")
    else:
        out.write(render_table(snap))
    return 1 if any(not w.get("ok") for w in watchers) else 0


def render_table(snap: dict[str, object]) -> str:
    """The snapshot as aligned text tables (pure, for tests)."""
    parts = []
    queues = _rows(snap.get("queues"))
    parts.append(_table(
        ["MTA", "QUEUE", "MESSAGES", "OLDEST", "FROZEN", "STUCK"],
        [[q.get("mta"), q.get("queue"), q.get("messages"), human_age(q.get("oldest_age_seconds")),
          q.get("frozen"), q.get("stuck")] for q in queues],
        right={2, 3, 4},
    ))
    filesystems = _rows(snap.get("filesystems"))
    if filesystems:
        parts.append(_table(
            ["FILESYSTEM", "FREE", "SIZE", "FREE%", "FREE INODES", "INODES FREE%"],
            [[f.get("path"), human_bytes(f.get("free_bytes")), human_bytes(f.get("size_bytes")),
              _pct(f.get("free_bytes"), f.get("size_bytes")), f.get("free_inodes"),
              _pct(f.get("free_inodes"), f.get("inodes"))] for f in filesystems],
            right={1, 2, 3, 4, 5},
        ))
    daemons = [[f"mailman runner {r.get('runner')}", r.get("running"),
                "ok" if r.get("running") else ("MISSING" if r.get("expected") else "not expected")]
               for r in _rows(snap.get("mailman_runners"))]
    daemons += [[p.get("name"), p.get("running"), "ok" if p.get("running") else "MISSING"]
                for p in _rows(snap.get("processes"))]
    if daemons:
        parts.append(_table(["PROCESS", "RUNNING", "STATE"], daemons, right={1}))
    clamd = snap.get("clamd")
    probes = [[d.get("name"), "reachable" if d.get("up") else "UNREACHABLE", d.get("detail")]
              for d in _rows(snap.get("downstreams"))]
    if isinstance(clamd, dict):
        probes.insert(0, ["clamd", "up" if clamd.get("up") else "DOWN", clamd.get("detail")])
    if probes:
        parts.append(_table(["PROBE", "STATE", "DETAIL"], probes))
    failed = [w for w in _rows(snap.get("watchers")) if not w.get("ok")]
    for w in failed:
        parts.append(f"watcher {w.get('name')} FAILED: {w.get('error')}\n")
    return "\n".join(parts)


def human_age(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def human_bytes(value: object) -> str:
    if not isinstance(value, int | float):
        return "n/a"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "n/a"


def _pct(part: object, whole: object) -> str:
    if isinstance(part, int | float) and isinstance(whole, int | float) and whole:
        return f"{100 * part / whole:.1f}%"
    return "n/a"


def _rows(value: object) -> list[dict[str, object]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _table(header: list[str], rows: list[list[object]], right: set[int] | None = None) -> str:
    text = [[_cell(c) for c in row] for row in rows] or [["(none)"] + [""] * (len(header) - 1)]
    widths = [max(len(r[i]) for r in [header, *text]) for i in range(len(header))]
    lines = []
    for row in [header, *text]:
        cells = [c.rjust(widths[i]) if right and i in right else c.ljust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
