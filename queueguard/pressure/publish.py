"""Pressure reports between queueguards: the ticket host publishes, the MX reads.

The host behind a route (in the 2022-10-17 incident: the ticket system's VM)
knows its own memory pressure; the MX that relays to it does not. A
queueguard on that host publishes its level (normal / soften / shed, from
its pressure governor) and its local queue size; the MX's Router applies it
to the route toward that host (see queueguard/routing.py, docs/routes.md).

Wire format, one JSON object, the same in Redis and in /status.json:
    {"node": "ticket1001", "level": "shed", "governor": "normal", "forced": "shed",
     "reason": "...", "queue": 12 | null, "time": <unix seconds>, "interval": 5.0}
Redis key `qg:pressure:<name>`, written every `interval` with a TTL (default
3 x interval), so a publisher that dies stops being believed within the TTL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from queueguard import metrics
from queueguard.policy.schema import Policy
from queueguard.pressure.governor import Governor
from queueguard.redis_client import BACKGROUND, connect
from queueguard.routing import LEVELS, PressureReport, PressureSource
from queueguard.settings import Settings
from queueguard.shared_state import raise_if_cancelling
from queueguard.webauth import read_token

if TYPE_CHECKING:
    from redis.asyncio import Redis


log = logging.getLogger("queueguard.pressure")

KEY_PREFIX = "qg:pressure:"
HTTP_TIMEOUT = 5.0
MAX_REPORT_BYTES = 1 << 20


def report_key(name: str) -> str:
    return KEY_PREFIX + name


def worst(*levels: str | None) -> str:
    return max((lv for lv in levels if lv is not None), key=LEVELS.index, default="normal")


def parse_level(text: str) -> str | None:
    """'shed\\n' -> 'shed'; '' -> None (no vote); anything else -> ValueError."""
    word = text.strip().lower()
    if not word:
        return None
    if word not in LEVELS:
        raise ValueError(f"{word[:40]!r} is not one of normal, soften, shed")
    return word


def parse_report(doc: object, where: str) -> PressureReport:
    """A published report (decoded JSON) -> PressureReport; ValueError saying what is wrong."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: pressure report is not a JSON object")
    level = doc.get("level")
    if level not in LEVELS:
        raise ValueError(f"{where}: pressure level {level!r} is not one of normal, soften, shed")
    queue = doc.get("queue")
    if queue is not None and (not isinstance(queue, int) or isinstance(queue, bool) or queue < 0):
        raise ValueError(f"{where}: queue {queue!r} is not a non-negative integer or null")
    node = doc.get("node")
    return PressureReport(str(level), queue, node if isinstance(node, str) else "")


def report_from_status(doc: object, where: str) -> PressureReport:
    """From another queueguard's /status.json: what it publishes (`published_pressure`: its
    governor or a forced level, with its queue), else its governor's `pressure` level."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: status is not a JSON object")
    for key in ("published_pressure", "pressure"):
        if isinstance(doc.get(key), dict):
            return parse_report(doc[key], where)
    raise ValueError(f"{where}: no 'published_pressure' or 'pressure' in the status")


def queue_total(snapshot: dict[str, object]) -> int | None:
    """Messages in every watched queue of a QueueWatch snapshot; None before its first round."""
    queues = snapshot.get("queues")
    if snapshot.get("time") is None or not isinstance(queues, list):
        return None
    return sum(int(q.get("messages", 0)) for q in queues if isinstance(q, dict))


class LevelFile:
    """A file an admin (or a test) writes `normal`, `soften` or `shed` into.

    The published level is at least what it says: draining a host for
    maintenance is `echo shed > /etc/queueguard/force-pressure`. A missing or
    empty file has no say; unreadable content is logged (once per content)
    and has no say either.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._complained: str | None = None

    def read(self) -> str | None:
        try:
            text = self.path.read_text(errors="replace")[:200]
        except FileNotFoundError:
            return None
        except OSError as e:
            text = f"<{e}>"
        try:
            level = parse_level(text)
        except ValueError as e:
            if self._complained != text:
                log.warning("pressure level file %s ignored: %s", self.path, e)
                self._complained = text
            return None
        self._complained = None
        return level


