"""A real redis-server (and redis-sentinel) for tests: loopback, free port, no persistence, run in
the foreground as our child and stopped by PID (the recipe's --daemonize would hide the PID behind
a pidfile).

Usage:
    with RedisServer(tmp_path) as r:
        r.url            # redis://127.0.0.1:PORT/0
        r.kill()         # SIGKILL, as a crash would
        r.pause()        # SIGSTOP, a hung server; r.resume()
        r.start()        # again, on the same port, empty
    replica = RedisServer(tmp_path / "b", args=["--replicaof", "127.0.0.1", str(r.port)])
    with RedisSentinel(tmp_path / "s", "qg", r.port) as s:
        s.url            # redis+sentinel://127.0.0.1:PORT/qg
        s.master()       # (host, port) of the master the sentinel reports now
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import redis

from queueguard.harness.ports import free_port, wait_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_SENTINEL = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None, args: Sequence[str] = ()) -> None:
        if not Path(REDIS_SERVER).exists():
            raise RuntimeError("redis-server is missing: install redis-server (setup.sh does)")
        self.args = list(args)
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.pid_file = self.dir / f"redis-{self.port}.pid"
        self.pid: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", str(self.dir), "--pidfile", str(self.pid_file), *self.args]

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Run the server in the foreground as our child (we know its PID at once and reap it)."""
        with (self.dir / f"redis-{self.port}.log").open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
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



class RedisSentinel(RedisServer):
    """One redis-sentinel watching `service` (master at 127.0.0.1:`master_port`, quorum 1), quick to
    act: the master is down after `down_after_ms` without an answer, then its replica is promoted."""

    def __init__(self, directory: Path, service: str, master_port: int, down_after_ms: int = 1000) -> None:
        if not Path(REDIS_SENTINEL).exists():
            raise RuntimeError("redis-sentinel is missing: install redis-sentinel (setup.sh does)")
        super().__init__(directory)
        self.service = service
        self.url = f"redis+sentinel://127.0.0.1:{self.port}/{service}"
        self.conf = self.dir / f"sentinel-{self.port}.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {self.dir}\n"
            f"sentinel monitor {service} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} 10000\n"
            f"sentinel parallel-syncs {service} 1\n"
        )

    def command(self) -> list[str]:
        """A sentinel rewrites its config file (it records what it learns), so it gets its own."""
        return [REDIS_SENTINEL, str(self.conf)]

    def master(self) -> tuple[str, int]:
        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2) as c:
            host, port = c.execute_command("SENTINEL", "get-master-addr-by-name", self.service)
        return host.decode(), int(port)

    def wait_master(self, port: int, timeout: float = 30.0) -> None:
        """Until the sentinel reports the master at `port` (after a failover: the promoted replica)."""
        deadline = time.monotonic() + timeout
        while self.master()[1] != port:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sentinel still reports {self.master()}, not port {port}")
            time.sleep(0.1)

    def __enter__(self) -> RedisSentinel:
        self.start()
        return self
