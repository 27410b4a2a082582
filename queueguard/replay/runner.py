"""Find a scenario in the package, run it, print the verdict table, write the JSON summary."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Protocol, TextIO

from queueguard.harness.exim import EXIM_ROOT_ENV, EximError
from queueguard.replay.report import Summary, render

SCENARIOS = {
    "vrts-spam-wave": "queueguard.replay.scenarios.vrts_spam_wave",
    "mx-stopped": "queueguard.replay.scenarios.mx_stopped",
    "outbound-stuck": "queueguard.replay.scenarios.outbound_stuck",
    "runner-crash": "queueguard.replay.scenarios.runner_crash",
    "inodes": "queueguard.replay.scenarios.inodes",
}


class Scenario(Protocol):
    """What a module under queueguard/replay/scenarios/ provides."""

    def run(self, scale: float, workdir: Path) -> Summary: ...


def load(name: str) -> Scenario:
    """The scenario's module, imported when it runs: `queueguard serve` never loads one."""
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


def main(scenario: str, scale: float, json_out: TextIO | None, *, keep: bool = False,
         exim_root: Path | None = None) -> int:
    """Exit 0 when every scenario run kept every check (0 lost included), 1 otherwise.

    `exim_root` goes into the environment, where the harness looks first.
    """
    if exim_root is not None:
        os.environ[EXIM_ROOT_ENV] = str(exim_root.resolve())
    names = list(SCENARIOS) if scenario == "all" else [scenario]
    try:
        summaries = [run(n, scale, keep=keep) for n in names]
    except EximError as exc:
        raise SystemExit(f"queueguard replay: {exc}") from exc
    if json_out is not None:
        doc = summaries[0].as_dict() if len(summaries) == 1 else [s.as_dict() for s in summaries]
        json.dump(doc, json_out, indent=2)
        json_out.write("\n")
        json_out.flush()
    return 0 if all(s.ok for s in summaries) else 1
