"""clamd health: a circuit breaker and a PING/VERSION/STATS loop.

When clamd is dead every scan would wait for a connect error or, worse, a
timeout while the sender holds a connection open. After `failures`
consecutive failures the breaker opens: messages get 451 at once without
touching the socket. After `reset` seconds one probe (a PING from the health
loop or the next scan, whichever comes first) may try; success closes the
breaker, failure re-opens it for another `reset`.

A PING that answers proves clamd alive, not that scans work (a clamd out of
memory, or too slow for `clamd.timeout`, still answers PONG), so it never resets
the count of failures: only a scan that worked does. After failed scans, the
health loop's probe is a PING and a scan of a few bytes, the breaker half-open
until that scan works; `clamd_up` stays 0 until then, so the alert sees scans
failing too. After failed PINGs, a PING that answers closes the breaker.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from queueguard import metrics
from queueguard.scan.clamd import ClamdStats, ScanError, Scanner

log = logging.getLogger("queueguard.scan")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, failures: int, reset: float, *, clock: Callable[[], float]) -> None:
        self.failures_to_open = failures
        self.reset = reset
        self.clock = clock
        self.state = BreakerState.CLOSED
        self.failures = 0
        self._opened_at = 0.0
        self._probing = False

    def rejecting(self) -> bool:
        """Open and not yet due for a probe: refuse without taking the probe slot."""
        return self.state is BreakerState.OPEN and self.clock() - self._opened_at < self.reset

    def allow(self) -> bool:
        """May a request go to clamd now? In half-open, only one at a time (the probe)."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN and self.clock() - self._opened_at >= self.reset:
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        if self.state is not BreakerState.CLOSED:
            log.warning("clamd answered again: breaker closed")
        self.state, self.failures, self._probing = BreakerState.CLOSED, 0, False
        metrics.clamd_breaker_open.set(0)

    def failure(self) -> None:
        self.failures += 1
        self._probing = False
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self.failures >= self.failures_to_open
        ):
            if self.state is BreakerState.CLOSED:
                log.warning("clamd failed %d times in a row: breaker open, scans answer 451", self.failures)
            self.state, self._opened_at = BreakerState.OPEN, self.clock()
            metrics.clamd_breaker_open.set(1)

    def ping_ok(self) -> None:
        """clamd answered PING: closes a half-open breaker (clamd is back), keeps the count."""
        if self.state is BreakerState.HALF_OPEN:
            log.warning("clamd answers PING again: breaker closed (re-opens on the next failed scan)")
            self.state, self._probing = BreakerState.CLOSED, False
            metrics.clamd_breaker_open.set(0)

    def release(self) -> None:
        """A probe that ended without telling us anything (message refused before scanning)."""
        self._probing = False


PROBE = b"queueguard health check: a scan of a few harmless bytes\r\n"


def database_stamp(directory: Path | None) -> str | None:
    """A digest of the names, sizes and modification times of the files in clamd's database
    directory; None where there is none to read (clamd on another host). A file that goes while
    we look (freshclam renames its downloads) is left out."""
    if directory is None:
        return None
    files = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    if entry.is_file():
                        st = entry.stat()
                        files.append((entry.name, st.st_size, st.st_mtime_ns))
    except OSError:
        return None
    return hashlib.sha256(repr(sorted(files)).encode()).hexdigest()[:16]


