"""A real memory hog in a memory-limited cgroup drives the governor to shed before the kernel OOM-kills it.

What this machine allowed (checked when the test was written): cgroup v1 with the
memory controller at /sys/fs/cgroup/memory; as root we may create a child under our
own memory group (the `memory:` line of /proc/self/cgroup), set memory.limit_in_bytes,
move a process into cgroup.procs, read memory.usage_in_bytes and memory.oom_control.
No swap, so the hog is OOM-killed at the limit rather than swapping. The v2 hierarchy
here has no memory controller and the kernel refuses PSI triggers (EINVAL), so the
PSI paths are covered by unit tests with fake files; this test uses the v1 usage/limit
sensor. If the layout is missing the test fails loudly rather than skipping.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from queueguard.model import Connection, Transaction, parse_ip
from queueguard.policy.schema import Levels, Policy, PressurePolicy, ScanPolicy
from queueguard.scan.check import ScanCheck
from queueguard.scan.governor import Governor, Level
from queueguard.scan.sensors import CgroupMemorySensor, own_cgroup
from queueguard.settings import ClamdSettings
from queueguard.stage import RcptContext

pytestmark = pytest.mark.integration

LIMIT = 256 * 1024 * 1024
HOG = """
import sys, time
sys.stdin.readline()
hoard = []
while True:
    hoard.append(b"\\x01" * (4 * 1024 * 1024))
    time.sleep(0.01)
"""


def oom_kills(group: Path) -> int:
    for line in (group / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def test_cgroup_hog_reaches_shed_before_oom_kill() -> None:
    base = own_cgroup()
    assert base is not None and (base / "memory.limit_in_bytes").exists(), (
        f"no cgroup v1 memory group for this process (found {base}); see the docstring"
    )
    group = base / f"qg-hog-{os.getpid()}"
    group.mkdir()
    hog: subprocess.Popen[bytes] | None = None
    try:
        (group / "memory.limit_in_bytes").write_text(str(LIMIT))
        hog = subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.PIPE)
        (group / "cgroup.procs").write_text(str(hog.pid))
        assert hog.stdin is not None
        hog.stdin.write(b"go\n")
        hog.stdin.flush()

        sensor = CgroupMemorySensor(group)
        pressure = PressurePolicy(psi_memory_some_avg10=None, cgroup_usage_ratio=Levels(soften=0.6, shed=0.85))
        policy = Policy(scan=ScanPolicy(pressure=pressure))
        gov = Governor([sensor], clock=time.monotonic)
        check = ScanCheck(ClamdSettings(enabled=True, address="/nonexistent/clamd.sock"), sensors=[sensor],
                          pressure_interval=0)
        levels: list[tuple[Level, bool]] = []
        shed_reply = ""
        deadline = time.monotonic() + 60
        while hog.poll() is None and time.monotonic() < deadline:
            level = gov.update(pressure)
            alive = hog.poll() is None
            if level is Level.SHED and not shed_reply and alive:
                txn = Transaction(Connection(parse_ip("192.0.2.1")), "a@flood.example")
                r = asyncio.run(check.on_rcpt(RcptContext(txn, "info@example.org", policy)))
                shed_reply = r.verdict.reply() if r.verdict else "accepted"
            if not levels or levels[-1][0] is not level:
                levels.append((level, alive))
            time.sleep(0.005)
        hog.wait(10)
        assert [lv for lv, _ in levels] == [Level.NORMAL, Level.SOFTEN, Level.SHED], levels
        assert all(alive for _, alive in levels), "shed came only after the hog died"
        assert shed_reply.startswith("451 4.3.2") and "memory pressure" in shed_reply, shed_reply
        assert hog.returncode == -9 and oom_kills(group) >= 1, (hog.returncode, oom_kills(group))
    finally:
        if hog is not None and hog.poll() is None:
            hog.kill()
            hog.wait()
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
