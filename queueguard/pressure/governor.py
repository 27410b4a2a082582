"""Pressure governor: normal / soften / shed from sensor readings.

The worst sensor sets the level. Hysteresis keeps a level until its sensor
falls below threshold x `hysteresis` (above threshold / hysteresis for sensors
where lower is worse, like MemAvailable), and `hold` keeps a level for a
minimum time before stepping down, so a level does not flap at a threshold.
Stepping up is immediate: pressure is what we must react to fast.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from queueguard import metrics
from queueguard.policy.schema import PressurePolicy
from queueguard.pressure.sensors import PsiTrigger, Sensor

log = logging.getLogger("queueguard.pressure")


class Level(enum.IntEnum):
    NORMAL = 0
    SOFTEN = 1
    SHED = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Threshold:
    soften: float
    shed: float
    lower_is_worse: bool = False


def thresholds(p: PressurePolicy) -> dict[str, Threshold]:
    """Policy thresholds keyed by sensor kind (the PressurePolicy field name)."""
    out: dict[str, Threshold] = {}
    if p.psi_memory_some_avg10:
        out["psi_memory_some_avg10"] = Threshold(p.psi_memory_some_avg10.soften, p.psi_memory_some_avg10.shed)
    if p.mem_available_below:
        out["mem_available_below"] = Threshold(
            p.mem_available_below.soften, p.mem_available_below.shed, lower_is_worse=True
        )
    if p.cgroup_usage_ratio:
        out["cgroup_usage_ratio"] = Threshold(p.cgroup_usage_ratio.soften, p.cgroup_usage_ratio.shed)
    if p.clamd_rss_above:
        out["clamd_rss_above"] = Threshold(p.clamd_rss_above.soften, p.clamd_rss_above.shed)
    return out


def _at_or_past(value: float, limit: float, lower_is_worse: bool) -> bool:
    return value <= limit if lower_is_worse else value >= limit


def sensor_level(value: float, th: Threshold, current: Level, hysteresis: float) -> Level:
    """The level one reading asks for, given the level we are at."""
    for level, limit in ((Level.SHED, th.shed), (Level.SOFTEN, th.soften)):
        if _at_or_past(value, limit, th.lower_is_worse):
            return level
        stay = limit / hysteresis if th.lower_is_worse else limit * hysteresis
        if current >= level and _at_or_past(value, stay, th.lower_is_worse):
            return level
    return Level.NORMAL


def decide(
    readings: Mapping[str, tuple[str, float | None]],
    ths: Mapping[str, Threshold],
    current: Level,
    hysteresis: float,
) -> tuple[Level, str | None]:
    """Level and the sensor that set it; `readings` maps sensor name -> (kind, value)."""
    worst, why = Level.NORMAL, None
    for name, (kind, value) in readings.items():
        th = ths.get(kind)
        if value is None or th is None:
            continue
        level = sensor_level(value, th, current, hysteresis)
        if level > worst:
            worst, why = level, name
    return worst, why


class Governor:
    """Reads the sensors, keeps the level, logs changes once, publishes metrics."""

    def __init__(self, sensors: Iterable[Sensor], *, clock: Callable[[], float], interval: float = 1.0) -> None:
        self.sensors = list(sensors)
        self.clock = clock
        self.interval = interval
        self.level = Level.NORMAL
        self.reason: str | None = None
        self.readings: dict[str, float | None] = {}
        self._changed_at = clock()
        self._updated_at: float | None = None
        metrics.pressure_level.set(0)

    def update(self, policy: PressurePolicy) -> Level:
        """Read every sensor now and move the level."""
        readings: dict[str, tuple[str, float | None]] = {}
        for s in self.sensors:
            try:
                value = s.read()
            except Exception:  # a broken sensor must not stop mail; it just has no vote
                log.exception("pressure sensor %s failed", s.name)
                value = None
            readings[s.name] = (s.kind, value)
            self.readings[s.name] = value
            if value is not None:
                metrics.pressure_sensor.labels(s.name).set(value)
        now = self.clock()
        self._updated_at = now
        target, why = decide(readings, thresholds(policy), self.level, policy.hysteresis)
        if target < self.level and now - self._changed_at < policy.hold:
            return self.level
        if target != self.level:
            self._change(target, why, readings, now)
        return self.level

    def current(self, policy: PressurePolicy) -> Level:
        """The level, re-read when the last reading is older than `interval` (cheap file reads),
        so the check works whether or not the background task runs."""
        if self._updated_at is None or self.clock() - self._updated_at >= self.interval:
            return self.update(policy)
        return self.level

    def _change(self, target: Level, why: str | None, readings: Mapping[str, tuple[str, float | None]],
                now: float) -> None:
        values = " ".join(f"{name}={v:g}" for name, (_, v) in readings.items() if v is not None)
        log.warning("pressure level %s -> %s (sensor=%s %s)", self.level.label, target.label, why or "-", values)
        self.level, self.reason, self._changed_at = target, why, now
        metrics.pressure_level.set(int(target))
        metrics.pressure_level_changes.labels(target.label).inc()

    async def watch(self, policy: Callable[[], PressurePolicy], trigger: PsiTrigger | None = None) -> None:
        """Sample every `interval` seconds, woken early by a PSI trigger where the kernel has one,
        so the level rises within one interval of pressure even with no mail arriving."""
        if trigger is not None:
            try:
                trigger.open()
            except OSError as e:
                log.info("PSI trigger on %s unavailable (%s): polling every %gs", trigger.path, e, self.interval)
                trigger = None
        try:
            while True:
                self.update(policy())
                if trigger is None:
                    await asyncio.sleep(self.interval)
                    continue
                try:
                    async with asyncio.timeout(self.interval):
                        await trigger.wait()
                except TimeoutError:
                    pass
        finally:
            if trigger is not None:
                trigger.close()

    def status(self) -> dict[str, object]:
        return {"level": self.level.label, "reason": self.reason, "sensors": dict(self.readings)}
