"""GCRA (generic cell rate algorithm): the rate-limit decision, as pure functions.

Why GCRA rather than a sliding window: it keeps one number per key, the
"theoretical arrival time" (TAT) — when the key's bucket would be empty
again. That fits the <= 200 bytes/key budget of the in-process store (a
sliding log keeps a timestamp per event; a sliding window two counters and a
window start), and the shared update is one tiny atomic Redis script
(`gcra.lua`, the same arithmetic as `reserve` and `refund` here), with the key
expiring when the TAT passes (an expired key and a fresh key mean the same
thing). It is exact, not an approximation between windows, and gives the
retry-after for free.

With `interval = period / count` and `burst` B (default: count), a quiet key
may take B events at once, then one every `interval`: '120/10m' with burst
30 lets 30 through at once, then one every 5 s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from queueguard.policy.schema import RateLimitRule

_EPSILON = 1e-9
SLACK = 2e-6
"""Seconds of rounding forgiven: Redis keeps microseconds, so a TAT read back from it (its mirror,
here) may sit up to a microsecond either side of `now` plus whole intervals."""


@dataclass(frozen=True)
class Limit:
    interval: float
    burst: float

    @classmethod
    def of(cls, rule: RateLimitRule) -> Limit:
        return cls(rule.rate.period / rule.rate.count, rule.burst or rule.rate.count)

    @property
    def tolerance(self) -> float:
        """How far ahead of now the TAT may be after an event: the whole bucket, in seconds."""
        return self.burst * self.interval

    def share(self, hosts: int) -> Limit:
        """This host's part of the limit when `hosts` enforce it apart (shared state down).

        The TAT stays in shared time (so the mirror of the shared TAT is the starting point) and
        each local event stands for `hosts` events: the tolerance is unchanged, the interval is
        `hosts` times longer. So N hosts together admit what one would, from where they were."""
        n = max(1, hosts)
        return Limit(self.interval * n, self.burst / n)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float
    remaining: int


def decide(tat: float | None, now: float, limit: Limit, n: int = 1) -> Decision:
    """May `n` more events happen now? Does not change anything."""
    base = now if tat is None or tat < now else tat
    room = limit.tolerance - (base - now)
    excess = n * limit.interval - room
    slack = max(SLACK, _EPSILON * limit.interval)
    remaining = max(0, math.floor((room + slack) / limit.interval) - n)
    if excess <= slack:
        return Decision(True, 0.0, remaining)
    return Decision(False, excess, 0)


def advance(tat: float | None, now: float, limit: Limit, n: int = 1) -> float:
    """The TAT after `n` events at `now`."""
    base = now if tat is None or tat < now else tat
    return base + n * limit.interval


@dataclass(frozen=True)
class Ask:
    """One key a recipient counts against. `gate`: being over this limit refuses the recipient
    (an enforced tempfail/reject rule), so nothing is reserved; shadow and quarantine rules are
    counted but do not refuse."""

    key: str
    limit: Limit
    gate: bool = True
    floor: float | None = None
    """The TAT this process last saw for the key in the shared store. A shared store that has no
    entry for the key at all (restarted empty, or evicted it) starts from here, not from a fresh
    burst; one that has an entry, even one lowered by another host's refund, keeps its own."""


@dataclass(frozen=True)
class Reservation:
    """What one atomic check-and-reserve found: `reserved` (every key took one event, or none
    did), each key's TAT afterwards, and each key's wait (0 when it was within its limit)."""

    reserved: bool
    tats: list[float | None]
    waits: list[float]


def reserve(tats: Sequence[float | None], now: float, asks: Sequence[Ask]) -> Reservation:
    """Check every key and, unless a gate key is over its limit, take one event on all of them.

    What the stores do atomically (the Redis script is this, in Lua): checking and taking in one
    step is what keeps concurrent transactions on several hosts from each seeing the same room."""
    waits = [decide(tat, now, ask.limit).retry_after for tat, ask in zip(tats, asks, strict=True)]
    ok = not any(wait > 0 and ask.gate for wait, ask in zip(waits, asks, strict=True))
    after: list[float | None] = (
        [advance(tat, now, ask.limit) for tat, ask in zip(tats, asks, strict=True)] if ok else list(tats))
    return Reservation(ok, after, waits)


def refund(tat: float | None, now: float, interval: float) -> float | None:
    """The TAT once one event of `interval` is given back (a reserved recipient whose mail did not
    go through); None when that leaves the key fresh. A TAT already past gives nothing back: the
    bucket refilled on its own."""
    if tat is None or tat <= now:
        return None
    back = tat - interval
    return back if back > now else None
