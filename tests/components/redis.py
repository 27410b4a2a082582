"""A real redis-server for tests: loopback, free port, no persistence, run in the foreground
as our child and stopped by PID (the recipe's --daemonize would hide the PID behind a pidfile).

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
from pathlib import Path
from types import TracebackType

from queueguard.harness.ports import free_port, wait_port

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
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Run redis-server in the foreground as our child (we know its PID at once and reap it)."""
        with (self.dir / f"redis-{self.port}.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--dir", str(self.dir), "--pidfile", str(self.pid_file)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        self.pid = self.proc.pid
        try:
            wait_port("127.0.0.1", self.port, timeout=timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _signal(self, sig: int) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            self.proc = self.pid = None
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.proc = self.pid = None

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

