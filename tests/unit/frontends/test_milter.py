"""Milter front end: the pure translations and the thread-to-loop bridge, without libmilter.

libmilter runs once per process, so the protocol itself is tested with
miltertest and Postfix (tests/integration/test_milter_*.py). Here the bridge
is driven from plain threads as libmilter would, and `Recorder` stands in for
libmilter's per-connection context only to see what the callbacks answer
when a stage fails or hangs (fault injection).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from typing import Any

import Milter
import pytest

from queueguard.frontends.milter import (
    MilterServer,
    QueueguardMilter,
    client_from,
    header_line,
    reply_args,
)
from queueguard.model import Connection, Transaction
from queueguard.pipeline import Pipeline, Session
from queueguard.policy.schema import Policy
from queueguard.settings import MilterSettings
from queueguard.verdict import INTERNAL_ERROR, reject, tempfail


def test_client_from_connect_arguments() -> None:
    conn = client_from("mail.example.net", socket.AF_INET, ("192.0.2.5", 40000))
    assert (conn.client_ip, conn.client_port, conn.client_name) == (ipaddress.ip_address("192.0.2.5"), 40000,
                                                                    "mail.example.net")
    assert client_from("[2001:db8::5]", socket.AF_INET6, ("2001:db8::5", 25, 0, 0)).client_name == ""
    local = client_from("localhost", socket.AF_UNIX, "/run/sock")
    assert local.client_ip is None and local.frontend == "milter"


def test_headers_are_rebuilt_with_crlf() -> None:
    assert header_line("Subject", b"hello") == b"Subject: hello\r\n"
    assert header_line("Received", b"from a\n\tby b") == b"Received: from a\r\n\tby b\r\n"
    assert header_line("X", b"a\r\n b") == b"X: a\r\n b\r\n"


def test_reply_args() -> None:
    limited = tempfail("4.7.1", "Rate limit 100% used", reason="ratelimit")
    assert reply_args(limited) == ("451", "4.7.1", "Rate limit 100%% used")
    assert reply_args(reject("5.7.1", "virus\r\nfound", reason="virus")) == ("550", "5.7.1", "virus found")


class Stuck:
    """A check stuck on a dead backend (fault injection)."""

    name = "stuck"

    async def on_rcpt(self, ctx: Any) -> Any:
        await asyncio.sleep(3600)

    async def on_end(self, txn: Transaction, passed: bool) -> None:
        return None


class Recorder:
    """Stands in for libmilter's connection context: records setreply."""

    def __init__(self) -> None:
        self.replies: list[tuple[str, ...]] = []

    def setreply(self, *args: str) -> None:
        self.replies.append(args)

    def setpriv(self, priv: object) -> None:
        return None


async def server_with(check: Stuck) -> MilterServer:
    pipeline = Pipeline(frontend="milter", policy=Policy, rcpt_checks=[check])
    server = MilterServer(pipeline, MilterSettings(), 10_000_000)
    server.loop = asyncio.get_running_loop()
    return server


async def test_bridge_runs_stages_on_the_loop_from_other_threads() -> None:
    server = await server_with(Stuck())
    loop_thread = threading.get_ident()
    seen: list[int] = []

    async def stage() -> str:
        seen.append(threading.get_ident())
        return "done"

    result = await asyncio.to_thread(server.call, stage(), 5)
    assert result == "done" and seen == [loop_thread] and server.busy == 0


async def test_hung_stage_times_out_and_is_cancelled() -> None:
    server = await server_with(Stuck())
    cancelled = asyncio.Event()

    async def hang() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    threads = threading.active_count()
    with pytest.raises(TimeoutError):
        await asyncio.to_thread(server.call, hang(), 0.1)
    await asyncio.wait_for(cancelled.wait(), 5)
    assert server.busy == 0 and threading.active_count() <= threads + 1


