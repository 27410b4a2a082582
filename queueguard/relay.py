"""Downstream SMTP client: ordered failover, pooled connections, PROXY headers.

Why our own client rather than smtplib/aiosmtplib: the proxy mirrors the
client's transaction onto the downstream one command at a time (MAIL at the
first accepted RCPT, each RCPT as it comes, DATA at the end), so the
downstream's own per-recipient answers (Exim's 550 for an unknown user) reach
the sender, and we answer 250 only after the downstream did. That needs
fine control over connection reuse (Exim delays its 221 to QUIT by 200 ms, so
a fresh connection per message costs Exim's whole budget), over PROXY
protocol headers (one per TCP connection, so a pooled connection may only be
reused for the same client address), and over health marking.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from queueguard import metrics
from queueguard.model import Connection, IPAddress
from queueguard.settings import Downstream as DownstreamSpec
from queueguard.settings import Settings, split_hostport

log = logging.getLogger("queueguard.relay")

Clock = Callable[[], float]

CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 60.0
DATA_TIMEOUT = 600.0
IDLE_TIMEOUT = 30.0
SLOT_WAIT = 10.0
#: A reply line: code 2xx-5xx (second digit 0-5), then a space, a hyphen or the end of the line.
_REPLY_LINE = re.compile(r"[2-5][0-5][0-9](?:[ -]|$)")
MAX_BACKOFF_FACTOR = 8
ONE_WRITE = 256 * 1024
"""Messages up to this size go downstream with their end-of-data in one write (one send, not two:
a copy is cheaper than a system call); larger ones are not copied."""
CLIENT_SHARE = 4
"""A client network holds at most 1/CLIENT_SHARE of a downstream's connections at once."""


@dataclass(frozen=True)
class Reply:
    """An SMTP reply as the downstream sent it (multi-line joined)."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


class DownstreamError(Exception):
    """The downstream could not be reached or broke off; the caller answers 4xx."""


class RecipientLost(DownstreamError):
    """The connection failed at the first RCPT after the downstream accepted MAIL: this
    transaction is lost (the sender hears 4.4.2), but nothing is known against the downstream's
    health, so there is no failover and no down mark, as for any later RCPT."""


class DownstreamBusy(DownstreamError):
    """Every connection slot toward this downstream stayed taken for SLOT_WAIT: not a failure of it."""


@functools.lru_cache(maxsize=4096)
def _network(ip: IPAddress | None) -> str:
    """The client network a downstream share is counted by: /24 for IPv4, /64 for IPv6 (cached:
    a wave comes from few addresses, and ip_network costs 2 % of a worker's CPU)."""
    if ip is None:
        return ""
    return str(ipaddress.ip_network((ip, 24 if ip.version == 4 else 64), strict=False))


def proxy_header(version: str, client_ip: IPAddress | None, client_port: int, server: tuple[str, int],
                 own: tuple[str, int] | None = None) -> bytes:
    """A PROXY protocol v1 or v2 header naming the original client to `server` (the downstream's
    address, which the client reached through us).

    Always an address header: Exim 4.96 takes a transaction after v1 UNKNOWN or v2 LOCAL and then
    crashes at the end of DATA (a 451 for every retry). An unknown client (a release of mail
    whose client was not recorded) is named as ourselves, `own` (our end of the connection), as
    Exim would see us without PROXY. The header is of the client's family, whatever the
    connection's (Exim takes a TCP4 header over IPv6, and logs a `::ffff:` client as IPv6, which
    its IPv4 host lists and DNS lists then miss): the downstream's address goes along as the
    IPv4 address it maps, or 0.0.0.0, for an IPv4 client, and as `::ffff:a.b.c.d` for an IPv6 one.
    """
    dst_ip: IPAddress = ipaddress.ip_address(server[0])
    if client_ip is None:
        client_ip, client_port = ipaddress.ip_address((own or server)[0]), 0
    if isinstance(client_ip, ipaddress.IPv6Address) and isinstance(dst_ip, ipaddress.IPv4Address):
        dst_ip = _as_v6(dst_ip)
    elif isinstance(client_ip, ipaddress.IPv4Address) and isinstance(dst_ip, ipaddress.IPv6Address):
        dst_ip = dst_ip.ipv4_mapped or ipaddress.IPv4Address(0)
    if version == "v1":
        fam = "TCP4" if client_ip.version == 4 else "TCP6"
        return f"PROXY {fam} {_text(client_ip)} {_text(dst_ip)} {client_port} {server[1]}\r\n".encode()
    fam_byte = 0x11 if client_ip.version == 4 else 0x21
    addrs = client_ip.packed + dst_ip.packed + struct.pack("!HH", client_port, server[1])
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, fam_byte]) + struct.pack("!H", len(addrs)) + addrs


