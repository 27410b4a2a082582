"""Policy socket: the Postfix policy delegation protocol over TCP or a unix socket.

Postfix asks it with `check_policy_service`, Exim with `${readsocket}` in its
RCPT ACL. A request is `name=value` lines ended by an empty line; the answer
is `action=...` and an empty line; a connection carries many requests.

Requests have no body, so only the connect, MAIL and RCPT stages run. Each
RCPT request is judged as a Session of its own with one transaction and that
one recipient, and there is no end-of-data signal: when the pipeline accepts
a RCPT request the Session decides it at once (`decide_without_data`), which
is where the rate limits are committed and a quarantine rule becomes `hold`. A
recipient that Postfix refuses later (unknown user, another restriction)
has then still used up its budget; that errs on the side of the flood limit.

Accepted requests are answered `dunno`, never `ok`: `ok` would end Postfix's
restriction list and so skip its relay control.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from queueguard import metrics
from queueguard.frontends.base import listening_socket
from queueguard.model import Connection, IPAddress, parse_ip
from queueguard.pipeline import End
from queueguard.settings import PolicySocketSettings, split_hostport
from queueguard.verdict import ACCEPT, Action, Verdict

if TYPE_CHECKING:
    from queueguard.pipeline import Pipeline

log = logging.getLogger(__name__)

MAX_LINE = 8192
"""Bytes in one `name=value` line; Postfix's longest (certificate subjects) fit easily."""
MAX_ATTRIBUTES = 100
"""Attributes in one request; Postfix sends about 35."""
REQUEST_TIMEOUT = 5.0
"""Seconds the pipeline may take for one request; contrib/postfix sets Postfix's timeout to 10 s."""
IDLE_TIMEOUT = 600.0
"""Seconds a client may sit between requests; Postfix closes idle ones after 300 s."""
SOCKET_MODE = 0o660
"""A unix socket for the MTA's group; add the postfix (or Debian-exim) user to queueguard's group."""
FRONTEND = "policy"

STATES = frozenset({"CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN"})


class BadRequest(ValueError):
    """A request we cannot judge; answered `defer` and logged with this text."""


@dataclass(frozen=True)
class PolicyRequest:
    """The facts of one request, validated; strings as Postfix sent them."""

    state: str
    client_ip: IPAddress | None
    client_name: str
    helo: str
    sender: str
    recipient: str
    sasl_username: str
    size: int | None
    instance: str

    def connection(self) -> Connection:
        return Connection(
            client_ip=self.client_ip,
            client_name=self.client_name,
            helo=self.helo,
            authenticated=self.sasl_username or None,
        )