@pytest.mark.parametrize("why", ["timeout", "exception"])
async def test_rcpt_stage_failures_answer_451(why: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("queueguard.frontends.milter.COMMAND_TIMEOUT", 0.1)
    server = await server_with(Stuck())
    if why == "exception":
        async def boom(*args: object, **kwargs: object) -> None:
            raise RuntimeError("bug")
        monkeypatch.setattr(Session, "rcpt", boom)
    m = QueueguardMilter(server)
    ctx = Recorder()
    m._setctx(ctx)
    m.session = server.pipeline.open(Connection(client_ip=None))
    await m.session.mail("a@example.net")
    rc = await asyncio.to_thread(m.envrcpt, "<bob@test.example>")
    assert rc == Milter.TEMPFAIL
    assert ctx.replies == [("451", "4.3.0", INTERNAL_ERROR.text)]


# --- translation: callbacks -> Session calls, verdicts -> milter actions ---------------------------


class Context(Recorder):
    """libmilter's per-connection context for the calls a verdict turns into."""

    def __init__(self) -> None:
        super().__init__()
        self.added: list[tuple[str, str]] = []
        self.changed: list[tuple[str, int, object]] = []
        self.held: list[str] = []

    def addheader(self, name: str, value: str, idx: int = -1) -> None:
        self.added.append((name, value))

    def chgheader(self, name: str, idx: int, value: object) -> None:
        self.changed.append((name, idx, value))

    def quarantine(self, reason: str) -> None:
        self.held.append(reason)

    def getsymval(self, name: str) -> str | None:
        return None


class Flood:
    """A rate limit that refuses `flood@` and a burst rule that holds or tags by subject."""

    name = "stand-in"

    async def on_rcpt(self, ctx: Any) -> Any:
        from queueguard.model import RuleHit
        from queueguard.stage import StageResult

        hit = RuleHit("flood", "ratelimit", "tempfail", retry_after=9)
        return StageResult([hit] if ctx.recipient.startswith("flood") else [])

    async def on_end(self, txn: Transaction, passed: bool) -> None:
        return None

    async def on_message(self, ctx: Any) -> Any:
        from queueguard.model import RuleHit
        from queueguard.stage import StageResult

        subject = ctx.parsed.subject
        return StageResult([RuleHit("wave", "burst", "quarantine")] if "wave" in subject else
                           [RuleHit("tagged", "pattern", "tag")] if "tag" in subject else [])


async def milter_for(*, hold: bool = False, max_size: int = 10_000) -> tuple[QueueguardMilter, Context]:
    check = Flood()

    class Store:
        async def put(self, *args: object) -> str:
            return "q1"

    pipeline = Pipeline(frontend="milter", policy=Policy, rcpt_checks=[check], message_checks=[check],
                        quarantine=None if hold else Store(), hold_in_mta=hold)
    server = MilterServer(pipeline, MilterSettings(), max_size)
    server.loop = asyncio.get_running_loop()
    m = QueueguardMilter(server)
    ctx = Context()
    m._setctx(ctx)
    m._actions = server.flags
    assert await asyncio.to_thread(m.connect, "mail.example.net", socket.AF_INET, ("192.0.2.5", 40000)) \
        == Milter.CONTINUE
    return m, ctx


async def send(m: QueueguardMilter, subject: str, *headers: tuple[str, bytes], body: bytes = b"hello\r\n") -> int:
    def run() -> int:
        assert m.envfrom("<a@example.net>") == Milter.CONTINUE
        assert m.envrcpt("<ok@example.org>") == Milter.CONTINUE
        m.header("Subject", subject.encode())
        for name, value in headers:
            m.header(name, value)
        m.body(body)
        return int(m.eom())

    return await asyncio.to_thread(run)


async def test_refused_rcpt_is_setreply_and_tempfail() -> None:
    m, ctx = await milter_for()
    await asyncio.to_thread(m.envfrom, "<a@example.net>")
    assert await asyncio.to_thread(m.envrcpt, "<flood@example.org>") == Milter.TEMPFAIL
    assert ctx.replies == [("451", "4.7.1", "Rate limit exceeded (rule flood), try again in 9s")]


async def test_accepted_message_gets_headers_and_forged_ones_deleted() -> None:
    m, ctx = await milter_for()
    rc = await send(m, "tag me", ("X-Queueguard-Hits", b"none"), ("x-queueguard-scan", b"clean"),
                    ("X-Queueguard-Hits", b"again"))
    assert rc == Milter.ACCEPT
    assert ctx.added == [("X-Queueguard-Pattern", "tagged"), ("X-Queueguard-Hits", "pattern:tagged")]
    assert ctx.changed == [("X-Queueguard-Hits", 2, None), ("x-queueguard-scan", 1, None),
                           ("X-Queueguard-Hits", 1, None)]


async def test_quarantine_store_discards_and_hold_asks_the_mta() -> None:
    m, ctx = await milter_for()
    assert await send(m, "wave") == Milter.DISCARD and ctx.held == []
    m, ctx = await milter_for(hold=True)
    assert await send(m, "wave") == Milter.ACCEPT and ctx.held == ["queueguard wave"]


async def test_oversize_is_rejected_at_eom_with_552() -> None:
    m, ctx = await milter_for(max_size=100)
    assert await send(m, "big", body=b"x" * 200) == Milter.REJECT
    assert ctx.replies == [("552", "5.3.4", "Message size exceeds fixed maximum message size")]
    assert m.session is not None and m.session.txn is None


async def test_abort_and_close_end_the_session() -> None:
    m, _ = await milter_for()
    await asyncio.to_thread(m.envfrom, "<a@example.net>")
    assert m.session is not None and m.session.txn is not None
    assert await asyncio.to_thread(m.abort) == Milter.CONTINUE and m.session.txn is None
    assert await asyncio.to_thread(m.close) == Milter.CONTINUE and m.session is None
