"""Milter front end for Postfix and Sendmail: the milter protocol on the event loop.

A thin front end: each MTA command becomes a call on the pipeline's Session
for that MTA connection, and the verdict becomes milter replies. The packets
are read and written by an asyncio protocol on the loop that runs the
pipeline (the codec is `milter_protocol`): no libmilter threads handing each
callback to the loop and waiting for it, which was most of the milter's cost
(docs/benchmarks.md#milter), and no process-wide state, so tests run it
in-process.

The MTA is asked for what the pipeline uses and no more: no EOH, DATA or
unknown-command steps; only the macros `{tls_version}` (HELO) and
`{auth_authen}` (MAIL); and it waits for our answer only at RCPT and at the end
of the message. Headers, body chunks and HELO need none. A refusal of CONNECT
(memory pressure: shed) or of MAIL (Session.mail gives none today) is answered
at each RCPT instead: Postfix, told at CONNECT, refuses at MAIL or RCPT
anyway, and under shed the RCPT check refuses as well, so no mail's fate
changes while every message costs two round trips fewer (see
docs/benchmarks.md#milter for the counts).
Deadlines stay below Postfix's milter timeouts, so on a slow stage we answer
451 ourselves rather than let `milter_default_action` decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from queueguard import metrics
from queueguard.frontends import milter_protocol as mp
from queueguard.frontends.base import listening_socket
from queueguard.model import Connection, parse_ip
from queueguard.pipeline import End, Session
from queueguard.settings import milter_listen
from queueguard.verdict import INTERNAL_ERROR, Action, Verdict

if TYPE_CHECKING:
    from queueguard.pipeline import Pipeline
    from queueguard.settings import MilterSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

FRONTEND = "milter"
COMMAND_TIMEOUT = 25.0
"""Seconds for connect/MAIL/RCPT stages; Postfix's milter_command_timeout is 30 s."""
CONTENT_TIMEOUT = 280.0
"""Seconds for the content stage (scan included); Postfix's milter_content_timeout is 300 s."""
FINISH_TIMEOUT = 10.0
STOP_GRACE = 10.0
"""Seconds `stop` waits for stages already running."""
MAX_PACKET = 4 * 1024 * 1024
"""Largest packet we take (Postfix sends body chunks of 64 KiB and headers under 100 KiB)."""
PAUSE_AT = 1024 * 1024
"""Bytes read ahead of a running stage before we stop reading from the MTA."""
SWEEP = 0.5
"""Seconds between checks for stages past their deadline (so a deadline may be up to this late)."""
LOG_EVERY = 60.0
"""Seconds between two log lines about connections closed over milter.max_connections."""
MTA_GROUP = "postfix"
"""The unix socket's group when none is configured and this group exists (Postfix's smtpd runs in it)."""

PROTOCOL = (mp.SMFIP_NOEOH | mp.SMFIP_NODATA | mp.SMFIP_NOUNKNOWN | mp.SMFIP_NR_HDR | mp.SMFIP_NR_BODY
            | mp.SMFIP_NR_HELO | mp.SMFIP_NR_MAIL | mp.SMFIP_NR_CONN)
"""Steps we skip and steps the MTA need not wait for (see the module doc)."""
NO_MACROS = "{none}"
"""To Postfix an empty list means its own defaults (j, {daemon_name}, {rcpt_addr}, i, ...), so the
stages we need nothing at name a macro no MTA defines (it then sends an empty MACRO packet)."""
MACROS = {mp.STAGE_CONNECT: NO_MACROS, mp.STAGE_HELO: "{tls_version}", mp.STAGE_MAIL: "{auth_authen}",
          mp.STAGE_RCPT: NO_MACROS, mp.STAGE_DATA: NO_MACROS, mp.STAGE_EOM: NO_MACROS, mp.STAGE_EOH: NO_MACROS}
"""The macros the pipeline reads, per stage."""

QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
"""Linux: acknowledge at once (see MilterConnection.data_received); None elsewhere."""

_connections = metrics.connections.labels(FRONTEND)
_active = metrics.connections_active.labels(FRONTEND)
_protocol_errors = metrics.protocol_errors.labels("milter_protocol")


