"""Inbound PROXY protocol is believed only from the configured load balancers (a real HAProxy).

A PROXY header from any other peer would let a client claim any address, 127.0.0.1 included,
which the shipped policy trusts (no per-network limit): it is refused and logged. A configured
load balancer that sends no header is refused too (a misconfigured HAProxy would otherwise make
every client look like the balancer itself).
"""

from __future__ import annotations

import smtplib
import socket
import time

import pytest

from queueguard.harness.guard import Guard
from queueguard.harness.sink import RecordingSink
from tests.components.haproxy import HAProxy

pytestmark = pytest.mark.integration
MSG = b"Subject: via haproxy\r\n\r\nhello\r\n"


def read_reply(s: socket.socket) -> bytes:
    return s.makefile("rb").readline()


def test_haproxy_passes_the_client_address_and_forged_headers_are_refused() -> None:
    with RecordingSink(proxy_protocol=True) as sink, Guard({
        "smtp": {"proxy_protocol_from": ["127.0.0.1/32"]},
        "downstreams": [{"address": f"127.0.0.1:{sink.port}", "proxy_protocol": "v2"}],
    }) as guard, HAProxy(guard.port) as lb:
        # A client at 127.0.0.5 through HAProxy: the guard (and the MTA behind it) see 127.0.0.5.
        with smtplib.SMTP("127.0.0.1", lb.port, source_address=("127.0.0.5", 0), timeout=30) as c:
            assert c.sendmail("a@client.example", ["bob@test.example"], MSG) == {}
        assert sink.wait_count(1) == 1 and sink.messages[0].proxy_source is not None
        assert sink.messages[0].proxy_source[0] == "127.0.0.5"
        assert any("client=unknown[127.0.0.5]" in line for line in guard.message_lines())

        # A client not in proxy_protocol_from claims to be 127.0.0.1 with a PROXY v1 header.
        with socket.create_connection(("127.0.0.1", guard.port), source_address=("127.0.0.2", 0), timeout=10) as s:
            assert read_reply(s).startswith(b"220 ")
            s.sendall(b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 25\r\n")
            f = s.makefile("rb")
            assert f.readline().startswith(b"554 5.7.0 PROXY header not accepted")
            assert f.readline() == b""  # closed
        assert guard.metric("queueguard_protocol_errors_total", kind="proxy_forged") == 1
        assert "PROXY header from 127.0.0.2 refused" in guard.log()

        # The same with a binary v2 header: never believed (read as junk lines, then its QUIT).
        v2 = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + socket.inet_aton("127.0.0.1") * 2
              + (40000).to_bytes(2, "big") + (25).to_bytes(2, "big"))
        with socket.create_connection(("127.0.0.1", guard.port), source_address=("127.0.0.2", 0), timeout=10) as s:
            assert read_reply(s).startswith(b"220 ")
            s.sendall(v2 + b"MAIL FROM:<x@forged.example>\r\n")
            rest = s.makefile("rb").read()
        assert b"250" not in rest.split(b"221")[0]  # nothing it sent became a transaction
        assert len(sink.messages) == 1

        # The load balancer's own address without a header: no greeting, closed, counted.
        with socket.create_connection(("127.0.0.1", guard.port), timeout=10) as s:
            s.sendall(b"EHLO direct.example\r\n")
            assert s.makefile("rb").read() == b""
        deadline = time.monotonic() + 10  # counted when the guard sees the close: wait for it
        while not guard.metric("queueguard_protocol_errors_total", kind="proxy_missing"):
            assert time.monotonic() < deadline, "the refused connection was never counted"
            time.sleep(0.05)
        assert guard.metric("queueguard_protocol_errors_total", kind="proxy_missing") == 1
        assert "no valid PROXY header" in guard.log()



def test_an_ipv4_client_behind_a_dual_stack_balancer_is_an_ipv4_client() -> None:
    """HAProxy on a dual-stack frontend writes an IPv4 client as TCP6 ::ffff:198.51.100.9; it is
    198.51.100.9 to the policies (IPv4 networks, per-network limits), the logs and the downstream
    (it was an IPv6 address that no IPv4 network matched)."""
    with RecordingSink(proxy_protocol=True) as sink, Guard({
        "smtp": {"proxy_protocol_from": ["127.0.0.1/32"]},
        "downstreams": [{"address": f"127.0.0.1:{sink.port}", "proxy_protocol": "v2"}],
    }) as guard, socket.create_connection(("127.0.0.1", guard.port), timeout=10) as s:
        s.sendall(b"PROXY TCP6 ::ffff:198.51.100.9 ::ffff:127.0.0.1 40000 25\r\n")
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        for line in (b"EHLO c.example\r\n", b"MAIL FROM:<a@client.example>\r\n", b"RCPT TO:<bob@test.example>\r\n",
                     b"DATA\r\n", MSG + b".\r\n", b"QUIT\r\n"):
            s.sendall(line)
        replies = f.read()
        assert b"250 2.0.0" in replies, replies
        assert sink.wait_count(1) == 1 and sink.messages[0].proxy_source == ("198.51.100.9", 40000)
        assert any("client=unknown[198.51.100.9]" in line for line in guard.message_lines())


def test_a_second_proxy_header_from_the_balancer_is_the_clients_and_refused() -> None:
    """After the balancer's header, a PROXY line can only come from the client it relays."""
    with RecordingSink() as sink, Guard({
        "smtp": {"proxy_protocol_from": ["127.0.0.1/32"]},
        "downstreams": [{"address": f"127.0.0.1:{sink.port}"}],
    }) as guard, socket.create_connection(("127.0.0.1", guard.port), timeout=10) as s:
        s.sendall(b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 25\r\n")
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(b"PROXY TCP4 127.0.0.1 127.0.0.1 40001 25\r\n")
        assert f.readline().startswith(b"554 5.7.0 PROXY header not accepted")
        assert f.readline() == b""  # closed
        assert "PROXY header from 198.51.100.9 refused (a second one on this connection)" in guard.log()
    assert sink.messages == []


def test_a_balancer_trickling_its_header_is_cut_off_after_five_seconds() -> None:
    """The balancer has PROXY_TIMEOUT (5 s) for its header. Every byte restarted the session's
    300 s idle timer, so a header sent a byte every 3 s was taken after two minutes."""
    with RecordingSink() as sink, Guard({
        "smtp": {"proxy_protocol_from": ["127.0.0.1/32"]},
        "downstreams": [{"address": f"127.0.0.1:{sink.port}"}],
    }) as guard, socket.create_connection(("127.0.0.1", guard.port), timeout=30) as s:
        started = time.monotonic()
        closed_at = None
        for byte in b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 25\r\n":
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed_at = time.monotonic()
                break
            s.settimeout(1.0)
            try:
                if s.recv(100) == b"":  # closed by the guard
                    closed_at = time.monotonic()
                    break
            except TimeoutError:
                continue
        assert closed_at is not None, "the header was taken"
        assert 4.5 <= closed_at - started <= 8, closed_at - started
