"""The scan stage: ClamAV under backpressure.

At end of DATA it looks for the answer of an earlier scan of the same content
(queueguard/scan/cache.py), then asks the breaker, then the admission gate (bounded
concurrency, lowered to `pressure.soften.scan_concurrency` while the pressure
governor says soften), then clamd. Memory-pressure deferrals themselves are
the admission check's (queueguard/pressure/admission.py), which runs whether
or not we scan. Every failure becomes a hit that resolves to 451 4.3.2 by
default, an unscanned accept only when the policy says `on_error: accept`
(and then the message carries a header that says so).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from queueguard import metrics
from queueguard.model import RuleHit
from queueguard.policy.schema import Policy, ScanPolicy
from queueguard.pressure.governor import Governor, Level
from queueguard.scan.cache import HASH_IN_THREAD, ScanCache, content_key
from queueguard.scan.clamd import ClamdClient, ScanError, Scanner, ScanResult
from queueguard.scan.gate import AdmissionGate, GateBusy, GateConfig
from queueguard.scan.health import CircuitBreaker, ClamdHealth
from queueguard.settings import ClamdSettings
from queueguard.stage import NOTHING, MessageContext, StageResult

log = logging.getLogger("queueguard.scan")


def share_of(host_limit: int, processes: int) -> int:
    """One worker's part of a per-host bound: the policy's scan limits are the host's (clamd is
    one per host), and with `workers: N` every worker has its own gate. Never below one scan,
    so with more workers than the bound the host's total is the number of workers."""
    return max(1, host_limit // processes)


def gate_config(scan: ScanPolicy, processes: int = 1) -> GateConfig:
    most = share_of(scan.max_concurrent, processes)
    return GateConfig(
        min_concurrent=min(scan.min_concurrent, most), max_concurrent=most,
        max_waiting=share_of(scan.max_waiting, processes), max_wait=scan.max_wait, adaptive=scan.adaptive,
    )


def threads_cap(threads_max: int | None, processes: int = 1) -> int | None:
    """Stay below clamd's MaxThreads, so a PING or STATS still gets a thread while we scan."""
    return None if threads_max is None else share_of(max(1, threads_max - 1), processes)


def _defer(reason: str, detail: str = "") -> StageResult:
    metrics.scan_deferrals.labels(reason).inc()
    return StageResult([RuleHit(reason, "scan", "tempfail", detail=detail)])


class ScanCheck:
    """A MessageCheck (see queueguard/stage.py)."""

    name = "scan"

    def __init__(
        self,
        settings: ClamdSettings,
        governor: Governor,
        *,
        clock: Callable[[], float] = time.monotonic,
        scanner: Scanner | None = None,
        processes: int = 1,
    ) -> None:
        """`processes`: the worker processes of this host, each with its own gate, that share
        clamd and the policy's per-host scan bounds (`share_of`)."""
        self.settings = settings
        self.processes = processes
        self.scanner: Scanner = scanner or ClamdClient.from_settings(settings)
        self.governor = governor
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset, clock=clock)
        self.health = ClamdHealth(self.scanner, self.breaker, interval=settings.ping_interval,
                                  database=settings.database_directory, reload_grace=settings.reload_grace,
                                  clock=clock)
        self.policy = ScanPolicy()
        self.gate = AdmissionGate(gate_config(self.policy, processes))
        self.cache = ScanCache(self.policy.cache.ttl, self.policy.cache.max_entries, clock=clock)
        self._warned_stream_limit = False

    def set_policy(self, policy: Policy) -> None:
        """Take a (re)loaded policy's scan section: the gate's bounds, the cache's size."""
        self.policy = policy.scan
        self.gate.configure(gate_config(policy.scan, self.processes))
        self.cache.configure(policy.scan.cache.ttl, policy.scan.cache.max_entries)

    def reload(self, policy: Policy) -> None:
        """A policy reload (SIGHUP, a changed file) also drops every cached answer: how an admin
        empties the cache, e.g. after adding a signature to a clamd whose files we cannot see."""
        self.set_policy(policy)
        self.cache.clear()

    def _enabled(self, policy: Policy) -> bool:
        if policy.scan is not self.policy:
            self.set_policy(policy)
        return self.settings.enabled and policy.scan.clamav.enabled

    async def on_message(self, ctx: MessageContext) -> StageResult:
        if not self._enabled(ctx.policy):
            return NOTHING
        scan = ctx.policy.scan
        size = len(ctx.raw)
        cap = threads_cap(self.health.stats.threads_max if self.health.stats else None, self.processes)
        if self.governor.current(ctx.policy.pressure) is Level.SOFTEN:
            soft = share_of(ctx.policy.pressure.soften.scan_concurrency, self.processes)
            cap = min(cap or soft, soft)
        self.gate.set_cap(cap)
        if size > self.settings.stream_max_length:
            err = ScanError("too_large", f"{size} bytes, clamd's StreamMaxLength is "
                            f"{self.settings.stream_max_length}", permanent=True)
            return self._on_error(scan, err)
        version = self.health.version
        key = None
        if self.cache.switch(version):
            key = await asyncio.to_thread(content_key, ctx.raw) if size > HASH_IN_THREAD else content_key(ctx.raw)
            cached = self.cache.get(key, version)
            metrics.scan_cache.labels("miss" if cached is None else "hit").inc()
            if cached is not None:
                return self._answer(scan, cached)
        if self.breaker.rejecting():
            return self._down(scan)
        try:
            async with self.gate.slot():
                result = await self._scan(ctx, scan, size)
                if isinstance(result, StageResult):
                    return result
                # not if clamd's signatures changed meanwhile, or may not be loaded yet
                current = self.health.version == version and not self.health.settling()
                if key is not None and current and self._reusable(result):
                    self.cache.put(key, version, result)
        except GateBusy as e:
            return _defer("busy_" + e.reason, str(e))
        return self._answer(scan, result)

    def _reusable(self, result: ScanResult) -> bool:
        """Whether this answer holds for every copy of the content.

        Only a clean one, and only from a scan quicker than clamd's MaxScanTime (it says OK for a
        scan that ran that long). A virus answer may come from a per-copy field the key leaves
        out (one copy of someone else's newsletter with a test string in its Cc would get every
        genuine copy refused), and checking that costs a second scan: an infected copy is
        refused for good anyway, so each is scanned."""
        return not result.infected and result.elapsed < self.settings.max_scan_time

    async def _scan(self, ctx: MessageContext, scan: ScanPolicy, size: int) -> ScanResult | StageResult:
        """clamd's answer, or the failure's result."""
        if not self.breaker.allow():
            return self._down(scan)
        start = time.monotonic()
        try:
            result = await self.scanner.instream(ctx.raw)
        except ScanError as e:
            elapsed = time.monotonic() - start
            ctx.txn.timings["scan"] = elapsed
            metrics.scans.labels("error").inc()
            metrics.scan_seconds.labels("error").observe(elapsed)
            if e.permanent:  # our own size check passed: it is clamd's StreamMaxLength that is lower
                self.breaker.release()
                if not self._warned_stream_limit:
                    self._warned_stream_limit = True
                    log.warning("clamd refused a stream as too large (%s): its StreamMaxLength is below "
                                "clamd.stream_max_length (%d); such mail gets 552", e, self.settings.stream_max_length)
            else:
                self.health.scan_failed(e)
                if e.reason == "timeout":
                    self.gate.record(elapsed, size, ok=False)
            return self._on_error(scan, e)
        except BaseException:  # cancelled, or a bug: never leave the half-open probe slot taken
            self.breaker.release()
            raise
        ctx.txn.timings["scan"] = result.elapsed
        self.health.scan_ok()
        self.gate.record(result.elapsed, size, ok=True)
        label = "infected" if result.infected else "clean"
        metrics.scans.labels(label).inc()
        metrics.scan_seconds.labels(label).observe(result.elapsed)
        return result

    @staticmethod
    def _answer(scan: ScanPolicy, result: ScanResult) -> StageResult:
        """clamd's answer (fresh or cached) as the stage's result: a hit only for a virus."""
        if not result.infected:
            return NOTHING
        signature = result.signature or "unknown"
        log.info("virus found: %s -> %s", signature, scan.clamav.on_infected)
        return StageResult([RuleHit("clamav", "scan", scan.clamav.on_infected, detail=signature)])

    def _down(self, scan: ScanPolicy) -> StageResult:
        err = ScanError("clamd_down", "clamd breaker open (recent failures), not connecting")
        if scan.clamav.on_error == "accept":
            return self._unscanned(err)
        return _defer("clamd_down", str(err))

    def _on_error(self, scan: ScanPolicy, err: ScanError) -> StageResult:
        log.debug("scan failed (%s): %s", err.reason, err)  # clamd up/down is logged once by health
        if scan.clamav.on_error == "accept":
            return self._unscanned(err)
        if err.permanent:
            metrics.scan_deferrals.labels("too_large").inc()
            return StageResult([RuleHit("too_large", "scan", "reject", detail=str(err))])
        return _defer("clamd_" + err.reason, str(err))

    @staticmethod
    def _unscanned(err: ScanError) -> StageResult:
        """The admin chose `on_error: accept`: let it through, marked with a header."""
        metrics.scan_deferrals.labels("unscanned_accept").inc()
        return StageResult([RuleHit("unscanned", "scan", "tag", detail=err.reason)])

    async def run(self) -> None:
        """Background work the app starts once: clamd PING/STATS."""
        await self.health.run()

    def status(self) -> dict[str, object]:
        """For the status page."""
        stats = self.health.stats
        return {
            "gate": self.gate.status(),
            "clamd_up": self.health.up,
            "breaker": self.breaker.state.value,
            "clamd_version": self.health.version,
            "cache_entries": len(self.cache),
            "clamd_stats": None if stats is None else {
                "threads_live": stats.threads_live, "threads_idle": stats.threads_idle,
                "threads_max": stats.threads_max, "queue": stats.queue,
            },
        }
