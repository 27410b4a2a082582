"""Admission gate in front of clamd: bounded concurrency, bounded waiting.

clamd never refuses work: when its threads are busy and MaxQueue is full its
accept loop just blocks, and every queued stream holds memory. So the bound
must be ours. A message that cannot get a slot within `max_wait`, or finds
`max_waiting` others already waiting, is refused (`GateBusy`) and the caller
answers 451 4.3.2: the sender's MTA keeps it and retries, nothing is lost.

The limit adapts to scan latency (AIMD, like TCP congestion control), once
per round of `limit` scans: it grows by one after a normal round and is cut
by a quarter after a slow one, whose median is far above the typical recent
scan (clamd stalling, the host starting to swap), or at once when a scan
times out. Rounds and medians, not single scans against the best one: on a
host whose CPU is busy with other work (the MTA, a load peak) scan latency
spreads widely without clamd being the bottleneck, and judged scan by scan
against the best, nearly every round had a "congested" scan, so the gate sat
at one or two scans while clamd's threads idled (the milter benchmark lost
12-14 % to it). A lasting new latency level becomes the new normal after
half a window; memory pressure, the reason to keep clamd small, is the
governor's signal, not this one. Latency is normalised by message size,
since a 10 MB message is slow without any congestion.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from queueguard import metrics

SIZE_UNIT = 64 * 1024
"""Bytes that cost clamd about as much as a scan's fixed overhead (measured here: ~1.5 ms
per scan plus ~33 ms per MB of base64 mail; bench/scan_bench.py)."""


class GateBusy(Exception):
    """No scan slot: `reason` is 'waiting_full' or 'wait_timeout'."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def aimd_next(limit: float, *, congested: bool, lo: int, hi: int, increase: float = 1.0,
              decrease: float = 0.75) -> float:
    """Next concurrency limit: additive increase (increase/limit per good sample), multiplicative decrease."""
    if congested:
        return max(float(lo), limit * decrease)
    return min(float(hi), limit + increase / max(limit, 1.0))


def normalized_latency(latency: float, size: int) -> float:
    """Seconds per unit of work, so small and large scans compare."""
    return latency / (1.0 + size / SIZE_UNIT)


def typical(samples: Sequence[float]) -> float | None:
    """The median of the recent normalised latencies; None before the first scan."""
    return statistics.median(samples) if samples else None


def is_congested(norm: float, baseline: float | None, *, tolerance: float, floor: float) -> bool:
    """Slow compared to the typical recent scan (and not just noise at sub-`floor` latencies)."""
    return baseline is not None and norm > floor and norm > baseline * tolerance


@dataclass
class GateConfig:
    min_concurrent: int = 1
    max_concurrent: int = 4
    max_waiting: int = 32
    max_wait: float = 5.0
    adaptive: bool = True
    tolerance: float = 3.0
    floor: float = 0.005
    window: int = 200


class AdmissionGate:
    """FIFO slots. `cap` (set by the governor under soften, or by clamd's
    MaxThreads) lowers the effective limit without touching the adaptive one."""

    def __init__(self, config: GateConfig | None = None) -> None:
        self.config = config or GateConfig()
        self._limit = float(self.config.max_concurrent)
        self.cap: int | None = None
        self.in_flight = 0
        self.peak_in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._samples: deque[float] = deque(maxlen=self.config.window)
        self._round: list[float] = []
        self._since_decrease = 1 << 30
        self.refused: dict[str, int] = {"waiting_full": 0, "wait_timeout": 0}
        self._publish()

    def configure(self, config: GateConfig) -> None:
        """Apply a reloaded policy; the adaptive limit is clamped into the new bounds."""
        if config == self.config:
            return
        if config.window != self.config.window:
            self._samples = deque(self._samples, maxlen=config.window)
        self.config = config
        self._limit = min(max(self._limit, config.min_concurrent), config.max_concurrent)
        if not config.adaptive:
            self._limit = float(config.max_concurrent)
        self._wake()
        self._publish()

    @property
    def limit(self) -> int:
        """Slots open now: adaptive limit, then cap, never below 1."""
        lim = math.floor(self._limit)
        if self.cap is not None:
            lim = min(lim, self.cap)
        return max(1, lim)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def set_cap(self, cap: int | None) -> None:
        if cap != self.cap:
            self.cap = cap
            self._wake()
            self._publish()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if not self._waiters and self.in_flight < self.limit:
            self._take()
            return
        if len(self._waiters) >= self.config.max_waiting:
            self._refuse("waiting_full")
            raise GateBusy("waiting_full", f"{len(self._waiters)} messages already wait for the scanner")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._publish()
        try:
            async with asyncio.timeout(self.config.max_wait):
                await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return  # the slot was handed over just as the timer fired: keep it
            self._refuse("wait_timeout")
            raise GateBusy("wait_timeout", f"no scan slot within {self.config.max_wait:g}s") from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()
            raise
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)
            self._publish()

    def _take(self) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self._publish()

    def _release(self) -> None:
        self.in_flight -= 1
        self._wake()
        self._publish()

    def _wake(self) -> None:
        """Hand free slots to waiters in arrival order; a handed slot is counted at once."""
        while self._waiters and self.in_flight < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self._take()
                fut.set_result(None)

    def _refuse(self, reason: str) -> None:
        self.refused[reason] += 1
        metrics.scan_gate_refused.labels(reason).inc()

    def record(self, latency: float, size: int, *, ok: bool) -> None:
        """Feed one finished scan into the adaptive limit. A round is `limit` scans (one round
        trip of the pipe, as in TCP): at its end the limit grows by one, or is cut by a quarter
        when the round's median was `tolerance` times the typical scan. One slow scan in a round
        is scheduling noise on a busy host, a slow round is clamd. A scan that timed out
        (`ok=False`) cuts at once, once per round (clamd down is the breaker's business)."""
        if not self.config.adaptive:
            return
        self._since_decrease += 1
        if not ok:
            if self._since_decrease >= self.limit:
                self._step(congested=True)
            return
        self._round.append(normalized_latency(latency, size))
        if len(self._round) < self.limit:
            return
        congested = is_congested(statistics.median(self._round), typical(self._samples),
                                 tolerance=self.config.tolerance, floor=self.config.floor)
        self._samples.extend(self._round)
        self._round.clear()
        self._step(congested=congested)

    def _step(self, *, congested: bool) -> None:
        if congested:
            self._since_decrease = 0
        self._limit = aimd_next(self._limit, congested=congested, lo=self.config.min_concurrent,
                                hi=self.config.max_concurrent, increase=max(self._limit, 1.0))
        self._wake()
        self._publish()

    def _publish(self) -> None:
        metrics.scan_in_flight.set(self.in_flight)
        metrics.scan_waiting.set(len(self._waiters))
        metrics.scan_limit.set(self.limit)

    def status(self) -> dict[str, object]:
        return {
            "in_flight": self.in_flight, "waiting": self.waiting, "limit": self.limit,
            "adaptive_limit": round(self._limit, 2), "cap": self.cap, "peak_in_flight": self.peak_in_flight,
            "refused": dict(self.refused),
        }
