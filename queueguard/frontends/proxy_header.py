"""The PROXY protocol header (v1 text, v2 binary) a load balancer sends before SMTP: pure parsing.

https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt. Only the source address matters to
us; a header that names none (v1 UNKNOWN, v2 LOCAL as health checks send it, a unix-socket or
unspecified family) means, by the spec, the connection's own endpoints.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107
"""Octets of the longest v1 line, CRLF included (the spec's bound)."""
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")


class ProxyHeaderError(ValueError):
    """Not a PROXY header, or a broken one."""


@dataclass(frozen=True)
class ProxyHeader:
    source: tuple[str, int] | None
    """The client's address and port; None for the connection's own endpoints."""
    length: int
    """Octets the header took: what follows is SMTP."""


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`; None while more bytes are needed."""
    if data[:6] == b"PROXY "[:len(data)] and len(data) < 6:
        return None
    if data.startswith(b"PROXY "):
        return _v1(data)
    if data[:12] == V2_SIGNATURE[:len(data)] and len(data) < 16:
        return None
    if data.startswith(V2_SIGNATURE):
        return _v2(data)
    raise ProxyHeaderError("no PROXY signature")


def _v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line too long")
        return None
    parts = data[6:end].decode("latin-1").split(" ")
    if parts[0] == "UNKNOWN":
        return ProxyHeader(None, end + 2)
    if parts[0] not in ("TCP4", "TCP6") or len(parts) != 5:
        raise ProxyHeaderError("PROXY v1 malformed")
    try:
        src, dst = ipaddress.ip_address(parts[1]), ipaddress.ip_address(parts[2])
    except ValueError:
        raise ProxyHeaderError("PROXY v1 address malformed") from None
    if not src.version == dst.version == (4 if parts[0] == "TCP4" else 6):
        raise ProxyHeaderError("PROXY v1 address of the wrong family")
    if not all(_PORT.fullmatch(p) and int(p) <= 65535 for p in parts[3:]):
        raise ProxyHeaderError("PROXY v1 port malformed")
    return ProxyHeader((str(src), int(parts[3])), end + 2)


def _v2(data: bytes) -> ProxyHeader | None:
    ver_cmd, fam_proto = data[12], data[13]
    total = 16 + int.from_bytes(data[14:16], "big")
    if ver_cmd & 0xF0 != 0x20 or ver_cmd & 0x0F > 1:
        raise ProxyHeaderError("PROXY v2 version or command unknown")
    family, proto = fam_proto >> 4, fam_proto & 0x0F
    if family > 3 or proto > 2:
        raise ProxyHeaderError("PROXY v2 family or protocol unknown")
    if len(data) < total:
        return None
    if ver_cmd & 0x0F == 0 or proto == 0 or family not in (1, 2):  # LOCAL, or no IP source
        return ProxyHeader(None, total)
    size = 4 if family == 1 else 16
    if total < 16 + 2 * size + 4:
        raise ProxyHeaderError("PROXY v2 address truncated")
    src = ipaddress.ip_address(data[16:16 + size])
    port = int.from_bytes(data[16 + 2 * size:18 + 2 * size], "big")
    return ProxyHeader((str(src), port), total)
