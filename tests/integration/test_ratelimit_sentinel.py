"""Redis HA: two real guards use `state: redis+sentinel://…` (a real redis-sentinel watching a real
master with one replica). The master is killed mid-flood; Sentinel promotes the replica, the guards
follow it, nothing is lost (every 250 is delivered; in the gap, only 4xx or the fallback's own
decisions), and the limit goes on where it was.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest
from redis import Redis

from queueguard.harness.guard import Guard
from queueguard.harness.sink import RecordingSink
from tests.components.flood import Sent, send, wait_for
from tests.components.redis import RedisSentinel, RedisServer

pytestmark = pytest.mark.integration

LIMIT = 30
INFO = "info@dest.example"
KEY = f"qg:rl:flood:{INFO}"


def policy(on_error: str) -> str:
    return f"ratelimits:\n  - name: flood\n    key: recipient\n    rate: {LIMIT}/1h\nstate:\n  on_error: {on_error}\n"


class Flood(threading.Thread):
    """Sends transactions (to INFO and one fresh recipient each) to the guards in turn until stopped,
    each client pausing `pause` seconds between them (so the master dies with budget left)."""

    def __init__(self, ports: list[int], clients: int = 4, pause: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.ports = ports
        self.clients = clients
        self.pause = pause
        self.sent: list[Sent] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.error: BaseException | None = None

    def run(self) -> None:
        workers = [threading.Thread(target=self.client, args=(i,)) for i in range(self.clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    def client(self, i: int) -> None:
        n = i
        while not self.stop.is_set():
            try:
                s = send(self.ports[n % len(self.ports)], [INFO, f"u{n}@dest.example"], n,
                         source=f"127.2.{n // 250 % 250}.{n % 250 + 1}")
            except BaseException as e:
                self.error = e
                return
            with self.lock:
                self.sent.append(s)
            n += self.clients
            self.stop.wait(self.pause)

    def count(self) -> int:
        with self.lock:
            return len(self.sent)


def state_error(s: Sent) -> bool:
    return any(text.startswith("4.3.0") for _, text in s.rcpt.values())


def back_on_redis(guard: Guard, flood: Flood) -> bool:
    """The guard noticed the outage, is not standing in for Redis, and its last answers came from Redis."""
    with flood.lock:
        recent = [s for s in flood.sent if s.port == guard.port][-3:]
    return (guard.metric("queueguard_state_errors_total", component="ratelimit") >= 1
            and guard.metric("queueguard_state_fallback_active", component="ratelimit") == 0
            and len(recent) == 3 and not any(state_error(s) for s in recent))


@pytest.mark.parametrize("on_error", ["fallback", "tempfail"])
def test_master_killed_mid_flood_guards_follow_the_promoted_replica(on_error: str, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(RecordingSink())
        master = stack.enter_context(RedisServer(tmp_path / "a", args=["--repl-diskless-sync-delay", "0"]))
        replica = stack.enter_context(RedisServer(tmp_path / "b", args=["--replicaof", "127.0.0.1", str(master.port)]))
        sentinel = stack.enter_context(RedisSentinel(tmp_path / "s", "qg", master.port))
        to_master = Redis(port=master.port, socket_timeout=5)
        to_replica = Redis(port=replica.port, socket_timeout=5)
        stack.callback(to_master.close)
        stack.callback(to_replica.close)
        wait_for("the replica to sync", lambda: to_replica.info("replication")["master_link_status"] == "up")

        settings = {"downstreams": [{"address": f"127.0.0.1:{sink.port}"}], "state": sentinel.url}
        guards = [stack.enter_context(Guard(settings, {"limits.yaml": policy(on_error)})) for _ in range(2)]
        wait_for("both guards to count two members",
                 lambda: {g.metric("queueguard_state_members") for g in guards} == {2})
        flood = Flood([g.port for g in guards])
        flood.start()
        stack.callback(flood.stop.set)
        wait_for("10 transactions before the failover", lambda: flood.count() >= 10)
        assert to_master.exists(KEY)  # the guards found the master through the sentinel
        to_master.wait(1, 2000)  # what the replica has when the master dies: everything so far

        killed_at = flood.count()
        master.kill()
        sentinel.wait_master(replica.port)
        wait_for("both guards on the new master", lambda: all(back_on_redis(g, flood) for g in guards), 60)
        resumed_at = flood.count()
        wait_for("20 more transactions after the failover", lambda: flood.count() >= resumed_at + 20)
        flood.stop.set()
        flood.join(60)
        assert flood.error is None, flood.error
        sent = flood.sent

        assert to_replica.info("replication")["role"] == "master" and to_replica.exists(KEY)
        # nothing lost: every reply is 250 or 4xx, and every transaction with a 250 was delivered
        assert all({s.code(r) for r in s.rcpt} <= {250, 451} for s in sent)
        with_250 = [s for s in sent if s.accepted]
        assert all(s.data is not None and s.data[0] == 250 for s in with_250)
        assert sink.wait_count(len(with_250), timeout=30) == len(with_250)
        delivered = [r.lower() for m in sink.received() for r in m.rcpt_tos]
        assert len(delivered) == sum(len(s.accepted) for s in sent)

        # the limit went on where it was: about LIMIT in all, and refusals after the failover are the rule's
        admitted = sum(s.code(INFO) == 250 for s in sent)
        phases = [sum(s.code(INFO) == 250 for s in part)
                  for part in (sent[:killed_at], sent[killed_at:resumed_at], sent[resumed_at:])]
        assert phases[0] < LIMIT, phases  # the master died with budget left
        assert LIMIT - 2 <= admitted <= 1.1 * LIMIT, (admitted, phases)
        assert all(s.code(INFO) == 451 and s.rcpt[INFO][1].startswith("4.7.1") for s in sent[-10:]), (
            phases, [s.rcpt[INFO] for s in sent[-10:]])
        state_errors = [s for s in sent if state_error(s)]
        if on_error == "tempfail":  # the gap: 451 4.3.0 for every recipient a limit would count
            assert state_errors
            assert phases[1] + phases[2] > 0  # admitted on the new master, from the replicated count (~LIMIT in all)
        else:  # the gap: each guard enforced from its mirror, its share, and the fresh recipients went on
            assert not state_errors
            assert all(s.code(f"u{s.n}@dest.example") == 250 for s in sent)
