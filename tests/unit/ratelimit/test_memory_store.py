"""The in-process stores: GCRA state, expiry, the cap on keys; the outage stand-in (LocalShare)."""

from __future__ import annotations

from queueguard import metrics
from queueguard.ratelimit.gcra import Ask, Limit
from queueguard.ratelimit.store import LocalShare, MemoryStore, Owed, make_store

ONE_PER_10S = Limit(interval=10.0, burst=4)


def test_add_and_get() -> None:
    s = MemoryStore()
    assert s.get("a") is None
    s.add("a", 5.0, now=100.0)
    s.add("b", 10.0, now=100.0)
    s.add("a", 5.0, now=101.0)
    assert [s.get(k) for k in ("a", "b", "c")] == [110.0, 110.0, None]
    s.add("a", 5.0, now=200.0)  # stale TAT: restarts from now
    assert s.get("a") == 205.0


async def test_reserve_refund_reconcile() -> None:
    s = MemoryStore()
    asks = [Ask("k", ONE_PER_10S)]
    assert [(await s.reserve(asks, 0.0)).reserved for _ in range(5)] == [True] * 4 + [False]
    assert s.get("k") == 40.0
    assert await s.refund([("k", 10.0)], 1.0) == [30.0]
    assert (await s.reserve(asks, 1.0)).reserved
    assert await s.reconcile([Owed("k", 100.0, 20.0), Owed("new", None, 20.0)], 1.0) == [120.0, 21.0]


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
    assert make_store("redis+sentinel://127.0.0.1:1/mymaster", 5000).name == "redis"


async def test_local_share_enforces_from_the_mirror_and_owes_what_it_admitted() -> None:
    hosts = 2
    local = LocalShare(MemoryStore(), lambda: hosts)
    local.observe(["k"], [20.0], now=0.0)  # while Redis answered: 2 of the burst of 4 used
    asks = [Ask("k", ONE_PER_10S)]
    # the 2 left, shared by 2 hosts: this one admits 1 (each local event stands for 2)
    assert [(await local.reserve(asks, 0.0)).reserved for _ in range(3)] == [True, False, False]
    assert local.tracked() == 1
    owed = local.take_owed(10)
    assert [(o.key, o.floor, o.increment) for o in owed] == [("k", 20.0, 10.0)]
    assert local.take_owed(10) == []
    local.restore(owed)  # the shared store failed again: still owed
    assert [o.increment for o in local.take_owed(10)] == [10.0]


async def test_local_share_refund_is_no_longer_owed() -> None:
    local = LocalShare(MemoryStore(), lambda: 3)
    asks = [Ask("k", ONE_PER_10S)]
    assert (await local.reserve(asks, 0.0)).reserved
    assert local.mirror.get("k") == 30.0  # one local event stands for three
    assert await local.refund([("k", 10.0)], 0.0) == [None]
    assert [o.increment for o in local.take_owed(10)] == [0.0]
