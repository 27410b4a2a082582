"""Is clamd alive, and can we reach each downstream? Small async probes with timeouts.

The clamd probe uses the scan stage's client (PING, then STATS); the
downstream probe reads the SMTP banner and says QUIT, sending a PROXY header
first when the downstream expects one (Exim with `hosts_proxy` drops a bare
connection from the proxy's address).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field
from typing import Literal

from queueguard.scan.clamd import ClamdClient, ScanError
from queueguard.settings import split_hostport

BANNER_LIMIT = 8192


@dataclass(frozen=True)
class ProbeResult:
    up: bool
    detail: str
    seconds: float
    stats: dict[str, int] = field(default_factory=dict)


async def probe_clamd(client: ClamdClient) -> ProbeResult:
    """PING (alive?) then STATS (threads, queue length); STATS failing does not make clamd down."""
    start = time.monotonic()
    try:
        await client.ping()
    except ScanError as e:
        return ProbeResult(False, f"{e.reason}: {e}", time.monotonic() - start)
    seconds = time.monotonic() - start
    try:
        st = await client.stats()
    except ScanError:
        return ProbeResult(True, "PONG", seconds)
    raw = {
        "threads_live": st.threads_live, "threads_idle": st.threads_idle,
        "threads_max": st.threads_max, "queue_items": st.queue,
    }
    return ProbeResult(True, "PONG", seconds, {k: v for k, v in raw.items() if v is not None})


def proxy_header(version: Literal["none", "v1", "v2"], sock: socket.socket | None) -> bytes:
    """Header for a health check: v2 LOCAL (made for this), v1 with our real socket addresses."""
    if version == "v2":
        return b"\r\n\r\n\x00\r\nQUIT\n" + b"\x20\x00\x00\x00"
    if version == "v1" and sock is not None:
        src, dst = sock.getsockname(), sock.getpeername()
        family = "TCP6" if sock.family == socket.AF_INET6 else "TCP4"
        return f"PROXY {family} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode()
    return b""


async def probe_smtp(
    address: str, proxy: Literal["none", "v1", "v2"] = "none", *, within: float = 5.0
) -> ProbeResult:
    """Connect, read the whole (possibly multi-line) banner: reachable only on 220.

    `within` bounds the connect and, separately, the banner read.
    """
    start = time.monotonic()
    host, port = split_hostport(address)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), within)
    except (OSError, TimeoutError) as e:
        return ProbeResult(False, f"connect: {type(e).__name__}: {e}".rstrip(": "), time.monotonic() - start)
    try:
        header = proxy_header(proxy, writer.get_extra_info("socket"))
        if header:
            writer.write(header)
            await writer.drain()
        banner = await asyncio.wait_for(_read_reply(reader), within)
        up = banner.startswith("220")
        if up:
            writer.write(b"QUIT\r\n")
            await writer.drain()
        return ProbeResult(up, banner[:200], time.monotonic() - start)
    except (OSError, TimeoutError, ValueError) as e:
        return ProbeResult(False, f"banner: {type(e).__name__}: {e}".rstrip(": "), time.monotonic() - start)
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1.0)


async def _read_reply(reader: asyncio.StreamReader) -> str:
    lines = []
    total = 0
    while True:
        line = await reader.readline()
        if not line:
            raise ValueError("connection closed before a banner")
        total += len(line)
        if total > BANNER_LIMIT:
            raise ValueError("banner too long")
        text = line.decode(errors="replace").rstrip("\r\n")
        lines.append(text)
        if len(text) < 4 or text[3] != "-":
            return " / ".join(lines)