def _as_v6(ip: IPAddress) -> ipaddress.IPv6Address:
    return ip if isinstance(ip, ipaddress.IPv6Address) else ipaddress.IPv6Address(f"::ffff:{ip}")


def _text(ip: IPAddress) -> str:
    """An address as v1 writes it; an IPv4-mapped one as `::ffff:a.b.c.d` (Python says ::ffff:7f00:1)."""
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return f"::ffff:{mapped}" if mapped is not None else str(ip)


_LINE_END = re.compile(rb"\r\n|\r|\n")


def dot_stuff(raw: bytes) -> bytes:
    """Body for DATA: CRLF line ends guaranteed, leading dots doubled, final CRLF.CRLF.

    Mail from the proxy was refused with any bare CR, bare LF or NUL (pipeline/hygiene.py); mail
    released from the quarantine or replayed may come from a milter, whose MTA passed them. A bare
    line end (or a NUL beside a dot) is what a lenient downstream ends DATA at, so what follows
    would run as a second transaction: line ends become CRLF and NULs (which RFC 5321 does not
    allow in DATA) are dropped."""
    if b"\0" in raw:
        raw = raw.replace(b"\0", b"")
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") != crlf or raw.count(b"\n") != crlf:
        raw = _LINE_END.sub(b"\r\n", raw)
    if raw.startswith(b"."):
        raw = b"." + raw
    raw = raw.replace(b"\r\n.", b"\r\n..")
    if not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    return raw + b".\r\n"


def data_parts(raw: bytes) -> tuple[bytes, bytes]:
    """dot_stuff(raw) in two parts, the message and the end of data: the everyday message (CRLF
    line ends, no NUL, no line starting with a dot) goes as it is, not copied (it may be 25 MB)."""
    crlf = raw.count(b"\r\n")
    if (raw.endswith(b"\r\n") and not raw.startswith(b".") and b"\r\n." not in raw and b"\0" not in raw
            and raw.count(b"\r") == crlf == raw.count(b"\n")):
        return raw, b".\r\n"
    return dot_stuff(raw), b""


SYNTAX_ERRORS = ("500", "501", "502", "504")
"""Replies a downstream counts as the client's syntax errors. Not 503: the RCPT pipelined behind a
refused MAIL draws one by design, and Exim does not count it."""


