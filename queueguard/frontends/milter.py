"""Milter front end for Postfix and Sendmail (pymilter / libmilter).

A thin front end: each libmilter callback becomes a call on the pipeline's
Session for that MTA connection, and the verdict becomes milter actions.
libmilter owns the socket and runs each MTA connection's callbacks on a
thread of its own; every callback hands its stage to the asyncio loop with
`run_coroutine_threadsafe` and waits on the result with a deadline, so the
loop never blocks and we start no threads beyond libmilter's main loop.
Deadlines stay below Postfix's milter timeouts, so on a slow stage we answer
451 ourselves rather than let `milter_default_action` decide.

libmilter keeps process-wide state and cannot be started twice in one
process; tests run the milter in a `queueguard serve` subprocess.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import Milter

from queueguard import metrics
from queueguard.model import Connection, parse_ip
from queueguard.pipeline import End, Session
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
"""Seconds `stop` waits for callbacks already inside a stage."""

_started = False


def client_from(hostname: str, family: int, hostaddr: object) -> Connection:
    """libmilter's connect arguments -> Connection; a bracketed hostname means no PTR name."""
    ip = None
    port = 0
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(hostaddr, tuple) and hostaddr:
        ip = parse_ip(str(hostaddr[0]))
        port = int(hostaddr[1]) if len(hostaddr) > 1 else 0
    name = "" if hostname.startswith("[") or hostname == "unknown" else hostname
    return Connection(client_ip=ip, client_port=port, client_name=name, frontend=FRONTEND)


def header_line(name: str, value: bytes) -> bytes:
    """One header as it was on the wire: libmilter strips the space after the colon and CRs."""
    value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return name.encode("ascii", "surrogateescape") + b": " + value + b"\r\n"


def reply_args(verdict: Verdict) -> tuple[str, str, str]:
    """(code, status, text) for smfi_setreply; libmilter drops texts with a lone '%'."""
    text = " ".join(verdict.text.split()).replace("%", "%%") or "-"
    code = str(verdict.code)
    if verdict.action is Action.TEMPFAIL and not code.startswith("4"):
        return "451", "4.3.0", text
    if verdict.action is Action.REJECT and not code.startswith("5"):
        return "550", "5.7.1", text
    return code, verdict.status or ("4.0.0" if code.startswith("4") else "5.0.0"), text


def wake(spec: str) -> None:
    """Connect once to our own socket, so libmilter's listener leaves its poll."""
    kind, _, rest = spec.partition(":")
    try:
        if kind in ("unix", "local"):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(rest)
        elif kind in ("inet", "inet6"):
            port, _, host = rest.partition("@")
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1):
                pass
    except (OSError, ValueError):
        pass


class MilterServer:
    """Runs libmilter's main loop on one dedicated thread and bridges callbacks to the loop."""

    def __init__(self, pipeline: Pipeline, settings: MilterSettings, max_size: int) -> None:
        """`pipeline.hold_in_mta` is `quarantine: hold`: the MTA's hold queue keeps quarantined mail."""
        self.pipeline = pipeline
        self.hold = pipeline.hold_in_mta
        self.listen = settings.listen
        self.io_timeout = int(settings.timeout)
        # CHGHDRS: forged <prefix>-* headers are deleted from every message we let through.
        self.flags = (Milter.CHGHDRS | (Milter.ADDHDRS if pipeline.add_headers else 0)
                      | (Milter.QUARANTINE if self.hold else 0))
        self.max_size = max_size
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.busy = 0
        self._lock = threading.Lock()

    async def start(self) -> None:
        global _started
        if _started:
            raise RuntimeError("libmilter can run only once per process")
        _started = True
        self.loop = asyncio.get_running_loop()
        Milter.factory = lambda: QueueguardMilter(self)
        Milter.set_flags(self.flags)
        Milter.set_exception_policy(Milter.TEMPFAIL)
        await asyncio.to_thread(self._open)
        self.thread = threading.Thread(target=self._main, name="milter", daemon=True)
        self.thread.start()
        log.info("milter listening on %s (quarantine: %s)", self.listen, "hold" if self.hold else "store")

    def _open(self) -> None:
        """What Milter.runmilter does before its blocking main(), so socket errors surface in start()."""
        Milter.set_connect_callback(Milter.connect_callback)
        Milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
        Milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
        Milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
        Milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
        Milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
        Milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
        Milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
        Milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
        Milter.set_close_callback(Milter.close_callback)
        Milter.setconn(self.listen)
        Milter.settimeout(self.io_timeout)
        Milter.register("queueguard", data=lambda ctx: ctx.getpriv().data(),
                           unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
                           negotiate=Milter.negotiate_callback)
        Milter.opensocket(True)

    def _main(self) -> None:
        try:
            Milter.main()
        except Exception:
            log.exception("milter main loop failed")

    def in_flight(self) -> int:
        return self.busy

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop accepting, let stages already running finish (bounded), then return."""
        if self.thread is None:
            return
        # smfi_stop waits for the listener's lock, which libmilter holds across a
        # 5 s poll; a connection to our own socket ends the poll early.
        stopping = asyncio.ensure_future(asyncio.to_thread(Milter.stop))
        deadline = time.monotonic() + grace
        while not stopping.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            await asyncio.to_thread(wake, self.listen)
        await stopping
        while time.monotonic() < deadline and (self.thread.is_alive() or self.busy):
            await asyncio.sleep(0.05)
        if self.thread.is_alive():
            log.warning("milter main loop still running after %.0fs", grace)
        self.thread = None

    # --- called on libmilter threads ---------------------------------------------

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run a pipeline stage on the loop and wait for it; raises on timeout (caller tempfails)."""
        assert self.loop is not None
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:
            coro.close()
            raise
        with self._lock:
            self.busy += 1
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise
        finally:
            with self._lock:
                self.busy -= 1


