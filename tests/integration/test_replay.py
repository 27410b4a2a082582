"""Each incident replay at a small scale: real Exim, clamd, smtp sinks, promtool, a memory cgroup
and a tmpfs, started and stopped by the scenario. Asserts the accounting balances with nothing
lost, and each scenario's key outcome (failover, alert fired within its `for:`, 452 with a
readable quarantine, clamd not restarted). Time per scenario is set by the alert windows
(~30 s for the queue scenarios), not by the scale.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest

from queueguard.cli import main as cli_main
from queueguard.replay.report import Summary
from queueguard.replay.runner import run

pytestmark = pytest.mark.integration


def checks(s: Summary) -> dict[str, bool]:
    return {c.name: c.ok for c in s.checks}


def assert_balanced(s: Summary) -> None:
    acc = s.accounting
    assert acc.sent > 0
    assert acc.lost == 0, acc.equation()
    assert acc.sent == acc.delivered + acc.quarantined + sum(acc.rejected.values()) + acc.queued_at_sender
    assert s.ok, [c for c in s.checks if not c.ok]


def test_mx_stopped_fails_over_and_back_without_loss() -> None:
    s = run("mx-stopped", 0.2, out=io.StringIO())
    assert_balanced(s)
    assert checks(s)["failover to the backup"] and checks(s)["primary back in use"]
    assert s.figures["delivered by backup"] > 0 and s.figures["delivered by primary"] > 0
    assert s.accounting.queued_at_sender == 0 and not s.accounting.rejected


def test_outbound_stuck_pages_within_for() -> None:
    s = run("outbound-stuck", 0.25, out=io.StringIO())
    assert_balanced(s)
    stuck = next(a for a in s.figures["alerts"] if a["alert"] == "QueueguardQueueStuck")
    assert stuck["labels"]["severity"] == "page" and stuck["labels"]["mta"] == "exim"
    assert stuck["fired_at"] - stuck["condition_from"] == 5 and stuck["witness_ok"]
    assert stuck["condition_from"] >= 30  # the rule waits for 30 minutes of data (its offset 30m term)
    assert s.accounting.delivered == s.accounting.sent  # all delivered once the path works again


def test_runner_crash_pages_for_the_runner_and_the_stuck_out_queue() -> None:
    s = run("runner-crash", 0.25, out=io.StringIO())
    assert_balanced(s)
    fired = {a["alert"]: a for a in s.figures["alerts"]}
    missing_runner = fired["QueueguardMailmanRunnerMissing"]
    assert missing_runner["labels"]["runner"] == "out"
    assert missing_runner["fired_at"] - s.figures["runner crashed at minute"] <= 5 + 1
    assert fired["QueueguardQueueStuck"]["within_for"] and fired["QueueguardQueueStuck"]["labels"]["queue"] == "out"
    assert s.figures["out queue when the runner came back"] > 0


def replay_mounts() -> set[str]:
    return {line for line in subprocess.run(["mount"], capture_output=True, text=True).stdout.splitlines()
            if "qg-replay-inodes" in line}


def test_inodes_452_readable_quarantine_and_alert() -> None:
    before = replay_mounts()  # another replay running beside this one may hold its own
    s = run("inodes", 0.3, out=io.StringIO())
    assert_balanced(s)
    c = checks(s)
    assert c["guard answered 452 4.3.1 when the quarantine hit its inode floor"]
    assert c["quarantine readable, nothing corrupted"] and c["legitimate mail still delivered"]
    assert s.accounting.quarantined > 0 and s.accounting.queued_at_sender > 0
    assert c["alert QueueguardFilesystemInodesLow"]
    assert not replay_mounts() - before  # ours unmounted in teardown


def test_vrts_spam_wave_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    assert cli_main(["replay", "vrts-spam-wave", "--scale", "0.3", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    acc = doc["accounting"]
    assert doc["lost"] == 0 and doc["ok"]
    placed = acc["delivered"] + acc["quarantined"] + sum(acc["rejected"].values()) + acc["queued_at_sender"]
    assert acc["sent"] == placed
    assert doc["figures"]["clamd restarts"] == 0 and doc["figures"]["OOM kills"] == 0
    assert doc["figures"]["spam quarantined"] > 0
    assert doc["figures"]["spam delivered"] <= 10  # the burst threshold of the replay policy
    assert acc["rejected"] == {"scan:clamav": acc["rejected"]["scan:clamav"]} and acc["rejected"]["scan:clamav"] > 0
    assert doc["figures"]["legit latency p99 s"] is not None
