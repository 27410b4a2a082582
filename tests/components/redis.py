"""A real redis-server for tests: loopback, free port, no persistence, stopped by PID.

Usage:
    with RedisServer(tmp_path) as r:
        r.url            # redis://127.0.0.1:PORT/0
        r.kill()         # SIGKILL, as a crash would
        r.pause()        # SIGSTOP, a hung server; r.resume()
        r.start()        # again, on the same port, empty
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from tests.components.ports import free_port, wait_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None) -> None:
        if not Path(REDIS_SERVER).exists():
            raise RuntimeError("redis-server is missing: install redis-server (setup.sh does)")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.pid_file = self.dir / f"redis-{self.port}.pid"
        self.pid: int | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.pid_file.unlink(missing_ok=True)
        subprocess.run(
            [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--daemonize", "yes", "--dir", str(self.dir), "--pidfile", str(self.pid_file),
             "--logfile", str(self.dir / f"redis-{self.port}.log")],
            check=True, timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while not self.pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.pid = int(self.pid_file.read_text().strip())
        wait_port("127.0.0.1", self.port, timeout=max(0.1, deadline - time.monotonic()))
        return self

    def _signal(self, sig: int) -> None:
        if self.pid is None:
            return
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            self.pid = None
            return
        deadline = time.monotonic() + 10
        while _alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.pid = None

    def kill(self) -> None:
        """SIGKILL: the crash case (no shutdown, connections reset)."""
        self._signal(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: a hung server (connections stay open, nothing answers)."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self._signal(signal.SIGTERM)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    """True while the process runs; a zombie (daemonized, waiting for init to reap it) is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
