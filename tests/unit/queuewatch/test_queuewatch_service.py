"""QueueWatch over real spool directories with an injected clock: metrics, snapshot, stuck, failures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
from pathlib import Path
from typing import cast

from prometheus_client import REGISTRY

from queueguard import metrics
from queueguard.queuewatch.service import QueueWatch, _Spools
from queueguard.settings import QueueWatchSettings
from tests.unit.queuewatch.spoolbuild import exim_message, mailman_message

T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def queue(snap: dict[str, object], mta: str, name: str) -> dict[str, object]:
    queues = snap["queues"]
    assert isinstance(queues, list)
    found = [q for q in queues if q["mta"] == mta and q["queue"] == name]
    assert found, f"{mta}/{name} not in {queues}"
    return dict(found[0])


async def test_counts_ages_and_departures(tmp_path: Path) -> None:
    exim, mm = tmp_path / "exim", tmp_path / "mailman"
    (exim / "input").mkdir(parents=True)
    ids = [exim_message(exim, int(T0) - 600 * i, i, split=True) for i in range(1, 4)]
    for i in range(2):
        mailman_message(mm, "out", T0 - 120 - i, i)
    (mm / "bad").mkdir()
    clock = Clock()
    watch = QueueWatch(QueueWatchSettings(exim_spool=exim, mailman_queue=mm, mailman_runners=["out"]),
                       clock=clock)
    departed_before = sample("queueguard_queue_departed_total", mta="exim", queue="main") or 0.0
    await watch.collect()
    assert sample("queueguard_queue_messages", mta="exim", queue="main") == 3
    assert sample("queueguard_queue_oldest_age_seconds", mta="exim", queue="main") == 1800
    assert sample("queueguard_queue_frozen_messages", mta="exim", queue="main") == 0
    assert sample("queueguard_queue_messages", mta="mailman", queue="out") == 2
    assert sample("queueguard_queuewatch_up", watcher="exim") == 1
    assert sample("queueguard_mailman_runner_up", runner="out") == 0  # no runner process here
    snap = watch.snapshot()
    assert queue(snap, "exim", "main")["stuck"] is None  # no history yet
    assert snap["mailman_runners"] == [{"runner": "out", "running": 0, "expected": True}]
    filesystems = snap["filesystems"]
    assert isinstance(filesystems, list) and len(filesystems) == 1  # both paths on one filesystem

    # Exim delivers the oldest message: it leaves the spool, the count says so
    for suffix in ("-H", "-D"):
        (exim / "input" / ids[2][5] / f"{ids[2]}{suffix}").unlink()
    clock.now += 30
    await watch.collect()
    assert sample("queueguard_queue_messages", mta="exim", queue="main") == 2
    assert sample("queueguard_queue_departed_total", mta="exim", queue="main") == departed_before + 1
    assert sample("queueguard_queue_oldest_age_seconds", mta="exim", queue="main") == 1230


async def test_stuck_after_a_window_of_growth_without_departures(tmp_path: Path) -> None:
    mm = tmp_path / "mailman"
    clock = Clock()
    watch = QueueWatch(QueueWatchSettings(mailman_queue=mm, mailman_runners=["out"]), clock=clock)
    n = 0
    for _round in range(8):  # 8 rounds, 5 minutes apart: 35 minutes > the 30-minute window
        for _ in range(3):
            mailman_message(mm, "out", clock.now, n)
            n += 1
        await watch.collect()
        clock.now += 300
    clock.now -= 300
    assert queue(watch.snapshot(), "mailman", "out")["stuck"] is True
    assert sample("queueguard_queue_stuck", mta="mailman", queue="out") == 1
    # the out runner comes back and sends one message: flowing again
    next(iter((mm / "out").iterdir())).unlink()
    clock.now += 300
    await watch.collect()
    assert queue(watch.snapshot(), "mailman", "out")["stuck"] is False
    assert sample("queueguard_queue_stuck", mta="mailman", queue="out") == 0


async def test_failed_watcher_reports_down_and_drops_stale_series(tmp_path: Path) -> None:
    exim = tmp_path / "spool-failing"
    (exim / "input").mkdir(parents=True)
    exim_message(exim, int(T0), 1)
    watch = QueueWatch(QueueWatchSettings(exim_spool=exim), clock=Clock())
    await watch.collect()
    assert sample("queueguard_queue_messages", mta="exim", queue="main") == 1
    shutil.rmtree(exim / "input")
    await watch.collect()
    assert sample("queueguard_queuewatch_up", watcher="exim") == 0
    assert sample("queueguard_queue_messages", mta="exim", queue="main") is None
    snap = watch.snapshot()
    assert isinstance(snap["watchers"], list)
    watchers = {w["name"]: w for w in snap["watchers"]}
    assert watchers["exim"]["ok"] is False and "No such file" in str(watchers["exim"]["error"])
    assert snap["queues"] == []


async def test_metrics_still_render_with_a_mailman_queue_name_that_is_not_utf8(tmp_path: Path) -> None:
    mm = tmp_path / "mailman"
    mailman_message(mm, "in", T0 - 5, 1)
    os.mkdir(os.fsencode(mm) + b"/bad\xff")
    watch = QueueWatch(QueueWatchSettings(mailman_queue=mm), clock=Clock())
    try:
        await watch.collect()
        text = metrics.exposition().decode()  # raised UnicodeEncodeError: /metrics closed, no answer
        assert 'queueguard_queue_messages{mta="mailman",queue="bad\\\\xff"} 0.0' in text
        assert sample("queueguard_queue_messages", mta="mailman", queue="in") == 1
    finally:
        # an unencodable label left in the registry would break every later test's scrape
        for q in ("bad\\xff", "bad\udcff", "in"):
            for family in (metrics.queue_messages, metrics.queue_oldest_age, metrics.queue_frozen,
                           metrics.queue_arrived, metrics.queue_departed, metrics.queue_stuck):
                with contextlib.suppress(KeyError):
                    family.remove("mailman", q)


class HungScan(QueueWatch):
    """The spool pass blocks until released. A fault made up: a hung NFS spool cannot be
    produced here (the FIFO that used to hang it no longer does, see test_queuewatch_spools)."""

    release = threading.Event()
    passes = 0

    def _scan_spools(self) -> _Spools:
        self.passes += 1
        self.release.wait()
        return super()._scan_spools()


async def test_hung_scan_reports_watchers_down_and_starts_no_second_scan(tmp_path: Path) -> None:
    exim = tmp_path / "spool-hung"
    (exim / "input").mkdir(parents=True)
    exim_message(exim, int(T0), 1)
    watch = HungScan(QueueWatchSettings(exim_spool=exim, filesystems=[tmp_path]), clock=Clock(),
                     scan_timeout=0.2)
    watch.release.clear()
    try:
        async with asyncio.timeout(5):  # without the scan timeout, collect() waited for ever
            await watch.collect()
            await watch.collect()
        assert sample("queueguard_queuewatch_up", watcher="exim") == 0
        assert sample("queueguard_queuewatch_up", watcher="filesystems") == 0
        watchers = {str(w["name"]): w for w in cast(list[dict[str, object]], watch.snapshot()["watchers"])}
        assert "still running" in str(watchers["exim"]["error"])
        assert watch.passes == 1  # the second round waited for the first scan, not started another
        watch.release.set()
        await watch.collect()  # the stuck scan finishes: its result counts, the watcher is back
        assert sample("queueguard_queuewatch_up", watcher="exim") == 1
        assert sample("queueguard_queue_messages", mta="exim", queue="main") == 1
    finally:
        watch.release.set()


def test_hung_scan_does_not_hold_up_shutdown(tmp_path: Path) -> None:
    """asyncio.run joins the default executor on exit; a scan stuck there hung SIGTERM."""
    (tmp_path / "input").mkdir()
    watch = HungScan(QueueWatchSettings(exim_spool=tmp_path, interval=0.05), scan_timeout=0.1)
    watch.release.clear()

    async def run_briefly() -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await watch.run()

    runner = threading.Thread(target=asyncio.run, args=(run_briefly(),), daemon=True)
    runner.start()
    runner.join(5)
    stuck = runner.is_alive()
    watch.release.set()
    runner.join(5)
    assert not stuck, "asyncio.run did not return while the scan thread was stuck"
