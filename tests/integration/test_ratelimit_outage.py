"""A Redis outage without a free burst: two real guards share a real redis-server, which is killed
mid-flood. Each guard goes on from what Redis had told it and takes its half of what was left, so
together they admit about the limit during the outage, not a new burst each (the old empty
in-process fallback gave every host a whole new burst). When Redis is back (restarted empty, as
after a crash without persistence) they add what they admitted and the limit goes on from there.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from queueguard.harness.guard import Guard
from queueguard.harness.sink import RecordingSink
from tests.components.flood import Sent, flood, send, wait_for
from tests.components.redis import RedisServer

pytestmark = pytest.mark.integration

LIMIT = 20
INTERVAL = 3600 / LIMIT
POLICY = f"""\
ratelimits:
  - name: flood
    key: recipient
    rate: {LIMIT}/1h
"""
INFO = "info@dest.example"
KEY = f"qg:rl:flood:{INFO}"


@pytest.fixture
def sink() -> Iterator[RecordingSink]:
    with RecordingSink() as s:
        yield s


def admitted(sent: list[Sent]) -> int:
    assert all({s.code(r) for r in s.rcpt} <= {250, 451} for s in sent)  # never a 5xx, never 4.3.0
    assert all(s.data is not None and s.data[0] == 250 for s in sent)  # the message itself always goes
    return sum(s.code(INFO) == 250 for s in sent)


def test_two_guards_share_out_the_limit_while_redis_is_down_and_reconcile(sink: RecordingSink,
                                                                          tmp_path: Path) -> None:
    rcpts = lambda n: [INFO, f"u{n}@dest.example"]  # noqa: E731
    with RedisServer(tmp_path / "redis") as redis, contextlib.ExitStack() as stack:
        settings = {"downstreams": [{"address": f"127.0.0.1:{sink.port}"}], "state": redis.url}
        a, b = (stack.enter_context(Guard(settings, {"limits.yaml": POLICY})) for _ in range(2))
        wait_for("both guards to count two members", lambda: {a.metric("queueguard_state_members"),
                                                               b.metric("queueguard_state_members")} == {2})
        before = [send((a, b)[n % 2].port, rcpts(n), n, source=f"127.0.7.{n + 1}") for n in range(10)]
        assert admitted(before) == 10

        redis.kill()
        start = time.monotonic()
        during = flood([a.port, b.port], 80, rcpts, first=100, threads=16)
        outage = admitted(during)
        assert outage <= LIMIT - 10 + 0.1 * LIMIT  # what was left (+10 %), not a new burst per guard
        assert outage >= LIMIT - 10 - 2  # and each guard did admit its share (rounding: one each)
        for g in (a, b):
            assert g.metric("queueguard_state_fallback_active", component="ratelimit") == 1
            assert "using in-process state" in g.log()

        redis.start()  # same port, empty
        client = Redis(port=redis.port, socket_timeout=5)
        stack.callback(client.close)
        # each guard asks Redis again 5 s after its last failure; the first transaction then reconciles
        n = 1000

        def back() -> bool:
            nonlocal n
            n += 1
            send((a, b)[n % 2].port, [f"v{n}@dest.example"], n, source="127.0.8.1")
            return all(g.metric("queueguard_state_fallback_active", component="ratelimit") == 0 for g in (a, b))

        wait_for("both guards back on Redis", back)
        assert "reconciled" in a.log() and "reconciled" in b.log()
        tat = int(client.get(KEY) or 0) / 1e6  # what was known before (10) and admitted during the outage
        assert tat - time.time() >= (10 + outage - 2) * INTERVAL - (time.monotonic() - start)

        after = flood([a.port, b.port], 20, rcpts, first=2000, threads=8)
        assert 10 + outage + admitted(after) <= 1.1 * LIMIT  # the whole window, across the outage
        assert time.monotonic() - start < INTERVAL  # no new slot came due meanwhile

    total = len(before) + len(during) + len(after)
    assert sink.wait_count(total) >= total  # nothing lost: every transaction delivered
    delivered = [r.lower() for m in sink.received() for r in m.rcpt_tos]
    assert delivered.count(INFO) == 10 + outage + admitted(after)
