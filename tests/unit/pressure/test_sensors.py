"""Sensors read fake kernel files (v1 and v2 cgroup layouts, PSI, meminfo, /proc)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from queueguard.pressure.sensors import (
    CgroupMemorySensor,
    ClamdRssSensor,
    MemAvailableSensor,
    PriorityWaiter,
    PsiSensor,
    PsiTrigger,
    default_sensors,
    own_cgroup,
    own_v2_group,
    parse_limit,
    parse_psi,
)
from tests.components.processes import process_named

PSI = "some avg10=12.50 avg60=3.00 avg300=1.00 total=123456\nfull avg10=4.25 avg60=1.00 avg300=0.10 total=999\n"


def write(d: Path, **files: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name.replace("__", ".")).write_text(text)
    return d


def test_psi(tmp_path: Path) -> None:
    assert parse_psi(PSI)["full"]["avg10"] == 4.25
    f = tmp_path / "memory.pressure"
    f.write_text(PSI)
    assert PsiSensor(f).read() == 12.5
    assert PsiSensor(f, line="full").read() == 4.25
    assert PsiSensor(tmp_path / "missing").read() is None
    f.write_text("garbage\n")
    assert PsiSensor(f).read() is None


def test_mem_available(tmp_path: Path) -> None:
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       24683692 kB\nMemFree:        100 kB\nMemAvailable:    1048576 kB\n")
    assert MemAvailableSensor(f).read() == 1024**3
    f.write_text("MemTotal: 1 kB\n")
    assert MemAvailableSensor(f).read() is None


def test_cgroup_v2(tmp_path: Path) -> None:
    d = write(tmp_path / "g", memory__current="600\n", memory__max="1000\n", memory__high="max\n",
              memory__events="low 0\nhigh 3\nmax 1\noom 0\noom_kill 2\n")
    s = CgroupMemorySensor(d)
    assert s.v2 and s.read() == 0.6
    assert s.events()["oom_kill"] == 2
    (d / "memory.high").write_text("800\n")
    assert s.read() == 0.75  # memory.high is where throttling starts
    (d / "memory.max").write_text("max\n")
    (d / "memory.high").write_text("max\n")
    assert s.read() is None


def test_cgroup_v1(tmp_path: Path) -> None:
    d = write(tmp_path / "g", memory__usage_in_bytes="300\n", memory__limit_in_bytes="1200\n",
              memory__failcnt="7\n", memory__oom_control="oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    s = CgroupMemorySensor(d)
    assert not s.v2 and s.read() == 0.25
    assert s.events() == {"oom_kill_disable": 0, "under_oom": 0, "oom_kill": 1, "failcnt": 7}
    (d / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert s.read() is None
    assert parse_limit("max") is None and parse_limit(None) is None and parse_limit("42") == 42


def test_clamd_rss(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write(proc / "100", comm="bash\n", status="Name:\tbash\nVmRSS:\t    10 kB\n")
    write(proc / "200", comm="clamd\n", status="Name:\tclamd\nVmRSS:\t  2048 kB\n")
    write(proc / "300", comm="clamd\n", status="Name:\tclamd\nVmRSS:\t  4096 kB\n")
    pid_file = tmp_path / "clamd.pid"
    pid_file.write_text("300\n")
    assert ClamdRssSensor(pid_file, proc=proc).read() == 4096 * 1024
    pid_file.write_text("999\n")  # stale pid file: fall back to the process table
    assert ClamdRssSensor(pid_file, proc=proc).read() in (2048 * 1024, 4096 * 1024)
    assert ClamdRssSensor(None, proc=proc, process_name="nothing").read() is None


def test_clamd_rss_ignores_a_stale_pid_file_naming_another_process(tmp_path: Path) -> None:
    """The pid file names a recycled pid now used by a big process: its RSS is not clamd's."""
    proc = tmp_path / "proc"
    write(proc / "100", comm="java\n", status="Name:\tjava\nVmRSS:\t 9999999 kB\n")
    write(proc / "200", comm="clamd\n", status="Name:\tclamd\nVmRSS:\t  2048 kB\n")
    pid_file = tmp_path / "clamd.pid"
    pid_file.write_text("100\n")
    sensor = ClamdRssSensor(pid_file, proc=proc)
    assert sensor.pid() == 200
    assert sensor.read() == 2048 * 1024


