"""A real clamd for tests and replays: local EICAR `.ndb` database, unix socket and loopback TCP.

freshclam cannot reach the internet here, so the database is one body
signature built at run time. The EICAR string is stored in pieces so that no
scanner flags this repository; `eicar()` joins them.

Usage:
    with Clamd(tmp_path, max_threads=4) as c:
        c.socket / c.tcp_address / c.pid
        c.kill9(); c.start()        # crash and restart on the same socket
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from queueguard.harness.ports import free_port

CLAMD = "/usr/sbin/clamd"
_EICAR_PARTS = ("X5O!P%@AP[4\\PZX54(P^)7CC)7}$", "EICAR-STANDARD-", "ANTIVIRUS-TEST-", "FILE!$H+H*")
SIGNATURE = "QG.Eicar.NDB"
FOUND = f"{SIGNATURE}.UNOFFICIAL"


def eicar() -> bytes:
    return "".join(_EICAR_PARTS).encode()


class Clamd:
    def __init__(
        self,
        directory: Path,
        *,
        max_threads: int = 4,
        max_queue: int = 100,
        stream_max_length: str = "25M",
        ready_timeout: float = 30.0,
    ) -> None:
        if not Path(CLAMD).exists():
            raise RuntimeError(f"{CLAMD} is missing: install clamav-daemon (setup.sh does)")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = self.dir / "clamd.sock"
        self.pid_file = self.dir / "clamd.pid"
        self.port = free_port()
        self.tcp_address = f"127.0.0.1:{self.port}"
        self.max_threads = max_threads
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        db = self.dir / "db"
        db.mkdir(exist_ok=True)
        (db / "qg.ndb").write_text(f"{SIGNATURE}:0:*:{eicar().hex()}\n")
        self.conf = self.dir / "clamd.conf"
        self.conf.write_text(
            "\n".join([
                "Foreground yes",
                f"LocalSocket {self.socket}",
                "LocalSocketMode 666",
                f"TCPSocket {self.port}",
                "TCPAddr 127.0.0.1",
                f"DatabaseDirectory {db}",
                f"PidFile {self.pid_file}",
                f"StreamMaxLength {stream_max_length}",
                f"MaxThreads {max_threads}",
                f"MaxQueue {max_queue}",
                "SelfCheck 0",
                f"LogFile {self.dir / 'clamd.log'}",
                "",
            ])
        )

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("clamd is not running")
        return self.proc.pid

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("clamd already running")
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [CLAMD, f"--config-file={self.conf}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.dir / "clamd.log").read_text() if (self.dir / "clamd.log").exists() else ""
                raise RuntimeError(f"clamd exited with {self.proc.returncode}: {log[-2000:]}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"clamd did not answer PING within {self.ready_timeout}s")

    def ping(self) -> bool:
        try:
            return self.command(b"zPING\0", timeout=1) == "PONG"
        except OSError:
            return False

    def command(self, command: bytes, timeout: float = 5) -> str:
        """A synchronous command over the unix socket (for STATS sampling from a thread)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(self.socket))
            s.sendall(command)
            data = b""
            while not data.endswith(b"\0"):
                part = s.recv(65536)
                if not part:
                    break
                data += part
        return data.rstrip(b"\0").decode()

    def rss(self) -> int:
        """Resident memory of the clamd process in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def kill9(self) -> None:
        """Crash it the way the OOM killer does."""
        if self.proc is None:
            return
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Clamd:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
