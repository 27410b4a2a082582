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
    size_option,
)
from queueguard.model import Connection, Transaction
from queueguard.pipeline import Pipeline
from queueguard.policy.schema import Policy
from queueguard.settings import Settings
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


def test_size_option() -> None:
    assert size_option(("BODY=8BITMIME", "size=1234")) == 1234
    assert size_option(("SIZE=abc",)) is None


def test_reply_args() -> None:
    limited = tempfail("4.7.1", "Rate limit 100% used", reason="ratelimit")
    assert reply_args(limited) == ("451", "4.7.1", "Rate limit 100%% used")
    assert reply_args(reject("5.7.1", "virus\r\nfound", reason="virus")) == ("550", "5.7.1", "virus found")


class Stuck:
    """A check stuck on a dead backend (fault injection)."""

    name = "stuck"

    async def on_rcpt(self, ctx: Any) -> Any:
        await asyncio.sleep(3600)

    async def commit(self, txn: Transaction, policy: Policy) -> None:
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
    server = MilterServer(pipeline, Settings())
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
        monkeypatch.setattr(server.pipeline, "rcpt", boom)
    m = QueueguardMilter(server)
    ctx = Recorder()
    m._setctx(ctx)
    m.conn = Connection(client_ip=None, frontend="milter")
    m.txn = Transaction(m.conn, "a@example.net", policy=Policy())
    rc = await asyncio.to_thread(m.envrcpt, "<bob@test.example>")
    assert rc == Milter.TEMPFAIL
    assert ctx.replies == [("451", "4.3.0", INTERNAL_ERROR.text)]
