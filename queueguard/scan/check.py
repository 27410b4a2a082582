"""The scan stage: ClamAV under backpressure.

At RCPT (cheap: nothing received yet) it defers new mail when the governor
says shed, and rate-limited flows under soften. At end of DATA it defers
what pressure says to defer, then asks the breaker, then the admission gate,
then clamd. Every failure becomes a verdict: 451 4.3.2 by default, an
unscanned accept only when the policy says `on_error: accept` (and then the
message carries a header that says so).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from queueguard import metrics
from queueguard.model import RuleHit, Transaction
from queueguard.policy.schema import Policy, ScanPolicy
from queueguard.scan.clamd import ClamdClient, ScanError, Scanner
from queueguard.scan.gate import AdmissionGate, GateBusy, GateConfig
from queueguard.scan.governor import Governor, Level
from queueguard.scan.health import CircuitBreaker, ClamdHealth
from queueguard.scan.sensors import PsiTrigger, Sensor, default_sensors
from queueguard.settings import ClamdSettings
from queueguard.stage import NOTHING, MessageContext, RcptContext, StageResult
from queueguard.verdict import Action, Verdict, quarantine, reject, tempfail

log = logging.getLogger("queueguard.scan")

HEADER = "X-Queueguard-Scan"
TEXT_SHED = "Temporarily deferred: mail scanner under memory pressure, try again later (scan:shed)"
TEXT_SOFT_SIZE = "Temporarily deferred: large message while the scanner is under memory pressure (scan:soften)"
TEXT_SOFT_RATE = "Temporarily deferred: rate-limited flow while the scanner is under memory pressure (scan:soften)"
TEXT_BUSY = "Temporarily deferred: scanner busy, try again later (scan:busy)"
TEXT_DOWN = "Temporarily deferred: virus scanner unavailable, try again later (scan:clamd)"


def gate_config(scan: ScanPolicy) -> GateConfig:
    return GateConfig(
        min_concurrent=min(scan.min_concurrent, scan.max_concurrent), max_concurrent=scan.max_concurrent,
        max_waiting=scan.max_waiting, max_wait=scan.max_wait, adaptive=scan.adaptive,
    )


def rate_limited(txn: Transaction) -> bool:
    """Some enforced rate limit already hit this transaction."""
    return any(h.kind == "ratelimit" and not h.shadow for h in txn.hits)


def threads_cap(threads_max: int | None) -> int | None:
    """Stay below clamd's MaxThreads, so a PING or STATS still gets a thread while we scan."""
    return None if threads_max is None else max(1, threads_max - 1)


