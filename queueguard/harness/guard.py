"""Run a real `queueguard serve` process for integration tests and replays.

The guard is started exactly as an admin would start it (the console entry
point of this interpreter's environment, a settings file, a policy directory),
on free loopback ports, and stopped with SIGTERM so its graceful shutdown is
exercised too. It runs in its work directory, so an installed wheel's guard
never sees a checkout.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from queueguard.harness.ports import free_port, wait_port

_DIRS: list[Path] = []


def serve_command() -> list[str]:
    """The venv's own `queueguard` script (beside sys.executable); `-m queueguard.cli` where there is none."""
    script = Path(sys.executable).parent / "queueguard"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "queueguard.cli"]


@atexit.register
def _remove_dirs() -> None:
    """Work dirs go when the test process ends (tests may read logs after a guard stopped)."""
    for d in _DIRS:
        shutil.rmtree(d, ignore_errors=True)


class Guard:
    """One queueguard process with its own settings, policies and quarantine."""

    def __init__(self, settings: Mapping[str, Any] | None = None, policies: Mapping[str, str] | None = None,
                 *, workdir: Path | None = None) -> None:
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="qg-guard-"))
        if workdir is None:
            _DIRS.append(self.dir)
        self.port = free_port()
        self.metrics_port = free_port()
        self.policy_dir = self.dir / "policies"
        self.policy_dir.mkdir(exist_ok=True)
        for name, text in (policies or {"empty.yaml": "# no rules: every check passes\nlists: {}\n"}).items():
            (self.policy_dir / name).write_text(text)
        base: dict[str, Any] = {
            "smtp": {"listen": f"127.0.0.1:{self.port}", "hostname": "guard.test", "shutdown_grace": 5},
            "metrics": f"127.0.0.1:{self.metrics_port}",
            "policies": str(self.policy_dir),
            "quarantine": {"directory": str(self.dir / "quarantine"), "min_free_bytes": 1024,
                           "min_free_inodes": 10},
        }
        for key, value in (settings or {}).items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        self.settings = base
        self.settings_path = self.dir / "queueguard.yaml"
        self.settings_path.write_text(yaml.safe_dump(base))
        self.log_path = self.dir / "queueguard.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0, env_extra: Mapping[str, str] | None = None) -> Guard:
        """Start the guard and wait for its ports. Refused while it runs: a second process would
        be forgotten here and outlive the test (`with guard.start()` starts twice: use `with guard`)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("this guard is already running (use `with guard:` or `guard.start()`, not both)")
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        env.update(env_extra or {})
        self.proc = subprocess.Popen(
            [*serve_command(), "serve", "--settings", str(self.settings_path)],
            cwd=self.dir, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"queueguard exited {self.proc.returncode}:\n{self.log()}")
            try:
                wait_port("127.0.0.1", self.metrics_port, timeout=0.2)
                wait_port("127.0.0.1", self.port, timeout=0.2)
                return self
            except (TimeoutError, OSError):
                continue
        self.kill()  # not left running behind the test that gave up on it
        raise RuntimeError(f"queueguard did not start:\n{self.log()}")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def __enter__(self) -> Guard:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def message_lines(self) -> list[str]:
        """The one-line-per-message log records."""
        return [line for line in self.log().splitlines() if "queueguard.message" in line or " verdict=" in line]

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            body: bytes = r.read()
        return body.decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for line in self.metrics_text().splitlines():
            if not line.startswith(name):
                continue
            m = re.match(r"^([a-zA-Z_:][\w:]*)(\{.*\})?\s+(\S+)$", line)
            if not m or m.group(1) != name:
                continue
            got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    def smtp(self, timeout: float = 30.0) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.port, timeout=timeout)
        client.ehlo("client.test")
        return client


def raw_dialogue(port: int, chunks: list[bytes], timeout: float = 10.0) -> str:
    """Send bytes exactly as given (for smuggling and garbage tests) and return every reply read."""
    replies = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        replies += _read_reply(s)
        for chunk in chunks:
            s.sendall(chunk)
            replies += _read_reply(s)
    return replies.decode(errors="replace")


def _read_reply(s: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            part = s.recv(65536)
        except TimeoutError:
            return data
        if not part:
            return data
        data += part
        lines = data.split(b"\r\n")
        complete = [ln for ln in lines[:-1] if ln]
        if complete and len(complete[-1]) >= 4 and complete[-1][3:4] == b" " and lines[-1] == b"":
            return data