class Ticks:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_clamd_rss_keeps_the_pid_it_searched_for(tmp_path: Path) -> None:
    """The /proc walk runs once, not every second: the pid found is kept while it is clamd,
    and a search that found nothing waits `search_every` before walking /proc again."""
    proc = tmp_path / "proc"
    write(proc / "100", comm="bash\n", status="VmRSS:\t 10 kB\n")
    clock = Ticks()
    sensor = ClamdRssSensor(None, proc=proc, search_every=30.0, clock=clock)
    assert sensor.read() is None
    write(proc / "200", comm="clamd\n", status="VmRSS:\t 2048 kB\n")
    clock.now = 29.0
    assert sensor.read() is None  # searched 29 s ago: not yet again
    clock.now = 30.0
    assert sensor.read() == 2048 * 1024
    # another clamd appears earlier in /proc: the kept pid is used, no new walk
    write(proc / "150", comm="clamd\n", status="VmRSS:\t 4096 kB\n")
    assert sensor.read() == 2048 * 1024
    # the kept pid is recycled by another program: searched again at once
    (proc / "200" / "comm").write_text("java\n")
    assert sensor.read() == 4096 * 1024


def test_clamd_search_survives_a_process_name_that_is_not_utf8(tmp_path: Path) -> None:
    """A real process whose name is not UTF-8 (a program file named b'sl\\xff') once made
    every read raise UnicodeDecodeError, logged by the governor every second."""
    with process_named(tmp_path, b"sl\xff"):
        assert ClamdRssSensor(None, process_name="no-such-clamd").read() is None


def test_own_cgroup_layouts(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    pc = tmp_path / "cgroup"
    pc.write_text("4:memory:/process_api/abc\n1:cpu:/\n0::/\n")
    write(root / "memory" / "process_api" / "abc", memory__usage_in_bytes="1\n")
    assert own_cgroup(pc, root) == root / "memory" / "process_api" / "abc"
    pc.write_text("0::/system.slice/queueguard.service\n")
    write(root / "system.slice" / "queueguard.service", memory__current="1\n", memory__pressure=PSI)
    write(root, cgroup__procs="")
    assert own_cgroup(pc, root) == root / "system.slice" / "queueguard.service"
    assert own_v2_group(pc, root) == root / "system.slice" / "queueguard.service"


def test_default_sensors_for_a_given_group(tmp_path: Path) -> None:
    g = write(tmp_path / "g", memory__current="5\n", memory__max="10\n", memory__pressure=PSI)
    sensors = {s.name: s for s in default_sensors(None, g, clamd=True)}
    assert sensors["cgroup_usage"].read() == 0.5
    assert sensors["cgroup_psi_memory"].read() == 12.5
    assert {"psi_memory", "mem_available", "clamd_rss"} <= set(sensors)


def test_no_clamd_sensor_without_clamd(tmp_path: Path) -> None:
    """Scanning off (the quick start): no sensor walking /proc every second for a clamd
    that is not there."""
    g = write(tmp_path / "g", memory__current="5\n", memory__max="10\n")
    names = {s.name for s in default_sensors(Path("/run/clamav/clamd.pid"), g, clamd=False)}
    assert "clamd_rss" not in names
    assert {"psi_memory", "mem_available", "cgroup_usage"} <= names


async def test_priority_waiter_wakes_on_pri_only() -> None:
    """Plain readability (the PSI files are always readable) must not wake it; POLLPRI must.
    TCP urgent data is the one POLLPRI source we can produce here without a PSI trigger."""
    server = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(server.getsockname())
    b, _ = server.accept()
    waiter = PriorityWaiter(b.fileno())
    try:
        a.send(b"ordinary data")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await waiter.wait()
        a.send(b"!", socket.MSG_OOB)
        async with asyncio.timeout(5):
            await waiter.wait()
    finally:
        waiter.close()
        for s in (a, b, server):
            s.close()


def test_psi_trigger_refused_is_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        PsiTrigger(tmp_path / "no-such-pressure-file").open()
    with pytest.raises(RuntimeError):
        asyncio.run(PsiTrigger().wait())
