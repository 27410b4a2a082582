"""The SMTP proxy front end only translates: bytes in -> Session calls, verdicts -> replies.

Driven without a network: the protocol object gets bytes as a socket would deliver them, split
anywhere, and its replies are read from a recording transport. The checks are stand-ins written
for the test (a refusing rate limit, a shedding door), the Session is the real one.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from queueguard.frontends.smtp_proxy import JUNK_LIMIT, READ_LIMIT, SmtpConnection, SmtpProxy
from queueguard.model import Connection, RuleHit, Transaction
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


class Wire(asyncio.Transport):
    """A socket's transport without a socket: writes are recorded, one entry per write."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol, self.closing, self.paused, self.full, self.aborted = protocol, False, False, False, False
        self.writes: list[bytes] = []

    def write(self, data: Any) -> None:
        """Past 64 KiB unread, the transport asks the protocol to stop writing, as asyncio's does."""
        self.writes.append(bytes(data))
        if sum(map(len, self.writes)) > 65536 and not self.full:
            self.full = True
            self.protocol.pause_writing()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.9", 4000) if name == "peername" else default

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class Client:
    """One connection to the front end, bytes in and replies out."""

    def __init__(self, proxy: SmtpProxy) -> None:
        self.conn = SmtpConnection(proxy)
        self.wire = Wire(self.conn)
        self.conn.connection_made(self.wire)
        self.read = 0

    async def send(self, *chunks: bytes) -> list[str]:
        """Feed the chunks as separate reads; the replies written since the last call."""
        for chunk in chunks:
            self.conn.data_received(chunk)
            await self.settled()
        await self.settled()
        text = b"".join(self.wire.writes[self.read:]).decode()
        self.read = len(self.wire.writes)
        return text.splitlines()

    async def settled(self) -> None:
        for _ in range(1000):
            if self.conn.task is None:
                return
            await asyncio.sleep(0)
        raise AssertionError("a command never finished")

    @property
    def txn(self) -> Transaction | None:
        assert self.conn.session is not None
        return self.conn.session.txn


def proxy(**kw: Any) -> tuple[SmtpProxy, Seen]:
    seen = Seen()
    kw.setdefault("quarantine", Store())
    pipeline = Pipeline(frontend="smtp", policy=Policy, rcpt_checks=[Refuse()], message_checks=[seen], **kw)
    return SmtpProxy(pipeline, SmtpSettings(max_recipients=3, hostname="guard.test", max_message_size=200_000)), seen


async def greeted(p: SmtpProxy) -> Client:
    c = Client(p)
    assert await c.send() == ["220 guard.test queueguard ESMTP"]
    assert (await c.send(b"EHLO client.example\r\n")) == ["250-guard.test", "250-SIZE 200000", "250-8BITMIME",
                                                           "250-SMTPUTF8", "250-PIPELINING", "250 HELP"]
    return c


async def test_mail_and_rcpt_become_session_calls_and_verdicts_become_replies() -> None:
    p, _ = proxy()
    c = await greeted(p)
    replies = await c.send(b"MAIL FROM:<a@example.net>\r\n", b"RCPT TO:<ok@example.org>\r\n",
                           b"RCPT TO:<flood@example.org>\r\n", b"RCPT TO:<not an address>\r\n")
    assert replies == ["250 2.1.0 Ok", "250 2.1.5 Ok", "451 4.7.1 Rate limit exceeded (rule flood), try again in 12s",
                       "501 5.1.3 Bad recipient address syntax"]
    assert c.txn is not None and c.txn.recipients == ["ok@example.org"]
    assert await c.send(b"RSET\r\n") == ["250 2.0.0 Ok"]
    assert c.txn is None


async def test_rcpt_without_mail_and_too_many_recipients() -> None:
    p, _ = proxy()
    c = await greeted(p)
    assert await c.send(b"RCPT TO:<b@example.org>\r\n") == ["503 5.5.1 Error: need MAIL command"]
    rcpts = [b"RCPT TO:<%s@x.example>\r\n" % n for n in (b"b", b"c", b"d", b"e")]
    replies = await c.send(b"MAIL FROM:<a@x.example>\r\n", *rcpts)
    assert replies[-2:] == ["250 2.1.5 Ok", "452 4.5.3 Too many recipients"]


async def test_greeting_is_the_connect_stage() -> None:
    p, _ = proxy(connect_checks=[Shed()])
    c = Client(p)
    replies = await c.send()
    assert replies[0].startswith("421 4.3.2 Temporarily deferred: this host is under memory pressure")
    assert c.wire.closing
    assert await c.send(b"EHLO client.example\r\n") == []  # nothing after the refusal is read


