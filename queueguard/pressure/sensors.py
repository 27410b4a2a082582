"""Memory pressure sensors: small objects that read one number from the kernel.

Each sensor has a `name` (its metric label) and a `kind`: the PressurePolicy
field whose thresholds judge it. `read()` returns None when the source is
missing or unreadable, so a host without PSI or a cgroup limit just has
fewer votes. Paths are constructor arguments so tests use fake files.
"""

from __future__ import annotations

import asyncio
import os
import select
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

UNLIMITED_V1 = 1 << 60
"""cgroup v1 reports 'no limit' as a huge page-rounded number (~2**63)."""
PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


class Sensor(Protocol):
    name: str
    kind: str

    def read(self) -> float | None: ...


def _read(path: Path) -> str | None:
    """Text of a kernel file, None if unreadable. Bytes that are not UTF-8 (a process may
    name itself anything) are replaced rather than raising: a sensor must not crash."""
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return None


def parse_psi(text: str) -> dict[str, dict[str, float]]:
    """'some avg10=1.00 avg60=... total=N' lines -> {'some': {'avg10': 1.0, ...}, 'full': {...}}."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind not in ("some", "full"):
            continue
        fields: dict[str, float] = {}
        for item in rest.split():
            key, _, value = item.partition("=")
            try:
                fields[key] = float(value)
            except ValueError:
                continue
        out[kind] = fields
    return out


def parse_keyed(text: str) -> dict[str, int]:
    """'key value' lines (meminfo with its 'kB', memory.events, memory.stat) -> ints, kB as bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) < 2 or not parts[1].isdigit():
            continue
        value = int(parts[1])
        out[parts[0]] = value * 1024 if len(parts) > 2 and parts[2] == "kB" else value
    return out


def parse_limit(text: str | None) -> int | None:
    """A cgroup limit file: 'max' (v2) or a huge number (v1) mean no limit."""
    if text is None:
        return None
    text = text.strip()
    if text == "max" or not text.isdigit():
        return None
    value = int(text)
    return None if value >= UNLIMITED_V1 else value


class PsiSensor:
    """avg10 of 'some' (or 'full') from /proc/pressure/memory or a cgroup v2 memory.pressure."""

    kind = "psi_memory_some_avg10"

    def __init__(self, path: Path = Path("/proc/pressure/memory"), *, name: str = "psi_memory",
                 line: str = "some", field: str = "avg10") -> None:
        self.path, self.name, self.line, self.field = path, name, line, field

    def read(self) -> float | None:
        text = _read(self.path)
        return None if text is None else parse_psi(text).get(self.line, {}).get(self.field)


class MemAvailableSensor:
    """MemAvailable in bytes: the kernel's estimate of memory usable without swapping."""

    kind = "mem_available_below"

    def __init__(self, path: Path = Path("/proc/meminfo"), *, name: str = "mem_available") -> None:
        self.path, self.name = path, name

    def read(self) -> float | None:
        text = _read(self.path)
        value = None if text is None else parse_keyed(text).get("MemAvailable")
        return None if value is None else float(value)


class CgroupMemorySensor:
    """Usage over limit (0..1) of a cgroup, v2 or v1.

    v2: memory.current over the lower of memory.high and memory.max (memory.high
    is where the kernel starts throttling, so that is the real ceiling). v1:
    memory.usage_in_bytes over memory.limit_in_bytes. None without a limit.
    """

    kind = "cgroup_usage_ratio"

    def __init__(self, directory: Path, *, name: str = "cgroup_usage") -> None:
        self.dir, self.name = directory, name

    @property
    def v2(self) -> bool:
        return (self.dir / "memory.current").exists()

    def usage_and_limit(self) -> tuple[int, int | None] | None:
        if self.v2:
            current = parse_limit(_read(self.dir / "memory.current"))
            limits = [v for f in ("memory.high", "memory.max") if (v := parse_limit(_read(self.dir / f)))]
            return None if current is None else (current, min(limits) if limits else None)
        usage = parse_limit(_read(self.dir / "memory.usage_in_bytes"))
        return None if usage is None else (usage, parse_limit(_read(self.dir / "memory.limit_in_bytes")))

    def events(self) -> dict[str, int]:
        """v2 memory.events (high, max, oom, oom_kill); v1 failcnt and oom_kill from oom_control."""
        if self.v2:
            return parse_keyed(_read(self.dir / "memory.events") or "")
        out = parse_keyed(_read(self.dir / "memory.oom_control") or "")
        failcnt = _read(self.dir / "memory.failcnt")
        if failcnt and failcnt.strip().isdigit():
            out["failcnt"] = int(failcnt)
        return out

    def read(self) -> float | None:
        got = self.usage_and_limit()
        if got is None or not got[1]:
            return None
        return got[0] / got[1]


