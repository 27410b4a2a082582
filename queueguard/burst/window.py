"""Sliding-window counts per fingerprint key, shared by every recipient and client.

A window of `period` seconds is cut into BUCKETS buckets; a key's count is
the sum of its buckets that are still inside the window, so the window
slides in steps of period/BUCKETS and old buckets expire by themselves.

The memory backend is bounded: at most `max_keys` keys, each holding at most
BUCKETS (bucket, count) pairs; when full, the key touched least recently is
dropped (a dropped key can only under-count, never invent a burst). Measured
on CPython 3.11: about 370 bytes per key with one live bucket, 540 with all
ten, so the default 50,000 keys stay under ~27 MiB — at 16 band keys per body
rule that is the band keys of the last ~3,000 distinct messages, and a live
burst is never the least recently touched key. The Redis backend keeps the
same buckets in one hash per key with a TTL of one window, so its memory is
bounded by the keys seen in one window (plus Redis's own maxmemory policy);
two MX hosts pointed at the same Redis count together.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from redis.asyncio import Redis

BUCKETS = 10
DEFAULT_MAX_KEYS = 50_000


class WindowCounter(Protocol):
    """The storage behind burst rules."""

    async def add(self, keys: Sequence[str], period: float, now: float) -> list[int]:
        """Count one event for each key; return each key's count in the window ending now (this one included)."""
        ...


def bucket_of(now: float, period: float) -> int:
    return int(now // (period / BUCKETS))


class MemoryWindow:
    """In-process counts: one host, or the fallback when Redis is down."""

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.max_keys = max_keys
        self._keys: OrderedDict[str, dict[int, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def add_now(self, keys: Sequence[str], period: float, now: float) -> list[int]:
        """The synchronous core of `add` (no I/O, so no awaits needed)."""
        current = bucket_of(now, period)
        oldest = current - BUCKETS + 1
        counts = []
        for key in keys:
            buckets = self._keys.pop(key, None) or {}
            for b in [b for b in buckets if b < oldest]:
                del buckets[b]
            buckets[current] = buckets.get(current, 0) + 1
            self._keys[key] = buckets
            counts.append(sum(buckets.values()))
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        return counts

    async def add(self, keys: Sequence[str], period: float, now: float) -> list[int]:
        return self.add_now(keys, period, now)


class RedisWindow:
    """Counts in Redis, one hash per key (field = bucket number), updated by one Lua script call."""

    def __init__(self, redis: Redis, prefix: str = "qg:burst:") -> None:
        self.redis = redis
        self.prefix = prefix
        script = resources.files("queueguard.burst").joinpath("window.lua").read_text()
        self._script = redis.register_script(script)

    async def add(self, keys: Sequence[str], period: float, now: float) -> list[int]:
        if not keys:
            return []
        ttl_ms = int(period * 1000 * (1 + 1 / BUCKETS)) + 1000
        result = await self._script(
            keys=[self.prefix + k for k in keys], args=[bucket_of(now, period), BUCKETS, ttl_ms]
        )
        return [int(c) for c in result]