async def test_pipelined_commands_are_answered_in_order() -> None:
    """RFC 2920: a client that sends its whole envelope at once gets every reply, in order. What
    is answered before a Session call is written before it starts (the client may wait on it);
    the rest leaves together."""
    p, seen = proxy(quarantine=None)
    c = await greeted(p)
    writes = len(c.wire.writes)
    replies = await c.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@x.example>\r\nRCPT TO:<c@x.example>\r\n"
                           b"DATA\r\nSubject: hi\r\n\r\nhello\r\n.\r\nNOOP\r\nQUIT\r\n")
    assert replies == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>",
                       "250 2.0.0 Ok", "250 OK", "221 Bye"]
    assert seen.raw == [b"Subject: hi\r\n\r\nhello\r\n"] and c.wire.closing
    assert len(c.wire.writes) - writes == 4  # MAIL | RCPT | RCPT + 354 | 250 + NOOP + QUIT


@pytest.mark.parametrize("line_length", [998, 1500, 40_000])
async def test_data_lines_of_any_length_reach_the_session_intact(line_length: int) -> None:
    """Exim and Postfix take newsletters with long lines; so must we (RFC 5321 limits are SHOULDs
    for senders, and a 5xx here would bounce mail the MTA behind us accepts). The end of DATA is
    found wherever the reads split it."""
    body = b"Subject: news\r\n\r\n" + b"x" * line_length + b"\r\n..dot-stuffed\r\n"
    wire = body + b".\r\n"
    for cut in (1, 2, 3, len(wire) - 4, len(wire) - 3, len(wire) - 2, len(wire) - 1):
        p, seen = proxy(quarantine=None)
        c = await greeted(p)
        await c.send(b"MAIL FROM:<a@example.net>\r\n", b"RCPT TO:<ok@example.org>\r\n", b"DATA\r\n")
        assert await c.send(wire[:cut], wire[cut:]) == ["250 2.0.0 Ok"], cut  # no relay: the checks' verdict
        assert seen.raw == [b"Subject: news\r\n\r\n" + b"x" * line_length + b"\r\n.dot-stuffed\r\n"], cut


async def test_only_crlf_dot_crlf_ends_data() -> None:
    """A bare-LF dot line is content (for the pipeline's hygiene to judge; there is none in this
    pipeline), never the end of the message: a downstream that read it otherwise would see a
    second, smuggled transaction."""
    p, seen = proxy(quarantine=None)
    c = await greeted(p)
    await c.send(b"MAIL FROM:<a@example.net>\r\n", b"RCPT TO:<ok@example.org>\r\n", b"DATA\r\n")
    assert await c.send(b"Subject: a\r\n\r\nx\n.\nMAIL FROM:<s@x>\r\n") == []
    assert await c.send(b".\r\n") == ["250 2.0.0 Ok"]
    assert seen.raw == [b"Subject: a\r\n\r\nx\n.\nMAIL FROM:<s@x>\r\n"]  # one message, not two


async def test_oversize_data_ends_the_transaction_with_552() -> None:
    p, seen = proxy()
    c = await greeted(p)
    await c.send(b"MAIL FROM:<a@example.net>\r\n", b"RCPT TO:<ok@example.org>\r\n", b"DATA\r\n")
    replies = await c.send(b"Subject: big\r\n\r\n", *[(b"y" * 999 + b"\r\n") * 30] * 10, b".\r\n")
    assert replies == ["552 5.3.4 Message size exceeds fixed maximum message size"]
    assert seen.raw == [] and c.txn is None
    assert await c.send(b"NOOP\r\n") == ["250 OK"]  # the session goes on


async def test_quarantine_verdict_is_the_reply_and_session_ends() -> None:
    p, _ = proxy()
    c = await greeted(p)
    await c.send(b"MAIL FROM:<a@example.net>\r\n", b"RCPT TO:<ok@example.org>\r\n", b"DATA\r\n")
    assert await c.send(b"Subject: wave\r\n\r\nwave\r\n.\r\n") == ["250 2.0.0 Ok: quarantined as q1"]
    assert c.txn is None


