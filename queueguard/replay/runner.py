"""Find a scenario in the checkout, run it, print the verdict table, write the JSON summary."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Protocol, TextIO

from queueguard.replay.report import Summary, render

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = {
    "vrts-spam-wave": "bench.scenarios.vrts_spam_wave",
    "mx-stopped": "bench.scenarios.mx_stopped",
    "outbound-stuck": "bench.scenarios.outbound_stuck",
    "runner-crash": "bench.scenarios.runner_crash",
    "inodes": "bench.scenarios.inodes",
}


class Scenario(Protocol):
    """What a module under bench/scenarios/ provides."""

    def run(self, scale: float, workdir: Path) -> Summary: ...


def load(name: str) -> Scenario:
    if not (REPO / "bench" / "scenarios").is_dir() or not (REPO / "tests" / "components").is_dir():
        raise SystemExit("queueguard replay runs from a source checkout (bench/scenarios, tests/components); "
                         f"not found under {REPO}")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    module: Scenario = importlib.import_module(SCENARIOS[name])
    return module


def run(name: str, scale: float, *, keep: bool = False, out: TextIO = sys.stdout) -> Summary:
    """Run one scenario in a fresh work directory; print its table; the summary says where files were kept."""
    if scale <= 0:
        raise SystemExit("--scale must be positive")
    workdir = Path(tempfile.mkdtemp(prefix=f"qg-replay-{name}-"))
    workdir.chmod(0o755)
    started = time.monotonic()
    try:
        summary = load(name).run(scale, workdir)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    summary.seconds = time.monotonic() - started
    if keep:
        summary.notes.append(f"work directory kept: {workdir}")
    print(render(summary), file=out, flush=True)
    print(file=out)
    return summary


def main(scenario: str, scale: float, json_out: TextIO | None, *, keep: bool = False) -> int:
    """Exit 0 when every scenario run kept every check (0 lost included), 1 otherwise."""
    names = list(SCENARIOS) if scenario == "all" else [scenario]
    summaries = [run(n, scale, keep=keep) for n in names]
    if json_out is not None:
        doc = summaries[0].as_dict() if len(summaries) == 1 else [s.as_dict() for s in summaries]
        json.dump(doc, json_out, indent=2)
        json_out.write("\n")
        json_out.flush()
    return 0 if all(s.ok for s in summaries) else 1