class SmtpConnection:
    """One open connection to a downstream, after banner and EHLO."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: object) -> None:
        self.reader = reader
        self.writer = writer
        self.key = key
        self.features: dict[str, str] = {}
        self.last_used = time.monotonic()
        self.broken = False
        self.stateful = False
        """The downstream now keeps something of a client on this connection that must not ride on
        into another client's session, so it is not reused: a syntax error (SYNTAX_ERRORS; Exim
        counts them per connection and drops it after smtp_max_synprot_errors, 3), or SMTPUTF8
        (Exim marks every later message on the connection utf8esmtp)."""
        self.uses = 0
        self.timed_out = 0.0
        """The timeout (s) that aborted this connection, or 0."""
        self.loop = asyncio.get_running_loop()
        self.due = 0.0
        """When the exchange under way must be over (loop time), or 0 between exchanges (_watch)."""
        self.due_timeout = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.holder: tuple[str, asyncio.Semaphore] | None = None
        """The client network whose transaction holds this connection now, and its share (Downstream.share)."""

    async def read_reply(self, timeout: float = COMMAND_TIMEOUT) -> Reply:
        """One reply, strictly (RFC 5321 4.2): anything else breaks the connection with a
        DownstreamError, so a garbled "250" can never count as the downstream's acceptance.
        Not within `timeout`: the connection is aborted (_time_out)."""
        self._watch(timeout)
        try:
            return await self._reply()
        except BaseException:
            self._break()
            raise
        finally:
            self.due = 0.0

    async def _reply(self) -> Reply:
        lines: list[str] = []
        code = ""
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    raise DownstreamError(self._why_closed("connection closed by downstream"))
                if not line.endswith(b"\n"):  # "250" and then the connection closed: no reply
                    raise DownstreamError(self._why_closed(f"connection closed mid-reply {line[:80]!r}"))
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                if _REPLY_LINE.match(text) is None or (lines and text[:3] != code):
                    raise DownstreamError(f"garbled reply {text[:80]!r}")
                code = text[:3]
                lines.append(text[4:])
                if len(text) == 3 or text[3] != "-":
                    self.stateful = self.stateful or code in SYNTAX_ERRORS
                    return Reply(int(code), tuple(lines))
        except OSError as e:
            raise DownstreamError(self._why_closed(f"reading reply: {e or type(e).__name__}")) from e

    async def _send(self, what: str, *parts: bytes, timeout: float | None = None) -> None:
        """Write `parts` and wait until the transport took them, aborting the connection if that
        takes longer than `timeout` (a downstream no longer reading would hold a drain() for
        ever)."""
        if timeout is not None:
            self._watch(timeout)
        try:
            for part in parts:
                self.writer.write(part)
            await self.writer.drain()
        except OSError as e:
            self._break()
            raise DownstreamError(self._why_closed(f"sending {what}: {e}")) from e
        except BaseException:
            self._break()
            raise
        finally:
            self.due = 0.0

    def _break(self) -> None:
        """An exchange interrupted half-way (cancelled, timed out, failed) leaves a reply in
        flight that would be read as the next command's answer: the connection is not reused."""
        self.broken = True

    def _watch(self, timeout: float) -> None:
        """An exchange starts: it must be over within `timeout`, or _time_out aborts the
        connection. One timer per connection, not per exchange: one already due no later is kept
        and finds the deadline when it fires (five exchanges a message; asyncio.timeout() cost
        4.8 µs a scope, a timer set and cancelled 2.5, this a clock read)."""
        due = self.loop.time() + timeout
        self.due, self.due_timeout = due, timeout
        if self.timer is None or self.timer.when() > due:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(due, self._timer_fired)

    def _timer_fired(self) -> None:
        self.timer = None
        if not self.due:
            return  # between exchanges: the next one arms it again
        if self.due > self.loop.time():
            self.timer = self.loop.call_at(self.due, self._timer_fired)
            return
        self._time_out(self.due_timeout)

    def _time_out(self, timeout: float) -> None:
        """Abort the connection, so a read sees its end and a drain() its loss."""
        self.timed_out = timeout
        self.broken = True
        self.writer.transport.abort()

    def _why_closed(self, what: str) -> str:
        return f"no progress within {self.timed_out:g} s: connection closed" if self.timed_out else what

    async def command(self, line: str, timeout: float = COMMAND_TIMEOUT) -> Reply:
        """One command, one reply."""
        await self._send(line.split(" ", 1)[0], line.encode("utf-8", "surrogateescape") + b"\r\n")
        return await self.read_reply(timeout)

    async def mail_and_rcpt(self, mail: str, rcpt: str, timeout: float = COMMAND_TIMEOUT) -> tuple[Reply, Reply | None]:
        """MAIL, and RCPT only if MAIL was accepted; where the downstream offers PIPELINING
        (RFC 2920) both go in one write, one round trip instead of two. Each reply has its own
        timeout (a sender callout and a recipient callout may each take long).

        A refused MAIL is the answer even if the connection then fails (Exim's `drop` answers
        550 and closes): RCPT's reply is then None and the connection broken. A failure after
        an accepted MAIL raises RecipientLost."""
        if "PIPELINING" not in self.features:
            reply = await self.command(mail, timeout)
            if not reply.positive:
                return reply, None
            try:
                return reply, await self.command(rcpt, timeout)
            except DownstreamError as e:
                raise RecipientLost(str(e)) from e
        await self._send("MAIL", f"{mail}\r\n{rcpt}\r\n".encode("utf-8", "surrogateescape"))
        reply = await self.read_reply(timeout)
        try:
            return reply, await self.read_reply(timeout)
        except DownstreamError as e:
            if not reply.positive:
                return reply, None
            raise RecipientLost(str(e)) from e

    async def body(self, raw: bytes, timeout: float) -> Reply:
        """The message after a 354, and the downstream's final answer to it, both within
        `timeout` (the client waits for that answer under its own idle timeout)."""
        deadline = self.loop.time() + timeout
        message, end = data_parts(raw)
        parts = (message + end,) if len(message) <= ONE_WRITE else (message, end)
        await self._send("message data", *parts, timeout=timeout)
        return await self.read_reply(max(0.0, deadline - self.loop.time()))

    def close(self) -> None:
        """QUIT without waiting for the 221 (Exim delays it), then close."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        with contextlib.suppress(Exception):
            if not self.broken:
                self.writer.write(b"QUIT\r\n")
            self.writer.close()


class Downstream:
    """One downstream MTA: a connection pool, a concurrency bound, a health mark."""

    def __init__(self, spec: DownstreamSpec, *, hostname: str, clock: Clock = time.monotonic,
                 data_timeout: float = DATA_TIMEOUT) -> None:
        self.spec = spec
        self.name = spec.address
        self.host, self.port = split_hostport(spec.address)
        self.hostname = spec.helo or hostname
        self.clock = clock
        self.data_timeout = data_timeout
        self.slots = asyncio.Semaphore(spec.max_connections)
        self.share = max(1, spec.max_connections // CLIENT_SHARE)
        """Connections one client network may hold: a transaction holds its connection from its
        first accepted RCPT to the end of its data, so a few clients trickling their data a byte
        at a time (or idling after RCPT) held all of them, and every other sender got 451."""
        self.held: dict[str, asyncio.Semaphore] = {}
        self.idle: list[SmtpConnection] = []
        self.failures = 0
        self.retry_at = 0.0
        self.open_count = 0
        metrics.downstream_up.labels(self.name).set(1)

    def available(self) -> bool:
        return self.clock() >= self.retry_at

    def mark_down(self, why: str) -> None:
        self.failures += 1
        delay = self.spec.retry_after * min(2 ** (self.failures - 1), MAX_BACKOFF_FACTOR)
        self.retry_at = self.clock() + delay
        metrics.downstream_up.labels(self.name).set(0)
        log.warning("downstream=%s status=down reason=%r retry_in=%.1fs", self.name, why, delay)

    def mark_up(self) -> None:
        if self.failures:
            log.info("downstream=%s status=up", self.name)
        self.failures = 0
        self.retry_at = 0.0
        metrics.downstream_up.labels(self.name).set(1)

    def _pool_key(self, client: Connection) -> object:
        return str(client.client_ip) if self.spec.proxy_protocol != "none" else None

    async def acquire(self, client: Connection) -> SmtpConnection:
        """A ready connection (reused when possible); holds one concurrency slot, and one of its
        client network's share, until release()."""
        holder = _network(client.client_ip)
        own = None if client.trusted else self.held.get(holder)
        if own is None and not client.trusted:
            own = self.held[holder] = asyncio.Semaphore(self.share)
        try:
            if (own is None or not own.locked()) and not self.slots.locked():
                if own is not None:  # both free: taken at once, without a timer
                    await own.acquire()
                await self.slots.acquire()
            else:
                async with asyncio.timeout(SLOT_WAIT):
                    if own is not None:
                        await own.acquire()
                    try:
                        await self.slots.acquire()
                    except BaseException:
                        self._give_back(holder, own)
                        raise
        except TimeoutError:
            which = "this client's share" if own is not None and own.locked() else f"all {self.spec.max_connections}"
            self._forget(holder, own)
            raise DownstreamBusy(f"{self.name}: {which} of its connections busy") from None
        try:
            key = self._pool_key(client)
            self._expire(time.monotonic())
            for i in range(len(self.idle) - 1, -1, -1):  # most recently used first
                conn = self.idle[i]
                if conn.key == key:
                    del self.idle[i]
                    if not conn.broken and not conn.reader.at_eof():
                        conn.holder = None if own is None else (holder, own)
                        return conn
                    self._discard(conn)
            conn = await self._connect(client, key)
        except BaseException:
            self.slots.release()
            self._give_back(holder, own)
            raise
        conn.holder = None if own is None else (holder, own)
        return conn

    def release(self, conn: SmtpConnection, *, reusable: bool) -> None:
        """Back to the idle list (oldest first), which holds at most max_connections across all
        client addresses: a wave from ever new addresses recycles the oldest, never grows it."""
        self.slots.release()
        if conn.holder is not None:
            self._give_back(*conn.holder)
            conn.holder = None
        conn.uses += 1
        if not reusable or conn.broken or conn.stateful:
            self._discard(conn)
            return
        conn.last_used = time.monotonic()
        self.idle.append(conn)
        self._expire(conn.last_used)
        while len(self.idle) > self.spec.max_connections:
            self._discard(self.idle.pop(0))

    def _give_back(self, holder: str, own: asyncio.Semaphore | None) -> None:
        if own is not None:
            own.release()
            self._forget(holder, own)

    def _forget(self, holder: str, own: asyncio.Semaphore | None) -> None:
        """Drop a share nobody holds or waits for: the table is bounded by the networks in flight."""
        if own is not None and self.held.get(holder) is own and own._value == self.share and not own.locked():
            del self.held[holder]

    def _expire(self, now: float) -> None:
        while self.idle and now - self.idle[0].last_used >= IDLE_TIMEOUT:
            self._discard(self.idle.pop(0))

    def _discard(self, conn: SmtpConnection) -> None:
        conn.close()
        self.open_count -= 1
        metrics.downstream_connections.labels(self.name).set(self.open_count)

    async def _connect(self, client: Connection, key: object) -> SmtpConnection:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError) as e:
            raise DownstreamError(f"connect to {self.name}: {e or 'timeout'}") from e
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = SmtpConnection(reader, writer, key)
        self.open_count += 1
        metrics.downstream_connections.labels(self.name).set(self.open_count)
        try:
            if self.spec.proxy_protocol != "none":
                server, own = writer.get_extra_info("peername")[:2], writer.get_extra_info("sockname")[:2]
                writer.write(proxy_header(self.spec.proxy_protocol, client.client_ip, client.client_port, server, own))
            banner = await conn.read_reply(CONNECT_TIMEOUT + 5)
            if banner.code != 220:
                raise DownstreamError(f"banner {banner}")
            ehlo = await conn.command(f"EHLO {self.hostname}")
            if ehlo.code != 250:
                raise DownstreamError(f"EHLO refused: {ehlo}")
        except BaseException:
            conn.broken = True
            self._discard(conn)
            raise
        for line in ehlo.lines[1:]:
            word, _, arg = line.partition(" ")
            conn.features[word.upper()] = arg
        return conn


