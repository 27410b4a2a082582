"""QueueWatch against a real Exim 4.96 spool: counts, ages, frozen, split spool, departures.

Exim queues the messages itself (`exim -odq`, no daemon needed), freezes one (`-Mf`) and delivers them
(`-qff` to local maildirs); `exim -bpc` (fine on a small queue) is the reference count.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from queueguard.harness.exim import Exim
from queueguard.queuewatch.service import QueueWatch
from queueguard.queuewatch.spools import exim_id_time, scan_exim
from queueguard.settings import QueueWatchSettings

MESSAGE = "From: a@example.org\nTo: alice@test.example\nSubject: queued {n}\n\nbody {n}\n"


@pytest.fixture(params=[False, True], ids=["flat", "split"])
def exim(request: pytest.FixtureRequest) -> Iterator[Exim]:
    split = bool(request.param)
    ex = Exim(main_config="split_spool_directory = true" if split else "")
    try:
        yield ex
    finally:
        ex.close()


def queue(ex: Exim, n: int) -> list[str]:
    """Queue n messages without delivering them; returns their ids from Exim's log."""
    for i in range(n):
        ex.run("-odq", "-f", "a@example.org", "alice@test.example", input=MESSAGE.format(n=i))
    ids = [line.split()[2] for line in ex.mainlog().splitlines() if " <= " in line]
    assert len(ids) == n, ex.mainlog()
    return ids


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_real_exim_spool(exim: Exim) -> None:
    split = "split_spool_directory" in exim.main_config
    ids = queue(exim, 5)
    spool = exim.dir / "spool"
    if split:
        assert all((spool / "input" / mid[5] / f"{mid}-H").exists() for mid in ids)

    scan = scan_exim(spool)
    assert scan.messages == exim.queue_count() == 5
    assert set(scan.arrivals) == set(ids)
    for mid in ids:
        # the -H file's 4th line is "<received time> <warning count>": the id's base-62 time must agree
        header = next(spool.glob(f"input/**/{mid}-H")).read_text().splitlines()
        assert exim_id_time(mid) == int(header[3].split()[0])
    assert time.time() - 60 < min(scan.arrivals.values()) <= time.time()
    assert scan.frozen == 0

    exim.run("-Mf", ids[0])
    assert scan_exim(spool).frozen == 1

    watch = QueueWatch(QueueWatchSettings(exim_spool=spool))
    departed = sample("queueguard_queue_departed_total", mta="exim", queue="main") or 0.0
    await watch.collect()
    assert sample("queueguard_queue_messages", mta="exim", queue="main") == 5
    assert sample("queueguard_queue_frozen_messages", mta="exim", queue="main") == 1

    exim.run("-qff")  # -qff delivers frozen messages too
    exim.wait_maildir("alice", count=5)
    remaining = exim.queue_count()
    await watch.collect()
    assert sample("queueguard_queue_messages", mta="exim", queue="main") == remaining == 0
    assert sample("queueguard_queue_departed_total", mta="exim", queue="main") == departed + 5
    snap_queue = watch.snapshot()["queues"]
    assert isinstance(snap_queue, list) and snap_queue[0]["departed"] == 5

