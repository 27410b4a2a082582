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