@dataclass
class RelayTransaction:
    """A transaction mirrored on one downstream (chosen at MAIL by failover)."""

    downstream: Downstream
    conn: SmtpConnection
    accepted: list[str] = field(default_factory=list)
    done: bool = False

    async def rcpt(self, address: str, options: tuple[str, ...] = ()) -> Reply:
        return self.answered(address, await self._command(rcpt_command(address, options)))

    def answered(self, address: str, reply: Reply) -> Reply:
        """Record the downstream's answer to RCPT for `address`."""
        if reply.positive:
            self.accepted.append(address)
        return reply

    async def data(self, raw: bytes) -> Reply:
        """DATA, then the body. A refused DATA command leaves the downstream transaction
        open, so it is reset (never pooled half-way) before the refusal is passed on."""
        started = time.monotonic()
        reply = await self._command("DATA")
        if reply.code != 354 and reply.positive:
            # Only 354 lets the message through; a 250 here is a downstream out of step with us,
            # and passing it on would answer 250 for a message nobody received.
            self.close(reusable=False)
            raise DownstreamError(f"answered DATA with {reply}, not 354")
        if reply.code != 354:
            await self.abort()
            return reply
        try:
            reply = await self.conn.body(raw, self.downstream.data_timeout)
        except BaseException:
            self.close(reusable=False)
            raise
        try:  # the downstream has answered: nothing here may change what the client is told
            metrics.downstream_latency.labels(self.downstream.name).observe(time.monotonic() - started)
            metrics.downstream_replies.labels(self.downstream.name, f"{reply.code // 100}xx").inc()
        except Exception:
            log.exception("recording the downstream's reply failed (the reply stands)")
        self.close(reusable=True)
        return reply

    async def _command(self, line: str) -> Reply:
        try:
            return await self.conn.command(line)
        except BaseException:
            self.close(reusable=False)
            raise

    async def abort(self) -> None:
        """The client went away or gave up: RSET so no partial transaction survives.

        A connection whose last command was interrupted, or whose RSET fails, is
        closed instead: closing also ends the downstream transaction, and a stale
        reply dies with it. Never raises but for cancellation."""
        if self.done:
            return
        if self.conn.broken:
            self.close(reusable=False)
            return
        try:
            reply = await self.conn.command("RSET", timeout=10)
        except DownstreamError:
            self.close(reusable=False)
            return
        except BaseException:
            self.close(reusable=False)
            raise
        self.close(reusable=reply.code == 250)

    def close(self, *, reusable: bool) -> None:
        if not self.done:
            self.done = True
            self.downstream.release(self.conn, reusable=reusable)


