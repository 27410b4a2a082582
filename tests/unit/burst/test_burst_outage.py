"""A Redis outage is no fresh start for a wave: the burst counts a shared window gave are mirrored
(window.WindowShare), and during the outage each process counts its copies as its share.

The shared window here is a MemoryWindow behind a switch that fails like an unreachable Redis
(a fault injected in-process: the unit level cannot kill a server); the same with a real
redis-server killed under two real guards is tests/integration/test_burst_redis.py."""

from __future__ import annotations

from collections.abc import Sequence

from queueguard.burst.campaign import Campaign, Sighting
from queueguard.burst.check import BurstCheck
from queueguard.burst.window import MemoryWindow, set_window_sum
from tests.unit.burst.test_burst_check import Clock, contexts, policy, wave


class SwitchedWindow:
    """A shared window (two checks count together in it) that can be switched off."""

    def __init__(self) -> None:
        self.inner = MemoryWindow()
        self.down = False

    async def add(self, keys: Sequence[str], period: float, now: float) -> list[int]:
        if self.down:
            raise ConnectionError("redis down")
        return self.inner.add_now(keys, period, now)

    async def link(self, scope: str, seen: Sighting, period: float, now: float) -> Campaign:
        if self.down:
            raise ConnectionError("redis down")
        return self.inner.link_now(scope, seen, period, now)


def hosts(shared: SwitchedWindow, n: int = 2) -> list[BurstCheck]:
    """`n` processes sharing the window, each with its own mirror, each knowing there are `n`."""
    clock = Clock()
    return [BurstCheck(shared, fallback=MemoryWindow(), hosts=lambda: n, clock=clock) for _ in range(n)]


async def alternate(checks: list[BurstCheck], raws: list[bytes], **rule: object) -> list[dict[str, str] | None]:
    """Each copy to the next process in turn (MX round-robin); per copy its fingerprints if held."""
    out: list[dict[str, str] | None] = []
    pol = policy(**rule)
    for i, raw in enumerate(raws):
        (ctx,) = await contexts(checks[i % len(checks)], [raw], pol)
        out.append(ctx.fingerprints if "burst" in ctx.fingerprints else None)
    return out


async def test_a_wave_already_held_stays_held_under_its_campaign_id_when_redis_fails() -> None:
    shared = SwitchedWindow()
    checks = hosts(shared)
    raws = wave(12)
    before = await alternate(checks, raws[:7])  # threshold 5: copies 6 and 7 held
    assert [f is not None for f in before] == [False] * 5 + [True] * 2
    campaign = {f["campaign"] for f in before if f}
    assert len(campaign) == 1

    shared.down = True
    during = await alternate(checks, raws[7:])
    # before the mirror, both processes counted from zero and let the next 5 copies each through
    assert all(f is not None for f in during), during
    assert {f["campaign"] for f in during if f} == campaign  # one `purge --campaign` still takes them all


async def test_during_an_outage_processes_together_pass_about_the_threshold() -> None:
    shared = SwitchedWindow()
    checks = hosts(shared)
    raws = wave(20)
    before = await alternate(checks, raws[:4])
    shared.down = True
    during = await alternate(checks, raws[4:])
    passed = sum(f is None for f in before + during)
    # the threshold (5) and at most one more per process: each knew the count only as of its own
    # last copy; the old empty fallback passed 4 + 2 x 5 = 14
    assert passed <= 5 + 1, passed
    assert during[-1] is not None


async def test_subject_keys_are_mirrored_too() -> None:
    shared = SwitchedWindow()
    checks = hosts(shared)
    raws = [f"Subject: Your parcel {i} is waiting x{i}q\r\n\r\nhello {i}\r\n".encode() for i in range(12)]
    before = await alternate(checks, raws[:4], fingerprint="subject")
    shared.down = True
    during = await alternate(checks, raws[4:], fingerprint="subject")
    assert sum(f is None for f in before + during) <= 6


async def test_messages_seen_once_are_not_mirrored() -> None:
    shared = SwitchedWindow()
    (check,) = hosts(shared, 1)
    await alternate([check], [raw for seed in range(6) for raw in wave(1, seed=seed)])
    assert check.share is not None
    assert len(check.share.mirror) == 0 and not check.share.mirror._campaigns


def test_set_window_sum_fills_the_current_bucket_and_drains_the_oldest() -> None:
    period, now = 600.0, 1_000_000.0
    step = period / 10
    buckets = {int(now // step) - 5: 3, int(now // step) - 1: 2}
    set_window_sum(buckets, 9, now, period)
    assert buckets == {int(now // step) - 5: 3, int(now // step) - 1: 2, int(now // step): 4}
    set_window_sum(buckets, 5, now, period)
    assert buckets == {int(now // step) - 1: 1, int(now // step): 4}
    set_window_sum(buckets, 0, now, period)
    assert buckets == {}


async def test_the_mirror_counts_as_the_shared_window_did() -> None:
    """The mirror's count of a campaign is the shared one, not this process's own copies."""
    shared = SwitchedWindow()
    checks = hosts(shared)
    await alternate(checks, wave(8)[:7])
    for check in checks:
        assert check.share is not None
        counts = sorted(c.buckets and sum(c.buckets.values()) for c in check.share.mirror._campaigns.values()
                        if c.merged_into is None)
        assert counts[-1] in (6, 7)  # as of this process's last copy (its own copies: 3 or 4)


async def test_a_shared_window_that_forgot_a_wave_is_outvoted_by_the_mirror() -> None:
    """Redis restarted empty between two copies (it answers, so no outage is seen): its counts start
    from one again, and without the mirror the wave would pass a whole threshold once more: copies
    of a variant the mirror saw count on in the campaign their held copies carry."""
    text = ("Dear customer, your parcel could not be delivered because the customs fee was not paid. "
            "Pay the small fee today and the courier will bring the parcel tomorrow morning. "
            "Follow the link below to choose a delivery slot and confirm your address details.")
    shared = SwitchedWindow()
    checks = hosts(shared)
    raws = [f"Subject: Your parcel {i} is waiting x{i}q\r\n\r\n{text} Ref {i * 7919}.\r\n".encode()
            for i in range(16)]
    before = await alternate(checks, raws[:8])
    assert [f is not None for f in before] == [False] * 5 + [True] * 3
    shared.inner = MemoryWindow()  # what the restarted Redis knows: nothing
    after = await alternate(checks, raws[8:])
    assert all(f is not None for f in after), after
    assert {f["campaign"] for f in before + after if f} == {before[-1]["campaign"]}  # type: ignore[index]


async def test_a_mirrored_key_count_never_outvotes_the_shared_window_once_it_slid() -> None:
    """The mirror dates a count at the moment it copied it: another host's copies from early in the
    window stay in the mirror after they left the shared window. Judged by the mirror, a later copy
    counted events no window held together (red-team review: 22 judged where 7 were true)."""
    shared = SwitchedWindow()
    a, b = hosts(shared)
    raws = [f"Subject: Your parcel {i} is waiting x{i}q\r\n\r\nhello {i}\r\n".encode() for i in range(22)]
    pol = {"fingerprint": "subject", "threshold": "20 in 10m"}
    clock = a.clock
    assert isinstance(clock, Clock)
    for raw in raws[:15]:
        clock.t += 1
        await alternate([b], [raw], **pol)
    clock.t += 485  # still in the window (buckets of 60 s) with B's copies: the shared count is 16
    assert await alternate([a], [raws[15]], **pol) == [None]
    held = []
    for raw in raws[16:]:
        clock.t += 100
        held += await alternate([a], [raw], **pol)
    assert held == [None] * len(held)
