"""SMTP sinks for tests and replays: Postfix's smtp-sink (fast, a real process) and a recording aiosmtpd sink.

`SmtpSink` runs ``smtp-sink`` as a subprocess (as root it must drop to
``nobody``); it counts messages from its ``-c`` counter output and, with
``dump=True``, writes every message to a file (``-d``) that `messages()` reads
back. Its ``-r/-f/-q/-Q/-w`` fault options can be passed as ``extra_args``.

`RecordingSink` keeps every message (envelope and bytes) and can be told,
while running, to answer 4xx/5xx for given recipients or at end of DATA, to be
slow, or to drop the connection. It runs its own asyncio loop in a **separate
thread**: a test whose proxy runs in the test's own event loop can deliver to
it without deadlock, and a synchronous test can use it as well. Its state is
guarded by a lock, so the test thread may read and change it at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from aiosmtpd.smtp import SMTP

from queueguard.harness.ports import free_port

SINK_USER = "nobody"


def _wait_banner(host: str, port: int, timeout: float, alive: Any = None) -> None:
    """Wait for a 220 greeting; ``alive()`` returning False aborts early (the process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"sink on {host}:{port} exited before greeting")
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                if s.recv(512).startswith(b"220"):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"no 220 banner from {host}:{port} after {timeout}s")


class SmtpSink:
    """Postfix ``smtp-sink`` on 127.0.0.1 with a free port; stop() by PID."""

    def __init__(
        self,
        *,
        port: int | None = None,
        dump: bool = False,
        extra_args: Sequence[str] = (),
        backlog: int = 1024,
    ) -> None:
        exe = shutil.which("smtp-sink")
        if exe is None:
            raise RuntimeError("smtp-sink missing: it ships with the postfix package (./setup.sh --no-run)")
        self.exe = exe
        self.port = port or free_port()
        self.dump = dump
        self.extra_args = tuple(extra_args)
        self.backlog = backlog
        self.dir = Path(tempfile.mkdtemp(prefix="qg-sink-"))
        self.dir.chmod(0o755)
        self.dump_dir = self.dir / "dump"
        self.dump_dir.mkdir()
        ent = pwd.getpwnam(SINK_USER)
        os.chown(self.dump_dir, ent.pw_uid, ent.pw_gid)
        self._out = self.dir / "counter.out"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, timeout: float = 10.0) -> Self:
        """Start smtp-sink and wait for its 220 banner."""
        if self.pid is not None:
            return self
        args = [self.exe, "-u", SINK_USER, "-c"]
        if self.dump:
            # smtp-sink appends a random hex suffix to the expanded template.
            args += ["-d", f"{self.dump_dir}/%Y%m%d%H%M%S."]
        args += [*self.extra_args, f"127.0.0.1:{self.port}", str(self.backlog)]
        with open(self._out, "ab") as out:
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        _wait_banner("127.0.0.1", self.port, timeout, alive=lambda: self.pid is not None)
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def count(self) -> int:
        """Messages accepted so far (the last ``mesg=N`` of the ``-c`` counter; survives restarts)."""
        text = self._out.read_text(errors="replace") if self._out.exists() else ""
        found = re.findall(r"mesg=(\d+)", text)
        return int(found[-1]) if found else 0

    def wait_count(self, n: int, timeout: float = 10.0) -> int:
        """Wait until at least n messages were accepted; return the count either way."""
        deadline = time.monotonic() + timeout
        while self.count() < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.count()

    def messages(self) -> list[bytes]:
        """Dumped messages (``dump=True``): smtp-sink's X-Client-Addr/X-Mail-Args/... headers, then
        the message. Note: smtp-sink 3.7 writes only the LAST X-Rcpt-Args of a transaction."""
        files = sorted(self.dump_dir.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]