class DownstreamGroup:
    """An ordered failover list: the first healthy downstream takes the transaction."""

    def __init__(self, name: str, downstreams: list[Downstream]) -> None:
        self.name = name
        self.downstreams = downstreams

    def _candidates(self) -> list[Downstream]:
        healthy = [d for d in self.downstreams if d.available()]
        metrics.downstreams_available.labels(self.name).set(len(healthy))
        return healthy

    async def begin(self, client: Connection, sender: str, mail_params: tuple[str, ...],
                    first_rcpt: tuple[str, tuple[str, ...]] | None = None) -> tuple[RelayTransaction | None, Reply]:
        """MAIL FROM (and the first RCPT TO, if given) on the first downstream that takes it.

        Returns (transaction, reply); transaction is None when the reply is a refusal of MAIL.
        With `first_rcpt` the reply is the downstream's answer to that RCPT, sent in the same
        round trip as MAIL when the downstream offers PIPELINING. Unreachable or broken
        downstreams, and a 421, are marked down and skipped for the next one; any other
        refusal of MAIL is the downstream's verdict on this sender and is passed back (it
        says nothing of its health).
        """
        last = "no downstream available"
        for ds in self._candidates():
            try:
                conn, reply, rcpt_reply = await self._mail(ds, client, sender, mail_params, first_rcpt)
            except DownstreamBusy as e:
                last = str(e)
                continue
            except RecipientLost:
                raise
            except DownstreamError as e:
                ds.mark_down(str(e))
                last = str(e)
                continue
            if reply.positive:
                ds.mark_up()
                rtx = RelayTransaction(ds, conn)
                if first_rcpt is None or rcpt_reply is None:
                    return rtx, reply
                return rtx, rtx.answered(first_rcpt[0], rcpt_reply)
            if reply.code == 421:
                ds.release(conn, reusable=False)
                ds.mark_down(f"MAIL answered {reply}")
                last = f"{ds.name} answered {reply}"
                continue
            # The downstream's own verdict on this sender (5xx, or a 4xx such as a deferred
            # sender verification): passed back, and the downstream stays healthy for others.
            ds.mark_up()
            if conn.broken:
                ds.release(conn, reusable=False)
                return None, reply
            try:
                rset = await conn.command("RSET", timeout=10)
            except BaseException as e:
                ds.release(conn, reusable=False)
                if isinstance(e, DownstreamError):
                    return None, reply
                raise
            ds.release(conn, reusable=rset.code == 250)
            return None, reply
        return None, Reply(451, (f"4.4.1 No downstream available ({last})",))

    @staticmethod
    async def _mail(ds: Downstream, client: Connection, sender: str, mail_params: tuple[str, ...],
                    first_rcpt: tuple[str, tuple[str, ...]] | None) -> tuple[SmtpConnection, Reply, Reply | None]:
        """MAIL FROM (and the first RCPT: SmtpConnection.mail_and_rcpt) on a connection to `ds`.
        A pooled connection the downstream has meanwhile dropped is replaced by a fresh one once,
        rather than counting against it."""
        while True:
            conn = await ds.acquire(client)
            params = [p for p in mail_params if _supported(p, conn.features)]
            mail = f"MAIL FROM:<{sender}>" + "".join(" " + p for p in params)
            conn.stateful = conn.stateful or any(p.upper() == "SMTPUTF8" for p in params)
            try:
                if first_rcpt is None:
                    return conn, await conn.command(mail), None
                return conn, *await conn.mail_and_rcpt(mail, rcpt_command(*first_rcpt))
            except RecipientLost:
                ds.release(conn, reusable=False)
                raise
            except DownstreamError:
                ds.release(conn, reusable=False)
                if conn.uses <= 1:
                    raise
            except BaseException:
                ds.release(conn, reusable=False)
                raise


def rcpt_command(address: str, options: tuple[str, ...] = ()) -> str:
    return f"RCPT TO:<{address}>" + "".join(" " + o for o in options)


def _supported(param: str, features: dict[str, str]) -> bool:
    """Pass SIZE/BODY/SMTPUTF8 on only when the downstream advertised them."""
    word = param.split("=", 1)[0].upper()
    needs = {"BODY": "8BITMIME", "SIZE": "SIZE", "SMTPUTF8": "SMTPUTF8"}.get(word)
    return needs is not None and needs in features


@dataclass
class DeliveryResult:
    ok: bool
    reply: str
    downstream: str = ""


class Relay:
    """All downstream groups (routes) by name; `default` takes what no route claims."""

    def __init__(self, groups: dict[str, DownstreamGroup]) -> None:
        self.groups = groups

    @classmethod
    def from_settings(cls, settings: Settings, clock: Clock = time.monotonic) -> Relay:
        hostname = settings.smtp.hostname or socket.getfqdn()
        timeout = settings.smtp.data_timeout

        def group(name: str, specs: list[DownstreamSpec]) -> DownstreamGroup:
            return DownstreamGroup(name, [Downstream(d, hostname=hostname, clock=clock, data_timeout=timeout)
                                          for d in specs])

        groups = {"default": group("default", settings.downstreams)}
        for name, route in settings.routes.items():
            groups[name] = group(name, route.downstreams)
        return cls(groups)

    def group(self, route: str | None) -> DownstreamGroup:
        return self.groups.get(route or "default", self.groups["default"])

    def close(self) -> None:
        for group in self.groups.values():
            for ds in group.downstreams:
                for conn in ds.idle:
                    conn.close()
                ds.idle.clear()

    async def deliver(self, client: Connection, sender: str, recipients: list[str], raw: bytes,
                      route: str | None = None, mail_params: tuple[str, ...] = (),
                      rcpt_params: dict[str, tuple[str, ...]] | None = None) -> DeliveryResult:
        """Send one whole message (quarantine release, replay): all recipients or nothing. The
        sender's MAIL and RCPT parameters go on as far as the downstream offers them: a UTF-8
        address without SMTPUTF8 is refused, and a DSN request dropped is a request ignored."""
        rtx, reply = await self.group(route).begin(client, sender, mail_params)
        if rtx is None:
            return DeliveryResult(False, str(reply))
        dsn = "DSN" in rtx.conn.features
        try:
            for rcpt in recipients:
                options = tuple(o for o in (rcpt_params or {}).get(rcpt, ()) if dsn
                                and o.split("=", 1)[0].upper() in ("NOTIFY", "ORCPT"))
                r = await rtx.rcpt(rcpt, options)
                if not r.positive:
                    await rtx.abort()
                    return DeliveryResult(False, f"RCPT {rcpt}: {r}", rtx.downstream.name)
            final = await rtx.data(raw)
        except DownstreamError as e:
            return DeliveryResult(False, str(e), rtx.downstream.name)
        return DeliveryResult(final.code == 250, str(final), rtx.downstream.name)
