"""ClamdClient: answer parsing, framing, and every failure as ScanError.

The small servers here are fault injection: a real clamd never answers
garbage or hangs silently on purpose, so these stand in for a broken one.
Real-clamd behaviour is in tests/integration/test_scan_clamd.py.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from queueguard.scan.clamd import ClamdClient, ScanError, instream_writes, parse_scan_answer, parse_stats
from tests.unit.scan.conftest import Handler

STATS_146 = (
    "POOLS: 1\n\nSTATE: VALID PRIMARY\nTHREADS: live 3  idle 1 max 4 idle-timeout 30\nQUEUE: 2 items\n"
    "\tSTATS 0.000002 \n\nMEMSTATS: heap N/A mmap N/A used N/A free N/A releasable N/A pools 1 "
    "pools_used 5.882M pools_total 5.964M\nEND"
)

def test_parse_answers() -> None:
    assert parse_scan_answer("stream: OK") .infected is False
    found = parse_scan_answer("stream: Win.Test.EICAR_HDB-1 FOUND\n")
    assert found.infected and found.signature == "Win.Test.EICAR_HDB-1"
    for over in ("INSTREAM size limit exceeded. ERROR", "stream: INSTREAM size limit exceeded. ERROR"):
        with pytest.raises(ScanError) as e:  # clamd 1.x sends the first (no `stream: `), 0.x the second
            parse_scan_answer(over)
        assert e.value.reason == "too_large" and e.value.permanent
    with pytest.raises(ScanError) as e:
        parse_scan_answer("COMMAND READ TIMED OUT ERROR")
    assert e.value.reason == "clamd_error" and not e.value.permanent
    with pytest.raises(ScanError) as e:
        parse_scan_answer("stream: Can't allocate memory ERROR")
    assert e.value.reason == "clamd_error" and not e.value.permanent
    for garbage in ("", "PONG", "hello world", "stream:OK"):
        with pytest.raises(ScanError):
            parse_scan_answer(garbage)


def test_parse_stats() -> None:
    s = parse_stats(STATS_146)
    assert (s.threads_live, s.threads_idle, s.threads_max, s.queue, s.threads_busy) == (3, 1, 4, 2, 2)
    assert s.memory["pools_used"] == pytest.approx(5.882 * 1024 * 1024)
    assert "heap" not in s.memory
    with pytest.raises(ScanError):
        parse_stats("UNKNOWN COMMAND")


@pytest.mark.parametrize("memstats", ["heap 1.2.3M", "used .M", "pools_used ...M"])
def test_parse_stats_bad_number_is_a_scan_error(memstats: str) -> None:
    """`[0-9.]+` lets `1.2.3` through to float(): a ValueError there killed the health loop."""
    with pytest.raises(ScanError) as e:
        parse_stats(f"THREADS: live 1  idle 0 max 8\nQUEUE: 0 items\nMEMSTATS: {memstats}\nEND")
    assert e.value.reason == "protocol"


def test_virus_name_is_printable_and_short() -> None:
    """The name goes into the SMTP reply: a CR or LF in it would end the reply line (and let clamd's
    answer write SMTP), and a 100 KB name made a 100 KB reply line."""
    found = parse_scan_answer("stream: Evil\r\n250 Ok\x00\x7f\u00e9 FOUND")
    assert found.infected and found.signature == "Evil??250 Ok???"
    long = parse_scan_answer("stream: " + "A" * 100_000 + " FOUND").signature
    assert long is not None and len(long) <= 200 and long.startswith("AAAA")
    with pytest.raises(ScanError) as e:
        parse_scan_answer("stream: " + "\r\nB" * 50_000 + " ERROR")
    assert "\r" not in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 300


def test_address_forms() -> None:
    assert ClamdClient("/run/clamav/clamd.ctl").unix
    tcp = ClamdClient("127.0.0.1:3310")
    assert not tcp.unix and tcp.hostport == ("127.0.0.1", 3310)
    assert ClamdClient("[::1]:3311").hostport == ("::1", 3311)
    with pytest.raises(ValueError):
        ClamdClient("")
    with pytest.raises(ValueError):
        ClamdClient("localhost:clamd")


async def test_over_stream_max_length_is_not_sent(fake: Callable[[Handler], Awaitable[str]]) -> None:
    connected = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        connected.append(1)
        w.close()

    client = ClamdClient(await fake(handler), stream_max_length=1000)
    with pytest.raises(ScanError) as e:
        await client.instream(b"x" * 1001)
    assert e.value.reason == "too_large" and e.value.permanent and "1001" in str(e.value)
    assert connected == []


async def test_refused(tmp_path: Path) -> None:
    with pytest.raises(ScanError) as e:
        await ClamdClient(str(tmp_path / "none.sock")).ping()
    assert e.value.reason == "connect"
    with pytest.raises(ScanError) as e:
        await ClamdClient("127.0.0.1:1").instream(b"hello")
    assert e.value.reason == "connect"


async def test_chunked_framing(fake: Callable[[Handler], Awaitable[str]]) -> None:
    seen: list[int] = []
    body = bytearray()

    async def clamd_like(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        assert await r.readuntil(b"\0") == b"zINSTREAM\0"
        while True:
            (n,) = struct.unpack("!L", await r.readexactly(4))
            if n == 0:
                break
            seen.append(n)
            body.extend(await r.readexactly(n))
        w.write(b"stream: OK\0")
        await w.drain()
        w.close()

    data = bytes(range(256)) * 100
    result = await ClamdClient(await fake(clamd_like), chunk_size=1000).instream(data)
    assert not result.infected
    assert bytes(body) == data
    assert max(seen) == 1000 and len(seen) == 26


@pytest.mark.parametrize(("size", "writes"), [(0, 1), (999, 1), (1000, 1), (1001, 2), (2500, 3)])
def test_instream_writes(size: int, writes: int) -> None:
    """The bytes are INSTREAM's framing exactly; an everyday message goes in one send."""
    data = bytes(range(256)) * 10
    data = data[:size]
    batches = [b"".join(w) for w in instream_writes(data, 1000)]
    assert len(batches) == writes
    expected = b"zINSTREAM\0" + b"".join(
        struct.pack("!L", len(data[i:i + 1000])) + data[i:i + 1000] for i in range(0, size, 1000)) + b"\0\0\0\0"
    assert b"".join(batches) == expected


