"""GCRA math with an explicit clock."""

from __future__ import annotations

import pytest

from queueguard.policy.schema import RateLimitRule
from queueguard.ratelimit.gcra import Limit, advance, decide


def run(limit: Limit, times: list[float]) -> list[bool]:
    """Offer one event at each time; consume only what is allowed (as commit would)."""
    tat: float | None = None
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
