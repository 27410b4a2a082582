"""Where rate-limit state lives: one narrow protocol, two backends.

A store keeps one number per key, the GCRA "theoretical arrival time" (TAT,
seconds since the epoch). `peek` reads (RCPT time, changes nothing);
`advance` adds to it atomically per key (after the final verdict). The
decision itself is pure and lives in `gcra`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from queueguard import metrics


class RateStore(Protocol):
    name: str

    async def peek(self, keys: Sequence[str]) -> list[float | None]:
        """The TAT of each key, None for a key never seen or expired."""
        ...

    async def advance(self, updates: Sequence[tuple[str, float]], now: float) -> None:
        """Per (key, increment): tat = max(tat, now) + increment, atomically; the key may
        be forgotten once its TAT has passed."""
        ...

    def tracked(self) -> int | None:
        """Keys held, when the store can say cheaply (None: it cannot)."""
        ...

    async def close(self) -> None: ...


class MemoryStore:
    """In-process store, bounded in memory and in time per operation.

    Keys are kept as their 64-bit hash (`hash(str)`, per-process random): a
    collision among a million keys has odds around 1e-7 and would only make two
    keys share a budget, and it saves the key strings (~60-90 bytes each).

    Expiry without a timer or heap: two generations. Writes go to `new`; each
    write also moves two entries out of `old`, keeping them (in `new`) only
    while their TAT is in the future. When `old` is empty the generations
    swap. So every key is looked at once per generation, expired keys go away
    within about half a generation of writes, and each operation costs O(1).
    Over `max_keys`, entries are dropped from `old` (live ones are counted as
    evictions: the limiter forgets them and becomes briefly more lenient).
    """

    name = "memory"

    def __init__(self, max_keys: int = 1_000_000) -> None:
        self.max_keys = max_keys
        self._new: dict[int, float] = {}
        self._old: dict[int, float] = {}

    async def peek(self, keys: Sequence[str]) -> list[float | None]:
        return [self.get(k) for k in keys]

    async def advance(self, updates: Sequence[tuple[str, float]], now: float) -> None:
        for key, increment in updates:
            self.add(key, increment, now)
        metrics.ratelimit_keys_tracked.labels(self.name).set(self.tracked())

    def get(self, key: str) -> float | None:
        h = hash(key)
        tat = self._new.get(h)
        return self._old.get(h) if tat is None else tat

    def add(self, key: str, increment: float, now: float) -> float:
        h = hash(key)
        tat = self._new.get(h)
        if tat is None:
            tat = self._old.pop(h, None)
        tat = (now if tat is None or tat < now else tat) + increment
        self._new[h] = tat
        self._sweep(now)
        return tat

    def _sweep(self, now: float) -> None:
        if not self._old:
            self._old, self._new = self._new, {}
        for _ in range(2):
            if not self._old:
                break
            h, tat = self._old.popitem()
            if tat > now and h not in self._new:
                self._new[h] = tat
        while len(self._new) + len(self._old) > self.max_keys:
            if not self._old:
                self._old, self._new = self._new, {}
            _, tat = self._old.popitem()
            if tat > now:
                metrics.ratelimit_evictions.inc()

    def tracked(self) -> int:
        return len(self._new) + len(self._old)

    async def close(self) -> None:
        return None


def make_store(url: str, max_keys: int) -> RateStore:
    """'memory' -> MemoryStore(max_keys); 'redis://...', 'rediss://...', 'unix://...' -> RedisStore."""
    if url == "memory":
        return MemoryStore(max_keys)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from queueguard.ratelimit.redis_store import RedisStore

        return RedisStore(url)
    raise ValueError(f"state must be 'memory' or a redis:// URL, got {url!r}")