async def test_vanished_client_ends_the_open_transaction() -> None:
    p, _ = proxy()
    c = await greeted(p)
    await c.send(b"MAIL FROM:<a@example.net>\r\n", b"RCPT TO:<ok@example.org>\r\n")
    c.conn.connection_lost(None)
    await asyncio.gather(*p._pending)
    assert getattr(p.pipeline.rcpt_checks[0], "ended", None) == (["ok@example.org"], False) and not p.sessions


async def test_a_client_that_stops_sending_is_answered_then_closed() -> None:
    """A client that half-closes after its last command hears every reply before the close."""
    p, _ = proxy()
    c = await greeted(p)
    c.conn.data_received(b"MAIL FROM:<a@example.net>\r\nNOOP\r\n")
    assert c.conn.eof_received() is True  # keep the socket open for the replies
    assert await c.send() == ["250 2.1.0 Ok", "250 OK"] and c.wire.closing


async def test_commands_piling_up_behind_a_slow_answer_pause_reading() -> None:
    """A client cannot make us hold more than a bounded buffer of commands while the Session
    works on one: reading pauses, and resumes once they are answered."""
    p, _ = proxy()
    c = await greeted(p)
    mail = b"MAIL FROM:<a@example.net>\r\n"
    more = 2 * READ_LIMIT // len(mail) + 10  # past twice the limit, their replies short of the transport's
    c.conn.data_received(b"RSET\r\n" + mail * (1 + more))  # RSET asks the Session in a task
    assert c.conn.task is not None and c.wire.paused
    replies = await c.send()
    assert replies == ["250 2.0.0 Ok", "250 2.1.0 Ok"] + ["503 5.5.1 Error: nested MAIL command"] * more
    assert not c.wire.paused


async def test_overlong_command_lines_get_500_and_the_session_goes_on() -> None:
    p, _ = proxy()
    c = await greeted(p)
    assert await c.send(b"NOOP " + b"x" * 20_000, b"x" * 20_000 + b"\r\n", b"NOOP\r\n") == [
        "500 Command line too long", "250 OK"]


async def test_a_client_that_does_not_read_its_replies_is_not_answered_without_bound() -> None:
    """One read of 256 KiB of out-of-order commands asks for 560 KB of replies: they leave in
    bounded writes, and once the transport says stop, neither replies nor reads go on until it
    says go."""
    p, _ = proxy()
    c = await greeted(p)
    c.wire.writes.clear()
    c.read = 0
    c.conn.data_received(b"RCPT TO:<a@b.c>\r\n" * (16 * 1024))
    assert c.conn.write_paused and c.wire.paused
    assert max(map(len, c.wire.writes)) < 2 * READ_LIMIT
    assert sum(map(len, c.wire.writes)) < 65536 + 2 * READ_LIMIT
    c.wire.writes.clear()
    c.conn.resume_writing()
    assert c.wire.writes and max(map(len, c.wire.writes)) < 2 * READ_LIMIT


async def test_a_refused_helo_leaves_the_transaction_as_it_was() -> None:
    """RFC 5321 4.1.4: only an acceptable HELO/EHLO resets the session."""
    p, seen = proxy(quarantine=None)
    c = await greeted(p)
    await c.send(b"MAIL FROM:<a@example.net>\r\n", b"RCPT TO:<ok@example.org>\r\n")
    assert await c.send(b"HELO bad\x01name\r\n") == ["501 5.5.2 Syntax error in HELO/EHLO hostname"]
    assert c.txn is not None and c.txn.recipients == ["ok@example.org"]
    assert await c.send(b"DATA\r\n", b"Subject: a\r\n\r\nb\r\n.\r\n") == [
        "354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 Ok"]
    assert len(seen.raw) == 1


async def test_a_client_leaving_mid_data_ends_its_transaction_unanswered() -> None:
    p, seen = proxy()
    c = await greeted(p)
    await c.send(b"MAIL FROM:<a@example.net>\r\n", b"RCPT TO:<ok@example.org>\r\n", b"DATA\r\n")
    c.conn.data_received(b"Subject: half\r\n\r\nthe first half\r\n")
    c.conn.eof_received()
    assert c.wire.closing and await c.send() == []
    c.conn.connection_lost(None)
    await asyncio.gather(*p._pending)
    assert seen.raw == [] and getattr(p.pipeline.rcpt_checks[0], "ended", None) == (["ok@example.org"], False)


class Slow:
    name = "slow"

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds

    async def on_message(self, ctx: MessageContext) -> StageResult:
        await asyncio.sleep(self.seconds)
        return StageResult()