@dataclass(frozen=True)
class Received:
    """One message as the RecordingSink got it."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: tuple[str, int]
    helo: str | None
    #: (source address, source port) from a PROXY header, when proxy_protocol is on.
    proxy_source: tuple[str, int] | None
    """The client address of the PROXY header (None without one, or for PROXY UNKNOWN / v2 LOCAL)."""
    mail_options: list[str] = field(default_factory=list)
    """The MAIL FROM parameters the client sent (SMTPUTF8, BODY=, SIZE=)."""


DropStage = Literal["MAIL", "RCPT", "DATA"]


@dataclass
class SinkBehaviour:
    """What the RecordingSink answers; change it between (or during) transactions."""

    #: recipient address (case-insensitive) -> full reply, e.g. "550 5.1.1 no such user".
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    #: reply after the message body instead of 250, e.g. "451 4.3.0 try later".
    data_reply: str | None = None
    #: seconds to wait before answering the end of DATA.
    data_delay: float = 0.0
    #: close the connection (RST) instead of answering this command; DATA means after the body.
    drop_at: DropStage | None = None
    #: seconds to wait before answering RSET.
    rset_delay: float = 0.0


class _Handler:
    """aiosmtpd handler; all shared state goes through the sink's lock."""

    def __init__(self, sink: RecordingSink) -> None:
        self.sink = sink

    async def handle_PROXY(self, server: Any, session: Any, envelope: Any, proxy_data: Any) -> bool:
        return True

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        with self.sink.lock:
            self.sink.sessions += 1
        return responses

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        session.host_name = hostname
        with self.sink.lock:
            self.sink.sessions += 1
        return f"250 {server.hostname}"

    def _drop(self, server: Any, stage: DropStage) -> bool:
        with self.sink.lock:
            if self.sink.behaviour.drop_at != stage:
                return False
            self.sink.drops += 1
        server.transport.abort()
        return True

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        if self._drop(server, "MAIL"):
            return "421 dropped"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if self._drop(server, "RCPT"):
            return "421 dropped"
        with self.sink.lock:
            reply = self.sink.behaviour.rcpt_replies.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        with self.sink.lock:
            self.sink.rsets += 1
            delay = self.sink.behaviour.rset_delay
        if delay:
            await asyncio.sleep(delay)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.sink.lock:
            delay, reply = self.sink.behaviour.data_delay, self.sink.behaviour.data_reply
            self.sink.in_data += 1
            self.sink.max_in_data = max(self.sink.max_in_data, self.sink.in_data)
        try:
            return await self._data(server, session, envelope, delay, reply)
        finally:
            with self.sink.lock:
                self.sink.in_data -= 1

    async def _data(self, server: Any, session: Any, envelope: Any, delay: float, reply: str | None) -> str:
        if delay:
            await asyncio.sleep(delay)
        if self._drop(server, "DATA"):
            return "421 dropped"
        if reply is not None:
            return reply
        proxy = session.proxy_data
        msg = Received(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.content),
            peer=tuple(session.peer[:2]),
            helo=session.host_name,
            proxy_source=(str(proxy.src_addr), int(proxy.src_port)) if proxy and proxy.src_addr else None,
            mail_options=list(envelope.mail_options),
        )
        with self.sink.lock:
            self.sink.messages.append(msg)
            self.sink.lock.notify_all()
        return "250 2.0.0 OK queued"


class RecordingSink:
    """aiosmtpd sink on 127.0.0.1 in its own thread and event loop; records every message."""

    def __init__(
        self,
        *,
        port: int | None = None,
        proxy_protocol: bool = False,
        hostname: str = "sink.test.example",
        data_size_limit: int = 50 * 1024 * 1024,
    ) -> None:
        self.port = port or free_port()
        self.proxy_protocol = proxy_protocol
        self.hostname = hostname
        self.data_size_limit = data_size_limit
        self.behaviour = SinkBehaviour()
        self.messages: list[Received] = []
        self.sessions = 0  # EHLO/HELO greetings seen: how many SMTP sessions clients opened
        self.drops = 0
        self.rsets = 0  # RSET commands received
        self.in_data = 0  # sessions between DATA and our answer to it, now ...
        self.max_in_data = 0  # ... and at most so far: a downstream-side view of concurrency
        self.lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def _factory(self) -> Any:
        return SMTP(
            _Handler(self),
            hostname=self.hostname,
            data_size_limit=self.data_size_limit,
            enable_SMTPUTF8=True,
            proxy_protocol_timeout=5.0 if self.proxy_protocol else None,
        )

    def start(self, timeout: float = 10.0) -> Self:
        """Start the loop thread and bind the port; returns once the port listens."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        errors: list[BaseException] = []

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopping = asyncio.Event()
            try:
                server = await self._loop.create_server(
                    self._factory, "127.0.0.1", self.port, reuse_address=True
                )
            except OSError as exc:
                errors.append(exc)
                return
            finally:
                ready.set()
            async with server:
                await self._stopping.wait()
            # asyncio.run() then cancels the sessions still open.

        def run() -> None:
            asyncio.run(serve())

        self._thread = threading.Thread(target=run, name=f"RecordingSink:{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or errors:
            self._thread.join(1)
            self._thread = None
            raise RuntimeError(f"RecordingSink could not listen on 127.0.0.1:{self.port}: {errors}")
        return self

    def stop(self) -> None:
        """Close the listener and every open session, then end the thread (the port is free again)."""
        thread, self._thread = self._thread, None
        if thread is None or self._loop is None or self._stopping is None:
            return
        self._loop.call_soon_threadsafe(self._stopping.set)
        thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def count(self) -> int:
        with self.lock:
            return len(self.messages)

    def wait_count(self, n: int, timeout: float = 10.0) -> int:
        """Wait until at least n messages were recorded; return the count either way."""
        with self.lock:
            self.lock.wait_for(lambda: len(self.messages) >= n, timeout)
            return len(self.messages)

    def received(self) -> list[Received]:
        """A snapshot of the recorded messages."""
        with self.lock:
            return list(self.messages)
