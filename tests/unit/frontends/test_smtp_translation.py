"""The SMTP proxy front end only translates: SMTP events -> Session calls, verdicts -> replies.

Driven without a network: aiosmtpd's hooks are called the way aiosmtpd calls them, DATA is fed
through a StreamReader, and replies are recorded from `push`. The checks are stand-ins written
for the test (a refusing rate limit, a shedding door), the Session is the real one.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiosmtpd.smtp import Envelope
from aiosmtpd.smtp import Session as AioSession

from queueguard.frontends.smtp_proxy import READ_LIMIT, ProxyHandler, QueueguardSMTP
from queueguard.model import Connection, RuleHit, Transaction, parse_ip
from queueguard.pipeline import Pipeline
from queueguard.policy.schema import Policy
from queueguard.settings import SmtpSettings
from queueguard.stage import MessageContext, RcptContext, StageResult


class Refuse:
    name = "ratelimit"

    async def on_rcpt(self, ctx: RcptContext) -> StageResult:
        if ctx.recipient.startswith("flood"):
            return StageResult([RuleHit("flood", "ratelimit", "tempfail", retry_after=12)])
        return StageResult()

    async def on_end(self, txn: Transaction, passed: bool) -> None:
        self.ended = (list(txn.recipients), passed)


class Seen:
    name = "seen"

    def __init__(self) -> None:
        self.raw: list[bytes] = []

    async def on_message(self, ctx: MessageContext) -> StageResult:
        self.raw.append(ctx.raw)
        return StageResult([RuleHit("wave", "burst", "quarantine")] if b"wave" in ctx.raw else [])


class Shed:
    name = "pressure"

    async def on_connect(self, conn: Connection, policy: Policy) -> StageResult:
        return StageResult([RuleHit("shed", "pressure", "tempfail")])


class Store:
    async def put(self, txn: Transaction, raw: bytes, *args: Any) -> str:
        return "q1"


class Recorder(QueueguardSMTP):
    """aiosmtpd's protocol object without a socket: `push` records instead of writing."""

    def __init__(self, handler: ProxyHandler) -> None:
        super().__init__(handler, loop=asyncio.get_running_loop(), data_size_limit=200_000)
        self.pushed: list[str] = []
        self.qg = handler.opened(self, Connection(parse_ip("192.0.2.9"), 4000))
        self._reader = asyncio.StreamReader(limit=READ_LIMIT)
        self.envelope = self._create_envelope()
        self.session = AioSession(asyncio.get_running_loop())
        self.session.host_name = "client.example"
        self.transport = asyncio.Transport()  # present (DATA reads while there is one), never written to

    async def push(self, status: Any) -> None:
        if isinstance(status, str) and status.startswith("220 ") and not self._greeted:
            self._greeted = True
            refusal = await self.qg_handler.connect(self)
            self.pushed.append(refusal or status)
            return
        self.pushed.append(status)


def handler(**kw: Any) -> tuple[ProxyHandler, Seen]:
    seen = Seen()
    kw.setdefault("quarantine", Store())
    pipeline = Pipeline(frontend="smtp", policy=Policy, rcpt_checks=[Refuse()], message_checks=[seen], **kw)
    return ProxyHandler(pipeline, SmtpSettings(max_recipients=3)), seen


async def mail_to(h: ProxyHandler, proto: Recorder, *rcpts: str) -> list[str]:
    env, sess = Envelope(), AioSession(asyncio.get_running_loop())
    replies = [await h.handle_MAIL(proto, sess, env, "a@example.net", [])]
    for r in rcpts:
        replies.append(await h.handle_RCPT(proto, sess, env, r, []))
    return replies