class QueueguardMilter(Milter.Base):  # type: ignore[misc]
    """One MTA connection: callbacks -> Session calls. Callbacks we do not override are skipped by
    negotiation."""

    def __init__(self, server: MilterServer) -> None:
        self.server = server
        self.session: Session | None = None
        self.headers: list[bytes] = []
        self.header_names: list[str] = []
        self.body_parts: list[bytes] = []
        self.size = 0
        self.too_big = False

    # --- callbacks -------------------------------------------------------------------

    def negotiate(self, opts: list[int]) -> int:
        """Ask only for the actions we use (change and add headers, hold) besides the steps the
        decorators pick; pymilter's `_actions` guards each action call with what was agreed."""
        rc = int(super().negotiate(opts))
        opts[0] = self._actions = opts[0] & self.server.flags
        return rc

    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        metrics.connections.labels(FRONTEND).inc()
        metrics.connections_active.labels(FRONTEND).inc()
        self.session = session = self.server.pipeline.open(client_from(hostname, family, hostaddr))
        return self._stage("connect", lambda: self.server.call(session.connect(), COMMAND_TIMEOUT))

    @Milter.noreply  # type: ignore[untyped-decorator]
    def hello(self, hostname: str) -> int:
        session = self._session()
        session.conn.tls = bool(self.getsymval("{tls_version}"))
        self._call(session.helo(hostname))
        return int(Milter.CONTINUE)

    def envfrom(self, sender: str, *params: str) -> int:
        self._reset_message()
        session = self._session()
        session.conn.authenticated = self.getsymval("{auth_authen}") or None
        return self._stage("mail", lambda: self.server.call(session.mail(sender, params), COMMAND_TIMEOUT))

    def envrcpt(self, recipient: str, *params: str) -> int:
        session = self._session()
        if session.txn is None:
            return self._tempfail(INTERNAL_ERROR)
        return self._stage("rcpt", lambda: self.server.call(session.rcpt(recipient, params), COMMAND_TIMEOUT))

    @Milter.noreply  # type: ignore[untyped-decorator]
    @Milter.decode("bytes")  # type: ignore[untyped-decorator]
    def header(self, name: str, value: bytes) -> int:
        self.header_names.append(name)
        self._keep(header_line(name, value), self.headers)
        return int(Milter.CONTINUE)

    @Milter.noreply  # type: ignore[untyped-decorator]
    def body(self, chunk: bytes) -> int:
        self._keep(chunk, self.body_parts)
        return int(Milter.CONTINUE)

    def eom(self) -> int:
        session = self._session()
        if session.txn is None:
            return self._tempfail(INTERNAL_ERROR)
        raw = b"".join(self.headers) + b"\r\n" + b"".join(self.body_parts)
        too_big, names = self.too_big, self.header_names
        self._reset_message()
        try:
            if too_big:
                verdict = self._call(session.end(End.OVERSIZE)) or INTERNAL_ERROR
                return self._apply(verdict, [])
            outcome = self.server.call(session.data(raw), CONTENT_TIMEOUT)
            if outcome.verdict.action in (Action.ACCEPT, Action.QUARANTINE):
                self._delete_own_headers(names)
            return self._apply(outcome.verdict, outcome.headers)
        except Exception:
            self._internal_error("eom")
            self._call(session.end(End.MTA_ABORT))
            return self._tempfail(INTERNAL_ERROR)

    def abort(self) -> int:
        self._reset_message()
        self._call(self._session().end(End.MTA_ABORT))
        return int(Milter.CONTINUE)

    def close(self) -> int:
        self._reset_message()
        session, self.session = self.session, None
        if session is not None:
            metrics.connections_active.labels(FRONTEND).dec()
            self._call(session.close())
        return int(Milter.CONTINUE)

    # --- helpers ----------------------------------------------------------------------

    def _session(self) -> Session:
        if self.session is None:  # a callback before connect (libmilter never does this): count it too
            metrics.connections.labels(FRONTEND).inc()
            metrics.connections_active.labels(FRONTEND).inc()
            self.session = self.server.pipeline.open(Connection(client_ip=None))
        return self.session

    def _call(self, coro: Coroutine[Any, Any, T]) -> T | None:
        """A bookkeeping call whose failure must not change the MTA's answer (logged)."""
        try:
            return self.server.call(coro, FINISH_TIMEOUT)
        except Exception:
            metrics.internal_errors.labels("milter_end").inc()
            log.exception("milter: ending a transaction failed")
            return None

    def _keep(self, data: bytes, into: list[bytes]) -> None:
        """Buffer message bytes up to the size limit; past it, remember to refuse at eom."""
        self.size += len(data)
        if self.size > self.server.max_size:
            self.too_big = True
        else:
            into.append(data)

    def _delete_own_headers(self, names: list[str]) -> None:
        """Forged `<prefix>-*` headers go (the pipeline already judged the message without them):
        smfi_chgheader with no value deletes the idx-th field of that name, last first so the
        indices of the others stay put."""
        wanted = self.server.pipeline.header_prefix.lower() + "-"
        seen: dict[str, int] = {}
        own: list[tuple[str, int]] = []
        for name in names:
            key = name.lower()
            seen[key] = seen.get(key, 0) + 1
            if key.startswith(wanted):
                own.append((name, seen[key]))
        for name, idx in reversed(own):
            self.chgheader(name, idx, None)

    def _reset_message(self) -> None:
        self.headers = []
        self.header_names = []
        self.body_parts = []
        self.size = 0
        self.too_big = False

    def _stage(self, stage: str, run: Callable[[], Verdict]) -> int:
        """Run a connect/MAIL/RCPT stage; accept -> CONTINUE, others -> setreply + code."""
        try:
            return self._apply(run(), None)
        except Exception:
            self._internal_error(stage)
            return self._tempfail(INTERNAL_ERROR)

    def _apply(self, verdict: Verdict, headers: list[tuple[str, str]] | None) -> int:
        """A verdict as milter actions (on this callback's thread, as libmilter requires);
        `headers` only at end of message, where accepted mail gets them."""
        match verdict.action:
            case Action.TEMPFAIL:
                return self._tempfail(verdict)
            case Action.REJECT:
                self.setreply(*reply_args(verdict))
                return int(Milter.REJECT)
            case Action.DISCARD:
                return int(Milter.DISCARD)
            case Action.QUARANTINE if not self.server.hold:
                return int(Milter.DISCARD)  # stored in our quarantine: the MTA must not deliver it
            case Action.QUARANTINE:
                self._add_headers(headers or [])
                self.quarantine(f"queueguard {verdict.rule or verdict.reason}")
                return int(Milter.ACCEPT)
            case _:
                if headers is None:
                    return int(Milter.CONTINUE)
                self._add_headers(headers)
                return int(Milter.ACCEPT)

    def _add_headers(self, headers: list[tuple[str, str]]) -> None:
        for name, value in headers:
            self.addheader(name, value)

    def _tempfail(self, verdict: Verdict) -> int:
        self.setreply(*reply_args(verdict))
        return int(Milter.TEMPFAIL)

    def _internal_error(self, stage: str) -> None:
        metrics.internal_errors.labels(f"milter_{stage}").inc()
        session = self.session
        txn = session.txn if session is not None else None
        log.exception("id=%s milter %s stage failed; answering 451", txn.id if txn else "-", stage)
