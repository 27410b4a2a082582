"""`queueguard serve` under a (fake) systemd: READY after the listeners are up, WATCHDOG from
the loop, RELOADING/READY around SIGHUP, STOPPING on SIGTERM. The receiving socket is a real
AF_UNIX datagram socket, exactly what systemd's NOTIFY_SOCKET is."""

from __future__ import annotations

import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest

from queueguard.harness.guard import Guard
from queueguard.harness.sink import RecordingSink

pytestmark = pytest.mark.integration


def _drain(sock: socket.socket, until: str, timeout: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if any(until in g for g in got):
            break
    return got


def test_serve_speaks_sd_notify() -> None:
    path = Path(tempfile.mkdtemp(prefix="qg-notify-")) / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, RecordingSink() as sink:
        sock.bind(str(path))
        g = Guard({"downstreams": [{"address": f"127.0.0.1:{sink.port}"}]})
        g.start(env_extra={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
        try:
            got = _drain(sock, "READY=1", 10)
            assert any("READY=1" in m for m in got), got
            with g.smtp() as c:  # READY means the SMTP listener answers
                c.sendmail("a@client.example", ["bob@test.example"], b"Subject: x\r\n\r\nx\r\n")
            got = _drain(sock, "WATCHDOG=1", 3)
            assert any("WATCHDOG=1" in m for m in got), got
            g.signal(signal.SIGHUP)
            got = _drain(sock, "READY=1", 5)
            assert any("RELOADING=1" in m for m in got) and any("READY=1" in m for m in got), got
            g.signal(signal.SIGTERM)
            got = _drain(sock, "STOPPING=1", 10)
            assert any("STOPPING=1" in m for m in got), got
            assert g.proc is not None and g.proc.wait(15) == 0
        finally:
            g.kill()
