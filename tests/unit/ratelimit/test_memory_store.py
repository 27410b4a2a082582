"""The in-process store: GCRA state, expiry, and the cap on keys."""

from __future__ import annotations

from queueguard import metrics
from queueguard.ratelimit.store import MemoryStore, make_store


async def test_advance_and_peek() -> None:
    s = MemoryStore()
    assert await s.peek(["a"]) == [None]
    await s.advance([("a", 5.0), ("b", 10.0)], now=100.0)
    await s.advance([("a", 5.0)], now=101.0)
    assert await s.peek(["a", "b", "c"]) == [110.0, 110.0, None]
    await s.advance([("a", 5.0)], now=200.0)  # stale TAT: restarts from now
    assert await s.peek(["a"]) == [205.0]


def test_expired_keys_are_swept_by_later_writes() -> None:
    s = MemoryStore()
    for i in range(1000):
        s.add(f"old{i}", 1.0, now=0.0)
    assert s.tracked() == 1000
    for i in range(3000):
        s.add(f"new{i % 10}", 100.0, now=100.0 + i)
    assert s.tracked() <= 20  # the 1000 expired keys are gone; 10 live ones (+ a few in transit)
    assert s.get("new3") is not None


def test_live_keys_survive_generation_swaps() -> None:
    s = MemoryStore()
    s.add("long", 10_000.0, now=0.0)
    for i in range(5000):
        s.add(f"k{i}", 1.0, now=float(i))
    assert s.get("long") == 10_000.0


def test_cap_on_keys_evicts_and_counts() -> None:
    s = MemoryStore(max_keys=1000)
    before = metrics.ratelimit_evictions._value.get()
    for i in range(5000):
        s.add(f"k{i}", 1e6, now=0.0)  # all live
        assert s.tracked() <= 1000
    assert metrics.ratelimit_evictions._value.get() - before == 4000
    assert s.get("k4999") == 1e6  # the newest is kept


def test_make_store() -> None:
    assert isinstance(make_store("memory", 5000), MemoryStore)
    assert make_store("redis://127.0.0.1:1/0", 5000).name == "redis"  # no connection until used
