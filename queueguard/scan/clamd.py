"""An async clamd client: INSTREAM, PING, VERSION, STATS.

Our own rather than the `clamd` package: that one is synchronous (a blocking
socket would stall the event loop, or need a thread per scan), has no connect
timeout separate from the scan timeout, and opens plain TCP sockets without
TCP_NODELAY, so small writes wait on delayed ACKs (~40-90 ms per scan over
loopback). `aioclamd` is async but TCP-only. The protocol is small: a
NUL-terminated `z` command, then for INSTREAM 4-byte big-endian length-prefixed
chunks ended by a zero length, and one NUL-terminated answer.

Every failure, whatever its cause (refused, reset, broken pipe, timeout, an
answer we do not understand, a stream over clamd's limit), is a `ScanError`,
so the caller has exactly one thing to turn into a verdict.

Plain non-blocking sockets (loop.sock_*), not asyncio streams: clamd answers a
stream over its StreamMaxLength and hangs up while we are still sending, and a
stream transport drops whatever the socket still holds once a send fails, so
that answer (a permanent 552) became a reset (a 451 retried for days). A socket
also closes at once on a timeout, where a transport with unsent data lingers.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from queueguard.resolve import printable
from queueguard.settings import ClamdSettings, split_hostport

ANSWER_LIMIT = 1 << 20
CLOSE_WAIT = 0.1
"""Seconds we wait for clamd to close its end after its answer (it closes at once)."""
"""Longest answer we read; STATS on a busy clamd is a few KB."""


class ScanError(Exception):
    """Any failure to get a scan answer from clamd.

    `reason` is a short machine word for metrics and logs (connect, timeout,
    reset, protocol, clamd_error, too_large); `permanent` is True only when
    retrying the same message cannot help (it is larger than clamd accepts).
    """

    def __init__(self, reason: str, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.permanent = permanent


@dataclass(frozen=True)
class ScanResult:
    infected: bool
    signature: str | None = None
    elapsed: float = 0.0


@dataclass(frozen=True)
class ClamdStats:
    """The parts of STATS we use; None where clamd did not say (MEMSTATS is N/A on some builds)."""

    threads_live: int | None = None
    threads_idle: int | None = None
    threads_max: int | None = None
    queue: int | None = None
    memory: dict[str, float] = field(default_factory=dict)

    @property
    def threads_busy(self) -> int | None:
        if self.threads_live is None or self.threads_idle is None:
            return None
        return self.threads_live - self.threads_idle


class Scanner(Protocol):
    """What the scan stage needs from a scanner."""

    async def instream(self, data: bytes) -> ScanResult: ...

    async def ping(self) -> None: ...

    async def version(self) -> str: ...

    async def stats(self) -> ClamdStats: ...


_ANSWER = re.compile(r"^(?:stream: (?:(?P<ok>OK)|(?P<sig>.+) FOUND)|(?:stream: )?(?P<err>.*) ERROR)$", re.DOTALL)
"""clamd 1.x sends some errors without `stream: ` (`INSTREAM size limit exceeded. ERROR`). Any
character may stand in a name (DOTALL): it is made printable, not refused as a protocol error."""
_THREADS = re.compile(r"THREADS: live (\d+)\s+idle (\d+)\s+max (\d+)")
_QUEUE = re.compile(r"QUEUE: (\d+) items")
_MEM = re.compile(r"(heap|mmap|used|free|releasable|pools_used|pools_total) ([0-9.]+)M")


def parse_scan_answer(answer: str, elapsed: float = 0.0) -> ScanResult:
    """'stream: OK' / 'stream: NAME FOUND'; clamd's ERROR answers and anything else raise.
    clamd's words end up in SMTP replies and logs, so they are kept printable and short."""
    m = _ANSWER.match(answer.strip())
    if m is None:
        raise ScanError("protocol", f"clamd answered something we do not understand: {answer[:200]!r}")
    if m.group("err") is not None:
        text = printable(m.group("err"))
        if "size limit exceeded" in text:
            raise ScanError("too_large", f"clamd refused the stream: {text}", permanent=True)
        raise ScanError("clamd_error", f"clamd error: {text}")
    if m.group("ok"):
        return ScanResult(False, None, elapsed)
    return ScanResult(True, printable(m.group("sig")), elapsed)


def parse_stats(text: str) -> ClamdStats:
    """Pick threads, queue length and memory (MiB figures, as bytes) out of a STATS answer."""
    threads = _THREADS.search(text)
    queue = _QUEUE.search(text)
    if threads is None and queue is None:
        raise ScanError("protocol", f"clamd STATS answer has no THREADS or QUEUE line: {text[:200]!r}")
    try:  # `[0-9.]+` also matches "1.2.3": a ValueError here would end the health loop
        memory = {k: float(v) * 1024 * 1024 for k, v in _MEM.findall(text)}
        live, idle, top = (int(g) for g in threads.groups()) if threads else (None, None, None)
        return ClamdStats(live, idle, top, int(queue.group(1)) if queue else None, memory)
    except ValueError as e:
        raise ScanError("protocol", f"clamd STATS answer has a malformed number: {e}") from e


def instream_writes(data: bytes, chunk_size: int) -> Iterator[list[bytes | memoryview]]:
    """INSTREAM as writes of about one chunk each: the command rides with the first chunk and
    the zero-length end with the last, so an everyday message is one send instead of four
    (a syscall and a wake-up of clamd's reader each)."""
    view = memoryview(data)
    pieces: list[bytes | memoryview] = [b"zINSTREAM\0"]
    for i in range(0, len(view), chunk_size):
        chunk = view[i : i + chunk_size]
        pieces += [struct.pack("!L", len(chunk)), chunk]
        if i + chunk_size < len(view):
            yield pieces
            pieces = []
    pieces.append(b"\0\0\0\0")
    yield pieces


