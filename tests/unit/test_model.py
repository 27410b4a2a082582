"""model.parse_ip: addresses as sockets, MTAs and PROXY headers write them."""

from __future__ import annotations

import ipaddress

import pytest

from queueguard.model import parse_ip


@pytest.mark.parametrize(("text", "ip"), [
    ("192.0.2.1", "192.0.2.1"), ("[192.0.2.1]", "192.0.2.1"), ("2001:db8::1", "2001:db8::1"),
    ("IPv6:2001:db8::1", "2001:db8::1"), ("[IPv6:2001:db8::1]", "2001:db8::1"),
    ("::ffff:192.0.2.1", "192.0.2.1"), ("[IPv6:::ffff:198.51.100.9]", "198.51.100.9"),
    ("::1", "::1"), ("", None), (None, None), ("unknown", None), ("192.0.2.300", None),
])
def test_parse_ip(text: str | None, ip: str | None) -> None:
    assert parse_ip(text) == (ipaddress.ip_address(ip) if ip else None)