@pytest.mark.parametrize(
    ("reply", "close", "reason"),
    [
        (b"I am not clamd\0", True, "protocol"),
        (b"\xff\xfe\0", True, "protocol"),
        (b"stream: O", True, "reset"),
        (b"", True, "reset"),
        (b"", False, "timeout"),
    ],
)
async def test_failures_are_scan_errors(
    fake: Callable[[Handler], Awaitable[str]], reply: bytes, close: bool, reason: str
) -> None:
    async def broken(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\0")
        w.write(reply)
        await w.drain()
        if close:
            w.close()
        else:
            await asyncio.sleep(5)

    client = ClamdClient(await fake(broken), timeout=0.3)
    with pytest.raises(ScanError) as e:
        await client.ping()
    assert e.value.reason == reason


async def test_reset_mid_stream(fake: Callable[[Handler], Awaitable[str]]) -> None:
    async def hangs_up(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(1000)
        w.transport.abort()

    with pytest.raises(ScanError) as e:
        await ClamdClient(await fake(hangs_up), chunk_size=4096).instream(b"x" * 5_000_000)
    assert e.value.reason == "reset"


async def test_ping_version_answers(fake: Callable[[Handler], Awaitable[str]]) -> None:
    answers = {b"zPING\0": b"PONG\0", b"zVERSION\0": b"ClamAV 1.4.6/27000/Mon Jan 1 2024\0"}

    async def ok(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(answers[await r.readuntil(b"\0")])
        await w.drain()
        w.close()

    client = ClamdClient(await fake(ok))
    await client.ping()
    assert (await client.version()).startswith("ClamAV 1.4.6")
    answers[b"zPING\0"] = b"PANG\0"
    with pytest.raises(ScanError):
        await client.ping()
