"""GCRA (generic cell rate algorithm): the rate-limit decision, as pure functions.

Why GCRA rather than a sliding window: it keeps one number per key, the
"theoretical arrival time" (TAT) — when the key's bucket would be empty
again. That fits the <= 200 bytes/key budget of the in-process store (a
sliding log keeps a timestamp per event; a sliding window two counters and a
window start), and the shared update is one tiny atomic Redis script:
`tat = max(tat, now) + n * interval`, with the key expiring when the TAT
passes (an expired key and a fresh key mean the same thing). It is exact,
not an approximation between windows, and gives the retry-after for free.

With `interval = period / count` and `burst` B (default: count), a quiet key
may take B events at once, then one every `interval`: '120/10m' with burst
30 lets 30 through at once, then one every 5 s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from queueguard.policy.schema import RateLimitRule

_EPSILON = 1e-9


@dataclass(frozen=True)
class Limit:
    interval: float
    burst: int

    @classmethod
    def of(cls, rule: RateLimitRule) -> Limit:
        return cls(rule.rate.period / rule.rate.count, rule.burst or rule.rate.count)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float
    remaining: int


def decide(tat: float | None, now: float, limit: Limit, n: int = 1) -> Decision:
    """May `n` more events happen now? Does not change anything."""
    base = now if tat is None or tat < now else tat
    room = limit.burst * limit.interval - (base - now)
    excess = n * limit.interval - room
    remaining = max(0, math.floor(room / limit.interval + _EPSILON) - n)
    if excess <= _EPSILON * limit.interval:
        return Decision(True, 0.0, remaining)
    return Decision(False, excess, 0)


def advance(tat: float | None, now: float, limit: Limit, n: int = 1) -> float:
    """The TAT after `n` events at `now` (what the stores do atomically)."""
    base = now if tat is None or tat < now else tat
    return base + n * limit.interval
