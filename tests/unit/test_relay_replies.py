"""Downstream replies are read strictly: a truncated or garbled "250" is a broken connection, never
an acceptance. Found by the fault matrix (bench/faults.py, downstream-garbage): a downstream that
sent "250" and closed the connection before the line end had the message counted as delivered,
and the sender heard 250 for mail nobody held."""

from __future__ import annotations

import asyncio

import pytest

from queueguard.relay import DownstreamError, SmtpConnection


async def reply_to(wire: bytes) -> str:
    """What read_reply makes of these bytes, followed by the connection closing."""
    reader = asyncio.StreamReader()
    reader.feed_data(wire)
    reader.feed_eof()
    conn = SmtpConnection(reader, None, None)  # type: ignore[arg-type]  # read_reply never writes
    try:
        return str(await conn.read_reply(timeout=1))
    except DownstreamError:
        assert conn.broken
        return "DownstreamError"


@pytest.mark.parametrize(("wire", "read"), [
    (b"250 2.0.0 Ok queued\r\n", "250 2.0.0 Ok queued"),
    (b"250\r\n", "250"),
    (b"250-first\r\n250 second\r\n", "250 first second"),
    (b"550 5.1.1 unknown\n", "550 5.1.1 unknown"),
    (b"250", "DownstreamError"),  # closed before the line end
    (b"250 Ok", "DownstreamError"),
    (b"250-first\r\n250 sec", "DownstreamError"),
    (b"250-a reply that never ends\r\n", "DownstreamError"),
    (b"2500 OK\r\n", "DownstreamError"),
    (b"25O OK\r\n", "DownstreamError"),
    (b"999 what\r\n", "DownstreamError"),
    (b"260 out of range\r\n", "DownstreamError"),
    (b"250-first\r\n550 second\r\n", "DownstreamError"),  # one reply, two codes
    (b"\x00\xff garbage\r\n", "DownstreamError"),
    (b"\r\n", "DownstreamError"),
    (b"", "DownstreamError"),
])
async def test_reply_parsing(wire: bytes, read: str) -> None:
    assert await reply_to(wire) == read


async def test_each_exchange_gets_its_own_deadline_on_the_connections_one_timer() -> None:
    """One timer per downstream connection, moved lazily: a reply within its deadline is not cut
    off when the timer goes off at an earlier exchange's, and a short deadline after a long one
    still aborts on time (the long one's timer is not kept)."""
    replies = asyncio.Queue[bytes]()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(await replies.get())

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        conn = SmtpConnection(reader, writer, None)
        loop = asyncio.get_running_loop()
        replies.put_nowait(b"250 first\r\n")
        assert str(await conn.read_reply(timeout=0.2)) == "250 first"  # its timer stays, 0.2 s out
        loop.call_later(0.5, replies.put_nowait, b"250 second\r\n")
        assert str(await conn.read_reply(timeout=10)) == "250 second"  # the timer went off meanwhile
        started = loop.time()
        with pytest.raises(DownstreamError, match=r"no progress within 0\.2 s"):
            await conn.read_reply(timeout=0.2)  # nothing comes; the timer was 10 s out
        assert 0.19 <= loop.time() - started < 5
        conn.close()
