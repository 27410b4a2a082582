"""ClamdHealth and the breaker: what a PING may and may not prove, and a health loop that never dies.

The breaker tests need no clamd (a clock and calls). The health-loop tests use a fake clamd and a
broken scanner on purpose: a real clamd does not send malformed STATS numbers, and a bug in our own
code is not something clamd can be made to produce. Scans failing while PING answers, with a real
clamd: tests/integration/test_scan_clamd.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from queueguard.scan.clamd import ClamdClient, ClamdStats, ScanError, ScanResult
from queueguard.scan.health import BreakerState, CircuitBreaker, ClamdHealth
from tests.unit.pressure.test_governor import Clock
from tests.unit.scan.conftest import Handler


def test_ping_closes_a_half_open_breaker_but_keeps_the_count() -> None:
    """PING answering says clamd is alive, not that scans work: it must not reset the count of
    failed scans (else the breaker never opens while clamd answers PING and every scan fails)."""
    clock = Clock()
    b = CircuitBreaker(3, 5.0, clock=clock)
    b.failure()
    b.failure()
    b.ping_ok()
    assert b.state is BreakerState.CLOSED and b.failures == 2
    b.failure()
    assert b.state is BreakerState.OPEN
    clock.now += 5
    assert b.allow() and b.state is BreakerState.HALF_OPEN  # the health loop's PING is the probe
    b.ping_ok()
    assert b.state is BreakerState.CLOSED and not b.rejecting() and b.failures == 3
    b.failure()  # scans still fail: the first one re-opens at once
    assert b.state is BreakerState.OPEN and b.rejecting()
    clock.now += 5
    assert b.allow()
    b.success()  # only a scan that worked resets the count
    assert b.state is BreakerState.CLOSED and b.failures == 0


async def test_malformed_stats_number_does_not_kill_the_health_loop(
    fake: Callable[[Handler], Awaitable[str]],
) -> None:
    """`MEMSTATS: heap 1.2.3M` raised ValueError out of parse_stats and ended ClamdHealth.run for
    good: no more PINGs, so a breaker once open never got its probe from the loop."""
    pings: list[float] = []

    async def odd_stats(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        cmd = await r.readuntil(b"\0")
        if cmd == b"zPING\0":
            pings.append(asyncio.get_running_loop().time())
            w.write(b"PONG\0")
        else:
            w.write(b"THREADS: live 1  idle 0 max 8\nQUEUE: 0 items\nMEMSTATS: heap 1.2.3M\nEND\0")
        await w.drain()
        w.close()

    health = ClamdHealth(ClamdClient(await fake(odd_stats)), CircuitBreaker(3, 5.0, clock=Clock()), interval=0.02)
    task = asyncio.create_task(health.run())
    await asyncio.sleep(0.3)
    try:
        assert not task.done(), task.exception()
        assert len(pings) >= 5 and health.up is True and health.stats is None
    finally:
        task.cancel()


class Buggy:
    """A scanner whose PING or STATS raises something that is not a ScanError (a bug of ours)."""

    def __init__(self) -> None:
        self.pings = 0

    async def instream(self, data: bytes) -> ScanResult:
        return ScanResult(False)

    async def ping(self) -> None:
        self.pings += 1
        if self.pings == 1:
            raise RuntimeError("bug in ping")

    async def version(self) -> str:
        return "ClamAV 1.0.0/1/Thu Jan  1 00:00:00 2026"

    async def stats(self) -> ClamdStats:
        raise KeyError("bug in stats")


async def test_health_loop_survives_any_exception(caplog: pytest.LogCaptureFixture) -> None:
    """Any exception is logged and the loop goes on; a half-open probe slot is not left taken."""
    clock = Clock()
    breaker = CircuitBreaker(1, 5.0, clock=clock)
    breaker.failure()
    clock.now += 5  # half-open: the first PING is the probe, and it raises
    scanner = Buggy()
    health = ClamdHealth(scanner, breaker, interval=0.02)
    task = asyncio.create_task(health.run())
    await asyncio.sleep(0.3)
    try:
        assert not task.done(), task.exception()
        assert scanner.pings >= 3 and breaker.state is BreakerState.CLOSED and health.up is True
        assert "bug in ping" in caplog.text and "bug in stats" in caplog.text
    finally:
        task.cancel()


@pytest.mark.parametrize(("scan_answer", "up"), [(b"stream: Can't allocate memory ERROR\0", False),
                                                 (b"stream: OK\0", True)])
async def test_after_failed_scans_a_ping_is_not_enough_to_call_clamd_up(
    fake: Callable[[Handler], Awaitable[str]], scan_answer: bytes, up: bool,
) -> None:
    """A clamd out of memory answers PONG and fails every scan (a reply a real clamd gives under
    pressure, which cannot be brought about on demand here). Once the breaker probes, the health
    loop scans a few bytes: failing, the breaker re-opens and clamd stays down for the alert;
    working, clamd is up without waiting for mail."""
    async def clamd(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        cmd = await r.readuntil(b"\0")
        if cmd == b"zPING\0":
            w.write(b"PONG\0")
        elif cmd == b"zSTATS\0":
            w.write(b"THREADS: live 1  idle 0 max 8\nQUEUE: 0 items\nEND\0")
        else:
            while (n := int.from_bytes(await r.readexactly(4), "big")) != 0:
                await r.readexactly(n)
            await asyncio.sleep(0.3)  # a slow scan: mail must not wait on it meanwhile
            w.write(scan_answer)
        await w.drain()
        w.close()

    clock = Clock()
    breaker = CircuitBreaker(3, 5.0, clock=clock)
    health = ClamdHealth(ClamdClient(await fake(clamd)), breaker, interval=60)
    from queueguard.scan.clamd import ScanError

    for _ in range(3):
        health.scan_failed(ScanError("clamd_error", "clamd error: Can't allocate memory"))
    assert breaker.state is BreakerState.OPEN and health.up is False
    clock.now += 5
    probe = asyncio.create_task(health.ping())
    await asyncio.sleep(0.15)  # PING answered, the probe scan under way: the breaker stays half-open
    assert breaker.state is BreakerState.HALF_OPEN and not breaker.allow()
    assert await probe
    assert health.up is up
    assert breaker.state is (BreakerState.CLOSED if up else BreakerState.OPEN)
    assert breaker.failures == (0 if up else 4)


class Versioned:
    """A scanner whose VERSION the test sets (None: VERSION fails); the rest answers."""

    def __init__(self) -> None:
        self.answer: str | None = "ClamAV 1.4.6/27480/Mon Dec  7 08:00:00 2026"

    async def instream(self, data: bytes) -> ScanResult:
        return ScanResult(False)

    async def ping(self) -> None:
        pass

    async def version(self) -> str:
        if self.answer is None:
            raise ScanError("protocol", "no VERSION")
        return self.answer

    async def stats(self) -> ClamdStats:
        return ClamdStats()


async def test_changed_signature_files_settle_until_clamd_reloads(tmp_path: Path) -> None:
    """The version cached answers belong to: clamd's VERSION and its files. Files changing first
    start a grace (clamd loads them at its SelfCheck); a new VERSION (clamd reloaded) ends it;
    a failing VERSION reuses nothing; files changing while clamd is down end the reuse too."""
    clock, scanner = Clock(), Versioned()
    (tmp_path / "daily.cld").write_bytes(b"1")
    health = ClamdHealth(scanner, CircuitBreaker(3, 5.0, clock=clock), interval=10, database=tmp_path,
                         reload_grace=900, clock=clock)
    await health.ping()
    first = health.version
    assert first is not None and first.startswith("ClamAV 1.4.6/27480/") and " files " in first
    assert not health.settling()
    (tmp_path / "local.ndb").write_text("Sig:0:*:41414141\n")
    await health.ping()
    assert health.version not in (None, first) and health.settling()
    clock.now += 899
    assert health.settling()
    clock.now += 1
    assert not health.settling()  # clamd's SelfCheck and load have had their time
    (tmp_path / "local.ndb").write_text("Sig:0:*:4242424242\n")
    await health.ping()
    assert health.settling()
    scanner.answer = "ClamAV 1.4.6/27481/Mon Dec  7 09:00:00 2026"
    await health.ping()
    assert not health.settling() and "27481" in str(health.version)  # reloaded: every file is in
    scanner.answer = None
    await health.ping()
    assert health.version is None
    scanner.answer = "ClamAV 1.4.6/27481/Mon Dec  7 09:00:00 2026"
    await health.ping()
    known = health.version
    health.files_changed()
    assert health.version == known
    (tmp_path / "third.ndb").write_text("Sig:0:*:43434343\n")
    health.files_changed()  # clamd down: no PING, no VERSION, but the files are watched
    assert health.version is None
