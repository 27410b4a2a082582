"""MemoryWindow: sliding-window counts with expiring buckets and a key cap."""

from __future__ import annotations

from queueguard.burst.window import BUCKETS, MemoryWindow


async def test_counts_accumulate_within_the_window() -> None:
    w = MemoryWindow()
    assert await w.add(["a", "b"], 600, 1000.0) == [1, 1]
    assert await w.add(["a"], 600, 1100.0) == [2]
    assert await w.add(["a", "b"], 600, 1500.0) == [3, 2]


async def test_old_buckets_expire() -> None:
    w = MemoryWindow()
    for t in range(10):
        await w.add(["k"], 100, 1000.0 + t)  # ten events in one bucket
    assert await w.add(["k"], 100, 1050.0) == [11]
    # a full window later only the new event counts
    assert await w.add(["k"], 100, 1000.0 + 100 + 100 / BUCKETS) == [2]
    assert await w.add(["k"], 100, 1300.0) == [1]


async def test_key_cap_evicts_least_recently_used() -> None:
    w = MemoryWindow(max_keys=3)
    for key in ("a", "b", "c"):
        await w.add([key], 60, 0.0)
    await w.add(["a"], 60, 1.0)  # a is now the most recent
    await w.add(["d"], 60, 2.0)  # evicts b
    assert len(w) == 3
    assert await w.add(["b"], 60, 3.0) == [1]
    assert await w.add(["a"], 60, 3.0) == [3]


def test_memory_per_key_matches_the_documented_bound() -> None:
    """The module docstring promises at most ~540 bytes per key (all ten buckets live); measure it."""
    import tracemalloc

    w = MemoryWindow(max_keys=5_000)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(5_000):
        for bucket in range(BUCKETS):
            w.add_now([f"burst-rule:b{i % 16:02d}:{i:016x}"], 600, bucket * 60.0)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(w) == 5_000
    assert used / 5_000 < 600, f"{used / 5_000:.0f} bytes per key"


def test_campaign_memory_per_distinct_message_matches_the_documented_bound() -> None:
    """window.py promises about 5.6 KB per distinct message in campaign state (33 link keys, a variant,
    a campaign) and a cap on links; measure both."""
    import random
    import tracemalloc

    from queueguard.burst.campaign import Sighting, link_keys

    rng = random.Random(1)
    signatures = [bytes(rng.getrandbits(8) for _ in range(128)) for _ in range(2_000)]
    seen = [Sighting(s, link_keys(s), (("subject+links", f"sl:{rng.getrandbits(64):016x}"),)) for s in signatures]
    w = MemoryWindow()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i, s in enumerate(seen):
        w.link_now("same-body-wave:", s, 600, 1000.0 + i)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert used / len(seen) < 6_500, f"{used / len(seen):.0f} bytes per distinct message"
    small = MemoryWindow(max_keys=1_000)
    for i, s in enumerate(seen):
        small.link_now("r:", s, 600, 1000.0 + i)
    assert len(small._links) <= 1.1 * small.max_links and len(small._variants) <= small.max_links // 16
