"""What the app needs of a front end: start listening, stop gracefully, say what is in flight."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

BACKLOG = 1024
"""Connections the kernel queues for a listener: an MTA opens one per SMTP session, a wave many."""


class Frontend(Protocol):
    async def start(self) -> None:
        """Listen; raises OSError when the address cannot be bound (the app says which)."""
        ...

    async def stop(self, grace: float) -> None:
        """Stop accepting; let what is in flight finish within `grace` seconds; close the rest
        with a temporary failure (never a silent drop)."""
        ...

    def in_flight(self) -> int:
        """Transactions or requests being decided now (what `stop` waits for)."""
        ...


def listening_socket(address: Path | tuple[str, int], prepare: Callable[[], None] | None = None) -> socket.socket:
    """A bound, listening, non-blocking socket on a unix path (a stale socket file there is
    replaced) or a (host, port). `prepare` runs after the bind (a unix socket's owner and mode).
    Made once per host when workers share it: the supervisor binds, every worker accepts."""
    if isinstance(address, Path):
        with contextlib.suppress(OSError):
            if address.is_socket():
                address.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        where: str | tuple[str, int] = str(address)
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        where = address
    try:
        sock.bind(where)
        if prepare is not None:
            prepare()
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
