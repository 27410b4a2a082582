"""Before-queue SMTP proxy front end: SMTP at the protocol level, translated into Session calls.

Translates SMTP into the pipeline's Session calls and verdicts back into replies, nothing more:
syntax (smtp_syntax), the PROXY header (proxy_header), the greeting, DATA's framing and sizes are
SMTP's; every decision about a transaction is the Session's, and whether one is open (MAIL given,
a recipient taken) is read from the Session, never kept twice. The sender gets 250 for a message
only after a downstream said 250 for it (or it was durably quarantined): the Session mirrors
MAIL/RCPT onto the downstream as they arrive, and relays DATA once the whole message is in and
checked.

Why not aiosmtpd (the first front end): a coroutine, a stream reader and a timer per command cost
0.7 ms of CPU per message (bench/frontend_cost.py), more than the checks themselves. Here one
asyncio.Protocol reads commands from its buffer as they arrive; only a command that asks the
Session something runs as a task, and the replies answered without one leave together.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

from queueguard import metrics
from queueguard.frontends.eager import run_eagerly
from queueguard.frontends.proxy_header import ProxyHeaderError, parse_proxy_header
from queueguard.frontends.smtp_syntax import (
    BAD_HELO,
    COMMAND_LIMIT,
    SIZE_EXCEEDED,
    mail_params,
    parse_path,
    rcpt_params,
    strip_keyword,
    valid_address,
    valid_helo,
)
from queueguard.model import Connection, IPAddress, parse_ip
from queueguard.pipeline import End, Outcome, Pipeline, Session
from queueguard.settings import SmtpSettings, split_hostport
from queueguard.verdict import INTERNAL_ERROR, Verdict

log = logging.getLogger("queueguard.smtp")

FRONTEND = "smtp"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
READ_LIMIT = 16 * 1024
"""Command bytes held unread while a command is answered; past twice this, reading pauses."""
TLS_NOT_OFFERED = "503 5.5.1 STARTTLS command used when not advertised"
PROXY_TIMEOUT = 5.0
"""Seconds a configured load balancer has to send its PROXY header."""
PROXY_FORGED = "554 5.7.0 PROXY header not accepted from this address"
AUTH_NOT_OFFERED = "503 5.5.1 AUTH command used when not advertised"
BOGUS_LIMIT = 5
"""Unknown commands and lines that are no command a client may send before it is told goodbye
(Exim: 3 by smtp_max_unknown_commands and smtp_max_synprot_errors)."""
JUNK_LIMIT = 100
"""NOOP, RSET, VRFY, EXPN and HELP a client may send between messages before it is told goodbye
(Postfix's smtpd_junk_command_limit): otherwise a client holds a connection slot, and has us
answer, for ever without sending mail."""
JUNK = frozenset({"NOOP", "RSET", "VRFY", "EXPN", "HELP"})
ALLOWED_BEFORE_STARTTLS = frozenset({"NOOP", "EHLO", "STARTTLS", "QUIT"})
END_OF_DATA = b"\r\n.\r\n"


def greeting_refusal(verdict: Verdict) -> str:
    """A refusal at connect time as SMTP allows it before the greeting: 421, then we close."""
    return f"421 {verdict.status or '4.3.0'} {verdict.text}"


class Phase(enum.Enum):
    PROXY = "proxy"
    """Waiting for a load balancer's PROXY header."""
    COMMAND = "command"
    DATA = "data"
    """Between 354 and the end of the message."""
    HANDSHAKE = "handshake"
    """STARTTLS: between our 220 and the end of the TLS handshake."""


class SmtpConnection(asyncio.Protocol):
    """One client connection: its buffer, its SMTP state, and the Session that judges it.

    Commands are taken from the buffer one at a time, in order. One that asks the Session runs as
    a task, and nothing after it is read until its reply is written (RFC 2920: replies in order).
    """

    def __init__(self, proxy: SmtpProxy) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.buffer = bytearray()
        self.out: list[bytes] = []
        self.out_size = 0
        self.phase = Phase.COMMAND
        self.task: asyncio.Future[str | None] | None = None
        self.closed = False
        """Nothing more is read or answered (QUIT, a refusal, the client gone)."""
        self.lost = False
        self.eof = False
        self.write_paused = False
        self.read_paused = False
        self.skipping = False
        """Inside a command line that is too long: dropped up to its end, then 500."""
        self.bogus = BOGUS_LIMIT
        self.junk = 0
        """JUNK commands since the last message."""
        self.extended = False
        self.tls = False
        self.data = bytearray()
        self.data_scanned = 0
        self.data_too_much = False
        self.proxied = False
        self.timeout = proxy.settings.data_timeout
        self.last_activity = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # --- the connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a socket's; uvloop's are no subclass
        peer = transport.get_extra_info("peername") or ("", 0)
        conn = Connection(parse_ip(str(peer[0])), int(peer[1]) if len(peer) > 1 else 0)
        self.session = self.proxy.opened(self, conn)
        # A PROXY header is required from the configured load balancers and believed from nobody
        # else (anyone could claim to be 127.0.0.1).
        if self.proxy.proxy_peer(conn.client_ip):
            self.phase = Phase.PROXY
            self.timer = self.loop.call_later(PROXY_TIMEOUT, self._proxy_timed_out)
            return
        self._arm(self.timeout)
        self._start(self._greet(), eager=True)
        if self.task is None:
            self._run()  # the greeting is ready: written now

    def connection_lost(self, error: Exception | None) -> None:
        self._gone()

    def _gone(self) -> None:
        """The client is gone: once per connection, from connection_lost or from a failed TLS
        handshake (asyncio tells no protocol of a socket lost mid-handshake)."""
        if self.lost:
            return
        self.lost = self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()  # a message's settling is shielded from this (Session.data)
        try:
            if self.phase is Phase.PROXY and self.buffer:
                self._proxy_missing()  # a partial header; one closed before any byte is a TCP health check
        finally:
            self.proxy.closed(self)  # the Session ends even if counting fails

    def eof_received(self) -> bool | None:
        """The client is done sending: on a plain socket what it sent is still answered, then the
        connection closes. A TLS connection cannot half-close: it closes now, as when it is lost."""
        self.eof = True
        self._run()
        return not self.tls  # True keeps a plain socket open for the replies; TLS cannot half-close

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._run()

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.DATA:
            self.data += data
        elif self.phase is Phase.HANDSHAKE and self.transport is not None and self.transport.get_protocol() is self:
            return  # plaintext after STARTTLS, before TLS took the socket: never commands (CVE-2011-0411)
        else:
            self.buffer += data
        if self.phase is not Phase.PROXY:
            self.last_activity = self.loop.time()
        self._run()

    # --- timers --------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        """An idle timeout of `seconds` from now; any bytes from the client restart it (a large
        message still arriving is not cut off). A timer already due no later is kept: it finds
        the new deadline when it fires (_timed_out), so a message does not cost a timer per stage."""
        if self.closed:
            return
        self.timeout = seconds
        self.last_activity = now = self.loop.time()
        if self.timer is not None:
            if self.timer.when() <= now + seconds:
                return
            self.timer.cancel()
        self.timer = self.loop.call_at(now + seconds, self._timed_out)

    def _timed_out(self) -> None:
        due = self.last_activity + self.timeout
        if due > self.loop.time():
            self.timer = self.loop.call_at(due, self._timed_out)
            return
        self.timer = None
        log.info("connection from %s timed out", self.session.conn.client_ip if self.session else "?")
        self._abort()

    def _proxy_timed_out(self) -> None:
        """The balancer's 5 s for its header are not extended by the bytes it trickles."""
        self.timer = None
        if self.phase is Phase.PROXY:
            self._proxy_missing()
            self._abort()

    def _proxy_missing(self) -> None:
        """Counted and logged once per connection: a load balancer that sends no valid header is
        misconfigured, and every client would otherwise look like the balancer itself."""
        self.phase = Phase.COMMAND
        metrics.protocol_errors.labels("proxy_missing").inc()
        client = self.session.conn.client_ip if self.session else "?"
        log.warning("connection from load balancer %s closed: no valid PROXY header", client)

    # --- the command loop ------------------------------------------------------------------------

    def _run(self) -> None:
        """Answer what the buffer holds, in order, until a command must wait for the Session."""
        while self.task is None and not self.closed:
            if self.phase is Phase.DATA:  # even while our replies wait to be read: the size limit holds
                if not self._data_end():
                    break
                continue
            if self.write_paused:
                break
            if self.phase is Phase.PROXY:
                if not self._proxy_header():
                    break
                continue
            if self.phase is Phase.HANDSHAKE:
                break
            nl = self.buffer.find(b"\n")
            if nl < 0:
                if len(self.buffer) > COMMAND_LIMIT + 1:
                    self.skipping = True
                    self.buffer.clear()
                break
            line = bytes(self.buffer[:nl + 1])
            del self.buffer[:nl + 1]
            if self.skipping:
                self.skipping = False
                self._reply("500 Command line too long")
                continue
            try:
                self._command(line)
            except Exception as error:  # a bug of ours: 451, never a dropped connection
                self._internal_error(error)
            if self.out_size >= READ_LIMIT:  # replies to a flood of pipelined junk: written, then paced
                self._flush()
        self._flush()
        if self.closed or self.transport is None:
            return
        if self.eof and self.task is None and self.phase is not Phase.HANDSHAKE and (
                self.phase is not Phase.COMMAND or self.buffer.find(b"\n") < 0):
            self._close()  # the client left; a message it did not finish is ended by closed()
        elif self.phase is Phase.HANDSHAKE:
            return  # start_tls owns the socket's reading
        elif (self.task is not None or self.write_paused) and len(self.buffer) > 2 * READ_LIMIT:
            if not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()
        elif self.read_paused and len(self.buffer) <= READ_LIMIT:
            self.read_paused = False
            self.transport.resume_reading()

    def _reply(self, text: str) -> None:
        line = text.encode("utf-8", "surrogateescape") + b"\r\n"
        self.out.append(line)
        self.out_size += len(line)

    def _flush(self) -> None:
        if self.out:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"".join(self.out))
            self.out.clear()
            self.out_size = 0

    def _close(self) -> None:
        """Write what is owed and hang up; nothing the client sent after this is read."""
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        """Hang up without writing what is pending: a client that does not read would otherwise
        hold the connection (and its replies) forever."""
        self.closed = True
        self.out.clear()
        if self.transport is not None:
            self.transport.abort()

    def _start(self, work: Coroutine[Any, Any, str | None], *, eager: bool = False) -> None:
        """Run a Session call; its reply is written, and the buffer read on, when it is done.
        `eager` for calls that seldom wait and need no current task before they do (eager.py):
        one that does not wait is answered here, in the loop that read its command."""
        self._flush()
        if not eager:
            self.task = self.loop.create_task(work)
            self.task.add_done_callback(self._done)
            return
        ran = run_eagerly(self.loop, work)
        if ran.done():
            self._answer(ran)
        else:
            self.task = ran
            ran.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[str | None]) -> None:
        self.task = None
        if self._answer(task) and not self.closed:
            self._run()

    def _answer(self, task: asyncio.Future[str | None]) -> bool:
        """The reply of a finished Session call; False if it was cancelled (the client is gone)."""
        if task.cancelled():
            return False
        error = task.exception()
        if error is not None:
            self._internal_error(error)  # logged even when the client has left
        elif (reply := task.result()) is not None:
            self._reply(reply)
        return True

    def _internal_error(self, error: BaseException) -> None:
        with contextlib.suppress(Exception):  # a broken metrics store must not hide the 451
            metrics.internal_errors.labels("session").inc()
        log.error("internal error in SMTP session: %r", error, exc_info=error)
        if not self.closed:
            self._reply(INTERNAL_ERROR.reply())

    def _command(self, line: bytes) -> None:
        line = line.rstrip(b"\r\n")
        verb, _, arg_bytes = line.partition(b" ")
        try:
            command = verb.upper().decode("ascii")
        except UnicodeDecodeError:
            command = ""
        if not command:
            self._bogus("500 Error: bad syntax")
            return
        arg = arg_bytes.strip().decode("utf-8", "surrogateescape") if arg_bytes else None
        if len(line) > COMMAND_LIMIT:
            self._reply("500 Command line too long")
            return
        if self.proxy.settings.require_tls and not self.tls and command not in ALLOWED_BEFORE_STARTTLS:
            # settings refuse require_tls without tls_cert: STARTTLS is on offer here
            self._reply("530 Must issue a STARTTLS command first")
            return
        handler = COMMANDS.get(command)
        if handler is None:
            self._bogus(f'500 Error: command "{command}" not recognized')
            return
        if command in JUNK:
            self.junk += 1
            if self.junk > JUNK_LIMIT:
                metrics.protocol_errors.labels("junk_commands").inc()
                self._reply("421 4.7.0 Too many commands without mail, closing connection")
                self._close()
                return
        handler(self, arg)

    def _bogus(self, reply: str) -> None:
        self.bogus -= 1
        if self.bogus < 1:
            metrics.protocol_errors.labels("unknown_commands").inc()
            self._reply("502 5.5.1 Too many unrecognized commands, goodbye.")
            self._close()
        else:
            self._reply(reply)

    def _need_helo(self) -> bool:
        if self.session is None or not self.session.conn.helo:  # set by Session.helo
            self._reply("503 5.5.1 Error: send HELO first")
            return True
        return False

    @property
    def _has_recipient(self) -> bool:
        txn = self.session.txn if self.session is not None else None
        return txn is not None and bool(txn.recipients)

    def _syntax_error(self, usage: str) -> str:
        return f"501 Syntax: {usage}" + (" [SP <mail-parameters>]" if self.extended else "")

    def _path(self, keyword: str, arg: str | None, syntax_error: str) -> tuple[str, str] | None:
        """MAIL's or RCPT's address and parameters; None once the client was told what is wrong."""
        path = strip_keyword(keyword, arg) if arg is not None else None
        address, rest = parse_path(path) if path is not None else ("", "")
        if address is None:
            self._reply("553 5.1.3 Error: malformed address")
        elif not address or (rest and not self.extended):
            self._reply(syntax_error)
        else:
            return address, rest
        return None

    # --- commands --------------------------------------------------------------------------------

    def smtp_helo(self, arg: str | None) -> None:
        self._hello(arg, extended=False)

    def smtp_ehlo(self, arg: str | None) -> None:
        self._hello(arg, extended=True)

    def _hello(self, hostname: str | None, *, extended: bool) -> None:
        if not hostname:
            self._reply(f"501 Syntax: {'EHLO' if extended else 'HELO'} hostname")
            return
        if not valid_helo(hostname):  # refused: the session stays as it was (RFC 5321 4.1.4)
            metrics.protocol_errors.labels("bad_helo").inc()
            self._reply(BAD_HELO)
            return
        self._start(self._helo(hostname, extended), eager=True)

    async def _helo(self, hostname: str, extended: bool) -> str:
        assert self.session is not None
        await self.session.helo(hostname)
        self.extended = extended
        name = self.proxy.hostname
        if not extended:
            return f"250 {name}"
        # PIPELINING (RFC 2920): commands are taken from the buffer in order, each answered
        # before the next is read, so a group costs the sender one round trip, not one a command.
        lines = [name, f"SIZE {self.proxy.settings.max_message_size}", "8BITMIME", "SMTPUTF8", "PIPELINING"]
        if self.proxy.tls_context is not None and not self.tls:
            lines.append("STARTTLS")
        return "".join(f"250-{line}\r\n" for line in lines) + "250 HELP"

    def smtp_mail(self, arg: str | None) -> None:
        if self._need_helo():
            return
        syntax_error = self._syntax_error("MAIL FROM: <address>")
        path = self._path("FROM:", arg, syntax_error)
        if path is None:
            return
        address, rest = path
        if self.session is not None and self.session.txn is not None:
            self._reply("503 5.5.1 Error: nested MAIL command")
        else:
            params = mail_params(rest, self.proxy.settings.max_message_size, syntax_error)
            if params.error == SIZE_EXCEEDED:
                metrics.protocol_errors.labels("oversize").inc()
            if params.error:
                self._reply(params.error)
            elif self.proxy.closing:
                self._reply(SHUTTING_DOWN)
            elif not valid_address(address, allow_null=True):
                metrics.protocol_errors.labels("bad_address").inc()
                self._reply("501 5.1.7 Bad sender address syntax")
            else:
                self._start(self._mail(address, params.options), eager=True)

    async def _mail(self, address: str, options: list[str]) -> str:
        assert self.session is not None
        verdict = await self.session.mail(address, options)
        return verdict.reply() if verdict.final else "250 2.1.0 Ok"

    def smtp_rcpt(self, arg: str | None) -> None:
        if self._need_helo():
            return
        txn = self.session.txn if self.session is not None else None
        if txn is None:
            self._reply("503 5.5.1 Error: need MAIL command")
            return
        syntax_error = self._syntax_error("RCPT TO: <address>")
        path = self._path("TO:", arg, syntax_error)
        if path is None:
            return
        address, rest = path
        if error := rcpt_params(rest, syntax_error):
            self._reply(error)
        elif not valid_address(address, allow_null=False):
            metrics.protocol_errors.labels("bad_address").inc()
            self._reply("501 5.1.3 Bad recipient address syntax")
        elif len(txn.recipients) >= self.proxy.settings.max_recipients:
            self._reply("452 4.5.3 Too many recipients")
        else:
            self._start(self._rcpt(address))

    async def _rcpt(self, address: str) -> str:
        assert self.session is not None
        verdict = await self.session.rcpt(address, [])
        if verdict.final or (verdict.code == 250 and verdict.text != "Ok"):
            return verdict.reply()
        return "250 2.1.5 Ok"

    def smtp_data(self, arg: str | None) -> None:
        if self._need_helo():
            return
        if not self._has_recipient:
            self._reply("503 5.5.1 Error: need RCPT command")
        elif arg:
            self._reply("501 Syntax: DATA")
        else:
            self._reply("354 End data with <CR><LF>.<CR><LF>")
            self.phase = Phase.DATA
            # DATA starts a line: a virtual line end in front of it finds a first-line dot too
            self.data = bytearray(b"\r\n") + self.buffer
            self.buffer.clear()
            self.data_scanned = 0
            self.data_too_much = False

    def _data_end(self) -> bool:
        """The message up to CRLF.CRLF, dot-unstuffed (RFC 5321 4.5.2): only that exact sequence
        ends DATA (any other dot stays content, for hygiene to judge). A line may be as long as
        the message may be large (Exim and Postfix take newsletters with lines of many kilobytes);
        past the size limit the rest is drained, not kept, and the answer is 552 after the data is
        in (RFC 5321 4.2.5). True once the message is in."""
        work = self.data
        end = work.find(END_OF_DATA, self.data_scanned)
        limit = self.proxy.settings.max_message_size
        if end < 0:
            # the limit is on the message, not on the wire: dot-stuffing adds at most a byte to a
            # 3-byte line (4/3), and the last 4 bytes may begin the terminator
            if limit and len(work) - 6 > limit * 4 // 3:
                self.data_too_much = True
                del work[:-4]
            self.data_scanned = max(0, len(work) - 4)
            return False
        self.buffer[:0] = work[end + 5:]  # commands pipelined after the data
        self.phase = Phase.COMMAND
        self.data = bytearray()
        if self.data_too_much:
            self._start(self._refuse_data(End.OVERSIZE))
            return True
        del work[end + 2:]
        if work.find(b"\r\n.") >= 0:  # dot-stuffed lines
            work = work.replace(b"\r\n.", b"\r\n")
        if limit and len(work) - 2 > limit:
            self._start(self._refuse_data(End.OVERSIZE))
        else:
            self._message(bytes(memoryview(work)[2:]))
        return True

    async def _refuse_data(self, why: End) -> str:
        assert self.session is not None
        verdict = await self.session.end(why)
        return verdict.reply() if verdict is not None else INTERNAL_ERROR.reply()

    def _message(self, content: bytes) -> None:
        """The Session's answer; the transaction stays open on it until then, so a client
        vanishing mid-way is ended by closed(). Waited for without a Task of ours (~8 µs a Task):
        the Session settles the message in its own, and `reply` stands for the wait."""
        assert self.session is not None
        # Checks and relay get the whole budget; the relay's own DATA timeout (data_timeout)
        # expires first, so the client always hears our 451 rather than a silent close.
        self._arm(self.proxy.settings.data_timeout + 60)
        self.junk = 0
        self._flush()
        reply: asyncio.Future[str | None] = self.loop.create_future()
        self.task = reply
        reply.add_done_callback(self._done)
        try:
            settled = self.session.data(content)
        except Exception as error:  # a bug of ours: 451, as from a Task
            reply.set_exception(error)
            return
        # The client gone (_gone cancels `reply`): the wait is cancelled as a Task's would be, and
        # Session.data's shield keeps a relayed message settling to its end.
        reply.add_done_callback(lambda _: settled.cancel() if reply.cancelled() else None)
        settled.add_done_callback(functools.partial(self._settled, reply))

    def _settled(self, reply: asyncio.Future[str | None], outcome: asyncio.Future[Outcome]) -> None:
        """The message's outcome as `reply`'s result: the verdict's reply line, or the error (451)."""
        try:
            self._arm(self.proxy.settings.data_timeout)
            error = None if outcome.cancelled() else outcome.exception()  # retrieved even if unused
            if reply.done():
                return  # the client is gone
            if outcome.cancelled():
                reply.cancel()
            elif error is not None:
                reply.set_exception(error)
            else:
                reply.set_result(outcome.result().verdict.reply())
        except Exception as error:
            if not reply.done():
                reply.set_exception(error)

    def smtp_rset(self, arg: str | None) -> None:
        if arg:
            self._reply("501 Syntax: RSET")
            return
        self._start(self._rset())

    async def _rset(self) -> str:
        assert self.session is not None
        await self.session.end(End.RSET)
        return "250 2.0.0 Ok"

    def smtp_noop(self, arg: str | None) -> None:
        self._reply("250 OK")

    def smtp_quit(self, arg: str | None) -> None:
        if arg:
            self._reply("501 Syntax: QUIT")
            return
        self._reply("221 Bye")
        self._close()

    def smtp_vrfy(self, arg: str | None) -> None:
        if not arg:
            self._reply("501 Syntax: VRFY <address>")
        elif parse_path(arg)[0] is None:
            self._reply("502 5.5.2 Could not VRFY that address")
        else:
            self._reply("252 Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_expn(self, arg: str | None) -> None:
        self._reply("502 EXPN not implemented")

    def smtp_help(self, arg: str | None) -> None:
        names = sorted(n for n in COMMANDS if n not in ("AUTH", "PROXY")
                       and (n != "STARTTLS" or self.proxy.tls_context is not None))
        code = 501 if arg and arg.upper() not in names else 250
        self._reply(f"{code} Supported commands: {' '.join(names)}")

    def smtp_auth(self, arg: str | None) -> None:
        """The proxy is an MX and authenticates nobody: AUTH is not offered and gets what Exim
        answers when it is not."""
        metrics.protocol_errors.labels("auth_not_offered").inc()
        self._reply(AUTH_NOT_OFFERED)

    def smtp_starttls(self, arg: str | None) -> None:
        """STARTTLS where it is not offered is refused, as Exim does: once TLS is on (RFC 3207
        4.2), and without a certificate (503 says do not retry)."""
        context = self.proxy.tls_context
        if self.tls or context is None:
            metrics.protocol_errors.labels("starttls_not_offered").inc()
            self._reply(TLS_NOT_OFFERED)
            return
        if arg:
            self._reply("501 Syntax: STARTTLS")
            return
        self._reply("220 Ready to start TLS")
        self.buffer.clear()  # pipelined after STARTTLS: plaintext, never commands (CVE-2011-0411)
        self.phase = Phase.HANDSHAKE
        self._start(self._starttls(context))

    async def _starttls(self, context: ssl.SSLContext) -> None:
        """A new session state once TLS is up (RFC 3207 4.2): no HELO, no transaction; the same
        client (the PROXY-given address survives)."""
        assert self.transport is not None and self.session is not None
        try:
            transport = await self.loop.start_tls(self.transport, self, context, server_side=True)
        except Exception as error:  # SSLError, a reset, asyncio's handshake timeout
            log.info("TLS handshake with %s failed: %r", self.session.conn.client_ip, error)
            transport = None
        if transport is None:
            self.transport.abort()
            self._gone()
            return None
        self.transport = transport
        self.tls = self.session.conn.tls = True
        self.extended = False
        self.phase = Phase.COMMAND
        await self.session.end(End.ABANDONED)  # logged with the HELO it was opened under
        self.session.conn.helo = ""
        return None

    def smtp_proxy(self, arg: str | None) -> None:
        """A PROXY header as a command: from a peer that is not a configured load balancer (a
        forged client address), or a second one from a balancer (after the first, where only
        the client can have put it). Refused, logged and counted, and the connection closed."""
        metrics.protocol_errors.labels("proxy_forged").inc()
        why = "a second one on this connection" if self.proxied else "not in smtp.proxy_protocol_from"
        client = self.session.conn.client_ip if self.session else "?"
        log.warning("PROXY header from %s refused (%s): %s", client, why, (arg or "")[:100])
        self._reply(PROXY_FORGED)
        self._close()

    # --- the greeting ----------------------------------------------------------------------------

    def _proxy_header(self) -> bool:
        """The balancer's header names the real client. One without a source (UNKNOWN, LOCAL, a
        unix socket) means, by the spec, the connection's own endpoints: the balancer stays the
        client, so limits still count it and the downstream is told an address."""
        assert self.session is not None
        try:
            header = parse_proxy_header(bytes(self.buffer))
        except ProxyHeaderError as error:
            log.info("invalid PROXY header from %s: %s", self.session.conn.client_ip, error)
            self._proxy_missing()
            self._close()
            return False
        if header is None:
            return False
        del self.buffer[:header.length]
        self.proxied = True
        ip = parse_ip(header.source[0]) if header.source is not None else None
        if ip is not None and header.source is not None:
            self.session.conn.client_ip, self.session.conn.client_port = ip, header.source[1]
        self.phase = Phase.COMMAND
        if self.timer is not None:  # the header's own timer (_proxy_timed_out): the idle one replaces it
            self.timer.cancel()
            self.timer = None
        self._arm(self.proxy.settings.data_timeout)
        self._start(self._greet(), eager=True)
        return True

    async def _greet(self) -> str | None:
        """The connect stage, once the real client is known (after PROXY): the greeting, or a
        refusal (421, then we close)."""
        assert self.session is not None
        verdict = await self.session.connect()
        if verdict.final:
            self._reply(greeting_refusal(verdict))
            self._close()
            return None
        return f"220 {self.proxy.hostname} queueguard ESMTP"


COMMANDS: dict[str, Callable[[SmtpConnection, str | None], None]] = {
    "HELO": SmtpConnection.smtp_helo, "EHLO": SmtpConnection.smtp_ehlo, "MAIL": SmtpConnection.smtp_mail,
    "RCPT": SmtpConnection.smtp_rcpt, "DATA": SmtpConnection.smtp_data, "RSET": SmtpConnection.smtp_rset,
    "NOOP": SmtpConnection.smtp_noop, "QUIT": SmtpConnection.smtp_quit, "VRFY": SmtpConnection.smtp_vrfy,
    "EXPN": SmtpConnection.smtp_expn, "HELP": SmtpConnection.smtp_help, "AUTH": SmtpConnection.smtp_auth,
    "STARTTLS": SmtpConnection.smtp_starttls, "PROXY": SmtpConnection.smtp_proxy,
}


class SmtpProxy:
    """The listening server and what its connections share, with a graceful stop: finish
    in-flight DATA, then 421."""

    def __init__(self, pipeline: Pipeline, settings: SmtpSettings, *, reuse_port: bool = False) -> None:
        """`reuse_port`: several worker processes listen on the port; the kernel spreads connections."""
        self.pipeline = pipeline
        self.settings = settings
        self.reuse_port = reuse_port
        self.hostname = settings.hostname or socket.getfqdn()
        self.proxy_networks = [ipaddress.ip_network(n, strict=False) for n in settings.proxy_protocol_from]
        self.tls_context = self._tls()
        self.sessions: dict[SmtpConnection, Session] = {}
        self.closing = False
        self.server: asyncio.Server | None = None
        self._pending: set[asyncio.Future[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _tls(self) -> ssl.SSLContext | None:
        if not self.settings.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.settings.tls_cert), str(self.settings.tls_key or self.settings.tls_cert))
        return ctx

    def proxy_peer(self, ip: IPAddress | None) -> bool:
        """The peer is a configured load balancer (smtp.proxy_protocol_from)."""
        return ip is not None and any(ip in net for net in self.proxy_networks)

    def opened(self, conn: SmtpConnection, client: Connection) -> Session:
        metrics.connections.labels(FRONTEND).inc()
        metrics.connections_active.labels(FRONTEND).inc()
        session = self.sessions[conn] = self.pipeline.open(client)
        return session

    def closed(self, conn: SmtpConnection) -> None:
        session = self.sessions.pop(conn, None)
        if session is not None:
            metrics.connections_active.labels(FRONTEND).dec()
            closing = run_eagerly(self.loop, session.close())  # seldom waits: a Task only if it does
            if not closing.done():
                self._pending.add(closing)
                closing.add_done_callback(self._pending.discard)

    async def start(self) -> None:
        host, port = split_hostport(self.settings.listen)
        self.server = await self.loop.create_server(lambda: SmtpConnection(self), host, port, reuse_address=True,
                                                    reuse_port=self.reuse_port)
        sock = self.server.sockets[0].getsockname()
        log.info("smtp proxy listening on %s:%s", sock[0], sock[1])

    def in_flight(self) -> int:
        return sum(1 for s in self.sessions.values() if s.in_data)

    async def stop(self, grace: float) -> None:
        """Stop accepting; let messages already in DATA finish within `grace`; then 421 everyone."""
        if self.server is None:
            return
        self.server.close()
        self.closing = True
        deadline = time.monotonic() + grace
        while self.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn, session in list(self.sessions.items()):
            await session.end(End.SHUTDOWN)
            transport = conn.transport
            if transport is not None and not transport.is_closing():
                with contextlib.suppress(Exception):
                    transport.write(SHUTTING_DOWN.encode() + b"\r\n")
                    transport.close()
        await asyncio.sleep(0)
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self.server.wait_closed()
