"""MAIL and the first RCPT: one round trip to a downstream that offers PIPELINING, and the
downstream's answers kept apart whatever it does.

The downstream here is a scripted asyncio server on loopback (a real socket, scripted replies;
fault injection such as "answer 550, then close" needs a script): it holds its answer to MAIL
for a moment and notes whether RCPT arrived meanwhile, which only a pipelining client does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from queueguard.model import Connection, parse_ip
from queueguard.relay import Downstream, DownstreamGroup, RecipientLost
from queueguard.settings import Downstream as DownstreamSpec

CLIENT = Connection(parse_ip("192.0.2.7"), 40000, frontend="smtp")


@dataclass
class Script:
    pipelining: bool
    mail_reply: bytes = b"250 2.1.0 Ok"
    rcpt_reply: bytes = b"250 2.1.5 Recipient ok"
    close_after_mail: bool = False  # Exim's `drop`: the reply, then the connection is gone
    close_at_rcpt: bool = False  # gone before answering RCPT (a crash, a timeout)
    seen: list[str] = field(default_factory=list)
    rcpt_before_mail_answered: list[bool] = field(default_factory=list)
    connections: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 scripted ESMTP\r\n")
        while line := (await reader.readline()).decode().strip():
            self.seen.append(line.split(":")[0].split(" ")[0].upper())
            verb = self.seen[-1]
            if verb == "EHLO":
                writer.write(b"250-scripted\r\n250 PIPELINING\r\n" if self.pipelining else b"250 scripted\r\n")
            elif verb == "MAIL":
                try:  # is the next command already here, before we answered MAIL?
                    early = (await asyncio.wait_for(reader.readline(), 0.3)).decode().strip()
                except TimeoutError:
                    early = ""
                self.rcpt_before_mail_answered.append(early.upper().startswith("RCPT"))
                writer.write(self.mail_reply + b"\r\n")
                if self.close_after_mail:
                    break
                if early:
                    self.seen.append("RCPT")
                    if self.close_at_rcpt:
                        break
                    accepted = self.mail_reply.startswith(b"2")
                    writer.write(self.rcpt_reply + b"\r\n" if accepted else b"503 5.5.1 need MAIL\r\n")
            elif verb == "RCPT":
                if self.close_at_rcpt:
                    break
                writer.write(self.rcpt_reply + b"\r\n")
            elif verb == "QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 Ok\r\n")
            await writer.drain()
        await writer.drain()
        writer.close()


@pytest.fixture
async def scripted(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Script, DownstreamGroup]]:
    script: Script = request.param
    server = await asyncio.start_server(script.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    group = DownstreamGroup("default", [Downstream(DownstreamSpec(address=f"127.0.0.1:{port}"), hostname="qg.test")])
    yield script, group
    for ds in group.downstreams:
        for conn in ds.idle:
            conn.close()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("scripted", [Script(pipelining=True)], indirect=True)
async def test_pipelining_downstream_gets_mail_and_rcpt_in_one_round_trip(
        scripted: tuple[Script, DownstreamGroup]) -> None:
    script, group = scripted
    rtx, reply = await group.begin(CLIENT, "s@example.org", (), ("a@example.net", ()))
    assert rtx is not None and (reply.code, reply.text) == (250, "2.1.5 Recipient ok")
    assert rtx.accepted == ["a@example.net"]
    assert script.rcpt_before_mail_answered == [True]
    await rtx.abort()


@pytest.mark.parametrize("scripted", [Script(pipelining=False)], indirect=True)
async def test_without_pipelining_rcpt_waits_for_the_mail_reply(scripted: tuple[Script, DownstreamGroup]) -> None:
    script, group = scripted
    rtx, reply = await group.begin(CLIENT, "s@example.org", (), ("a@example.net", ()))
    assert rtx is not None and (reply.code, reply.text) == (250, "2.1.5 Recipient ok")
    assert rtx.accepted == ["a@example.net"]
    assert script.rcpt_before_mail_answered == [False]
    assert script.seen[-2:] == ["MAIL", "RCPT"]
    await rtx.abort()


@pytest.mark.parametrize("scripted", [Script(pipelining=True, rcpt_reply=b"550 5.1.1 no such user"),
                                      Script(pipelining=False, rcpt_reply=b"550 5.1.1 no such user")],
                         indirect=True)
async def test_a_refused_first_recipient_is_the_rcpt_reply_not_the_mail_reply(
        scripted: tuple[Script, DownstreamGroup]) -> None:
    _, group = scripted
    rtx, reply = await group.begin(CLIENT, "s@example.org", (), ("nobody@example.net", ()))
    assert rtx is not None and (reply.code, reply.text) == (550, "5.1.1 no such user")
    assert rtx.accepted == []
    await rtx.abort()


@pytest.mark.parametrize("scripted", [Script(pipelining=False, mail_reply=b"550 5.7.1 sender refused")], indirect=True)
async def test_without_pipelining_a_refused_mail_sends_no_rcpt(scripted: tuple[Script, DownstreamGroup]) -> None:
    script, group = scripted
    rtx, reply = await group.begin(CLIENT, "s@example.org", (), ("a@example.net", ()))
    assert rtx is None and reply.code == 550 and reply.text == "5.7.1 sender refused"
    assert script.seen == ["EHLO", "MAIL", "RSET"]


@pytest.mark.parametrize("scripted", [Script(pipelining=True, mail_reply=b"550 5.7.1 sender refused")], indirect=True)
async def test_pipelined_refused_mail_passes_on_the_mail_reply_and_keeps_the_connection_in_step(
        scripted: tuple[Script, DownstreamGroup]) -> None:
    """The 503 to the pipelined RCPT is read and dropped; the reset connection serves the next sender."""
    script, group = scripted
    rtx, reply = await group.begin(CLIENT, "s@example.org", (), ("a@example.net", ()))
    assert rtx is None and reply.code == 550 and reply.text == "5.7.1 sender refused"
    assert script.seen == ["EHLO", "MAIL", "RCPT", "RSET"]
    script.mail_reply = b"250 2.1.0 Ok"
    rtx, reply = await group.begin(CLIENT, "t@example.org", (), ("b@example.net", ()))
    assert rtx is not None and reply.code == 250 and rtx.accepted == ["b@example.net"]
    assert script.connections == 1
    await rtx.abort()


@pytest.mark.parametrize("scripted", [
    Script(pipelining=True, mail_reply=b"550 5.7.1 sender blocked", close_after_mail=True),
    Script(pipelining=False, mail_reply=b"550 5.7.1 sender blocked", close_after_mail=True),
], indirect=True)
async def test_a_sender_refused_then_dropped_is_the_downstreams_verdict_not_an_outage(
        scripted: tuple[Script, DownstreamGroup]) -> None:
    """Exim's ACL `drop` answers 550 and closes: the 550 reaches the sender, the downstream stays up."""
    script, group = scripted
    rtx, reply = await group.begin(CLIENT, "s@example.org", (), ("a@example.net", ()))
    assert rtx is None and (reply.code, reply.text) == (550, "5.7.1 sender blocked")
    ds = group.downstreams[0]
    assert ds.available() and ds.failures == 0 and not ds.idle
    script.mail_reply, script.close_after_mail = b"250 2.1.0 Ok", False
    rtx, reply = await group.begin(CLIENT, "t@example.org", (), ("b@example.net", ()))
    assert rtx is not None and reply.code == 250 and script.connections == 2
    await rtx.abort()


@pytest.mark.parametrize("scripted", [Script(pipelining=True, close_at_rcpt=True),
                                      Script(pipelining=False, close_at_rcpt=True)], indirect=True)
async def test_a_connection_lost_at_the_first_rcpt_loses_the_transaction_not_the_downstream(
        scripted: tuple[Script, DownstreamGroup]) -> None:
    """As at any later RCPT: the sender hears 4.4.2 (RecipientLost is a DownstreamError), no
    failover re-sends the recipient, and the downstream is not marked down."""
    script, group = scripted
    with pytest.raises(RecipientLost):
        await group.begin(CLIENT, "s@example.org", (), ("a@example.net", ()))
    ds = group.downstreams[0]
    assert ds.available() and ds.failures == 0 and not ds.idle
    assert script.connections == 1 and script.seen.count("RCPT") == 1