class ScanCheck:
    """Both a RcptCheck and a MessageCheck (see queueguard/stage.py)."""

    name = "scan"

    def __init__(
        self,
        settings: ClamdSettings,
        *,
        sensors: Iterable[Sensor] | None = None,
        clock: Callable[[], float] = time.monotonic,
        scanner: Scanner | None = None,
        trigger: PsiTrigger | None = None,
        pressure_interval: float = 1.0,
        cgroup: Path | None = None,
    ) -> None:
        """Without `sensors`: every sensor this host has (`cgroup`: which group's memory to
        watch, default our own) and a PSI trigger on system memory pressure."""
        if sensors is None:
            sensors = default_sensors(settings.pid_file, cgroup)
            trigger = trigger or PsiTrigger()
        self.settings = settings
        self.scanner: Scanner = scanner or ClamdClient.from_settings(settings)
        self.governor = Governor(sensors, clock=clock, interval=pressure_interval)
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset, clock=clock)
        self.health = ClamdHealth(self.scanner, self.breaker, interval=settings.ping_interval)
        self.policy = ScanPolicy()
        self.gate = AdmissionGate(gate_config(self.policy))
        self.trigger = trigger

    def set_policy(self, policy: Policy) -> None:
        """Take a (re)loaded policy's scan section: gate bounds and pressure thresholds."""
        self.policy = policy.scan
        self.gate.configure(gate_config(policy.scan))

    def _enabled(self, policy: Policy) -> bool:
        if policy.scan is not self.policy:
            self.set_policy(policy)
        return self.settings.enabled and policy.scan.clamav.enabled

    def _level(self, scan: ScanPolicy) -> Level:
        return self.governor.current(scan.pressure)

    @staticmethod
    def _defer(reason: str, text: str, detail: str = "") -> StageResult:
        metrics.scan_deferrals.labels(reason).inc()
        hit = RuleHit(rule=reason, kind="scan", action="tempfail", detail=detail)
        return StageResult(tempfail("4.3.2", text, reason=reason, rule="scan"), [hit])

    async def on_rcpt(self, ctx: RcptContext) -> StageResult:
        if not self._enabled(ctx.policy):
            return NOTHING
        scan = ctx.policy.scan
        level = self._level(scan)
        if level is Level.SHED:
            return self._defer("shed", TEXT_SHED, self.governor.reason or "")
        if level is Level.SOFTEN and scan.soften.defer_rate_limited and rate_limited(ctx.txn):
            return self._defer("soften_rate_limited", TEXT_SOFT_RATE, self.governor.reason or "")
        return NOTHING

    async def commit(self, txn: Transaction, policy: Policy) -> None:
        """Nothing to record: the scan stage keeps no per-sender budget."""

    async def on_message(self, ctx: MessageContext) -> StageResult:
        if not self._enabled(ctx.policy):
            return NOTHING
        scan = ctx.policy.scan
        size = len(ctx.raw)
        level = self._level(scan)
        cap = threads_cap(self.health.stats.threads_max if self.health.stats else None)
        if level is Level.SHED:
            return self._defer("shed", TEXT_SHED, self.governor.reason or "")
        if level is Level.SOFTEN:
            if size > scan.soften.defer_larger_than:
                return self._defer("soften_size", TEXT_SOFT_SIZE, f"{size} bytes")
            if scan.soften.defer_rate_limited and rate_limited(ctx.txn):
                return self._defer("soften_rate_limited", TEXT_SOFT_RATE, self.governor.reason or "")
            cap = min(cap or scan.soften.max_concurrent, scan.soften.max_concurrent)
        self.gate.set_cap(cap)
        if size > self.settings.stream_max_length:
            err = ScanError("too_large", f"message of {size} bytes is over clamd's StreamMaxLength "
                            f"({self.settings.stream_max_length})", permanent=True)
            return self._on_error(scan, err)
        if self.breaker.rejecting():
            return self._down(scan)
        try:
            async with self.gate.slot():
                return await self._scan(ctx, scan, size)
        except GateBusy as e:
            return self._defer("busy_" + e.reason, TEXT_BUSY, str(e))

    async def _scan(self, ctx: MessageContext, scan: ScanPolicy, size: int) -> StageResult:
        if not self.breaker.allow():
            return self._down(scan)
        start = time.monotonic()
        try:
            result = await self.scanner.instream(ctx.raw)
        except ScanError as e:
            elapsed = time.monotonic() - start
            metrics.scans.labels("error").inc()
            metrics.scan_seconds.labels("error").observe(elapsed)
            if e.permanent:
                self.breaker.release()
            else:
                self.health.scan_failed(e)
                if e.reason == "timeout":
                    self.gate.record(elapsed, size, ok=False)
            return self._on_error(scan, e)
        except BaseException:  # cancelled, or a bug: never leave the half-open probe slot taken
            self.breaker.release()
            raise
        self.health.scan_ok()
        self.gate.record(result.elapsed, size, ok=True)
        label = "infected" if result.infected else "clean"
        metrics.scans.labels(label).inc()
        metrics.scan_seconds.labels(label).observe(result.elapsed)
        if not result.infected:
            return NOTHING
        return self._infected(scan, result.signature or "unknown")

    def _infected(self, scan: ScanPolicy, signature: str) -> StageResult:
        text = f"virus found: {signature}"
        verdict: Verdict
        if scan.clamav.on_infected == "quarantine":
            verdict = quarantine(text, reason="virus", rule="clamav")
        else:
            verdict = reject("5.7.1", f"{text} (scan:clamav)", reason="virus", rule="clamav")
        log.info("virus found: %s -> %s", signature, verdict.action.value)
        return StageResult(verdict, [RuleHit("clamav", "scan", verdict.action.value, detail=signature)])

    def _down(self, scan: ScanPolicy) -> StageResult:
        err = ScanError("clamd_down", "clamd breaker open (recent failures), not connecting")
        if scan.clamav.on_error == "accept":
            return self._unscanned(err)
        return self._defer("clamd_down", TEXT_DOWN, str(err))

    def _on_error(self, scan: ScanPolicy, err: ScanError) -> StageResult:
        log.debug("scan failed (%s): %s", err.reason, err)  # clamd up/down is logged once by health
        if scan.clamav.on_error == "accept":
            return self._unscanned(err)
        if err.permanent:
            metrics.scan_deferrals.labels("too_large").inc()
            text = f"Message too large to scan (limit {self.settings.stream_max_length} bytes) (scan:clamd)"
            hit = RuleHit("clamd", "scan", "reject", detail=str(err))
            return StageResult(reject("5.3.4", text, reason="too_large_to_scan", rule="scan", code=552), [hit])
        return self._defer("clamd_" + err.reason, TEXT_DOWN, str(err))

    @staticmethod
    def _unscanned(err: ScanError) -> StageResult:
        """The admin chose `on_error: accept`: let it through, marked."""
        metrics.scan_deferrals.labels("unscanned_accept").inc()
        hit = RuleHit("clamd", "scan", Action.ACCEPT.value, detail=f"unscanned: {err}")
        return StageResult(None, [hit], [(HEADER, f"unscanned (clamd error: {err.reason})")])

    async def run(self) -> None:
        """Background work the app starts once: clamd PING/STATS and pressure sampling
        (woken early by a PSI trigger where the kernel supports one)."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.health.run())
            tg.create_task(self._watch_pressure())

    async def _watch_pressure(self) -> None:
        trigger = self.trigger
        if trigger is not None:
            try:
                trigger.open()
            except OSError as e:
                log.info("PSI trigger on %s unavailable (%s): polling every %gs", trigger.path, e,
                         self.governor.interval)
                trigger = None
        try:
            while True:
                self.governor.update(self.policy.pressure)
                if trigger is None:
                    await asyncio.sleep(self.governor.interval)
                    continue
                try:
                    async with asyncio.timeout(self.governor.interval):
                        await trigger.wait()
                except TimeoutError:
                    pass
        finally:
            if trigger is not None:
                trigger.close()

    def status(self) -> dict[str, object]:
        """For the status page."""
        stats = self.health.stats
        return {
            **self.governor.status(),
            "gate": self.gate.status(),
            "clamd_up": self.health.up,
            "breaker": self.breaker.state.value,
            "clamd_stats": None if stats is None else {
                "threads_live": stats.threads_live, "threads_idle": stats.threads_idle,
                "threads_max": stats.threads_max, "queue": stats.queue,
            },
        }
