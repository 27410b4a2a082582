"""A real memory hog in a memory-limited cgroup drives the governor to shed before the kernel OOM-kills it,
and a running guard with clamd off (the quick start) closes its door under it.

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
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from queueguard.harness.guard import Guard
from queueguard.harness.sink import RecordingSink
from queueguard.model import Connection, Transaction, parse_ip
from queueguard.policy.schema import Levels, Policy, PressurePolicy
from queueguard.pressure.admission import Admission
from queueguard.pressure.governor import Governor, Level
from queueguard.pressure.sensors import CgroupMemorySensor, own_cgroup
from queueguard.stage import RcptContext
from tests.integration.test_status_page import Rows, run_chromium

pytestmark = pytest.mark.integration

LIMIT = 256 * 1024 * 1024
HOG = """
import sys, time
sys.stdin.readline()
target = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 62
hoard = []
while len(hoard) * 4 * 1024 * 1024 < target:
    hoard.append(b"\\x01" * (4 * 1024 * 1024))
    time.sleep(0.01)
print("holding", flush=True)
sys.stdin.readline()
"""


def oom_kills(group: Path) -> int:
    for line in (group / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def memory_group(name: str) -> Path:
    base = own_cgroup()
    assert base is not None and (base / "memory.limit_in_bytes").exists(), (
        f"no cgroup v1 memory group for this process (found {base}); see the docstring"
    )
    group = base / f"qg-{name}-{os.getpid()}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(LIMIT))
    return group


def start_hog(group: Path, *args: str) -> subprocess.Popen[bytes]:
    hog = subprocess.Popen([sys.executable, "-c", HOG, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    (group / "cgroup.procs").write_text(str(hog.pid))
    assert hog.stdin is not None
    hog.stdin.write(b"go\n")
    hog.stdin.flush()
    return hog


def remove(group: Path, hog: subprocess.Popen[bytes] | None) -> None:
    if hog is not None and hog.poll() is None:
        hog.kill()
        hog.wait()
    for _ in range(50):
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def test_cgroup_hog_reaches_shed_before_oom_kill() -> None:
    group = memory_group("hog")
    hog: subprocess.Popen[bytes] | None = None
    try:
        hog = start_hog(group)
        sensor = CgroupMemorySensor(group)
        pressure = PressurePolicy(psi_memory_some_avg10=None, cgroup_usage_ratio=Levels(soften=0.6, shed=0.85))
        policy = Policy(pressure=pressure)
        gov = Governor([sensor], clock=time.monotonic)
        check = Admission(Governor([sensor], clock=time.monotonic, interval=0))
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
        remove(group, hog)


QUICK_POLICY = """\
pressure:
  psi_memory_some_avg10: null
  mem_available_below: null
  cgroup_usage_ratio: {soften: 0.6, shed: 0.85}
  hold: 1s
"""


def status(guard: Guard) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{guard.metrics_port}/status.json", timeout=5) as r:
        doc: dict[str, Any] = json.load(r)
    return doc


def wait_level(guard: Guard, level: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pressure = status(guard)["pressure"]
        if pressure["level"] == level:
            return dict(pressure)
        time.sleep(0.2)
    raise AssertionError(f"pressure level never reached {level}: {status(guard)['pressure']}")


def test_quick_start_without_clamd_sheds_at_the_door_under_a_real_hog() -> None:
    """The governor runs with clamd off (the shipped quick start has no clamd): a hog in the watched
    group takes the host to shed; new connections get 421, the status page says why, nothing is
    accepted meanwhile; the hog gone, mail flows again."""
    group = memory_group("door")
    hog: subprocess.Popen[bytes] | None = None
    try:
        with RecordingSink() as sink, Guard({"downstreams": [{"address": f"127.0.0.1:{sink.port}"}],
                                             "clamd": {"enabled": False, "memory_cgroup": str(group)}},
                                            {"pressure.yaml": QUICK_POLICY}) as guard:
            assert wait_level(guard, "normal")["sensors"]["cgroup_usage"] is not None
            assert status(guard)["scan"] is None
            with guard.smtp() as c:
                assert c.sendmail("a@example.net", ["info@example.org"], b"Subject: before\r\n\r\nx\r\n") == {}
            hog = start_hog(group, str(int(LIMIT * 0.9)))
            assert hog.stdout is not None and hog.stdout.readline() == b"holding\n"
            shed = wait_level(guard, "shed")
            assert shed["reason"] == "cgroup_usage" and shed["sensors"]["cgroup_usage"] >= 0.85
            with socket.create_connection(("127.0.0.1", guard.port), timeout=5) as s:
                greeting = s.makefile("rb").readline()
            assert greeting.startswith(b"421 4.3.2 ") and b"memory pressure" in greeting, greeting
            dom = asyncio.run(run_chromium("--virtual-time-budget=5000", "--dump-dom",
                                           f"http://127.0.0.1:{guard.metrics_port}/"))
            page = Rows()
            page.feed(dom)
            assert page.ids["pressure-level"] == "shed" and "cgroup_usage" in page.ids["pressure-reason"]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{guard.metrics_port}/readyz", timeout=5)
                raise AssertionError("/readyz answered 200 while shedding")
            except urllib.error.HTTPError as e:
                assert e.code == 503 and b"memory pressure" in e.read()
            assert guard.metric("queueguard_pressure_deferrals_total", reason="shed") >= 1
            assert guard.metric("queueguard_pressure_level") == 2
            assert hog.stdin is not None
            hog.kill()
            hog.wait()
            wait_level(guard, "normal")
            with guard.smtp() as c:
                assert c.sendmail("a@example.net", ["info@example.org"], b"Subject: after\r\n\r\nx\r\n") == {}
            assert [m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in sink.messages] == [b"before", b"after"]
    finally:
        remove(group, hog)
