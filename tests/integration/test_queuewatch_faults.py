"""A real guard whose spools hold hostile entries: a FIFO named like an Exim -H file and a
Mailman queue directory whose name is not UTF-8. Queue watching keeps working, /metrics
keeps answering, and SIGTERM still stops the daemon."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from queueguard.harness.guard import Guard
from queueguard.harness.sink import SmtpSink
from queueguard.queuewatch.spools import exim_id_for_time
from tests.unit.queuewatch.spoolbuild import exim_message, mailman_message


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    s = SmtpSink().start()
    try:
        yield s
    finally:
        s.close()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_fifo_in_exim_spool_neither_freezes_watching_nor_hangs_sigterm(tmp_path: Path, sink: SmtpSink) -> None:
    exim = tmp_path / "exim"
    (exim / "input").mkdir(parents=True)
    exim_message(exim, int(time.time()) - 60, 1)
    guard = Guard({"downstreams": [{"address": f"127.0.0.1:{sink.port}"}],
                   "queuewatch": {"interval": "1s", "exim_spool": str(exim)}}).start()
    try:
        wait_for(lambda: guard.metric("queueguard_queue_messages", mta="exim") == 1, "the first count")
        os.mkfifo(exim / "input" / f"{exim_id_for_time(int(time.time()) - 30, 2)}-H")
        exim_message(exim, int(time.time()) - 20, 3)
        # the next rounds complete: the new message is counted, the FIFO is not
        wait_for(lambda: guard.metric("queueguard_queue_messages", mta="exim") == 2, "a round after the FIFO")
        assert guard.metric("queueguard_queuewatch_up", watcher="exim") == 1
    finally:
        started = time.monotonic()
        rc = guard.stop(timeout=15)  # hung joining the blocked executor thread; kill + raise on timeout
    assert rc == 0
    assert time.monotonic() - started < 10


def test_mailman_queue_name_not_utf8_keeps_metrics_answering(tmp_path: Path, sink: SmtpSink) -> None:
    mm = tmp_path / "mailman"
    mailman_message(mm, "in", time.time(), 1)
    bad = os.fsencode(mm) + b"/bad\xff"
    os.mkdir(bad)
    open(bad + b"/" + f"{time.time()!r}+{2:040x}.pck".encode(), "wb").close()
    with Guard({"downstreams": [{"address": f"127.0.0.1:{sink.port}"}],
                "queuewatch": {"interval": "1s", "mailman_queue": str(mm)}}) as guard:
        wait_for(lambda: guard.metric("queueguard_queue_messages", mta="mailman", queue="in") == 1,
                 "the Mailman queues counted")
        text = guard.metrics_text()  # the scrape used to close with no response at all
        assert 'queueguard_queue_messages{mta="mailman",queue="bad\\\\xff"} 1.0' in text
