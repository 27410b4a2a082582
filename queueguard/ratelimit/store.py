"""Where rate-limit state lives: one narrow protocol, three stores.

A store keeps one number per key, the GCRA "theoretical arrival time" (TAT,
seconds since the epoch). `reserve` checks a recipient's keys and takes one
event on them in one atomic step (RCPT time); `refund` gives an event back
(the recipient was refused later, or its mail did not go through); `reconcile`
adds what a host admitted while it could not reach the shared store. The
arithmetic is pure and lives in `gcra`.

  MemoryStore   this process only (`state: memory`), and the mirror below
  RedisStore    shared by every guard on one Redis (redis_store.py)
  LocalShare    the fallback while Redis is down: the mirror of the shared TATs
                this process saw, and its share of each limit
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from queueguard import metrics
from queueguard.ratelimit import gcra
from queueguard.ratelimit.gcra import Ask, Reservation


@dataclass
class Owed:
    """What this process admitted on one key while the shared store was down: `increment` seconds
    of TAT (events x interval, the whole limit's interval, not the share's) on top of `floor`, the
    shared TAT it last saw (None: it had not seen the key)."""

    key: str
    floor: float | None
    increment: float


class RateStore(Protocol):
    name: str

    async def reserve(self, asks: Sequence[Ask], now: float) -> Reservation:
        """Atomically: check every key, and take one event on all of them unless a gate key is
        over its limit (gcra.reserve)."""
        ...

    async def refund(self, refunds: Sequence[tuple[str, float]], now: float) -> list[float | None]:
        """Per (key, interval): give one event back if the key's TAT is still ahead of now.
        Returns each key's TAT afterwards."""
        ...

    async def reconcile(self, owed: Sequence[Owed], now: float) -> list[float | None]:
        """Per entry: tat = max(tat, now, floor) + increment, atomically per key. Returns the TATs."""
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

    async def reserve(self, asks: Sequence[Ask], now: float) -> Reservation:
        return self.reserve_now(asks, now)

    def reserve_now(self, asks: Sequence[Ask], now: float) -> Reservation:
        """The synchronous core of `reserve` (no await between the check and the update)."""
        result = gcra.reserve([self.get(a.key) for a in asks], now, asks)
        if result.reserved:
            for ask, tat in zip(asks, result.tats, strict=True):
                self.set(ask.key, tat, now)
            metrics.ratelimit_keys_tracked.labels(self.name).set(self.tracked())
        return result

    async def refund(self, refunds: Sequence[tuple[str, float]], now: float) -> list[float | None]:
        out = []
        for key, interval in refunds:
            tat = gcra.refund(self.get(key), now, interval)
            self.set(key, tat, now)
            out.append(tat)
        return out

    async def reconcile(self, owed: Sequence[Owed], now: float) -> list[float | None]:
        out: list[float | None] = []
        for o in owed:
            tat = self.get(o.key)
            base = max(now, o.floor or now, tat or now)
            self.set(o.key, base + o.increment, now)
            out.append(base + o.increment)
        return out

    def get(self, key: str) -> float | None:
        h = hash(key)
        tat = self._new.get(h)
        return self._old.get(h) if tat is None else tat

    def add(self, key: str, increment: float, now: float) -> float:
        """tat = max(tat, now) + increment."""
        tat = self.get(key)
        tat = (now if tat is None or tat < now else tat) + increment
        self.set(key, tat, now)
        return tat

    def set(self, key: str, tat: float | None, now: float) -> None:
        """The key's TAT becomes `tat` (None, or a time already past: the key is forgotten)."""
        h = hash(key)
        self._old.pop(h, None)
        if tat is None or tat <= now:
            self._new.pop(h, None)
            return
        self._new[h] = tat
        self._sweep(now)

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


class LocalShare:
    """The fallback of a shared store: this process's mirror of the shared TATs, and its share.

    While the shared store answers, every TAT it returns is copied into `mirror` (`observe`), so
    when it fails the mirror already holds where each key this process saw stood: enforcing from
    it is not a fresh, full burst. During the outage each of the `hosts()` processes that shared
    the store (as last counted: shared_state.Membership) takes its share of each limit
    (gcra.Limit.share), so together they admit what one would; what this process admitted is kept
    as `Owed` and added to the shared store when it answers again (`take_owed`). Bounded:
    at most `max_owed` keys are remembered as owed (more are still enforced, just not reconciled).
    """

    name = "memory"

    def __init__(self, mirror: MemoryStore, hosts: Callable[[], int] = lambda: 1,
                 max_owed: int = 100_000) -> None:
        self.mirror = mirror
        self.hosts = hosts
        self.max_owed = max_owed
        self._owed: dict[str, Owed] = {}

    def observe(self, keys: Sequence[str], tats: Sequence[float | None], now: float) -> None:
        """The shared store's answer for these keys (their TATs after the call)."""
        for key, tat in zip(keys, tats, strict=True):
            self.mirror.set(key, tat, now)

    async def reserve(self, asks: Sequence[Ask], now: float) -> Reservation:
        n = self.hosts()
        floors = [self.mirror.get(a.key) for a in asks]
        result = self.mirror.reserve_now([Ask(a.key, a.limit.share(n), a.gate) for a in asks], now)
        if result.reserved:
            for ask, floor in zip(asks, floors, strict=True):
                self._owe(ask.key, floor, ask.limit.interval)
        return result

    async def refund(self, refunds: Sequence[tuple[str, float]], now: float) -> list[float | None]:
        n = self.hosts()
        for key, interval in refunds:
            if (o := self._owed.get(key)) is not None:
                o.increment = max(0.0, o.increment - interval)
        return await self.mirror.refund([(key, interval * n) for key, interval in refunds], now)

    async def reconcile(self, owed: Sequence[Owed], now: float) -> list[float | None]:
        return [self.mirror.get(o.key) for o in owed]  # it is the one that owes, not the one owed

    def _owe(self, key: str, floor: float | None, interval: float) -> None:
        o = self._owed.get(key)
        if o is not None:
            o.increment += interval
        elif len(self._owed) < self.max_owed:
            self._owed[key] = Owed(key, floor, interval)

    def take_owed(self, n: int) -> list[Owed]:
        """Up to `n` entries to add to the shared store, taken out (so two transactions that both
        find the store back do not add them twice); `restore` them if that fails."""
        keys: list[str] = []
        for key in self._owed:
            if len(keys) == n:
                break
            keys.append(key)
        return [self._owed.pop(k) for k in keys]

    def restore(self, owed: Sequence[Owed]) -> None:
        for o in owed:
            if (now := self._owed.get(o.key)) is not None:
                now.increment += o.increment
                now.floor = o.floor
            else:
                self._owed[o.key] = o

    def tracked(self) -> int:
        return self.mirror.tracked()

    async def close(self) -> None:
        return None


def make_store(url: str, max_keys: int) -> RateStore:
    """'memory' -> MemoryStore(max_keys); any Redis URL (redis_client.parse) -> RedisStore."""
    if url == "memory":
        return MemoryStore(max_keys)
    from queueguard.ratelimit.redis_store import RedisStore

    return RedisStore(url)