def client_from(hostname: str, family: str, port: int, address: str) -> Connection:
    """CONNECT's fields -> Connection; a bracketed hostname means no PTR name."""
    ip = parse_ip(address) if family in (mp.FAMILY_INET, mp.FAMILY_INET6) else None
    name = "" if hostname.startswith("[") or hostname == "unknown" else hostname
    return Connection(client_ip=ip, client_port=port if ip else 0, client_name=name, frontend=FRONTEND)


def header_line(name: str, value: bytes) -> bytes:
    """One header as it was on the wire: the MTA strips the space after the colon and CRs."""
    value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return name.encode("ascii", "surrogateescape") + b": " + value + b"\r\n"


def reply_args(verdict: Verdict) -> tuple[str, str, str]:
    """(code, status, text) of an SMFIR_REPLYCODE; Postfix turns '%%' back into '%' (Sendmail's
    format), and a reply is one line."""
    text = " ".join(verdict.text.split()).replace("%", "%%") or "-"
    code = str(verdict.code)
    if verdict.action is Action.TEMPFAIL and not code.startswith("4"):
        return "451", "4.3.0", text
    if verdict.action is Action.REJECT and not code.startswith("5"):
        return "550", "5.7.1", text
    return code, verdict.status or ("4.0.0" if code.startswith("4") else "5.0.0"), text


