"""Admission gate: the bound holds, waiting is bounded by count and time, AIMD moves the limit."""

from __future__ import annotations

import asyncio
import random
import statistics

import pytest

from queueguard import metrics
from queueguard.scan.gate import (
    SIZE_UNIT,
    AdmissionGate,
    GateBusy,
    GateConfig,
    aimd_next,
    is_congested,
    normalized_latency,
)


def test_aimd() -> None:
    assert aimd_next(4.0, congested=False, lo=1, hi=8) == pytest.approx(4.25)
    assert aimd_next(8.0, congested=False, lo=1, hi=8) == 8.0
    assert aimd_next(4.0, congested=True, lo=1, hi=8) == 3.0
    assert aimd_next(1.2, congested=True, lo=1, hi=8) == 1.0


def test_congestion_signal() -> None:
    assert normalized_latency(1.0, SIZE_UNIT) == 0.5
    assert not is_congested(0.1, None, tolerance=3, floor=0.005)
    assert is_congested(0.1, 0.01, tolerance=3, floor=0.005)
    assert not is_congested(0.025, 0.01, tolerance=3, floor=0.005)
    assert not is_congested(0.004, 0.0001, tolerance=3, floor=0.005)


async def hold(gate: AdmissionGate, release: asyncio.Event, peak: list[int]) -> str:
    try:
        async with gate.slot():
            peak.append(gate.in_flight)
            await release.wait()
            return "scanned"
    except GateBusy as e:
        return e.reason


async def test_bound_and_waiting_count() -> None:
    gate = AdmissionGate(GateConfig(max_concurrent=3, max_waiting=2, max_wait=10, adaptive=False))
    release = asyncio.Event()
    peak: list[int] = []
    tasks = [asyncio.create_task(hold(gate, release, peak)) for _ in range(10)]
    await asyncio.sleep(0.01)
    assert (gate.in_flight, gate.waiting) == (3, 2)
    assert metrics.scan_in_flight._value.get() == 3 and metrics.scan_waiting._value.get() == 2
    release.set()
    results = await asyncio.gather(*tasks)
    assert results.count("scanned") == 5 and results.count("waiting_full") == 5
    assert max(peak) == 3 and gate.peak_in_flight == 3
    assert gate.in_flight == 0 and gate.waiting == 0


async def test_wait_timeout() -> None:
    gate = AdmissionGate(GateConfig(max_concurrent=1, max_waiting=5, max_wait=0.05, adaptive=False))
    release = asyncio.Event()
    peak: list[int] = []
    first = asyncio.create_task(hold(gate, release, peak))
    await asyncio.sleep(0)
    assert await hold(gate, release, peak) == "wait_timeout"
    assert gate.refused["wait_timeout"] == 1 and gate.waiting == 0
    release.set()
    assert await first == "scanned"


async def test_fifo_and_cap() -> None:
    gate = AdmissionGate(GateConfig(max_concurrent=4, max_waiting=10, max_wait=10, adaptive=False))
    gate.set_cap(1)
    order: list[int] = []
    release = asyncio.Event()

    async def one(i: int) -> None:
        async with gate.slot():
            order.append(i)
            assert gate.in_flight == 1
            await release.wait()

    tasks = [asyncio.create_task(one(i)) for i in range(4)]
    await asyncio.sleep(0.01)
    assert gate.limit == 1 and gate.waiting == 3
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]


async def test_raising_cap_wakes_waiters() -> None:
    gate = AdmissionGate(GateConfig(max_concurrent=3, max_waiting=10, max_wait=10, adaptive=False))
    gate.set_cap(1)
    release = asyncio.Event()
    peak: list[int] = []
    tasks = [asyncio.create_task(hold(gate, release, peak)) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert gate.in_flight == 1
    gate.set_cap(None)
    await asyncio.sleep(0)
    assert gate.in_flight == 3 and gate.waiting == 0
    release.set()
    await asyncio.gather(*tasks)


async def test_cancelled_waiter_leaks_nothing() -> None:
    gate = AdmissionGate(GateConfig(max_concurrent=1, max_waiting=5, max_wait=10, adaptive=False))
    release = asyncio.Event()
    peak: list[int] = []
    first = asyncio.create_task(hold(gate, release, peak))
    waiter = asyncio.create_task(hold(gate, release, peak))
    await asyncio.sleep(0.01)
    assert gate.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.waiting == 0
    release.set()
    await first
    assert gate.in_flight == 0


def test_adaptive_limit_moves_within_bounds() -> None:
    gate = AdmissionGate(GateConfig(min_concurrent=2, max_concurrent=8, adaptive=True))
    assert gate.limit == 8
    for _ in range(100):
        gate.record(0.01, 1000, ok=True)
    for _ in range(24):
        gate.record(1.0, 1000, ok=True)  # rounds of 100x the typical scan: clamd stalls
    assert gate.limit == 2  # 8 -> 6 -> 4.5 -> 3.4 -> 2.5 -> 2, one cut per round of `limit` scans
    for _ in range(30):
        gate.record(0.01, 1000, ok=True)  # +1 per good round: 2+3+4+5+6+7 scans
    assert gate.limit == 8
    gate.record(30, 1000, ok=False)
    assert gate.limit == 6  # a timeout cuts at once
    gate.record(30, 1000, ok=False)
    assert gate.limit == 6  # ... once per round


def test_lasting_slowdown_becomes_the_new_normal() -> None:
    """Slow from now on (a busier host, bigger mail): cut at first, then the median moves up
    and the limit climbs back; memory pressure is the governor's business, not the gate's."""
    gate = AdmissionGate(GateConfig(min_concurrent=1, max_concurrent=8, adaptive=True, window=200))
    for _ in range(200):
        gate.record(0.01, 0, ok=True)
    for _ in range(30):
        gate.record(0.1, 0, ok=True)
    assert gate.limit <= 2
    for _ in range(300):
        gate.record(0.1, 0, ok=True)
    assert gate.limit == 8


def test_one_slow_scan_in_a_round_is_noise() -> None:
    gate = AdmissionGate(GateConfig(min_concurrent=1, max_concurrent=8, adaptive=True))
    for _ in range(50):
        gate.record(0.01, 0, ok=True)
    for _ in range(10):
        for i in range(8):
            gate.record(1.0 if i == 0 else 0.01, 0, ok=True)
    assert gate.limit == 8
    for _ in range(8):
        gate.record(1.0, 0, ok=True)
    assert gate.limit == 6  # a whole slow round: one cut


def test_cpu_contention_spread_does_not_starve_clamd() -> None:
    """Scans on a CPU-busy host: latency spread 2-15 ms with no trend (lognormal, as measured under
    the milter benchmark). Judged scan by scan against the best recent one the limit sat at 1;
    judged by rounds against the typical scan it stays at clamd's threads."""
    rng = random.Random(7)
    gate = AdmissionGate(GateConfig(min_concurrent=1, max_concurrent=4, adaptive=True))
    limits = []
    for _ in range(2000):
        gate.record(0.006 * rng.lognormvariate(0, 0.9), 4096, ok=True)
        limits.append(gate.limit)
    assert statistics.mean(limits[500:]) >= 3.9


def test_fixed_limit_and_reconfigure() -> None:
    gate = AdmissionGate(GateConfig(max_concurrent=4, adaptive=False))
    for _ in range(50):
        gate.record(5.0, 0, ok=False)
    assert gate.limit == 4
    gate.configure(GateConfig(max_concurrent=2, adaptive=True))
    assert gate.limit == 2
    gate.configure(GateConfig(min_concurrent=3, max_concurrent=6, adaptive=True))
    assert gate.limit == 3