class ClamdRssSensor:
    """clamd's resident memory in bytes, found by pid file, else by process name in /proc.

    Every pid is checked to be clamd (/proc/<pid>/comm) before its RSS counts: a stale
    pid file can name any process, and its memory read as clamd's would soften or shed
    mail for nothing. The name search walks all of /proc, so the pid it finds is kept
    while it stays clamd, and a search that finds nothing is not repeated for
    `search_every` seconds (clamd may be on another host).
    """

    kind = "clamd_rss_above"

    def __init__(self, pid_file: Path | None = Path("/run/clamav/clamd.pid"), *, proc: Path = Path("/proc"),
                 process_name: str = "clamd", name: str = "clamd_rss", search_every: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pid_file, self.proc, self.process_name, self.name = pid_file, proc, process_name, name
        self.search_every, self.clock = search_every, clock
        self._found: int | None = None
        self._searched_at: float | None = None

    def pid(self) -> int | None:
        if self.pid_file is not None:
            text = (_read(self.pid_file) or "").strip()
            if text.isdigit() and self.is_clamd(int(text)):
                return int(text)
        if self._found is not None:
            if self.is_clamd(self._found):
                return self._found
            self._found = self._searched_at = None  # clamd restarted: look for the new one now
        now = self.clock()
        if self._searched_at is not None and now - self._searched_at < self.search_every:
            return None
        self._searched_at = now
        self._found = self._search()
        return self._found

    def is_clamd(self, pid: int) -> bool:
        return (_read(self.proc / str(pid) / "comm") or "").strip() == self.process_name

    def _search(self) -> int | None:
        try:
            entries = list(self.proc.iterdir())
        except OSError:
            return None
        for entry in entries:
            if entry.name.isdigit() and self.is_clamd(int(entry.name)):
                return int(entry.name)
        return None

    def read(self) -> float | None:
        pid = self.pid()
        if pid is None:
            return None
        rss = parse_keyed(_read(self.proc / str(pid) / "status") or "").get("VmRSS")
        return None if rss is None else float(rss)


def own_cgroup(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> Path | None:
    """Where this process's memory is accounted: the v1 memory controller's group if
    mounted, else the v2 group (pure v2 hosts mount it at the root)."""
    text = _read(proc_cgroup)
    if text is None:
        return None
    v2: Path | None = None
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            return root / "memory" / path.lstrip("/")
        if hid == "0" and controllers == "":
            for base in (root, root / "unified"):
                candidate = base / path.lstrip("/")
                if (candidate / "memory.current").exists():
                    v2 = candidate
                    break
    return v2


def default_sensors(pid_file: Path | None, cgroup: Path | None = None, *, clamd: bool) -> list[Sensor]:
    """Every sensor this host can feed: system PSI, MemAvailable, a cgroup's usage and PSI
    (default: our own group; pass clamd's or the mail host's slice to watch that), and clamd's
    RSS only when `clamd` (scanning enabled): otherwise its /proc search is pure cost."""
    sensors: list[Sensor] = [PsiSensor(), MemAvailableSensor()]
    group = cgroup or own_cgroup()
    if group is not None:
        sensors.append(CgroupMemorySensor(group))
    psi_group = group if group is not None and (group / "memory.pressure").exists() else own_v2_group()
    if psi_group is not None and (psi_group / "memory.pressure").exists():
        sensors.append(PsiSensor(psi_group / "memory.pressure", name="cgroup_psi_memory"))
    if clamd:
        sensors.append(ClamdRssSensor(pid_file))
    return sensors


def own_v2_group(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> Path | None:
    text = _read(proc_cgroup) or ""
    for line in text.splitlines():
        if line.startswith("0::"):
            path = line[3:].lstrip("/")
            for base in (root, root / "unified"):
                if (base / "cgroup.procs").exists() and (base / path).is_dir():
                    return base / path
    return None


class PriorityWaiter:
    """Wake on EPOLLPRI of one fd, from asyncio.

    PSI files are always readable, so `loop.add_reader(fd)` on them fires in a
    busy loop; a trigger signals POLLPRI instead. We put the fd in an epoll set
    for EPOLLPRI only and let asyncio watch the epoll fd, which becomes readable
    exactly when the trigger fired.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.epoll = select.epoll()
        self.epoll.register(fd, select.EPOLLPRI)

    async def wait(self) -> None:
        """Return when the fd signalled POLLPRI (bound it with asyncio.timeout)."""
        loop = asyncio.get_running_loop()
        fired: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if self.epoll.poll(0) and not fired.done():
                fired.set_result(None)

        loop.add_reader(self.epoll.fileno(), ready)
        try:
            await fired
        finally:
            loop.remove_reader(self.epoll.fileno())

    def close(self) -> None:
        self.epoll.close()


class PsiTrigger:
    """A kernel PSI trigger ('some 200000 2000000': 200 ms of stall within 2 s).

    The trigger lives as long as its fd. The 2 s window is what an unprivileged
    daemon may use (Linux >= 6.5; shorter windows need CAP_SYS_RESOURCE). Where
    the kernel refuses (older kernels, PSI off, a read-only /proc) `open()` raises
    OSError and the caller falls back to polling.
    """

    def __init__(self, path: Path = Path("/proc/pressure/memory"), *, line: str = "some",
                 stall_us: int = 200_000, window_us: int = 2_000_000) -> None:
        self.path, self.spec = path, f"{line} {stall_us} {window_us}"
        self._fd: int | None = None
        self._waiter: PriorityWaiter | None = None

    def open(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
        try:
            os.write(fd, self.spec.encode() + b"\0")
        except OSError:
            os.close(fd)
            raise
        self._fd, self._waiter = fd, PriorityWaiter(fd)

    async def wait(self) -> None:
        if self._waiter is None:
            raise RuntimeError("PsiTrigger.wait before open")
        await self._waiter.wait()

    def close(self) -> None:
        if self._waiter is not None:
            self._waiter.close()
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._waiter = None
