"""Before-queue SMTP proxy front end (aiosmtpd).

Translates SMTP into pipeline stages and verdicts back into replies, nothing
more. The sender gets 250 for a message only after a downstream said 250 for
it (or it was durably quarantined): the pipeline mirrors MAIL/RCPT onto the
downstream as they arrive, so the downstream's per-recipient answers reach
the sender, and DATA is relayed only once the whole message is in and checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import ssl
import time
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from queueguard import metrics
from queueguard.model import Connection, Transaction, parse_ip
from queueguard.pipeline import Pipeline
from queueguard.settings import SmtpSettings, split_hostport
from queueguard.verdict import INTERNAL_ERROR, Action, Verdict, reject

log = logging.getLogger("queueguard.smtp")

FRONTEND = "smtp"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
SIZE_EXCEEDED = reject("5.3.4", "Message size exceeds fixed maximum message size", reason="oversize", code=552)
LINE_TOO_LONG = reject("5.5.2", "Line too long: at most 1000 octets per line (RFC 5321 4.5.3.1.6)",
                       reason="line_too_long", code=500)


_ADDRESS = re.compile(r"^[^\s<>()\[\]\\,;:@\"]+(\.[^\s<>()\[\]\\,;:@\"]+)*@[^\s<>@]+$|^\"[^\"\r\n]*\"@[^\s<>@]+$")


BAD_HELO = "501 5.5.2 Syntax error in HELO/EHLO hostname"
READ_LIMIT = 16 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def valid_helo(hostname: str) -> bool:
    """No control characters (a NUL would reach logs and the downstream's Received line)."""
    return len(hostname) <= 255 and _CONTROL.search(hostname) is None


def valid_address(address: str, *, allow_null: bool) -> bool:
    """RFC 5321 path, loosely: local@domain without spaces, brackets or control characters; `<>`
    only where allowed; `postmaster` alone as a recipient (RFC 5321 4.5.1 says it must be accepted)."""
    if address in ("", "<>"):
        return allow_null
    if not allow_null and address.lower() == "postmaster":
        return True
    return len(address) <= 320 and _ADDRESS.match(address) is not None and _CONTROL.search(address) is None


def smuggling_verdict(raw: bytes) -> Verdict | None:
    """Refuse bare LF or bare CR anywhere in DATA (SMTP smuggling, 2023).

    aiosmtpd only ends DATA at CRLF.CRLF, so every smuggling end-of-data
    variant (LF.LF, LF.CRLF, CR.CR, CRLF.LF, CRLF.CR, ...) reaches us as
    message content containing a bare LF or CR; refusing those is what
    Postfix's smtpd_forbid_bare_newline does.
    """
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") != crlf:
        what = "bare <LF>"
    elif raw.count(b"\r") != crlf:
        what = "bare <CR>"
    else:
        return None
    return reject("5.5.2", f"Message refused: {what} in message data (SMTP smuggling protection); "
                  "lines must end with CRLF", reason="bare_newline", code=554)


class _Session:
    """Our per-connection state, kept beside aiosmtpd's Session."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.txn: Transaction | None = None
        self.in_data = False


_PLAIN_PATH = re.compile(
    r"<((?!\.)((?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|\.(?!\.))+)(?<!\.)@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(.*)\Z",
    re.DOTALL)
"""A path whose local part is a plain dot-atom and whose domain is a plain host name."""


def _names(cls: type, *prefixes: str) -> list[str]:
    return sorted(n for n in dir(cls) if n.startswith(prefixes))


class QueueguardSMTP(SMTP):
    """aiosmtpd's SMTP with our connection bookkeeping and RFC 3463 size replies."""

    _dir: list[str] = []

    def __dir__(self) -> list[str]:
        """aiosmtpd builds its command and AUTH tables from dir()/getmembers() on every new
        connection (~130 µs, 13 % of the proxy's CPU at 1,000 connections/s); it only looks
        for smtp_* and auth_* names, so hand it those, computed once per class."""
        cls = type(self)
        if not cls._dir:
            cls._dir = _names(cls, "smtp_", "auth_")
        return cls._dir

    def __init__(self, handler: ProxyHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.qg_handler = handler
        self.qg: _Session | None = None
        reader: asyncio.StreamReader | None = getattr(self, "_stream_reader", None)
        if reader is not None:
            # aiosmtpd sizes its reader by the 1001-octet line limit, and a reader pauses the
            # socket (epoll off, then on again) once it holds twice its limit: twice for every
            # message over 2 KB, 3 % of the proxy's CPU. Line lengths are checked on their own
            # (command_size_limit, line_length_limit: same 500 replies), so only the pause
            # point moves; one connection holds at most 2 x READ_LIMIT unread.
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
        self.qg = _Session(Connection(parse_ip(str(peer[0])), int(peer[1]) if len(peer) > 1 else 0,
                                      frontend=FRONTEND))
        self.qg_handler.opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self.qg_handler.closed(self)

    def data_received(self, data: bytes) -> None:
        """Any bytes from the client restart aiosmtpd's timer, which otherwise only commands do:
        the timeout is then an idle timeout, and a large message still arriving is not cut off."""
        super().data_received(data)
        self._reset_timeout()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The everyday `<local@domain>` without going through the email package's RFC 5322
        parser (8 % of the proxy's CPU); anything else is left to aiosmtpd."""
        m = _PLAIN_PATH.match(arg)
        if m is None or "(" in m.group(3) or (self.local_part_limit and len(m.group(2)) > self.local_part_limit):
            return super()._getaddr(arg)
        return m.group(1), m.group(3).lstrip(" \t")

    async def push(self, status: Any) -> None:
        """aiosmtpd refuses an oversized message or an over-long line itself, after the data
        is in and without calling handle_DATA: our reply text, and the transaction ends here
        (downstream side reset, one log line with the reason) rather than at the next command."""
        if isinstance(status, str):
            if status.startswith("552 Error: Too much mail data"):
                status = await self._data_refused(SIZE_EXCEEDED)
            elif status.startswith("500 Line too long"):
                status = await self._data_refused(LINE_TOO_LONG)
            elif status.startswith("552 Error:"):  # SIZE= at MAIL: no transaction of ours yet
                metrics.protocol_errors.labels("oversize").inc()
                status = SIZE_EXCEEDED.reply()
        await super().push(status)

    async def _data_refused(self, verdict: Verdict) -> str:
        metrics.protocol_errors.labels(verdict.reason or "data").inc()
        state = self.qg
        if state is not None and state.txn is not None:
            txn, state.txn = state.txn, None
            try:
                await self.qg_handler.pipeline.finish(txn, verdict)
            except Exception:
                log.exception("id=%s finishing the transaction failed", txn.id)
        return verdict.reply()


class ProxyHandler:
    """aiosmtpd handler hooks → pipeline stages."""

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
        self.sessions: set[QueueguardSMTP] = set()
        self.closing = False
        self._pending: set[asyncio.Task[None]] = set()

    # --- connection bookkeeping ------------------------------------------------

    def opened(self, proto: QueueguardSMTP) -> None:
        self.sessions.add(proto)
        metrics.connections.labels(FRONTEND).inc()
        metrics.connections_active.labels(FRONTEND).inc()

    def closed(self, proto: QueueguardSMTP) -> None:
        self.sessions.discard(proto)
        metrics.connections_active.labels(FRONTEND).dec()
        state = proto.qg
        if state is not None and state.txn is not None:
            txn, state.txn = state.txn, None
            task = asyncio.get_running_loop().create_task(self._vanished(txn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _vanished(self, txn: Transaction) -> None:
        """Client went away mid-transaction: nothing was answered 250, undo the downstream side."""
        await self.pipeline.finish(txn, Verdict(Action.TEMPFAIL, 421, "4.4.2", "client disconnected",
                                                reason="client_disconnected"),
                                   downstream_reply="(none: the client disconnected)")

    def in_flight(self) -> int:
        return sum(1 for s in self.sessions if s.qg is not None and s.qg.in_data)

    # --- hooks -----------------------------------------------------------------

    @staticmethod
    def _state(server: SMTP) -> _Session:
        assert isinstance(server, QueueguardSMTP) and server.qg is not None
        return server.qg

    async def handle_PROXY(self, server: SMTP, session: Session, envelope: Envelope, proxy_data: Any) -> bool:
        """Inbound PROXY header from a load balancer: the real client is in it."""
        if not proxy_data or not getattr(proxy_data, "valid", False):
            return False
        state = self._state(server)
        state.conn.client_ip = parse_ip(str(proxy_data.src_addr)) if proxy_data.src_addr else None
        state.conn.client_port = int(proxy_data.src_port or 0)
        return True

    async def handle_HELO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str) -> str:
        if not valid_helo(hostname):
            metrics.protocol_errors.labels("bad_helo").inc()
            return BAD_HELO
        await self._reset(server)
        self._state(server).conn.helo = hostname
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        if not valid_helo(hostname):
            metrics.protocol_errors.labels("bad_helo").inc()
            return [BAD_HELO]
        await self._reset(server)
        self._state(server).conn.helo = hostname
        session.host_name = hostname
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        state = self._state(server)
        if self.closing:
            return SHUTTING_DOWN
        if not valid_address(address, allow_null=True):
            metrics.protocol_errors.labels("bad_address").inc()
            return "501 5.1.7 Bad sender address syntax"
        try:
            if state.txn is not None:
                await self.pipeline.finish(state.txn, Verdict(Action.TEMPFAIL, 451, "4.5.0", "abandoned",
                                                               reason="abandoned"))
                state.txn = None
            size = next((int(o[5:]) for o in mail_options if o.startswith("SIZE=") and o[5:].isdigit()), None)
            txn, verdict = await self.pipeline.mail(state.conn, address, tuple(mail_options), size)
        except Exception:
            return self._internal_error(state)
        if verdict.final:
            return verdict.reply()
        state.txn = txn
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
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
        try:
            verdict = await self.pipeline.rcpt(txn, address, tuple(rcpt_options))
        except Exception:
            return self._internal_error(state)
        if verdict.final:
            return verdict.reply()
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return verdict.reply() if verdict.code == 250 and verdict.text != "Ok" else "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Checks, then relay; the answer is the downstream's. The transaction stays on the
        session until we finish it, so a client vanishing mid-way is finished by closed()."""
        state = self._state(server)
        txn = state.txn
        if txn is None:
            return "503 5.5.1 Error: need MAIL command"
        state.in_data = True
        # Checks and relay get the whole budget; the relay's own DATA timeout (data_timeout)
        # expires first, so the client always hears our 451 rather than a silent close.
        server._reset_timeout(self.settings.data_timeout + 60)
        try:
            raw = envelope.original_content or b""
            txn.size = len(raw)
            txn.timings["receive"] = time.monotonic() - txn.started
            verdict = smuggling_verdict(raw)
            if verdict is not None:
                metrics.protocol_errors.labels("bare_newline").inc()
            else:
                verdict = await self.pipeline.message(txn, raw)
                if verdict.action is Action.ACCEPT:
                    verdict = await self.pipeline.deliver(txn, raw)
        except Exception:
            log.exception("id=%s internal error at DATA", txn.id)
            metrics.internal_errors.labels("data").inc()
            verdict = INTERNAL_ERROR
        finally:
            state.in_data = False
        if state.txn is txn:
            state.txn = None
            try:
                await self.pipeline.finish(txn, verdict)
            except Exception:
                log.exception("id=%s finishing the transaction failed", txn.id)
        return verdict.reply()

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await self._reset(server)
        return "250 2.0.0 Ok"

    async def _reset(self, server: SMTP) -> None:
        """RSET, and HELO/EHLO, which reset a transaction too (RFC 5321 4.1.4) as aiosmtpd's
        envelope does: ours ends here, its downstream side reset."""
        state = self._state(server)
        if state.txn is not None:
            txn, state.txn = state.txn, None
            await self.pipeline.finish(txn, Verdict(Action.TEMPFAIL, 250, "2.0.0", "reset", reason="rset"))

    async def handle_exception(self, error: Exception) -> str:
        """Anything aiosmtpd itself did not expect: 451, never its default 500."""
        metrics.internal_errors.labels("session").inc()
        log.error("internal error in SMTP session: %r", error, exc_info=error)
        return INTERNAL_ERROR.reply()

    def _internal_error(self, state: _Session) -> str:
        metrics.internal_errors.labels("command").inc()
        log.exception("conn=%s internal error", state.conn.id)
        return INTERNAL_ERROR.reply()


# aiosmtpd asks inspect.signature() on every connection which of its two handle_EHLO styles
# this is; a stored signature makes that a look-up (10 µs, 1 % of the proxy's CPU).
ProxyHandler.handle_EHLO.__signature__ = inspect.signature(ProxyHandler.handle_EHLO)  # type: ignore[attr-defined]


class SmtpProxy:
    """The listening server, with a graceful stop: finish in-flight DATA, then 421."""

    def __init__(self, pipeline: Pipeline, settings: SmtpSettings) -> None:
        self.settings = settings
        self.handler = ProxyHandler(pipeline, settings)
        self.server: asyncio.Server | None = None

    def _tls(self) -> ssl.SSLContext | None:
        if not self.settings.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.settings.tls_cert), str(self.settings.tls_key or self.settings.tls_cert))
        return ctx

    async def start(self) -> tuple[str, int]:
        host, port = split_hostport(self.settings.listen)
        tls = self._tls()
        s = self.settings
        loop = asyncio.get_running_loop()  # given, or aiosmtpd looks it up per connection

        def factory() -> QueueguardSMTP:
            return QueueguardSMTP(
                self.handler, data_size_limit=s.max_message_size, enable_SMTPUTF8=True, decode_data=False,
                hostname=s.hostname or None, ident="queueguard ESMTP", tls_context=tls,
                require_starttls=s.require_tls, timeout=s.data_timeout,
                proxy_protocol_timeout=5.0 if s.proxy_protocol_inbound else None, loop=loop,
            )

        self.server = await loop.create_server(factory, host, port, reuse_address=True)
        sock = self.server.sockets[0].getsockname()
        log.info("smtp proxy listening on %s:%s", sock[0], sock[1])
        return str(sock[0]), int(sock[1])

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting; let messages already in DATA finish within `grace`; then 421 everyone."""
        if self.server is None:
            return
        self.server.close()
        self.handler.closing = True
        deadline = time.monotonic() + (self.settings.shutdown_grace if grace is None else grace)
        while self.handler.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for proto in list(self.handler.sessions):
            transport = proto.transport
            if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
                with contextlib.suppress(Exception):
                    transport.write(SHUTTING_DOWN.encode() + b"\r\n")
                    transport.close()
        await asyncio.sleep(0)
        if self.handler._pending:
            await asyncio.gather(*self.handler._pending, return_exceptions=True)
        await self.server.wait_closed()
