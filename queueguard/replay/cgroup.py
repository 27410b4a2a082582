"""A memory-limited cgroup for a replay's "host": clamd, the hog and the guard live in it.

cgroup v1 (the memory controller's group of this process, as on the dev
machines) or v2 (memory.max, where the controller is enabled for children).
Needs root. The group is removed on exit, after its processes are gone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from queueguard.pressure.sensors import CgroupMemorySensor, own_cgroup


class CgroupUnavailable(RuntimeError):
    """No memory cgroup this process may create children in."""


class MemoryGroup:
    def __init__(self, name: str, limit_bytes: int) -> None:
        base = own_cgroup()
        self.base = base
        if base is None or not os.access(base, os.W_OK):
            raise CgroupUnavailable(f"no writable memory cgroup for this process (found {base}); run as root")
        self.path = base / name
        self.limit = limit_bytes
        self.v2 = (base / "memory.current").exists()

    def __enter__(self) -> MemoryGroup:
        self.path.mkdir()
        limit_file = "memory.max" if self.v2 else "memory.limit_in_bytes"
        (self.path / limit_file).write_text(str(self.limit))
        return self

    @contextmanager
    def joined(self) -> Iterator[None]:
        """Move this process into the group for the block: what it starts meanwhile is born there
        (and charged there from its first page; v1 does not move charges of a process moved later)."""
        assert self.base is not None
        self.add(os.getpid())
        try:
            yield
        finally:
            (self.base / "cgroup.procs").write_text(str(os.getpid()))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def sensor(self) -> CgroupMemorySensor:
        return CgroupMemorySensor(self.path)

    def usage(self) -> int:
        got = self.sensor().usage_and_limit()
        return got[0] if got else 0

    def peak(self) -> int | None:
        """Highest usage since creation (v1 max_usage_in_bytes, v2 memory.peak where the kernel has it)."""
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            p = self.path / name
            if p.exists():
                return int(p.read_text().split()[0])
        return None

    def oom_kills(self) -> int:
        return self.sensor().events().get("oom_kill", 0)

    def pids(self) -> list[int]:
        text = (self.path / "cgroup.procs").read_text()
        return [int(x) for x in text.split()]

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