async def test_mail_and_rcpt_become_session_calls_and_verdicts_become_replies() -> None:
    h, _ = handler()
    proto = Recorder(h)
    replies = await mail_to(h, proto, "ok@example.org", "flood@example.org", "not an address")
    assert replies == ["250 2.1.0 Ok", "250 2.1.5 Ok", "451 4.7.1 Rate limit exceeded (rule flood), try again in 12s",
                       "501 5.1.3 Bad recipient address syntax"]
    assert proto.qg is not None and proto.qg.txn is not None and proto.qg.txn.recipients == ["ok@example.org"]
    assert await h.handle_RSET(proto, AioSession(asyncio.get_running_loop()), Envelope()) == "250 2.0.0 Ok"
    assert proto.qg.txn is None


async def test_rcpt_without_mail_and_too_many_recipients() -> None:
    h, _ = handler()
    proto = Recorder(h)
    sess = AioSession(asyncio.get_running_loop())
    assert await h.handle_RCPT(proto, sess, Envelope(), "b@example.org", []) == "503 5.5.1 Error: need MAIL command"
    replies = await mail_to(h, proto, "a@x.example", "b@x.example", "c@x.example", "d@x.example")
    assert replies[-1] == "452 4.5.3 Too many recipients"


async def test_greeting_is_the_connect_stage() -> None:
    h, _ = handler(connect_checks=[Shed()])
    proto = Recorder(h)
    await proto.push("220 guard.test queueguard ESMTP")
    assert proto.pushed[0].startswith("421 4.3.2 Temporarily deferred: this host is under memory pressure")


@pytest.mark.parametrize("line_length", [998, 1500, 40_000])
async def test_data_lines_of_any_length_reach_the_session_intact(line_length: int) -> None:
    """Exim and Postfix take newsletters with long lines; so must we (RFC 5321 limits are SHOULDs
    for senders, and a 5xx here would bounce mail the MTA behind us accepts)."""
    h, seen = handler(quarantine=None)
    proto = Recorder(h)
    await mail_to(h, proto, "ok@example.org")
    assert proto.envelope is not None
    proto.envelope.rcpt_tos.append("ok@example.org")
    body = b"Subject: news\r\n\r\n" + b"x" * line_length + b"\r\n..dot-stuffed\r\n"
    proto._reader.feed_data(body + b".\r\n")
    await proto.smtp_DATA("")
    assert seen.raw == [b"Subject: news\r\n\r\n" + b"x" * line_length + b"\r\n.dot-stuffed\r\n"]
    assert proto.pushed[-1] == "250 2.0.0 Ok"  # no relay in this pipeline: the checks' verdict


async def test_oversize_data_ends_the_transaction_with_552() -> None:
    h, seen = handler()
    proto = Recorder(h)
    await mail_to(h, proto, "ok@example.org")
    assert proto.envelope is not None
    proto.envelope.rcpt_tos.append("ok@example.org")
    proto._reader.feed_data(b"Subject: big\r\n\r\n" + (b"y" * 999 + b"\r\n") * 300 + b".\r\n")
    await proto.smtp_DATA("")
    assert proto.pushed[-1] == "552 5.3.4 Message size exceeds fixed maximum message size"
    assert seen.raw == [] and proto.qg is not None and proto.qg.txn is None


async def test_quarantine_verdict_is_the_reply_and_session_ends() -> None:
    h, _ = handler()
    proto = Recorder(h)
    await mail_to(h, proto, "ok@example.org")
    env = Envelope()
    env.original_content = b"Subject: wave\r\n\r\nwave\r\n"
    reply = await h.handle_DATA(proto, AioSession(asyncio.get_running_loop()), env)
    assert reply == "250 2.0.0 Ok: quarantined as q1" and proto.qg is not None and proto.qg.txn is None


async def test_vanished_client_ends_the_open_transaction() -> None:
    h, _ = handler()
    proto = Recorder(h)
    await mail_to(h, proto, "ok@example.org")
    refuse = h.pipeline.rcpt_checks[0]
    h.closed(proto)
    await asyncio.gather(*h._pending)
    assert getattr(refuse, "ended", None) == (["ok@example.org"], False) and not h.sessions
