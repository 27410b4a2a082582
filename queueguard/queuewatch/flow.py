"""Is mail leaving a queue? Departures between scans, and "stuck" from a short history.

A big queue and a stuck queue are different alarms (incident 2021-12-03: the
queue grew for a day while nothing was delivered). Size alone cannot tell a
busy-but-flowing queue from a dead one, so each scan's message ids are
compared with the previous scan's: an id that is gone from every queue of the
MTA has *departed* (delivered, bounced or removed), attributed to the queue
it was last seen in. Postfix moves the same id between incoming, active and
deferred, which is therefore not a departure; Mailman writes a new file name
per queue, so a message moving from `in` to `pipeline` departs `in`.

A queue is *stuck* when, over a whole window, it never emptied, nothing
departed, and it either grew by at least `min_growth` or held at least
`min_messages` throughout. The thresholds stop a quiet server with one message
retrying to a dead domain from counting as stuck. The Prometheus alert
QueueguardQueueStuck applies the same rule to the exported counters.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from queueguard.queuewatch.spools import QueueScan

STUCK_WINDOW = 1800.0
STUCK_MIN_GROWTH = 10
STUCK_MIN_MESSAGES = 100
PARKING_QUEUES = {("postfix", "hold"), ("mailman", "bad"), ("mailman", "shunt")}
"""Queues where mail waits for a human by design; they are never "stuck"."""


@dataclass(frozen=True)
class FlowPoint:
    at: float
    messages: int
    departed: int
    """Departures since the previous point."""


@dataclass(frozen=True)
class Flow:
    arrived: int
    departed: int


def diff_scans(previous: Sequence[QueueScan] | None, current: Sequence[QueueScan]) -> dict[str, Flow]:
    """Arrivals and departures per queue of one MTA between two scans (None: first scan, all zero)."""
    if previous is None:
        return {s.queue: Flow(0, 0) for s in current}
    now_ids = _union(current)
    before_ids = _union(previous)
    before_by_queue = {s.queue: s.arrivals for s in previous}
    flows = {}
    for scan in current:
        before = before_by_queue.get(scan.queue, {})
        departed = sum(1 for qid in before if qid not in now_ids)
        arrived = sum(1 for qid in scan.arrivals if qid not in before_ids)
        flows[scan.queue] = Flow(arrived, departed)
    for queue, before in before_by_queue.items():
        if queue not in flows:
            flows[queue] = Flow(0, sum(1 for qid in before if qid not in now_ids))
    return flows


def _union(scans: Iterable[QueueScan]) -> set[str] | dict[str, float]:
    scans = list(scans)
    if len(scans) == 1:
        return scans[0].arrivals
    ids: set[str] = set()
    for s in scans:
        ids.update(s.arrivals)
    return ids


def is_stuck(
    history: Sequence[FlowPoint],
    now: float,
    window: float = STUCK_WINDOW,
    min_growth: int = STUCK_MIN_GROWTH,
    min_messages: int = STUCK_MIN_MESSAGES,
) -> bool | None:
    """Stuck: a full window observed, never empty, nothing departed, and grown or big.

    None until the history covers the window (just started: cannot tell yet).
    """
    start = now - window
    covering = [p for p in history if p.at >= start]
    earlier = [p for p in history if p.at < start]
    if not earlier or not covering:
        return None
    base = earlier[-1]
    points = [base, *covering]
    if any(p.messages == 0 for p in points):
        return False
    if any(p.departed for p in covering):
        return False
    grew = covering[-1].messages - base.messages >= min_growth
    big = min(p.messages for p in points) >= min_messages
    return grew or big


class History:
    """Flow points of one queue, kept just long enough to judge the window."""

    def __init__(self, window: float = STUCK_WINDOW) -> None:
        self.window = window
        self.points: deque[FlowPoint] = deque()

    def add(self, point: FlowPoint) -> None:
        self.points.append(point)
        # keep one point older than the window: it is the baseline for "grew"
        while len(self.points) > 2 and self.points[1].at < point.at - self.window:
            self.points.popleft()

    def stuck(self, now: float) -> bool | None:
        return is_stuck(self.points, now, self.window)
