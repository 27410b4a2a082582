"""A real `queueguard serve` started and stopped many times, each time on a fresh quarantine directory,
while `queueguard quarantine list` and `stats` read that directory: every start must open the index
(its recovery task and its summary refresher open it at once, from two threads) and every CLI call
must answer. The issue saw one start in eighteen log `quarantine recovery failed … database is
locked`; on a fast disk the window is too short for this test to hit it often (0 in 60 starts here
before the fix), so tests/unit/quarantine/test_quarantine_open.py is the reproducer and this test
checks the whole path: serve's start, the CLI beside it, and what they log.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from queueguard.harness.guard import Guard

pytestmark = pytest.mark.integration
STARTS = 20
OPENED = "index open, nothing to recover"
FAILED = ("quarantine recovery failed", "cannot read its index", "Traceback")


@dataclass(frozen=True)
class Call:
    qdir: Path
    argv: tuple[str, ...]
    code: int
    stderr: str

    @property
    def before_the_guard_made_it(self) -> bool:
        """The CLI refuses a directory that is not (yet) a quarantine rather than create one: correct."""
        return self.code == 2 and ("does not exist" in self.stderr or "is not a quarantine" in self.stderr)


CHECKOUT = Path(__file__).resolve().parents[2]


class Reader:
    """Runs `quarantine list` and `quarantine stats --json` back to back on the current directory."""

    def __init__(self) -> None:
        self.qdir: Path | None = None
        self.calls: list[Call] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        commands = [("list",), ("stats", "--json")]
        i = 0
        while not self.done.is_set():
            qdir = self.qdir
            assert qdir is not None
            sub, *rest = commands[i % len(commands)]
            argv = (sys.executable, "-m", "queueguard.cli", "quarantine", sub, "--quarantine", str(qdir), *rest)
            r = subprocess.run(argv, capture_output=True, text=True, cwd=CHECKOUT, timeout=60)
            self.calls.append(Call(qdir, (sub, *rest), r.returncode, r.stderr))
            i += 1

    def wait_answered(self, qdir: Path, timeout: float = 20.0) -> None:
        """Until a call has read `qdir` (exit 0), so that every start is read while its guard runs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(c.qdir == qdir and c.code == 0 for c in self.calls):
                return
            time.sleep(0.05)
        raise AssertionError(f"no CLI call read {qdir}: {[c for c in self.calls if c.qdir == qdir]}")


def wait_opened(guard: Guard, timeout: float = 15.0) -> None:
    """Until the recovery task and the first summary refresh have each succeeded or failed (logged)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = guard.log()
        recovered = OPENED in log or "quarantine recovery" in log
        summarised = "cannot read its index" in log or guard.metric("queueguard_quarantine_inodes") > 0
        if recovered and summarised:
            return
        time.sleep(0.05)
    raise AssertionError(f"the guard never reported opening its quarantine:\n{guard.log()}")


def test_a_fresh_quarantine_opens_at_every_start_while_the_cli_reads_it(tmp_path: Path) -> None:
    reader = Reader()
    logs: list[str] = []
    try:
        for i in range(STARTS):
            qdir = tmp_path / f"q{i:02d}"
            guard = Guard({"quarantine": {"directory": str(qdir)}})
            reader.qdir = qdir  # the CLI goes for it before and while the guard starts
            if i == 0:
                reader.thread.start()
            guard.start()
            try:
                wait_opened(guard)
                reader.wait_answered(qdir)
            finally:
                assert guard.stop() == 0
            logs.append(guard.log())
    finally:
        reader.done.set()
        reader.thread.join(timeout=60)
    failed_starts = [(n, line) for n, log in enumerate(logs) for line in log.splitlines()
                     if any(f in line for f in FAILED)]
    assert failed_starts == [], f"{len(failed_starts)} failures in {STARTS} starts: {failed_starts[:5]}"
    assert all(OPENED in log for log in logs)
    failed_calls = [c for c in reader.calls if c.code != 0 and not c.before_the_guard_made_it]
    assert failed_calls == [], f"{len(failed_calls)} of {len(reader.calls)} CLI calls failed: {failed_calls[:5]}"
    answered = sum(c.code == 0 for c in reader.calls)
    print(f"{STARTS} starts; {len(reader.calls)} CLI calls: {answered} answered, "
          f"{len(reader.calls) - answered} refused a directory the guard had not made yet")
