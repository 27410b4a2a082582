"""Departures between scans and the "stuck" rule, on hand-made histories."""

from __future__ import annotations

from queueguard.queuewatch.flow import Flow, FlowPoint, History, diff_scans, is_stuck
from queueguard.queuewatch.spools import QueueScan


def pf(queue: str, *ids: str) -> QueueScan:
    return QueueScan("postfix", queue, {i: 0.0 for i in ids})


def test_first_scan_counts_nothing() -> None:
    assert diff_scans(None, [pf("active", "A", "B")]) == {"active": Flow(0, 0)}


def test_postfix_move_between_queues_is_not_a_departure() -> None:
    before = [pf("active", "A", "B"), pf("deferred", "C")]
    after = [pf("active", "C", "D"), pf("deferred", "B")]
    flows = diff_scans(before, after)
    # A left the MTA from active; B moved active->deferred, C deferred->active; D is new
    assert flows == {"active": Flow(arrived=1, departed=1), "deferred": Flow(arrived=0, departed=0)}


def test_queue_that_vanished_still_reports_its_departures() -> None:
    flows = diff_scans([pf("active", "A"), pf("hold", "H")], [pf("active", "A")])
    assert flows["hold"] == Flow(0, 1)


def points(*spec: tuple[float, int, int]) -> list[FlowPoint]:
    return [FlowPoint(at, n, d) for at, n, d in spec]


def test_growing_with_nothing_leaving_is_stuck() -> None:
    h = points((0, 50, 0), (900, 58, 0), (1800, 61, 0), (1900, 65, 0))
    assert is_stuck(h, now=1900, window=1800) is True


def test_one_departure_means_flowing() -> None:
    h = points((0, 50, 0), (900, 58, 1), (1800, 61, 0), (1900, 65, 0))
    assert is_stuck(h, now=1900, window=1800) is False


def test_small_steady_queue_is_not_stuck() -> None:
    # one message retrying to a dead domain on a quiet server
    h = points((0, 1, 0), (900, 1, 0), (1900, 1, 0))
    assert is_stuck(h, now=1900, window=1800) is False


def test_big_steady_queue_with_nothing_leaving_is_stuck() -> None:
    h = points((0, 4000, 0), (900, 4000, 0), (1900, 4000, 0))
    assert is_stuck(h, now=1900, window=1800) is True


def test_emptied_queue_is_not_stuck() -> None:
    h = points((0, 500, 0), (900, 0, 0), (1900, 500, 0))
    assert is_stuck(h, now=1900, window=1800) is False


def test_unknown_until_the_window_is_covered() -> None:
    h = points((200, 4000, 0), (1900, 4000, 0))
    assert is_stuck(h, now=1900, window=1800) is None
    assert is_stuck([], now=1900, window=1800) is None


def test_history_keeps_one_baseline_point_before_the_window() -> None:
    h = History(window=100)
    for t in range(0, 1000, 10):
        h.add(FlowPoint(float(t), 200, 0))
    assert h.points[0].at < 990 - 100 <= h.points[1].at
    assert len(h.points) <= 12
    assert h.stuck(990) is True