class PressurePublisher:
    """Builds this host's report and writes it to Redis (when there is one) every `interval`."""

    def __init__(self, name: str, *, level: Callable[[], str], reason: Callable[[], str | None] = lambda: None,
                 queue: Callable[[], int | None] = lambda: None, level_file: LevelFile | None = None,
                 redis: Redis | None = None, interval: float = 5.0, ttl: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.level = level
        self.reason = reason
        self.queue = queue
        self.level_file = level_file
        self.redis = redis
        self.interval = interval
        self.ttl = ttl or 3 * interval
        self.clock = clock
        self._failing = False

    def report(self) -> dict[str, object]:
        governed = self.level()
        forced = self.level_file.read() if self.level_file is not None else None
        level = worst(governed, forced)
        reason = self.reason() if level == governed or self.level_file is None else \
            f"forced by {self.level_file.path}"
        return {"node": self.name, "level": level, "governor": governed, "forced": forced, "reason": reason,
                "queue": self.queue(), "time": round(self.clock(), 3), "interval": self.interval}

    async def publish_once(self) -> dict[str, object]:
        report = self.report()
        if self.redis is None:
            return report
        try:
            await self.redis.set(report_key(self.name), json.dumps(report), px=int(self.ttl * 1000))
        except Exception as e:
            raise_if_cancelling(e)
            metrics.pressure_published.labels("error").inc()
            if not self._failing:
                log.warning("publishing pressure to Redis failed (readers fall back after the TTL): %s", e)
            self._failing = True
            return report
        metrics.pressure_published.labels("ok").inc()
        if self._failing:
            log.info("publishing pressure to Redis works again")
        self._failing = False
        return report

    async def run(self) -> None:
        while True:
            await self.publish_once()
            raise_if_cancelling()
            await asyncio.sleep(self.interval)


def publisher_from_settings(settings: Settings, policy: Callable[[], Policy],
                            governor: Governor) -> PressurePublisher | None:
    """The publisher `publish_pressure` asks for; its level is this host's governor (the one
    admission at the door uses), judged by the running policy's thresholds."""
    pub = settings.publish_pressure
    if pub is None:
        return None

    def level() -> str:
        return governor.current(policy().pressure).label

    redis = connect(settings.state, BACKGROUND) if settings.state != "memory" else None
    return PressurePublisher(
        pub.name or settings.node or socket.gethostname(), level=level, reason=lambda: governor.reason,
        level_file=LevelFile(pub.level_file) if pub.level_file is not None else None, redis=redis,
        interval=pub.interval, ttl=pub.ttl,
    )


class RedisPressureSource:
    """Reads the report another queueguard publishes under `qg:pressure:<name>`."""

    def __init__(self, redis: Redis, name: str) -> None:
        self.redis, self.name = redis, name

    async def read(self) -> PressureReport | None:
        raw = await self.redis.get(report_key(self.name))
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"redis {report_key(self.name)}: not JSON: {e}") from e
        return parse_report(doc, f"redis {report_key(self.name)}")


class HttpPressureSource:
    """Reads another queueguard's /status.json (no shared Redis needed), with its bearer token if it has one."""

    def __init__(self, url: str, timeout: float = HTTP_TIMEOUT, token: str | None = None) -> None:
        self.url, self.timeout, self.token = url, timeout, token

    def _get(self) -> bytes:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        with urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=self.timeout) as r:
            body: bytes = r.read(MAX_REPORT_BYTES + 1)
        if len(body) > MAX_REPORT_BYTES:
            raise ValueError(f"{self.url}: status larger than {MAX_REPORT_BYTES} bytes")
        return body

    async def read(self) -> PressureReport | None:
        body = await asyncio.to_thread(self._get)
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise ValueError(f"{self.url}: not JSON: {e}") from e
        return report_from_status(doc, self.url)


def pressure_sources(settings: Settings) -> dict[str, PressureSource]:
    """One source per route that names one (settings validated: redis routes have a redis state)."""
    sources: dict[str, PressureSource] = {}
    redis: Redis | None = None
    for name, route in settings.routes.items():
        p = route.pressure
        if p is None:
            continue
        if p.source == "http":
            token = read_token(p.token_file) if p.token_file is not None else None
            sources[name] = HttpPressureSource(p.url, token=token)
            continue
        if redis is None:
            redis = connect(settings.state, BACKGROUND)
        sources[name] = RedisPressureSource(redis, p.name)
    return sources