class ClamdClient:
    """One connection per command (clamd's IDSESSION buys nothing here and
    pins a clamd thread). `address` is a unix socket path ("/run/clamav/clamd.ctl")
    or "host:port"."""

    def __init__(
        self,
        address: str,
        *,
        connect_timeout: float = 2.0,
        timeout: float = 30.0,
        chunk_size: int = 65536,
        stream_max_length: int = 26_214_400,
    ) -> None:
        if not address:
            raise ValueError("clamd address is empty")
        self.address = address
        self.unix = address.startswith("/") or address.startswith("./")
        self.hostport = None if self.unix else split_hostport(address, 3310)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.chunk_size = max(1, chunk_size)
        self.stream_max_length = stream_max_length

    @classmethod
    def from_settings(cls, s: ClamdSettings) -> ClamdClient:
        return cls(
            s.address, connect_timeout=s.connect_timeout, timeout=s.timeout,
            chunk_size=s.chunk_size, stream_max_length=s.stream_max_length,
        )

    async def instream(self, data: bytes) -> ScanResult:
        if len(data) > self.stream_max_length:
            raise ScanError(
                "too_large",
                f"message of {len(data)} bytes is over clamd's StreamMaxLength ({self.stream_max_length})",
                permanent=True,
            )
        start = time.monotonic()
        answer = await self._command(instream_writes(data, self.chunk_size))
        try:
            return parse_scan_answer(answer, time.monotonic() - start)
        except ScanError as e:
            if e.reason == "too_large":  # clamd's own StreamMaxLength is below ours
                raise ScanError("too_large", f"{len(data)} bytes, {e}", permanent=True) from e
            raise

    async def ping(self) -> None:
        answer = await self._command([[b"zPING\0"]])
        if answer.strip() != "PONG":
            raise ScanError("protocol", f"clamd answered PING with {answer[:200]!r}")

    async def version(self) -> str:
        answer = await self._command([[b"zVERSION\0"]])
        if not answer.startswith("ClamAV"):
            raise ScanError("protocol", f"clamd answered VERSION with {answer[:200]!r}")
        return answer.strip()

    async def stats(self) -> ClamdStats:
        return parse_stats(await self._command([[b"zSTATS\0"]]))

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.hostport is None:
                    return await _open(loop, socket.AF_UNIX, self.address)
                error = OSError(f"no address for {self.address}")
                for family, _, proto, _, sockaddr in await loop.getaddrinfo(*self.hostport, type=socket.SOCK_STREAM):
                    try:
                        sock = await _open(loop, family, sockaddr, proto)
                    except OSError as e:
                        error = e
                        continue
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    return sock
                raise error
        except TimeoutError as e:
            raise ScanError("timeout", f"connect to clamd at {self.address} timed out") from e
        except OSError as e:
            raise ScanError("connect", f"cannot connect to clamd at {self.address}: {e}") from e

    async def _command(self, writes: Iterable[list[bytes | memoryview]]) -> str:
        """Send each write (a list of pieces, one send); then read the NUL-terminated answer.
        A send that fails (broken pipe, reset) may still have an answer behind it: clamd refuses a
        stream over its StreamMaxLength by answering and hanging up, so we read once before
        calling it a reset."""
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(self.timeout):
                sock = await self._connect()
                try:
                    for pieces in writes:
                        await loop.sock_sendall(sock, b"".join(pieces))
                except OSError as sent:
                    try:
                        raw = await self._answer(loop, sock)
                    except (OSError, ScanError):
                        raise ScanError("reset", f"connection to clamd at {self.address} failed: {sent}") from sent
                else:
                    raw = await self._answer(loop, sock)
                    await self._closed_by_clamd(loop, sock)
        except ScanError:
            raise
        except TimeoutError as e:
            raise ScanError("timeout", f"clamd at {self.address}: no answer within {self.timeout:g}s") from e
        except OSError as e:
            raise ScanError("reset", f"connection to clamd at {self.address} failed: {e}") from e
        finally:
            if sock is not None:
                sock.close()  # at once, unsent data or not: the timeout is the timeout
        try:
            return raw.decode()
        except UnicodeDecodeError as e:
            raise ScanError("protocol", f"clamd at {self.address} answered with non-UTF-8 bytes") from e

    async def _closed_by_clamd(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        """Wait (briefly) for clamd to close its end, as it does once its thread is done with the
        command: closing first, we freed our scan slot while clamd's thread still tidied up, and
        the next scan made clamd run more at once than our bound (4 for a bound of 2)."""
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(CLOSE_WAIT):
                while await loop.sock_recv(sock, 4096):
                    pass

    async def _answer(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
        """Everything up to the answer's NUL; what follows it, if anything, is ignored."""
        answer = bytearray()
        while True:
            part = await loop.sock_recv(sock, 65536)
            if not part:
                raise ScanError("reset", f"clamd at {self.address} closed the connection unanswered")
            end = part.find(b"\0")
            answer += part if end < 0 else part[:end]
            if len(answer) > ANSWER_LIMIT:
                raise ScanError("protocol", f"clamd at {self.address} sent an over-long answer")
            if end >= 0:
                return bytes(answer)


async def _open(loop: asyncio.AbstractEventLoop, family: int, address: Any, proto: int = 0) -> socket.socket:
    """A connected non-blocking socket; closed again if connecting fails or is cancelled."""
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock
