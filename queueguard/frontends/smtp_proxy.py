"""Before-queue SMTP proxy front end (aiosmtpd).

Translates SMTP into the pipeline's Session calls and verdicts back into
replies, nothing more: syntax (addresses, HELO names), the greeting, DATA's
framing and sizes are SMTP's; every decision about a transaction is the
Session's. The sender gets 250 for a message only after a downstream said
250 for it (or it was durably quarantined): the Session mirrors MAIL/RCPT
onto the downstream as they arrive, and relays DATA once the whole message
is in and checked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Sequence
from typing import Any

from aiosmtpd.proxy_protocol import V2_CMD
from aiosmtpd.smtp import SMTP, Envelope, syntax
from aiosmtpd.smtp import Session as AioSession

from queueguard import metrics
from queueguard.model import Connection, IPAddress, parse_ip
from queueguard.pipeline import End, Pipeline, Session
from queueguard.settings import SmtpSettings, split_hostport
from queueguard.verdict import INTERNAL_ERROR, Verdict

log = logging.getLogger("queueguard.smtp")

FRONTEND = "smtp"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
SIZE_EXCEEDED = "552 5.3.4 Message size exceeds fixed maximum message size"


_ADDRESS = re.compile(r"^[^\s<>()\[\]\\,;:@\"]+(\.[^\s<>()\[\]\\,;:@\"]+)*@[^\s<>@]+$"
                      r"|^\"(?:[^\"\\\r\n]|\\[^\r\n])*\"@[^\s<>@]+$")
"""Dot-atom or quoted local part (with quoted pairs: `"a\\"b"@`, which Exim takes) at a domain."""


BAD_HELO = "501 5.5.2 Syntax error in HELO/EHLO hostname"
READ_LIMIT = 16 * 1024
COMMAND_LIMIT = 16 * 1024 - 1
"""Octets in a command line, CRLF included. Exim takes up to ~16 KB (its command buffer): long
AUTH= values and SRS/VERP senders with parameters pass there, so they must pass here too
(RFC 5321 sets 512 as the least a server must take, not the most)."""
IGNORED_PARAMS = ("RET", "ENVID")
"""MAIL parameters of DSN (RFC 3461) that Exim accepts and ignores when it does not offer DSN; so do we."""
TLS_NOT_OFFERED = "503 5.5.1 STARTTLS command used when not advertised"
PROXY_TIMEOUT = 5.0
"""Seconds a configured load balancer has to send its PROXY header."""
PROXY_FORGED = "554 5.7.0 PROXY header not accepted from this address"
AUTH_NOT_OFFERED = "503 5.5.1 AUTH command used when not advertised"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def valid_helo(hostname: str) -> bool:
    """No control characters (a NUL would reach logs and the downstream's Received line). Any
    length the command line allows is taken, as Exim takes it (5,000 characters and more)."""
    return _CONTROL.search(hostname) is None


def valid_address(address: str, *, allow_null: bool) -> bool:
    """RFC 5321 path, loosely: local@domain without spaces, brackets or control characters; `<>`
    only where allowed; `postmaster` alone as a recipient (RFC 5321 4.5.1 says it must be accepted)."""
    if address in ("", "<>"):
        return allow_null
    if not allow_null and address.lower() == "postmaster":
        return True
    return len(address) <= 320 and _ADDRESS.match(address) is not None and _CONTROL.search(address) is None


_PLAIN_PATH = re.compile(
    r"<((?!\.)((?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|\.(?!\.))+)(?<!\.)@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(.*)\Z",
    re.DOTALL)
"""A path whose local part is a plain dot-atom and whose domain is a plain host name."""
_QUOTED_PATH = re.compile(r'<("(?:[^"\\\r\n]|\\[^\r\n])*"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(.*)\Z', re.DOTALL)
"""A path whose local part is a quoted string: kept as the client wrote it (aiosmtpd's parser
rewrote `".a"@` to `.a@`, which is no address)."""


def ignored_param(param: str) -> bool:
    """A MAIL parameter taken and dropped: DSN's RET/ENVID, a SIZE that says no number."""
    name, _, value = param.partition("=")
    name = name.upper()
    return name in IGNORED_PARAMS or (name == "SIZE" and _DIGITS.fullmatch(value) is None)


_DIGITS = re.compile(r"[0-9]{1,20}")


def _names(cls: type, *prefixes: str) -> list[str]:
    return sorted(n for n in dir(cls) if n.startswith(prefixes))


def greeting_refusal(verdict: Verdict) -> str:
    """A refusal at connect time as SMTP allows it before the greeting: 421, then we close."""
    return f"421 {verdict.status or '4.3.0'} {verdict.text}"


class QueueguardSMTP(SMTP):
    """aiosmtpd's SMTP with our Session per connection, DATA without a line limit, and our replies."""

    _dir: list[str] = []

    def __dir__(self) -> list[str]:
        """aiosmtpd builds its command and AUTH tables from dir()/getmembers() on every new
        connection (~130 µs, 13 % of the proxy's CPU at 1,000 connections/s); it only looks
        for smtp_* and auth_* names, so hand it the commands, computed once per class, and no
        AUTH mechanism (see smtp_AUTH)."""
        cls = type(self)
        if not cls._dir:
            cls._dir = _names(cls, "smtp_")
        return cls._dir

    def __init__(self, handler: ProxyHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        # aiosmtpd keeps the per-command limits in a dict of its class, cleared by every new
        # connection and raised by every EHLO: a session's limit hung on other clients. Ours.
        self.command_size_limit = COMMAND_LIMIT
        self.command_size_limits = collections.defaultdict(lambda: COMMAND_LIMIT)
        self.qg_handler = handler
        self.qg: Session | None = None
        self._greeted = False
        self._proxied = False
        self._timeout_now: float = self._timeout_duration
        reader: asyncio.StreamReader | None = getattr(self, "_stream_reader", None)
        if reader is not None:
            # aiosmtpd sizes its reader by the 1001-octet line limit, and a reader pauses the
            # socket (epoll off, then on again) once it holds twice its limit: twice for every
            # message over 2 KB, 3 % of the proxy's CPU. Command lines are checked on their own
            # (command_size_limit), DATA lines of any length are read in pieces (smtp_DATA), so
            # only the pause point moves; one connection holds at most 2 x READ_LIMIT unread.
            reader._limit = READ_LIMIT  # type: ignore[attr-defined]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls = self.qg is not None
        super().connection_made(transport)
        if self.qg is not None and starttls:
            # aiosmtpd calls us again with the TLS transport: same client (the PROXY-given
            # address must survive), a new session state per RFC 3207.
            self.qg.conn.tls = True
            self.qg.conn.helo = ""
            return
        peer = transport.get_extra_info("peername") or ("", 0)
        conn = Connection(parse_ip(str(peer[0])), int(peer[1]) if len(peer) > 1 else 0)
        # A PROXY header is required from the configured load balancers and believed from nobody
        # else (anyone could claim to be 127.0.0.1); aiosmtpd reads it only when this is set.
        self._proxy_timeout = PROXY_TIMEOUT if self.qg_handler.proxy_peer(conn.client_ip) else None
        self.qg = self.qg_handler.opened(self, conn)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if self._proxy_timeout is not None and not self._proxied and self.qg is not None:
            metrics.protocol_errors.labels("proxy_missing").inc()
            log.warning("connection from load balancer %s closed: no valid PROXY header", self.qg.conn.client_ip)
        self.qg_handler.closed(self)

    async def smtp_PROXY(self, arg: str) -> None:
        """A PROXY header as a command: from a peer that is not a configured load balancer (a
        forged client address), or a second one from a balancer (after the first, where only
        the client can have put it). Refused, logged and counted, and the connection closed."""
        state = self.qg
        metrics.protocol_errors.labels("proxy_forged").inc()
        why = "a second one on this connection" if self._proxied else "not in smtp.proxy_protocol_from"
        log.warning("PROXY header from %s refused (%s): %s", state.conn.client_ip if state else "?", why, arg[:100])
        await self.push(PROXY_FORGED)
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        """Any bytes from the client restart aiosmtpd's timer, which otherwise only commands do:
        the timeout is then an idle timeout, and a large message still arriving is not cut off.
        The timer restarts with the time it was last given (the relay's budget while a message is
        relayed); a load balancer's PROXY header has its own 5 s, which bytes do not extend."""
        super().data_received(data)
        if self._proxy_timeout is None or self._proxied:
            self._reset_timeout(self._timeout_now)

    def _reset_timeout(self, duration: float | None = None) -> None:
        self._timeout_now = duration or self._timeout_duration
        super()._reset_timeout(duration)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """STARTTLS where it is not offered is refused, as Exim does: once TLS is on (RFC 3207 4.2;
        aiosmtpd started a second TLS layer inside the first), and without a certificate (aiosmtpd
        answered 454, a temporary failure, where Exim's 503 says do not retry)."""
        if self._tls_protocol is not None or not self.tls_context:
            metrics.protocol_errors.labels("starttls_not_offered").inc()
            await self.push(TLS_NOT_OFFERED)
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        """The proxy is an MX and authenticates nobody: AUTH is not advertised (handle_EHLO drops
        the line aiosmtpd adds after STARTTLS) and gets what Exim answers when it is not."""
        metrics.protocol_errors.labels("auth_not_offered").inc()
        await self.push(AUTH_NOT_OFFERED)

    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        """MAIL's `AUTH=` (RFC 4954), `RET=` and `ENVID=` (RFC 3461) are accepted and ignored, as Exim
        does without authenticators or DSN (senders that saw them offered elsewhere send them;
        aiosmtpd refused them with a 555), and so is a SIZE that is not a number of ASCII digits
        (Exim takes `SIZE=` and `SIZE=²`; aiosmtpd answered 501, or 451 from int('²'))."""
        result = super()._getparams([p for p in params if not ignored_param(p)])
        if result is not None:
            result.pop("AUTH", None)
        return result

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The everyday `<local@domain>` without going through the email package's RFC 5322
        parser (8 % of the proxy's CPU), and a quoted local part as written; anything else is
        left to aiosmtpd."""
        m = _PLAIN_PATH.match(arg)
        if m is not None and "(" not in m.group(3) and not (
                self.local_part_limit and len(m.group(2)) > self.local_part_limit):
            return m.group(1), m.group(3).lstrip(" \t")
        q = _QUOTED_PATH.match(arg)
        if q is not None and "(" not in q.group(2):
            return q.group(1), q.group(2).lstrip(" \t")
        return super()._getaddr(arg)

    async def push(self, status: Any) -> None:
        """The greeting is where the connect stage answers (a refusal: 421 and close); aiosmtpd's
        own size refusal at MAIL gets our RFC 3463 text."""
        if isinstance(status, str):
            if not self._greeted and status.startswith("220 "):
                self._greeted = True
                refusal = await self.qg_handler.connect(self)
                if refusal is not None:
                    await super().push(refusal)
                    if self.transport is not None:
                        self.transport.close()
                    return
            elif status.startswith("552 Error:"):  # SIZE= at MAIL: no transaction of ours yet
                metrics.protocol_errors.labels("oversize").inc()
                status = SIZE_EXCEEDED
        await super().push(status)

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, but a line may be as long as the message may be large: Exim and
        Postfix take HTML newsletters with lines of many kilobytes, and we must never be stricter
        than the MTA behind us (_read_data); only the size limit ends a transaction (552, after
        the data is in, RFC 5321 4.2.5)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content = await self._read_data()
        if content is None:
            return  # the client left before the end of the data: nothing to judge
        if isinstance(content, End):
            status = await self.qg_handler.refused_data(self, content)
        else:
            self.envelope.original_content = self.envelope.content = content
            status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)

    async def _read_data(self) -> bytes | End | None:
        """The message up to CRLF.CRLF, dot-unstuffed (RFC 5321 4.5.2), read in whole chunks:
        only that exact sequence ends DATA (any other dot stays content, for hygiene to judge). A
        line may be as long as the message may be large. End.OVERSIZE once past the size limit
        (the rest is drained, not kept); None if the client leaves first.

        Read and scanned chunk by chunk into one buffer: kept line by line, a message of millions
        of short lines cost a Python object per line (12 MB of `a:` lines took 400 MB) and a
        coroutine step per line."""
        work = bytearray(b"\r\n")  # DATA starts a line: a virtual line end in front of it
        scanned, limit, too_much = 0, self.data_size_limit, False
        while True:
            end = work.find(b"\r\n.\r\n", scanned)
            if end >= 0:
                break
            # the limit is on the message, not on the wire: dot-stuffing adds at most a byte to a
            # 3-byte line (4/3), and the last 4 bytes may begin the terminator
            if limit and len(work) - 6 > limit * 4 // 3:
                too_much = True
                del work[:-4]  # only a terminator split across reads is left to find
            scanned = max(0, len(work) - 4)
            chunk = await self._reader.read(READ_LIMIT)
            if not chunk:
                return None
            work += chunk
        if rest := work[end + 5:]:  # commands pipelined after the data: back in front of the reader
            self._reader._buffer[:0] = rest  # type: ignore[attr-defined]
        if too_much:
            return End.OVERSIZE
        del work[end + 2:]
        if work.find(b"\r\n.") >= 0:  # dot-stuffed lines (the virtual line end finds a first one too)
            work = work.replace(b"\r\n.", b"\r\n")
        if limit and len(work) - 2 > limit:
            return End.OVERSIZE
        return bytes(memoryview(work)[2:])  # one copy: a message costs about twice its size here


class ProxyHandler:
    """aiosmtpd handler hooks → Session calls; verdicts → replies."""

    _dir: list[str] = []

    def __dir__(self) -> list[str]:
        """Only the hook names aiosmtpd looks for (see QueueguardSMTP.__dir__)."""
        cls = type(self)
        if not cls._dir:
            cls._dir = _names(cls, "handle_", "auth_")
        return cls._dir

    def __init__(self, pipeline: Pipeline, settings: SmtpSettings) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.proxy_networks = [ipaddress.ip_network(n, strict=False) for n in settings.proxy_protocol_from]
        self.sessions: dict[QueueguardSMTP, Session] = {}
        self.closing = False
        self._pending: set[asyncio.Task[None]] = set()

    # --- connection bookkeeping ------------------------------------------------

    def proxy_peer(self, ip: IPAddress | None) -> bool:
        """The peer is a configured load balancer (smtp.proxy_protocol_from)."""
        return ip is not None and any(ip in net for net in self.proxy_networks)

    def opened(self, proto: QueueguardSMTP, conn: Connection) -> Session:
        metrics.connections.labels(FRONTEND).inc()
        metrics.connections_active.labels(FRONTEND).inc()
        session = self.sessions[proto] = self.pipeline.open(conn)
        return session

    def closed(self, proto: QueueguardSMTP) -> None:
        session = self.sessions.pop(proto, None)
        if session is not None:
            metrics.connections_active.labels(FRONTEND).dec()
            task = asyncio.get_running_loop().create_task(session.close())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def connect(self, proto: QueueguardSMTP) -> str | None:
        """The connect stage, once the real client is known (after PROXY); a refusal's reply."""
        verdict = await self._state(proto).connect()
        return greeting_refusal(verdict) if verdict.final else None

    async def refused_data(self, proto: QueueguardSMTP, why: End) -> str:
        verdict = await self._state(proto).end(why)
        return verdict.reply() if verdict is not None else INTERNAL_ERROR.reply()

    def in_flight(self) -> int:
        return sum(1 for s in self.sessions.values() if s.in_data)

    # --- hooks -----------------------------------------------------------------

    @staticmethod
    def _state(server: SMTP) -> Session:
        assert isinstance(server, QueueguardSMTP) and server.qg is not None
        return server.qg

    async def handle_PROXY(self, server: SMTP, session: AioSession, envelope: Envelope, proxy_data: Any) -> bool:
        """Inbound PROXY header from a load balancer: the real client is in it. A header without
        one (v1 UNKNOWN, v2 LOCAL as health checks send it, a unix-socket source) means, by the
        spec, the connection's own endpoints: the balancer stays the client, so limits still
        count it and the downstream is told an address (not LOCAL, which crashes Exim 4.96)."""
        if not proxy_data or not getattr(proxy_data, "valid", False):
            return False
        assert isinstance(server, QueueguardSMTP)
        server._proxied = True
        conn = self._state(server).conn
        local = proxy_data.version == 2 and proxy_data.command == V2_CMD.LOCAL
        ip = None if local or not proxy_data.src_addr else parse_ip(str(proxy_data.src_addr))
        if ip is not None:
            conn.client_ip, conn.client_port = ip, int(proxy_data.src_port or 0)
        return True

    async def handle_HELO(self, server: SMTP, session: AioSession, envelope: Envelope, hostname: str) -> str:
        if not valid_helo(hostname):
            metrics.protocol_errors.labels("bad_helo").inc()
            return BAD_HELO
        await self._state(server).helo(hostname)
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_EHLO(self, server: SMTP, session: AioSession, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        if not valid_helo(hostname):
            metrics.protocol_errors.labels("bad_helo").inc()
            return [BAD_HELO]
        await self._state(server).helo(hostname)
        session.host_name = hostname
        return [r for r in responses if not r.startswith("250-AUTH")]

    async def handle_MAIL(self, server: SMTP, session: AioSession, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        if self.closing:
            return SHUTTING_DOWN
        if not valid_address(address, allow_null=True):
            metrics.protocol_errors.labels("bad_address").inc()
            return "501 5.1.7 Bad sender address syntax"
        mail_options = [o for o in mail_options if not ignored_param(o)]
        verdict = await self._state(server).mail(address, mail_options)
        if verdict.final:
            return verdict.reply()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: AioSession, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        state = self._state(server)
        txn = state.txn
        if txn is None:
            return "503 5.5.1 Error: need MAIL command"
        if not valid_address(address, allow_null=False):
            metrics.protocol_errors.labels("bad_address").inc()
            return "501 5.1.3 Bad recipient address syntax"
        if len(txn.recipients) >= self.settings.max_recipients:
            return "452 4.5.3 Too many recipients"
        verdict = await state.rcpt(address, rcpt_options)
        if verdict.final:
            return verdict.reply()
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return verdict.reply() if verdict.code == 250 and verdict.text != "Ok" else "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: AioSession, envelope: Envelope) -> str:
        """The Session's answer; the transaction stays open on it until then, so a client
        vanishing mid-way is ended by closed()."""
        state = self._state(server)
        if state.txn is None:
            return "503 5.5.1 Error: need MAIL command"
        # Checks and relay get the whole budget; the relay's own DATA timeout (data_timeout)
        # expires first, so the client always hears our 451 rather than a silent close.
        server._reset_timeout(self.settings.data_timeout + 60)
        outcome = await state.data(envelope.original_content or b"")
        return outcome.verdict.reply()

    async def handle_RSET(self, server: SMTP, session: AioSession, envelope: Envelope) -> str:
        await self._state(server).end(End.RSET)
        return "250 2.0.0 Ok"

    async def handle_exception(self, error: Exception) -> str:
        """Anything aiosmtpd itself did not expect: 451, never its default 500."""
        metrics.internal_errors.labels("session").inc()
        log.error("internal error in SMTP session: %r", error, exc_info=error)
        return INTERNAL_ERROR.reply()


# aiosmtpd asks inspect.signature() on every connection which of its two handle_EHLO styles
# this is; a stored signature makes that a look-up (10 µs, 1 % of the proxy's CPU).
ProxyHandler.handle_EHLO.__signature__ = inspect.signature(ProxyHandler.handle_EHLO)  # type: ignore[attr-defined]


class SmtpProxy:
    """The listening server, with a graceful stop: finish in-flight DATA, then 421."""

    def __init__(self, pipeline: Pipeline, settings: SmtpSettings, *, reuse_port: bool = False) -> None:
        """`reuse_port`: several worker processes listen on the port; the kernel spreads connections."""
        self.settings = settings
        self.handler = ProxyHandler(pipeline, settings)
        self.reuse_port = reuse_port
        self.server: asyncio.Server | None = None

    def _tls(self) -> ssl.SSLContext | None:
        if not self.settings.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.settings.tls_cert), str(self.settings.tls_key or self.settings.tls_cert))
        return ctx

    async def start(self) -> None:
        host, port = split_hostport(self.settings.listen)
        tls = self._tls()
        s = self.settings
        loop = asyncio.get_running_loop()  # given, or aiosmtpd looks it up per connection

        def factory() -> QueueguardSMTP:
            return QueueguardSMTP(
                self.handler, data_size_limit=s.max_message_size, enable_SMTPUTF8=True, decode_data=False,
                hostname=s.hostname or None, ident="queueguard ESMTP", tls_context=tls,
                require_starttls=s.require_tls, timeout=s.data_timeout,
                proxy_protocol_timeout=PROXY_TIMEOUT if s.proxy_protocol_from else None, loop=loop,
            )

        self.server = await loop.create_server(factory, host, port, reuse_address=True, reuse_port=self.reuse_port)
        sock = self.server.sockets[0].getsockname()
        log.info("smtp proxy listening on %s:%s", sock[0], sock[1])

    def in_flight(self) -> int:
        return self.handler.in_flight()

    async def stop(self, grace: float) -> None:
        """Stop accepting; let messages already in DATA finish within `grace`; then 421 everyone."""
        if self.server is None:
            return
        self.server.close()
        self.handler.closing = True
        deadline = time.monotonic() + grace
        while self.handler.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for proto, session in list(self.handler.sessions.items()):
            await session.end(End.SHUTDOWN)
            transport = proto.transport
            if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
                with contextlib.suppress(Exception):
                    transport.write(SHUTTING_DOWN.encode() + b"\r\n")
                    transport.close()
        await asyncio.sleep(0)
        if self.handler._pending:
            await asyncio.gather(*self.handler._pending, return_exceptions=True)
        await self.server.wait_closed()
