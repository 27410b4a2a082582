"""GCRA math with an explicit clock."""

from __future__ import annotations

import pytest

from queueguard.policy.schema import RateLimitRule
from queueguard.ratelimit.gcra import Ask, Limit, advance, decide, refund, reserve


def run(limit: Limit, times: list[float], tat: float | None = None) -> list[bool]:
    """Offer one event at each time, from `tat`; consume only what is allowed (as a reservation would)."""
    out = []
    for t in times:
        ok = decide(tat, t, limit).allowed
        if ok:
            tat = advance(tat, t, limit)
        out.append(ok)
    return out


def test_limit_from_rule_defaults_burst_to_count() -> None:
    rule = RateLimitRule.model_validate({"name": "r", "key": "recipient", "rate": "120/10m"})
    assert Limit.of(rule) == Limit(5.0, 120)
    rule = RateLimitRule.model_validate({"name": "r", "key": "recipient", "rate": "120/10m", "burst": 30})
    assert Limit.of(rule) == Limit(5.0, 30)


def test_burst_at_once_then_one_per_interval() -> None:
    limit = Limit(interval=5.0, burst=3)
    assert run(limit, [0, 0, 0, 0]) == [True, True, True, False]
    assert run(limit, [0, 0, 0, 4.9, 5.0, 5.1, 10.0]) == [True, True, True, False, True, False, True]


def test_steady_rate_is_enforced_over_a_long_run() -> None:
    limit = Limit(interval=1.0, burst=10)
    times = [i * 0.1 for i in range(10_000)]  # 10 per second offered for 1000 s
    allowed = sum(run(limit, times))
    assert allowed == pytest.approx(1000 + 10, abs=2)


def test_quiet_key_recovers_fully() -> None:
    limit = Limit(interval=2.0, burst=4)
    assert run(limit, [0, 0, 0, 0, 0, 8, 8, 8, 8, 8]) == [True] * 4 + [False] + [True] * 4 + [False]


def test_retry_after_and_remaining() -> None:
    limit = Limit(interval=5.0, burst=2)
    fresh = decide(None, 100.0, limit)
    assert (fresh.allowed, fresh.remaining) == (True, 1)
    tat = advance(advance(None, 100.0, limit), 100.0, limit)
    assert tat == 110.0
    d = decide(tat, 100.0, limit)
    assert not d.allowed and d.retry_after == pytest.approx(5.0)
    d = decide(tat, 103.0, limit)
    assert not d.allowed and d.retry_after == pytest.approx(2.0)
    assert decide(tat, 105.0, limit).allowed


def test_several_units_at_once() -> None:
    limit = Limit(interval=1.0, burst=5)
    assert decide(None, 0.0, limit, n=5).allowed
    assert not decide(None, 0.0, limit, n=6).allowed
    assert advance(None, 0.0, limit, n=5) == 5.0


def test_stale_tat_counts_as_fresh() -> None:
    limit = Limit(interval=1.0, burst=1)
    assert decide(50.0, 1000.0, limit).allowed
    assert advance(50.0, 1000.0, limit) == 1001.0


def test_reserve_takes_one_event_on_every_key_or_none() -> None:
    small, big = Limit(interval=10.0, burst=1), Limit(interval=1.0, burst=100)
    asks = [Ask("a", small), Ask("b", big)]
    r = reserve([None, None], 0.0, asks)
    assert r.reserved and r.tats == [10.0, 1.0] and r.waits == [0.0, 0.0]
    r = reserve(r.tats, 0.0, asks)  # 'a' is full: a gate, so 'b' takes nothing either
    assert not r.reserved and r.tats == [10.0, 1.0] and r.waits == [pytest.approx(10.0), 0.0]


def test_a_key_that_is_no_gate_counts_along_over_its_limit() -> None:
    """Shadow and quarantine rules: over the limit is a hit, but the recipient is not refused."""
    asks = [Ask("q", Limit(interval=10.0, burst=1), gate=False), Ask("t", Limit(interval=1.0, burst=5))]
    r = reserve([10.0, None], 0.0, asks)
    assert r.reserved and r.tats == [20.0, 1.0] and r.waits[0] == pytest.approx(10.0)


def test_refund_gives_one_interval_back_while_the_tat_is_ahead() -> None:
    assert refund(30.0, 0.0, 10.0) == 20.0
    assert refund(15.0, 10.0, 10.0) is None  # would fall behind now: the key is fresh again
    assert refund(5.0, 10.0, 10.0) is None  # already past: nothing to give back
    assert refund(None, 10.0, 10.0) is None


def test_reserve_then_refund_is_as_if_nothing_happened() -> None:
    limit = Limit(interval=5.0, burst=2)
    tat = advance(None, 100.0, limit)
    r = reserve([tat], 100.0, [Ask("k", limit)])
    assert refund(r.tats[0], 101.0, limit.interval) == tat


@pytest.mark.parametrize("hosts", [1, 2, 3, 4, 7])
def test_hosts_taking_their_share_admit_what_one_would(hosts: int) -> None:
    """Each host enforces limit.share(n) from the TAT it last saw: together they admit the room
    that was left (within one event per host, rounding), not a full burst each."""
    limit = Limit(interval=10.0, burst=20)
    seen = advance(None, 0.0, limit, n=8)  # 8 of the burst of 20 used before the outage
    share = limit.share(hosts)
    total = 0
    for _ in range(hosts):
        total += sum(run(share, [0.0] * 50, seen))
    assert 12 - hosts < total <= 12
    assert share.tolerance == limit.tolerance



def test_a_tat_read_back_in_microseconds_is_not_off_by_one() -> None:
    """Redis keeps microseconds: 2 of 3 used may come back as now + 40.0000005 (the rounding of now),
    and must still leave room for the third."""
    limit = Limit(interval=20.0, burst=3)
    now = 1_700_000_000.123456789
    tat = (round(now * 1e6) + 40_000_000) / 1e6
    assert tat - now > 40.0
    assert decide(tat, now, limit).allowed and decide(tat, now, limit).remaining == 0
    assert not decide(tat + 1e-5, now, limit).allowed