class ClamdHealth:
    """Owns the breaker and the `clamd_up` gauge; pings on a schedule and right after a failure.

    `clamd_up` is 0 while PING fails, and from the scan failure that reaches the breaker's count
    until a scan works again, whatever PING says meanwhile (`scans_failing`).
    """

    def __init__(self, scanner: Scanner, breaker: CircuitBreaker, *, interval: float,
                 database: Path | None = None, reload_grace: float = 900.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`database`: clamd's DatabaseDirectory, if this host can read it (part of `version`);
        `reload_grace`: how long clamd may take to load files that changed there."""
        self.scanner = scanner
        self.database = database
        self.reload_grace = reload_grace
        self.clock = clock
        self._engine: str | None = None
        self._stamp: str | None = None
        self._settled_at = 0.0
        self.breaker = breaker
        self.interval = interval
        self.up: bool | None = None
        self.stats: ClamdStats | None = None
        self.version: str | None = None
        """clamd's VERSION (engine/signature version/date) and a stamp of its database files;
        None until read, or if VERSION fails."""
        self.scans_failing = False
        self._kick = asyncio.Event()

    def scan_ok(self) -> None:
        self.breaker.success()
        self.scans_failing = False
        self._set_up(True)

    def scan_failed(self, err: ScanError) -> None:
        """One failure is for the breaker's count (and the PING it kicks) to judge; enough in a
        row mark clamd down until a scan works, even while it answers PING."""
        self.breaker.failure()
        if self.breaker.failures >= self.breaker.failures_to_open:
            self.scans_failing = True
            self._set_up(False, f"{self.breaker.failures} failures in a row, the last: {err}")
        self._kick.set()

    def _set_up(self, up: bool, why: str = "") -> None:
        if up != self.up:
            if up:
                log.info("clamd is up")
            else:
                log.warning("clamd is down: %s", why)
        self.up = up
        metrics.clamd_up.set(1 if up else 0)

    async def ping(self) -> bool:
        """One health probe; respects the breaker so a dead clamd is tried once per reset period."""
        if not self.breaker.allow():
            return False
        try:
            await self.scanner.ping()
        except ScanError as e:
            self.breaker.failure()
            self._set_up(False, str(e))
            return False
        except BaseException:  # cancelled, or a bug: never leave the half-open probe slot taken
            self.breaker.release()
            raise
        if self.scans_failing:
            await self._probe_scan()
        else:
            self.breaker.ping_ok()
            self._set_up(True)
        await self.read_version()
        await self.read_stats()
        return True

    async def read_version(self) -> None:
        """The version cached scan answers belong to (queueguard/scan/cache.py): it changes when
        clamd loads new official signatures (VERSION names the daily database) or any signature
        file changes (third-party and local ones, which VERSION does not show). Unknown after a
        failure, so nothing is reused meanwhile."""
        try:
            version = await self.scanner.version()
        except ScanError:
            self.version = None
            return
        stamp = database_stamp(self.database)
        if version != self._engine:  # clamd reloaded, or the first reading: every file is loaded
            self._settled_at = 0.0
        elif stamp != self._stamp:  # changed files that clamd may not have loaded yet
            self._settled_at = self.clock() + self.reload_grace
        self._engine, self._stamp = version, stamp
        self.version = version if stamp is None else f"{version} files {stamp}"

    def files_changed(self) -> None:
        """Checked on every pass of the loop, clamd up or not: signature files that changed while
        clamd is down (a reload that ran out of memory) end the reuse of earlier answers until
        VERSION is read again."""
        if self._engine is not None and database_stamp(self.database) != self._stamp:
            self.version = None

    def settling(self) -> bool:
        """Signature files changed and clamd may still scan with the old ones (it loads them at
        its next SelfCheck): answers are not to be reused until it reloads or `reload_grace` ends."""
        return self.clock() < self._settled_at

    async def _probe_scan(self) -> None:
        """While scans were failing, a PING says too little: scan a few bytes, with the breaker
        still half-open (mail gets its fast 451 meanwhile, not a wait for a clamd that may hang).
        A scan that works closes it and marks clamd up without waiting for mail (a quiet host
        would keep the alert on); one that fails re-opens it."""
        try:
            await self.scanner.instream(PROBE)
        except ScanError as e:
            self.breaker.failure()
            self._set_up(False, f"clamd answers PING but scans fail: {e}")
            return
        except BaseException:
            self.breaker.release()
            raise
        self.scan_ok()

    async def read_stats(self) -> None:
        try:
            self.stats = await self.scanner.stats()
        except ScanError:
            return  # STATS is optional (may be disabled or slow); PING decides health
        s = self.stats
        for state, value in (("live", s.threads_live), ("idle", s.threads_idle), ("max", s.threads_max)):
            if value is not None:
                metrics.clamd_threads.labels(state).set(value)
        if s.queue is not None:
            metrics.clamd_queue.set(s.queue)
        for kind, value_b in s.memory.items():
            metrics.clamd_memory.labels(kind).set(value_b)

    async def run(self) -> None:
        """PING every `interval`, sooner after a failure (then no faster than the breaker's reset).
        Survives any exception (logged): without this loop an open breaker is probed only by mail."""
        while True:
            try:
                self.files_changed()
                await self.ping()
            except Exception:
                log.exception("clamd health check failed unexpectedly; trying again")
            wait = self.interval
            if self.breaker.state is not BreakerState.CLOSED:
                wait = min(wait, max(self.breaker.reset, 0.05))
            self._kick.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._kick.wait()
            except TimeoutError:
                pass