def remove_socket(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_socket():
            path.unlink()


def bind(settings: MilterSettings) -> socket.socket:
    """The milter's listening socket, a unix socket with the owner, group and mode of the
    settings. With `workers` the supervisor binds it and every worker accepts on it (a unix
    socket cannot be shared by SO_REUSEPORT)."""
    kind, where, port = milter_listen(settings.listen)
    if kind == "unix":
        path = Path(where)
        return listening_socket(path, lambda: set_permissions(path, settings))
    return listening_socket((where, port))


def set_permissions(path: Path, s: MilterSettings) -> None:
    """Owner, group and mode from the settings, so the MTA's user can connect (Postfix's smtpd
    runs as `postfix`); by default group `postfix` where it exists, mode 0660."""
    try:
        uid = pwd.getpwnam(s.socket_owner).pw_uid if s.socket_owner else -1
    except KeyError:
        raise OSError(f"milter socket {path}: no user {s.socket_owner!r} (milter.socket_owner)") from None
    group = s.socket_group
    if group is None:
        with contextlib.suppress(KeyError):
            group = grp.getgrnam(MTA_GROUP).gr_name
    try:
        gid = grp.getgrnam(group).gr_gid if group else -1
    except KeyError:
        raise OSError(f"milter socket {path}: no group {group!r} (milter.socket_group)") from None
    path.chmod(int(s.socket_mode, 8))
    if uid == -1 and gid == -1:
        return
    try:
        os.chown(path, uid, gid)
    except PermissionError:
        if s.socket_group is not None or s.socket_owner is not None:
            raise
        # The default group, as a user outside it: the MTA is refused (and tempfails) until
        # queueguard's user joins the group; say so rather than not start at all.
        log.warning("milter socket %s: cannot give it to group %s (add queueguard's user to that group, "
                    "or set milter.socket_group); the MTA cannot connect until then", path, group)


class MilterServer:
    """The listening socket and its MTA connections; each connection has one Session."""

    def __init__(self, pipeline: Pipeline, settings: MilterSettings, max_size: int,
                 sock: socket.socket | None = None) -> None:
        """`pipeline.hold_in_mta` is `quarantine: hold`: the MTA's hold queue keeps quarantined mail.
        `sock`: a listening socket bound by the supervisor and shared by every worker (see `bind`);
        without one the server binds its own and removes a unix socket's file at stop."""
        self.pipeline = pipeline
        self.sock = sock
        self.hold = pipeline.hold_in_mta
        self.settings = settings
        self.listen = settings.listen
        self.io_timeout = float(settings.timeout)
        self.max_size = max_size
        # CHGHDRS: forged <prefix>-* headers are deleted from every message we let through.
        self.actions = (mp.SMFIF_CHGHDRS | (mp.SMFIF_ADDHDRS if pipeline.add_headers else 0)
                        | (mp.SMFIF_QUARANTINE if self.hold else 0))
        self.server: asyncio.Server | None = None
        self.connections: set[MilterConnection] = set()
        self.busy = 0
        self._refused_logged = -LOG_EVERY
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self.sock or bind(self.settings)
        if sock.family == socket.AF_UNIX:
            self.server = await loop.create_unix_server(lambda: MilterConnection(self), sock=sock)
        else:
            self.server = await loop.create_server(lambda: MilterConnection(self), sock=sock)
        self._sweeper = loop.create_task(self._sweep())
        log.info("milter listening on %s (quarantine: %s)%s", self.listen, "hold" if self.hold else "store",
                 ", shared with the other workers" if self.sock is not None else "")

    def refused_connection(self) -> None:
        """Logged at most once a minute: a flood of connections must not become a flood of lines."""
        now = time.monotonic()
        if now - self._refused_logged >= LOG_EVERY:
            self._refused_logged = now
            log.warning("milter: %d connections open (milter.max_connections); closing new ones",
                        len(self.connections))

    @property
    def port(self) -> int:
        """The TCP port actually bound (for `inet:0@127.0.0.1` in tests)."""
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def in_flight(self) -> int:
        return self.busy

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop accepting, let stages already running finish (bounded), then close the MTA's
        connections: for a transaction still open the MTA applies its default action (tempfail)."""
        if self.server is None:
            return
        server, self.server = self.server, None
        server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.busy and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self.busy:
            log.warning("milter: %d stages still running after %.0fs", self.busy, grace)
        tasks = [c.task for c in self.connections if c.task is not None]
        for conn in list(self.connections):
            conn.close()
        if tasks:
            await asyncio.wait(tasks, timeout=FINISH_TIMEOUT)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1)
        kind, where, _ = milter_listen(self.listen)
        if kind == "unix" and self.sock is None:  # a shared socket is the supervisor's to remove
            remove_socket(Path(where))

    async def _sweep(self) -> None:
        """Stages past their deadline are cancelled (and answered 451); connections on which the
        MTA said nothing for `timeout` are closed. One timer for all connections: a deadline
        per stage (asyncio.timeout) was 6 % of the milter's CPU."""
        every = max(0.05, min(SWEEP, self.io_timeout / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            for conn in list(self.connections):
                if conn.deadline is not None and now > conn.deadline:
                    conn.expire()
                elif conn.waiting and now - conn.last_read > self.io_timeout:
                    log.info("milter: closing a connection idle for %.0fs", now - conn.last_read)
                    conn.close()


class MilterConnection(asyncio.Protocol):
    """One MTA connection: its packets, in order, become Session calls; verdicts become replies.
    Packets are parsed as they arrive and handled one after the other by one task."""

    def __init__(self, server: MilterServer) -> None:
        self.server = server
        self.pipeline = server.pipeline
        self.own_prefix = server.pipeline.header_prefix.lower() + "-"
        """Our verdict headers' names start so; a message's own copies of them are forged: deleted
        (the pipeline already judged the message without them)."""
        self.reader = mp.PacketReader(MAX_PACKET)
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.session: Session | None = None
        self.no_reply = 0
        """The negotiated SMFIP_NR_* flags: commands the MTA does not wait on."""
        self.macros: dict[str, str] = {}
        self.refused_connect: Verdict | None = None
        self.refused_mail: Verdict | None = None
        """Refusals of a CONNECT or MAIL the MTA did not wait for: answered at each RCPT instead."""
        self.headers = bytearray()
        self.own_headers: list[tuple[str, int]] = []
        """Our `<prefix>-*` header fields in the message, with each one's index among fields of its
        name (what CHGHEADER deletes by): only these, so a million other fields cost nothing here."""
        self.header_counts: dict[str, int] = {}
        self.body_parts = bytearray()
        self.size = 0
        self.too_big = False
        self.waiting = False
        self.last_read = 0.0
        self.deadline: float | None = None
        """When the running stage must have answered (loop time); None between stages."""
        self.quickack: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Future[None] | None = None
        self._expired = False
        self._wrote = False
        self._closed = False
        self._paused = False

    # --- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if len(self.server.connections) >= self.server.settings.max_connections:
            # Whoever can reach the socket could otherwise hold any number of sessions open; the
            # MTA takes a closed connection as a milter failure (milter_default_action: tempfail).
            metrics.connection_limits.labels("milter_max_connections").inc()
            self.server.refused_connection()
            transport.close()
            return
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Our EOM answer is several actions in one write, but never wait on Nagle either way.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.quickack = sock
        self.loop = loop = asyncio.get_running_loop()
        self.last_read = loop.time()
        self.server.connections.add(self)
        self.task = loop.create_task(self.run())

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        if self.reader.buffered > PAUSE_AT and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wakeup()

    def eof_received(self) -> bool:
        self._closed = True
        self._wakeup()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._wakeup()

    def _wakeup(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None and not wake.done():
            wake.set_result(None)

    def expire(self) -> None:
        """The running stage is past its deadline: cancel it (`_within` turns that into a timeout)."""
        self.deadline = None
        if self.task is not None:
            self._expired = True
            self.task.cancel()

    def close(self) -> None:
        """Drop the connection (shutdown, idle): the MTA applies its default action to an open
        transaction."""
        self._closed = True
        if self.transport is not None:
            self.transport.abort()
        self._wakeup()

    async def run(self) -> None:
        """Handle packets in order until QUIT, a protocol error or the MTA going away."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                packet = self.reader.next()
                if packet is None:
                    if self._closed:
                        return
                    if self._paused and self.transport is not None:
                        self._paused = False
                        self.transport.resume_reading()
                    if self.quickack is not None and not self._wrote:
                        self._ack_now()
                    self._wake = loop.create_future()
                    self.waiting = True
                    await self._wake
                    self.waiting = self._wrote = False
                    self.last_read = loop.time()
                    continue
                command, data = packet
                handler = HANDLERS.get(command)
                if handler is None:
                    raise mp.ProtocolError(f"unknown command {command:#x}")
                if not await handler(self, data):
                    return
        except mp.ProtocolError as e:
            _protocol_errors.inc()
            log.warning("milter: protocol error from the MTA, closing: %s", e)
        except Exception:
            metrics.internal_errors.labels("milter_connection").inc()
            log.exception("milter: connection failed")
        finally:
            self.waiting = False
            self.server.connections.discard(self)
            await self._close_session()
            if self.transport is not None:
                self.transport.close()

    def _ack_now(self) -> None:
        """Over TCP, acknowledge what we read and will not answer (packets the MTA does not wait
        on). Postfix writes a MACRO packet and then its command as two small segments on a socket
        without TCP_NODELAY: Nagle holds the second until the first is ACKed, and a delayed ACK
        costs 40 ms. Where we answer, the ACK rides on the answer and this syscall is saved."""
        assert self.quickack is not None and QUICKACK is not None
        with contextlib.suppress(OSError):
            self.quickack.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)

    # --- commands ---------------------------------------------------------------------------------

    async def on_optneg(self, data: bytes) -> bool:
        """Agree on what the MTA sends and waits for; refuse an MTA without the actions we need."""
        version, actions, protocol, _ = mp.parse_optneg(data)
        wanted = self.server.actions
        if version < 2:
            log.error("milter: the MTA speaks milter protocol %d, we need 2 or later; closing, so it applies "
                      "milter_default_action", version)
            return False
        if wanted & ~actions:
            log.error("milter: the MTA offers the actions %#x, we need %#x; closing, so it applies "
                      "milter_default_action", actions, wanted)
            return False
        agreed = PROTOCOL & protocol
        macros = None
        if version >= mp.VERSION and actions & mp.SMFIF_SETSYMLIST:
            wanted |= mp.SMFIF_SETSYMLIST
            macros = MACROS
        self.no_reply = agreed
        self.write(mp.optneg(min(version, mp.VERSION), wanted, agreed, macros))
        return True

    async def on_macro(self, data: bytes) -> bool:
        if len(data) > 1:  # most are empty: we asked for macros at two stages only
            self.macros.update(mp.parse_macros(data)[1])
        return True

    async def on_connect(self, data: bytes) -> bool:
        hostname, family, port, address = mp.parse_connect(data)
        await self._close_session()  # a second CONNECT on one connection (after QUIT_NC)
        _connections.inc()
        _active.inc()
        self.session = session = self.pipeline.open(client_from(hostname, family, port, address))
        verdict = await self._stage("connect", session.connect(), COMMAND_TIMEOUT)
        if self.no_reply & mp.SMFIP_NR_CONN:
            self.refused_connect = verdict if verdict.final else None
        else:
            self.write(self.answer(verdict))
        return True

    async def on_helo(self, data: bytes) -> bool:
        session = self._session()
        session.conn.tls = bool(self.macros.get("tls_version"))
        args = mp.split_strings(data)
        await self._quiet(session.helo(mp.text(args[0]) if args else ""))
        return self._continue(mp.HELO)

    async def on_mail(self, data: bytes) -> bool:
        self._reset_message()
        session = self._session()
        session.conn.authenticated = self.macros.get("auth_authen") or None
        args = [mp.text(a) for a in mp.split_strings(data)] or [""]
        verdict = await self._stage("mail", session.mail(args[0], args[1:]), COMMAND_TIMEOUT)
        if self.no_reply & mp.SMFIP_NR_MAIL:
            self.refused_mail = verdict if verdict.final else None
        else:
            self.write(self.answer(verdict))
        return True

    async def on_rcpt(self, data: bytes) -> bool:
        session = self._session()
        owed = self.refused_connect or self.refused_mail
        if owed is not None:
            verdict = owed
        elif session.txn is None:
            verdict = INTERNAL_ERROR
        else:
            args = [mp.text(a) for a in mp.split_strings(data)] or [""]
            verdict = await self._stage("rcpt", session.rcpt(args[0], args[1:]), COMMAND_TIMEOUT)
        if not self.no_reply & mp.SMFIP_NR_RCPT:
            self.write(self.answer(verdict))
        return True

    async def on_header(self, data: bytes) -> bool:
        name, value = mp.parse_header(data)
        key = name.lower()
        if key.startswith(self.own_prefix) and not self.too_big:
            n = self.header_counts[key] = self.header_counts.get(key, 0) + 1
            self.own_headers.append((name, n))
        self._keep(header_line(name, value), self.headers)
        return self._continue(mp.HEADER)

    async def on_body(self, data: bytes) -> bool:
        self._keep(data, self.body_parts)
        return self._continue(mp.BODY)

    async def on_eoh(self, data: bytes) -> bool:
        """EOH, DATA and unknown commands are negotiated away; an MTA that sends them anyway (it
        could not skip them) waits for an answer unless it offered not to."""
        return self._continue(mp.EOH)

    async def on_data(self, data: bytes) -> bool:
        return self._continue(mp.DATA)

    async def on_unknown(self, data: bytes) -> bool:
        return self._continue(mp.UNKNOWN)

    async def on_eom(self, data: bytes) -> bool:
        if data:
            self._keep(data, self.body_parts)
        self.write(await self.end_of_message())
        return True

    async def on_abort(self, data: bytes) -> bool:
        """The MTA ended the transaction (RSET, a refused DATA, the client gone); no reply."""
        self._reset_message()
        self.refused_mail = None
        if self.session is not None and self.session.txn is not None:  # Postfix aborts after each message too
            await self._quiet(self.session.end(End.MTA_ABORT))
        return True

    async def on_quit(self, data: bytes) -> bool:
        return False

    async def on_quit_nc(self, data: bytes) -> bool:
        """QUIT, and the MTA will use this connection for another SMTP session."""
        await self._close_session()
        return True

    # --- the transaction ------------------------------------------------------------------------

    async def end_of_message(self) -> bytes:
        """The data stage; the verdict as milter actions and the final reply."""
        session = self._session()
        if session.txn is None:
            return self.answer(INTERNAL_ERROR)
        raw = bytes(self.headers) + b"\r\n" + bytes(self.body_parts)
        too_big, own = self.too_big, self.own_headers
        self._reset_message()
        try:
            if too_big:
                refused: Verdict | None = await self._quiet(session.end(End.OVERSIZE))
                return self.answer(refused or INTERNAL_ERROR)
            self.server.busy += 1
            try:
                outcome = await self._within(session.data(raw), CONTENT_TIMEOUT)
            finally:
                self.server.busy -= 1
            deletes = b""
            if outcome.verdict.action in (Action.ACCEPT, Action.QUARANTINE):
                deletes = b"".join(mp.chgheader(idx, name) for name, idx in reversed(own))
            return deletes + self.answer(outcome.verdict, outcome.headers)
        except Exception:
            self._internal_error("eom")
            await self._quiet(session.end(End.MTA_ABORT))
            return self.answer(INTERNAL_ERROR)

    def answer(self, verdict: Verdict, headers: list[tuple[str, str]] | None = None) -> bytes:
        """A verdict as milter replies; `headers` only at end of message, where accepted mail
        gets them."""
        match verdict.action:
            case Action.TEMPFAIL | Action.REJECT:
                return mp.replycode(*reply_args(verdict))
            case Action.DISCARD:
                return mp.packet(mp.DISCARD)
            case Action.QUARANTINE if not self.server.hold:
                return mp.packet(mp.DISCARD)  # stored in our quarantine: the MTA must not deliver it
            case Action.QUARANTINE:
                reason = f"queueguard {verdict.rule or verdict.reason}"
                return self._add_headers(headers or []) + mp.quarantine(reason) + mp.packet(mp.ACCEPT)
            case _:
                if headers is None:
                    return mp.packet(mp.CONTINUE)
                return self._add_headers(headers) + mp.packet(mp.ACCEPT)

    def _add_headers(self, headers: list[tuple[str, str]]) -> bytes:
        return b"".join(mp.addheader(name, value) for name, value in headers)

    # --- helpers ----------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self._wrote = True

    def _continue(self, command: int) -> bool:
        """Answer a step the MTA waits on (one it offered no NR_* flag for)."""
        if not self.no_reply & mp.NO_REPLY[command]:
            self.write(mp.packet(mp.CONTINUE))
        return True

    def _session(self) -> Session:
        if self.session is None:  # a command before CONNECT (an MTA that skips it): count it too
            _connections.inc()
            _active.inc()
            self.session = self.pipeline.open(Connection(client_ip=None))
        return self.session

    async def _close_session(self) -> None:
        self._reset_message()
        self.refused_connect = self.refused_mail = None
        self.macros.clear()
        session, self.session = self.session, None
        if session is not None:
            _active.dec()
            await self._quiet(session.close())

    async def _stage(self, stage: str, step: Coroutine[Any, Any, Verdict], timeout: float) -> Verdict:
        """Run a connect/MAIL/RCPT stage with its deadline; any failure is a 451."""
        self.server.busy += 1
        try:
            return await self._within(step, timeout)
        except Exception:
            self._internal_error(stage)
            return INTERNAL_ERROR
        finally:
            self.server.busy -= 1

    async def _quiet(self, step: Coroutine[Any, Any, T]) -> T | None:
        """A bookkeeping call whose failure must not change the MTA's answer (logged)."""
        try:
            return await self._within(step, FINISH_TIMEOUT)
        except Exception:
            metrics.internal_errors.labels("milter_end").inc()
            log.exception("milter: ending a transaction failed")
            return None

    async def _within(self, step: Awaitable[T], timeout: float) -> T:
        """Await a pipeline step; TimeoutError once the sweeper finds it past `timeout` seconds."""
        assert self.loop is not None
        self.deadline = self.loop.time() + timeout
        try:
            return await step
        except asyncio.CancelledError:
            if not self._expired:
                raise
            self._expired = False
            if self.task is not None:
                self.task.uncancel()
            raise TimeoutError(f"no answer in {timeout:.0f}s") from None
        finally:
            self.deadline = None

    def _keep(self, data: bytes, into: bytearray) -> None:
        """Buffer message bytes up to the size limit; past it, remember to refuse at eom."""
        self.size += len(data)
        if self.size > self.server.max_size:
            self.too_big = True
        else:
            into += data

    def _reset_message(self) -> None:
        self.headers = bytearray()
        self.own_headers = []
        self.header_counts = {}
        self.body_parts = bytearray()
        self.size = 0
        self.too_big = False

    def _internal_error(self, stage: str) -> None:
        metrics.internal_errors.labels(f"milter_{stage}").inc()
        session = self.session
        txn = session.txn if session is not None else None
        log.exception("id=%s milter %s stage failed; answering 451", txn.id if txn else "-", stage)


Handler = Callable[[MilterConnection, bytes], Awaitable[bool]]
HANDLERS: dict[int, Handler] = {
    mp.HEADER: MilterConnection.on_header, mp.BODY: MilterConnection.on_body, mp.MACRO: MilterConnection.on_macro,
    mp.RCPT: MilterConnection.on_rcpt, mp.MAIL: MilterConnection.on_mail, mp.EOM: MilterConnection.on_eom,
    mp.HELO: MilterConnection.on_helo, mp.CONNECT: MilterConnection.on_connect,
    mp.OPTNEG: MilterConnection.on_optneg, mp.ABORT: MilterConnection.on_abort, mp.QUIT: MilterConnection.on_quit,
    mp.QUIT_NC: MilterConnection.on_quit_nc, mp.EOH: MilterConnection.on_eoh, mp.DATA: MilterConnection.on_data,
    mp.UNKNOWN: MilterConnection.on_unknown,
}
"""Each command's handler; True: read on, False: close the connection."""
