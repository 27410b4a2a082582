"""Wire formats the proxy produces: PROXY headers, dot-stuffing, reply mapping, smuggling."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from queueguard.pipeline.hygiene import smuggling_verdict
from queueguard.pipeline.session import from_downstream as _from_downstream
from queueguard.relay import Reply, data_parts, dot_stuff, proxy_header
from queueguard.verdict import Action

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def test_proxy_v1_ipv4_and_ipv6() -> None:
    v4 = proxy_header("v1", ipaddress.ip_address("198.51.100.9"), 40000, ("127.0.0.1", 2525))
    assert v4 == b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 2525\r\n"
    v6 = proxy_header("v1", ipaddress.ip_address("2001:db8::9"), 40000, ("::1", 2525))
    assert v6 == b"PROXY TCP6 2001:db8::9 ::1 40000 2525\r\n"


def test_proxy_v2_ipv4_layout() -> None:
    h = proxy_header("v2", ipaddress.ip_address("198.51.100.9"), 40000, ("127.0.0.1", 2525))
    assert h[:12] == V2_SIG and h[12] == 0x21 and h[13] == 0x11
    (length,) = struct.unpack("!H", h[14:16])
    assert length == 12 and len(h) == 16 + 12
    assert h[16:20] == bytes([198, 51, 100, 9]) and h[20:24] == bytes([127, 0, 0, 1])
    assert struct.unpack("!HH", h[24:28]) == (40000, 2525)


def test_proxy_unknown_client_or_family_mismatch() -> None:
    """Never UNKNOWN or LOCAL (Exim 4.96 crashes at the end of DATA after them): an unknown client
    is ourselves, and the header has the client's family whatever the connection's."""
    assert proxy_header("v1", None, 0, ("192.0.2.25", 25), ("192.0.2.9", 41000)) == \
        b"PROXY TCP4 192.0.2.9 192.0.2.25 0 25\r\n"  # ourselves, not the downstream
    v1 = proxy_header("v1", ipaddress.ip_address("2001:db8::66"), 40000, ("127.0.0.1", 25))
    assert v1 == b"PROXY TCP6 2001:db8::66 ::ffff:127.0.0.1 40000 25\r\n"
    assert proxy_header("v1", ipaddress.ip_address("198.51.100.9"), 1, ("::1", 25)) == \
        b"PROXY TCP4 198.51.100.9 0.0.0.0 1 25\r\n"  # Exim logs a ::ffff: client as IPv6
    assert proxy_header("v1", ipaddress.ip_address("198.51.100.9"), 1, ("::ffff:192.0.2.25", 25)) == \
        b"PROXY TCP4 198.51.100.9 192.0.2.25 1 25\r\n"
    v2 = proxy_header("v2", ipaddress.ip_address("2001:db8::1"), 1, ("127.0.0.1", 25))
    assert v2[:14] == V2_SIG + b"\x21\x21" and v2[16 + 16:16 + 32] == ipaddress.ip_address("::ffff:127.0.0.1").packed


@pytest.mark.parametrize(("raw", "wire"), [
    (b"a\r\n.b\r\n", b"a\r\n..b\r\n.\r\n"),
    (b".first\r\n", b"..first\r\n.\r\n"),
    (b"no final newline", b"no final newline\r\n.\r\n"),
    (b"x\r\n.\r\ny\r\n", b"x\r\n..\r\ny\r\n.\r\n"),
    # bare line ends and NULs (mail released from a milter's quarantine): no end of data but ours
    (b"a\n.\nMAIL FROM:<x@y>\n", b"a\r\n..\r\nMAIL FROM:<x@y>\r\n.\r\n"),
    (b"a\r.\rb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"a\r\n\x00.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"a\r\x00\n.\x00\r\n", b"a\r\n..\r\n.\r\n"),
])
def test_dot_stuffing(raw: bytes, wire: bytes) -> None:
    assert dot_stuff(raw) == wire
    assert wire.count(b"\r\n.\r\n") == 1 and wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")


def test_downstream_reply_mapping() -> None:
    assert _from_downstream(Reply(250, ("2.0.0 OK id=1abc",)), "data").action is Action.ACCEPT
    rej = _from_downstream(Reply(550, ("5.1.1 <x@y>: unknown user",)), "rcpt")
    assert rej.reply() == "550 5.1.1 <x@y>: unknown user"
    plain = _from_downstream(Reply(550, ("Unrouteable address",)), "rcpt")
    assert plain.reply() == "550 5.0.0 Unrouteable address"
    tmp = _from_downstream(Reply(452, ("4.3.1 full",)), "data")
    assert tmp.code == 451 and tmp.status == "4.4.3" and "452 4.3.1 full" in tmp.text
    none = _from_downstream(Reply(451, ("4.4.1 No downstream available (x)",)), "mail")
    assert none.reply() == "451 4.4.1 No downstream available (x)"


@pytest.mark.parametrize("body", [b"a\nb\r\n", b"a\rb\r\n", b"x\r\n.\n", b"x\n.\r\n", b"x\r.\r\n"])
def test_smuggling_detects_bare_cr_and_lf(body: bytes) -> None:
    v = smuggling_verdict(body)
    assert v is not None and v.code == 554 and v.status == "5.5.2"


def test_clean_crlf_message_passes_smuggling_check() -> None:
    assert smuggling_verdict(b"Subject: x\r\n\r\nline\r\n\r\nmore\r\n") is None


@pytest.mark.parametrize("raw", [b"Subject: x\r\n\r\nplain\r\n", b".lead\r\n", b"a\r\n.b\r\n", b"no end",
                                 b"a\nb\r\n", b"a\x00b\r\n", b""])
def test_data_parts_are_dot_stuff_in_two(raw: bytes) -> None:
    message, end = data_parts(raw)
    assert message + end == dot_stuff(raw)
    if raw == b"Subject: x\r\n\r\nplain\r\n":
        assert message is raw  # the everyday message is not copied