def parse_attribute(line: bytes) -> tuple[str, str]:
    """One `name=value` line (without its newline) -> (name, value)."""
    if len(line) > MAX_LINE:
        raise BadRequest(f"line longer than {MAX_LINE} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"line is not UTF-8 (byte {e.start})") from None
    name, eq, value = text.partition("=")
    if not eq:
        raise BadRequest(f"line without '=': {text[:60]!r}")
    if not name or not all(c.isalnum() or c in "_-." for c in name):
        raise BadRequest(f"bad attribute name {name[:60]!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise BadRequest(f"control character in {name}")
    return name, value


def parse_attributes(lines: Iterable[bytes]) -> dict[str, str]:
    """The lines of one request (empty line excluded) -> attributes, duplicates refused."""
    attrs: dict[str, str] = {}
    for line in lines:
        name, value = parse_attribute(line)
        if name in attrs:
            raise BadRequest(f"attribute {name} given twice")
        attrs[name] = value
        if len(attrs) > MAX_ATTRIBUTES:
            raise BadRequest(f"more than {MAX_ATTRIBUTES} attributes")
    return attrs


def parse_request(attrs: Mapping[str, str]) -> PolicyRequest:
    """Validate the attributes we use; ignore the others, as the protocol asks.

    `request` and `protocol_state` may be left out (handy for Exim's
    readsocket): the state is then RCPT when a recipient is given, else MAIL.
    """
    kind = attrs.get("request", "smtpd_access_policy")
    if kind != "smtpd_access_policy":
        raise BadRequest(f"unknown request type {kind[:60]!r}")
    state = attrs.get("protocol_state", "").upper()
    if not state:
        state = "RCPT" if "recipient" in attrs else "MAIL" if "sender" in attrs else ""
    if state not in STATES:
        raise BadRequest(f"unknown protocol_state {state[:30]!r}" if state else "no protocol_state")
    if state == "RCPT" and not attrs.get("recipient"):
        raise BadRequest("RCPT request without recipient")
    address = attrs.get("client_address", "")
    client_ip = parse_ip(address)
    if address and client_ip is None:
        raise BadRequest(f"bad client_address {address[:60]!r}")
    size_text = attrs.get("size", "")
    if size_text and not (size_text.isascii() and size_text.isdigit()):  # '²' is a digit to str.isdigit
        raise BadRequest(f"bad size {size_text[:30]!r}")
    name = attrs.get("client_name", "")
    return PolicyRequest(
        state=state,
        client_ip=client_ip,
        client_name="" if name == "unknown" else name,
        helo=attrs.get("helo_name", ""),
        sender=attrs.get("sender", ""),
        recipient=attrs.get("recipient", ""),
        sasl_username=attrs.get("sasl_username", ""),
        size=int(size_text) if size_text and int(size_text) > 0 else None,
        instance=attrs.get("instance", ""),
    )


def action_for(verdict: Verdict) -> str:
    """A verdict as a policy action (access(5) syntax, enhanced status kept)."""
    text = " ".join(verdict.text.split())
    match verdict.action:
        case Action.ACCEPT:
            return "dunno"
        case Action.TEMPFAIL:
            return f"defer_if_permit {verdict.status} {text}"
        case Action.REJECT:
            return f"{verdict.code} {verdict.status} {text}"
        case Action.QUARANTINE:
            return f"hold {text}"
        case Action.DISCARD:
            return f"discard {text}"


def defer_action(text: str) -> str:
    """What we answer for bad requests, internal errors and timeouts."""
    return f"defer 4.3.0 {text}"


def format_reply(action: str) -> bytes:
    return f"action={action}\n\n".encode()


async def read_request(reader: asyncio.StreamReader) -> tuple[list[bytes], bool]:
    """Lines up to the empty line -> (lines, at_eof).

    A client that half-closes after its attributes without the empty line
    (Exim's readsocket does shut down its side) still gets an answer.
    Raises BadRequest for an over-long line.
    """
    lines: list[bytes] = []
    while True:
        try:
            line = await reader.readline()
        except ValueError:
            raise BadRequest(f"line longer than {MAX_LINE} bytes") from None
        if not line:
            return lines, True
        if not line.endswith(b"\n"):
            lines.append(line)
            return lines, True
        line = line.rstrip(b"\n").removesuffix(b"\r")
        if not line:
            return lines, False
        if len(lines) >= MAX_ATTRIBUTES:
            raise BadRequest(f"more than {MAX_ATTRIBUTES} attributes")
        lines.append(line)


def bind(settings: PolicySocketSettings) -> socket.socket:
    """The policy service's listening socket (a unix socket with SOCKET_MODE). With `workers`
    the supervisor binds it and every worker answers on it."""
    if settings.listen.startswith("/"):
        path = Path(settings.listen)
        return listening_socket(path, lambda: path.chmod(SOCKET_MODE))
    return listening_socket(split_hostport(settings.listen, 10031))


class PolicySocket:
    """The listening server; each request is answered by the shared pipeline."""

    def __init__(self, pipeline: Pipeline, settings: PolicySocketSettings, sock: socket.socket | None = None) -> None:
        """`sock`: a listening socket the supervisor bound for every worker (see `bind`); without
        one the server binds its own and removes a unix socket's file at stop."""
        self.pipeline = pipeline
        self.settings = settings
        self.sock = sock
        self.listen = settings.listen
        self.server: asyncio.Server | None = None
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._answering = 0

    @property
    def unix_path(self) -> Path | None:
        return Path(self.listen) if self.listen.startswith("/") else None

    async def start(self) -> None:
        sock = self.sock or bind(self.settings)
        if sock.family == socket.AF_UNIX:
            self.server = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_LINE + 2)
        else:
            self.server = await asyncio.start_server(self._client, sock=sock, limit=MAX_LINE + 2)
        log.info("policy socket listening on %s%s", self.listen,
                 ", shared with the other workers" if self.sock is not None else "")

    @property
    def port(self) -> int:
        """The TCP port actually bound (for `:0` in tests)."""
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def in_flight(self) -> int:
        return self._answering

    async def stop(self, grace: float = REQUEST_TIMEOUT + 1) -> None:
        """Requests being answered finish (each has its own REQUEST_TIMEOUT); idle clients are
        closed: the MTA's `defer` default applies to a request it cannot send."""
        if self.server is None:
            return
        self.server.close()
        deadline = asyncio.get_running_loop().time() + grace
        while self._answering and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        # Closing the transports ends each client's read (cancelling the handler
        # tasks would make asyncio's stream callback log a spurious error).
        for writer in self._clients.values():
            writer.transport.abort()
        if self._clients:
            await asyncio.wait(list(self._clients), timeout=REQUEST_TIMEOUT + 1)
        await self.server.wait_closed()
        self.server = None
        path = self.unix_path
        if path is not None and self.sock is None:  # a shared socket is the supervisor's to remove
            with contextlib.suppress(OSError):
                path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients[task] = writer
        metrics.connections.labels(FRONTEND).inc()
        metrics.connections_active.labels(FRONTEND).inc()
        try:
            while True:
                try:
                    lines, eof = await asyncio.wait_for(read_request(reader), IDLE_TIMEOUT)
                except BadRequest as e:
                    writer.write(format_reply(self._bad(str(e))))
                    await writer.drain()
                    return
                if not lines:
                    if eof:
                        return
                    writer.write(format_reply(self._bad("empty request")))
                    await writer.drain()
                    continue
                writer.write(format_reply(await self.answer(lines)))
                await writer.drain()
                if eof:
                    return
        except (TimeoutError, ConnectionError):
            return
        finally:
            self._clients.pop(task, None)
            metrics.connections_active.labels(FRONTEND).dec()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _bad(self, reason: str) -> str:
        metrics.protocol_errors.labels("policy_request").inc()
        log.warning("policy socket: bad request: %s", reason)
        return defer_action("Bad policy request")

    async def answer(self, lines: list[bytes]) -> str:
        """One request's lines -> its action; never raises."""
        try:
            request = parse_request(parse_attributes(lines))
        except BadRequest as e:
            return self._bad(str(e))
        self._answering += 1
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return action_for(await self.judge(request))
        except TimeoutError:
            metrics.internal_errors.labels("policy_timeout").inc()
            log.warning("policy socket: request timed out after %.0fs (%s)", REQUEST_TIMEOUT, request.state)
        except Exception:
            metrics.internal_errors.labels("policy").inc()
            log.exception("policy socket: internal error (%s)", request.state)
        finally:
            self._answering -= 1
        return defer_action("Temporary local problem, please try again later")

    async def judge(self, request: PolicyRequest) -> Verdict:
        """Run the stages up to the request's state in a Session of its own; RCPT is decided at
        once (see module doc). The Session is closed however the request ends."""
        if request.state not in ("CONNECT", "EHLO", "HELO", "MAIL", "RCPT"):
            return ACCEPT
        session = self.pipeline.open(request.connection())
        try:
            verdict = await session.connect()
            if verdict.final or request.state not in ("MAIL", "RCPT"):
                return verdict
            verdict = await session.mail(request.sender)
            if verdict.final or request.state == "MAIL":
                await session.end(End.RSET)
                return verdict
            verdict = await session.rcpt(request.recipient)
            if verdict.final:
                await session.end(End.RSET)
                return verdict
            return await session.decide_without_data()
        finally:
            await session.close()
