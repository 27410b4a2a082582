"""Exact limits across hosts: four real `queueguard serve` processes (two hosts x two workers, as
far as limits go: each process decides on its own) share one real redis-server, and many clients
flood one recipient through all four at once. They admit what one guard would, because each
decision is one atomic Lua call in Redis (the old peek-then-record let every transaction in flight
see the same room). Real SMTP clients, a real recording sink downstream; nothing mocked.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from queueguard.harness.guard import Guard
from queueguard.harness.sink import RecordingSink
from tests.components.flood import flood
from tests.components.redis import RedisServer

pytestmark = pytest.mark.integration

LIMIT = 20
POLICY = f"""\
ratelimits:
  - name: flood-to-one-address
    key: recipient
    rate: {LIMIT}/1h
"""
INFO = "info@dest.example"


def wait_until(ok: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def sink() -> Iterator[RecordingSink]:
    with RecordingSink() as s:
        yield s


def test_two_hosts_of_two_workers_flooding_one_recipient_admit_exactly_the_limit(
        sink: RecordingSink, tmp_path: Path) -> None:
    """Two guards (two MX hosts) of two workers each: four processes decide at once on one Redis."""
    with RedisServer(tmp_path / "redis") as redis, contextlib.ExitStack() as stack:
        settings = {"downstreams": [{"address": f"127.0.0.1:{sink.port}"}], "state": redis.url, "workers": 2}
        guards = [stack.enter_context(Guard(settings, {"limits.yaml": POLICY})) for _ in range(2)]
        for g in guards:  # both workers of each listening before the flood
            wait_until(lambda g=g: "queueguard ready: 2 workers" in g.log(), 60)
        start = time.monotonic()
        sent = flood([g.port for g in guards] * 2, 160, lambda n: [INFO, f"u{n}@dest.example"], threads=32)
        elapsed = time.monotonic() - start
        assert {g.metric("queueguard_state_fallback_active", component="ratelimit") for g in guards} == {0}

    assert elapsed < 3600 / LIMIT  # no new slot came due while the flood ran: exactly LIMIT is right
    assert all({s.code(r) for r in s.rcpt} <= {250, 451} for s in sent)
    refused = [s.rcpt[INFO][1] for s in sent if s.code(INFO) == 451]
    assert all(text.startswith("4.7.1") and "flood-to-one-address" in text for text in refused)
    assert len(sent) - len(refused) == LIMIT  # four processes, 32 clients at once: not one more
    assert all(s.code(f"u{s.n}@dest.example") == 250 and s.data and s.data[0] == 250 for s in sent)
    # nothing lost: every transaction delivered once, to exactly the recipients that got 250
    assert sink.wait_count(len(sent)) == len(sent)
    delivered = [r.lower() for m in sink.received() for r in m.rcpt_tos]
    assert delivered.count(INFO) == LIMIT and len(delivered) == len(sent) + LIMIT
