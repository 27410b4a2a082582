"""A real HAProxy (Debian's haproxy) in TCP mode in front of the guard, sending PROXY v2."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from queueguard.harness.ports import free_port, wait_port

CONFIG = """\
global
  maxconn 200
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend smtp
  bind 127.0.0.1:{port}
  default_backend guard
backend guard
  server guard 127.0.0.1:{backend} send-proxy-v2
"""


class HAProxy:
    def __init__(self, backend: int) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="qg-haproxy-"))
        self.config = self.dir / "haproxy.cfg"
        self.config.write_text(CONFIG.format(port=self.port, backend=backend))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> HAProxy:
        check = subprocess.run(["haproxy", "-c", "-f", str(self.config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port("127.0.0.1", self.port)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
