"""Replay accounting and promtool report parsing (pure functions)."""

from __future__ import annotations

from queueguard.replay.alerts import input_series, parse_failures
from queueguard.replay.report import Summary, account, missing, percentile, render
from queueguard.replay.scrape import Scrape, parse_samples


def test_account_places_each_id_once_and_counts_lost() -> None:
    acc = account(["a", "b", "c", "d", "e"], delivered=["a", "a"], quarantined=["b"],
                  rejected={"c": "scan:clamav"}, queued=["d"])
    assert (acc.delivered, acc.quarantined, acc.rejected, acc.queued_at_sender) == (1, 1, {"scan:clamav": 1}, 1)
    assert acc.duplicates == 1 and acc.lost == 1
    assert missing(["a", "b", "e"], ["a"], ["b"]) == ["e"]


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0


def test_render_says_fail_when_lost() -> None:
    s = Summary("x", "inc", 1.0, account(["a"], [], [], {}, []))
    assert "FAIL" in render(s) and not s.ok


def test_input_series_gaps_and_up() -> None:
    samples = parse_samples('queueguard_queue_messages{mta="exim",queue="main"} 5\nother 1\n',
                            {"queueguard_queue_messages"})
    series = input_series([Scrape(0, samples), Scrape(1, None)])
    assert series[0] == {"series": 'queueguard_queue_messages{instance="replay", job="queueguard", mta="exim", '
                                   'queue="main"}', "values": "5 _"}
    assert series[-1]["values"] == "1 0"


def test_parse_failures_reads_what_fired() -> None:
    report = """  FAILED:
    alertname: A, time: 5m,
        exp:[
            0:
              Labels:{alertname="A", replay_probe="1"}
            ],
        got:[]
    alertname: A, time: 1h2m,
        exp:[],
        got:[
            0:
              Labels:{alertname="A", mta="exim", severity="page"}
              Annotations:{summary="exim queue is big"}
            ]
"""
    got = parse_failures(report)
    assert got[("A", 5)] == []
    assert got[("A", 62)] == [({"alertname": "A", "mta": "exim", "severity": "page"}, {"summary": "exim queue is big"})]
