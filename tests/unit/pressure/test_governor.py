"""Governor levels from injected sensors, with hysteresis and hold; and the clamd breaker."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from queueguard import metrics
from queueguard.policy.schema import Levels, PressurePolicy, SizeLevels
from queueguard.pressure.governor import Governor, Level, Threshold, decide, sensor_level, thresholds
from queueguard.scan.health import BreakerState, CircuitBreaker

MiB = 1024 * 1024


@dataclass
class FakeSensor:
    """An injected sensor: the value is whatever the test sets."""

    name: str
    kind: str
    value: float | None = None
    broken: bool = False

    def read(self) -> float | None:
        if self.broken:
            raise OSError("sensor file vanished")
        return self.value


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


POLICY = PressurePolicy(
    psi_memory_some_avg10=Levels(soften=10, shed=40),
    mem_available_below=SizeLevels(soften=512 * MiB, shed=128 * MiB),
    cgroup_usage_ratio=Levels(soften=0.7, shed=0.9),
    hysteresis=0.8,
    hold=10,
)


def test_thresholds_from_policy() -> None:
    th = thresholds(POLICY)
    assert th["psi_memory_some_avg10"] == Threshold(10, 40)
    assert th["mem_available_below"] == Threshold(512 * MiB, 128 * MiB, lower_is_worse=True)
    assert "clamd_rss_above" not in th
    assert set(thresholds(PressurePolicy(psi_memory_some_avg10=None))) == set()


@pytest.mark.parametrize(
    ("value", "current", "expected"),
    [
        (5, Level.NORMAL, Level.NORMAL),
        (10, Level.NORMAL, Level.SOFTEN),
        (40, Level.NORMAL, Level.SHED),
        (33, Level.SHED, Level.SHED),  # 33 >= 40*0.8: stays
        (31, Level.SHED, Level.SOFTEN),
        (8.5, Level.SOFTEN, Level.SOFTEN),  # 8.5 >= 10*0.8
        (7.9, Level.SOFTEN, Level.NORMAL),
        (33, Level.SOFTEN, Level.SOFTEN),  # hysteresis never raises a level
    ],
)
def test_sensor_level_higher_is_worse(value: float, current: Level, expected: Level) -> None:
    assert sensor_level(value, Threshold(10, 40), current, 0.8) is expected


def test_sensor_level_lower_is_worse() -> None:
    th = Threshold(512 * MiB, 128 * MiB, lower_is_worse=True)
    assert sensor_level(1024 * MiB, th, Level.NORMAL, 0.8) is Level.NORMAL
    assert sensor_level(500 * MiB, th, Level.NORMAL, 0.8) is Level.SOFTEN
    assert sensor_level(100 * MiB, th, Level.NORMAL, 0.8) is Level.SHED
    assert sensor_level(150 * MiB, th, Level.SHED, 0.8) is Level.SHED  # below 128/0.8 = 160 MiB
    assert sensor_level(170 * MiB, th, Level.SHED, 0.8) is Level.SOFTEN


def test_worst_sensor_wins() -> None:
    readings = {"psi": ("psi_memory_some_avg10", 12.0), "mem": ("mem_available_below", 100.0 * MiB),
                "rss": ("clamd_rss_above", 1e12), "gone": ("cgroup_usage_ratio", None)}
    assert decide(readings, thresholds(POLICY), Level.NORMAL, 0.8) == (Level.SHED, "mem")


def test_governor_levels_hysteresis_and_hold(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    psi = FakeSensor("psi_memory", "psi_memory_some_avg10", 0.0)
    gov = Governor([psi], clock=clock)
    caplog.set_level(logging.INFO, "queueguard.scan")
    assert gov.update(POLICY) is Level.NORMAL
    psi.value = 15
    assert gov.update(POLICY) is Level.SOFTEN
    psi.value = 45
    assert gov.update(POLICY) is Level.SHED  # up: at once
    assert metrics.pressure_level._value.get() == 2
    assert metrics.pressure_sensor.labels("psi_memory")._value.get() == 45
    psi.value = 35
    for _ in range(5):
        clock.now += 60
        assert gov.update(POLICY) is Level.SHED  # inside the hysteresis band
    psi.value = 0
    clock.now += 60
    assert gov.update(POLICY) is Level.NORMAL
    psi.value = 12
    clock.now += 1
    assert gov.update(POLICY) is Level.SOFTEN
    psi.value = 0
    clock.now += 5
    assert gov.update(POLICY) is Level.SOFTEN  # hold: 10 s at a level before stepping down
    clock.now += 5
    assert gov.update(POLICY) is Level.NORMAL
    changes = [r for r in caplog.records if "pressure level" in r.getMessage()]
    assert [r.getMessage().split(" (")[0] for r in changes] == [
        "pressure level normal -> soften", "pressure level soften -> shed", "pressure level shed -> normal",
        "pressure level normal -> soften", "pressure level soften -> normal",
    ]


def test_broken_or_missing_sensor_has_no_vote() -> None:
    clock = Clock()
    bad = FakeSensor("cgroup_usage", "cgroup_usage_ratio", broken=True)
    none = FakeSensor("mem_available", "mem_available_below", None)
    gov = Governor([bad, none], clock=clock)
    assert gov.update(POLICY) is Level.NORMAL
    assert gov.status()["sensors"] == {"cgroup_usage": None, "mem_available": None}


def test_current_rereads_after_interval() -> None:
    clock = Clock()
    psi = FakeSensor("psi_memory", "psi_memory_some_avg10", 50.0)
    gov = Governor([psi], clock=clock, interval=1.0)
    assert gov.current(POLICY) is Level.SHED
    psi.value = 0
    clock.now += 20
    assert gov.current(POLICY) is Level.NORMAL
    psi.value = 50
    clock.now += 0.5
    assert gov.current(POLICY) is Level.NORMAL  # cached within the interval
    clock.now += 0.5
    assert gov.current(POLICY) is Level.SHED


def test_breaker() -> None:
    clock = Clock()
    b = CircuitBreaker(3, 5.0, clock=clock)
    for _ in range(2):
        b.failure()
    assert b.state is BreakerState.CLOSED and b.allow()
    b.success()
    for _ in range(3):
        b.failure()
    assert b.state is BreakerState.OPEN and b.rejecting() and not b.allow()
    assert metrics.clamd_breaker_open._value.get() == 1
    clock.now += 5
    assert not b.rejecting()
    assert b.allow() and b.state is BreakerState.HALF_OPEN
    assert not b.allow()  # one probe at a time
    b.failure()
    assert b.state is BreakerState.OPEN and not b.allow()
    clock.now += 5
    assert b.allow()
    b.release()
    assert b.allow()
    b.success()
    assert b.state is BreakerState.CLOSED and b.allow() and b.allow()
    assert metrics.clamd_breaker_open._value.get() == 0
