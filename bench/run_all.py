"""Run every benchmark script in bench/ and print one table; each row carries the command that made it.

    .venv/bin/python -m bench.run_all [--only proxy,scan] [--json all.json]

Each `bench/*_bench.py` (and bench/burst_real.py, bench/evasion.py) runs as
`python -m bench.NAME` with its defaults (and `--json FILE` where it offers one); its JSON is
flattened into rows (`key.path  value`), and a script without JSON contributes the last lines
of its own printed table. Slow: tens of minutes with every script at its defaults; not part of
the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


EXTRA = ("burst_real", "evasion")
"""Benchmarks named for what they measure rather than `*_bench`."""


def scripts() -> list[str]:
    return sorted([*(p.stem for p in BENCH.glob("*_bench.py")), *EXTRA])


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """JSON -> (dotted key, printable leaf) rows."""
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list):
        return [row for i, v in enumerate(value) for row in flatten(v, f"{prefix}[{i}]")]
    if isinstance(value, float):
        return [(prefix, f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}")]
    return [(prefix, str(value))]


def run(name: str, tmp: Path) -> tuple[str, int, float, list[tuple[str, str]]]:
    """(command, exit code, seconds, rows)."""
    cmd = [sys.executable, "-m", f"bench.{name}"]
    helptext = subprocess.run([*cmd, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    out_json = tmp / f"{name}.json"
    if "--json" in helptext:
        cmd += ["--json", str(out_json)]
    started = time.monotonic()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    seconds = time.monotonic() - started
    shown = " ".join(["python -m", f"bench.{name}", *(["--json FILE"] if "--json" in cmd else [])])
    if out_json.exists():
        rows = flatten(json.loads(out_json.read_text()))
    else:
        rows = [("output", line) for line in res.stdout.strip().splitlines()[-12:]]
    if res.returncode:
        rows.append(("error", (res.stderr.strip().splitlines() or ["?"])[-1]))
    return shown, res.returncode, seconds, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated script names (without _bench)")
    parser.add_argument("--json", type=Path, help="write every script's rows here")
    args = parser.parse_args(argv)
    names = scripts()
    if args.only:
        wanted = {f"{n.strip()}_bench" for n in args.only.split(",")}
        names = [n for n in names if n in wanted]
    results: dict[str, Any] = {}
    failed = 0
    with tempfile.TemporaryDirectory(prefix="qg-bench-") as tmp:
        for name in names:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            cmd, rc, seconds, rows = run(name, Path(tmp))
            failed += rc != 0
            results[name] = {"command": cmd, "exit": rc, "seconds": round(seconds, 1), "rows": rows}
    width = max((len(k) for r in results.values() for k, _ in r["rows"]), default=10)
    print(f"{'benchmark / figure':<{width + 2}}  value")
    for name, r in results.items():
        print(f"\n{name}  ({r['command']}; exit {r['exit']}; {r['seconds']} s)")
        for key, value in r["rows"]:
            print(f"  {key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
