"""One client holding many connections gets 421 past its limit; another client's mail goes through."""

from __future__ import annotations

import contextlib
import json
import smtplib
import socket
import time
import urllib.request
from typing import Any

import pytest

from queueguard.harness.guard import Guard
from queueguard.harness.sink import RecordingSink

pytestmark = pytest.mark.integration
POLICY = "connections:\n  max_per_ip: 5\n  max_per_network: 100\n"


def status(guard: Guard) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{guard.metrics_port}/status.json", timeout=5) as r:
        doc: dict[str, Any] = json.load(r)
    return doc


def greeting(port: int, source: str) -> tuple[socket.socket, bytes]:
    s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0), timeout=10)
    return s, s.makefile("rb").readline()


def test_idle_connections_past_the_limit_get_421_and_others_still_deliver() -> None:
    with RecordingSink() as sink, Guard({"downstreams": [{"address": f"127.0.0.1:{sink.port}"}]},
                                         {"connections.yaml": POLICY}) as guard, contextlib.ExitStack() as held:
        for _ in range(5):
            s, line = greeting(guard.port, "127.0.0.3")
            held.callback(s.close)
            assert line.startswith(b"220 ")
        s, line = greeting(guard.port, "127.0.0.3")
        with s:
            assert line == b"421 4.7.0 Too many connections from your address, try again later (connection:per_ip)\r\n"
            assert s.makefile("rb").read() == b""  # and closed
        with smtplib.SMTP("127.0.0.1", guard.port, source_address=("127.0.0.4", 0), timeout=10) as c:
            assert c.sendmail("a@client.example", ["bob@test.example"], b"Subject: other\r\n\r\nx\r\n") == {}
        assert sink.wait_count(1) == 1
        assert guard.metric("queueguard_connection_limit_refusals_total", reason="per_ip") == 1
        held.close()  # the idle ones go: their places come back once the guard has seen them close
        deadline = time.monotonic() + 10
        while status(guard)["connections"]["open"]:
            assert time.monotonic() < deadline, status(guard)["connections"]
            time.sleep(0.05)
        with smtplib.SMTP("127.0.0.1", guard.port, source_address=("127.0.0.3", 0), timeout=10) as c:
            assert c.sendmail("a@client.example", ["bob@test.example"], b"Subject: back\r\n\r\nx\r\n") == {}
