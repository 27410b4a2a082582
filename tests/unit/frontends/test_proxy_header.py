"""The PROXY header parser: every form a load balancer sends, read from any split of the bytes,
and broken or foreign headers refused (the connection is then closed, never believed)."""

from __future__ import annotations

import socket

import pytest

from queueguard.frontends.proxy_header import V2_SIGNATURE, ProxyHeader, ProxyHeaderError, parse_proxy_header


def v2(command: int, fam_proto: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, fam_proto]) + len(body).to_bytes(2, "big") + body


V4 = socket.inet_aton("198.51.100.9") + socket.inet_aton("192.0.2.1") + (40000).to_bytes(2, "big") + b"\x00\x19"
V6 = (socket.inet_pton(socket.AF_INET6, "2001:db8::9") + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
      + (40001).to_bytes(2, "big") + b"\x00\x19")
VALID = [
    (b"PROXY TCP4 198.51.100.9 192.0.2.1 40000 25\r\n", ("198.51.100.9", 40000)),
    (b"PROXY TCP6 2001:db8::9 2001:db8::1 40001 25\r\n", ("2001:db8::9", 40001)),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),
    (v2(1, 0x11, V4), ("198.51.100.9", 40000)),
    (v2(1, 0x11, V4 + b"\x04\x00\x02ok"), ("198.51.100.9", 40000)),  # with a TLV after the addresses
    (v2(1, 0x21, V6), ("2001:db8::9", 40001)),
    (v2(0, 0x00, b""), None),  # LOCAL: a health check
    (v2(1, 0x31, b"\x00" * 216), None),  # a unix socket: no IP source
]


@pytest.mark.parametrize(("header", "source"), VALID)
def test_every_form_from_every_split(header: bytes, source: tuple[str, int] | None) -> None:
    tail = b"EHLO client.example\r\n"
    for cut in range(len(header)):
        assert parse_proxy_header(header[:cut]) is None, cut
    assert parse_proxy_header(header + tail) == ProxyHeader(source, len(header))


@pytest.mark.parametrize("junk", [
    b"EHLO client.example\r\n", b"PROXY TCP4 198.51.100.9 192.0.2.1 40000\r\n",
    b"PROXY TCP4 2001:db8::9 192.0.2.1 40000 25\r\n", b"PROXY TCP4 198.51.100.9 192.0.2.1 040000 25\r\n",
    b"PROXY TCP4 198.51.100.9 192.0.2.1 70000 25\r\n", b"PROXY TCP4 198.51.100.999 192.0.2.1 1 25\r\n",
    b"PROXY UDP4 198.51.100.9 192.0.2.1 1 25\r\n", b"PROXY TCP4 " + b"1" * 120,
    v2(2, 0x11, V4), V2_SIGNATURE + b"\x31\x11\x00\x0c" + V4, v2(1, 0x51, V4), v2(1, 0x11, V4[:8]),
])
def test_broken_or_foreign_headers_are_refused(junk: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(junk)