async def test_a_client_leaving_while_its_message_is_judged_cancels_the_judging_without_a_relay() -> None:
    """The front end waits on the Session's future, not in a Task of its own: leaving must still
    cancel that wait as it cancelled the Task. Without a relay nothing reached a downstream, so the
    judging stops and the transaction ends unpassed (with one, Session.data's shield keeps it)."""
    pipeline = Pipeline(frontend="smtp", policy=Policy, rcpt_checks=[Refuse()], message_checks=[Slow()])
    p = SmtpProxy(pipeline, SmtpSettings(hostname="guard.test", max_message_size=200_000))
    c = await greeted(p)
    await c.send(b"MAIL FROM:<a@example.net>\r\n", b"RCPT TO:<ok@example.org>\r\n", b"DATA\r\n")
    c.conn.data_received(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    assert c.conn.task is not None
    c.conn.connection_lost(None)
    await asyncio.gather(*p._pending)
    assert getattr(p.pipeline.rcpt_checks[0], "ended", None) == (["ok@example.org"], False)
    assert await c.send() == []


async def test_a_failure_handing_the_message_to_the_session_is_a_451() -> None:
    p, _ = proxy()
    c = await greeted(p)
    await c.send(b"MAIL FROM:<a@example.net>\r\n", b"RCPT TO:<ok@example.org>\r\n", b"DATA\r\n")
    assert c.conn.session is not None

    def broken(raw: bytes) -> asyncio.Future[Any]:
        raise RuntimeError("a bug")

    c.conn.session.data = broken  # type: ignore[method-assign]
    replies = await c.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    assert len(replies) == 1 and replies[0].startswith("451 4.3.0"), replies
    assert await c.send(b"NOOP\r\n") == ["250 OK"]  # the session goes on


async def test_the_idle_timeout_runs_from_the_last_reply_through_every_stage() -> None:
    """One idle timer per connection, re-armed lazily: after a message whose settling outlasted
    data_timeout (it has data_timeout + 60) a client that says nothing more is hung up on
    data_timeout after our last reply, not later and not earlier."""
    pipeline = Pipeline(frontend="smtp", policy=Policy, rcpt_checks=[Refuse()], message_checks=[Slow(0.6)])
    p = SmtpProxy(pipeline, SmtpSettings(hostname="guard.test", max_message_size=200_000, data_timeout=0.4))
    c = await greeted(p)
    await c.send(b"MAIL FROM:<a@example.net>\r\n", b"RCPT TO:<ok@example.org>\r\n", b"DATA\r\n")
    await asyncio.sleep(0.3)  # most of a timeout spent before the message: the timer must move on
    c.conn.data_received(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    while c.conn.task is not None:  # judged for 0.6 s, past the idle timeout
        await asyncio.sleep(0.01)
    assert await c.send() == ["250 2.0.0 Ok"] and not c.wire.aborted
    answered = asyncio.get_running_loop().time()
    while not c.wire.aborted:
        assert asyncio.get_running_loop().time() - answered < 5, "never timed out"
        await asyncio.sleep(0.01)
    assert asyncio.get_running_loop().time() - answered >= 0.39


async def test_lines_that_are_no_command_count_towards_goodbye() -> None:
    p, _ = proxy()
    c = await greeted(p)
    replies = await c.send(b"\r\n\xff\r\nFOO\r\n\r\n\r\nNOOP\r\n")
    assert replies == ["500 Error: bad syntax"] * 2 + ['500 Error: command "FOO" not recognized',
                                                        "500 Error: bad syntax",
                                                        "502 5.5.1 Too many unrecognized commands, goodbye."]
    assert c.wire.closing


async def test_commands_without_mail_are_bounded_and_a_message_resets_the_count() -> None:
    """Postfix's smtpd_junk_command_limit: a client that only NOOPs holds a connection for nothing."""
    p, _ = proxy(quarantine=None)
    c = await greeted(p)
    assert await c.send(b"NOOP\r\n" * JUNK_LIMIT) == ["250 OK"] * JUNK_LIMIT
    await c.send(b"MAIL FROM:<a@example.net>\r\n", b"RCPT TO:<ok@example.org>\r\n", b"DATA\r\n")
    assert await c.send(b"Subject: a\r\n\r\nb\r\n.\r\n") == ["250 2.0.0 Ok"]
    replies = await c.send(b"RSET\r\n" * (JUNK_LIMIT + 1))
    assert replies[-2:] == ["250 2.0.0 Ok", "421 4.7.0 Too many commands without mail, closing connection"]
    assert len(replies) == JUNK_LIMIT + 1 and c.wire.closing
