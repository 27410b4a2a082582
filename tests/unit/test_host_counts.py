"""Connection counts shared by the workers of a host: each writes its own row, everyone reads the sum."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from queueguard.host_counts import HostCounts


def test_every_worker_sees_the_sum_and_a_restarted_worker_starts_from_zero(tmp_path: Path) -> None:
    path = HostCounts.create(tmp_path / "connections", 3)
    w0, w1 = HostCounts(path, 0), HostCounts(path, 1)
    for _ in range(4):
        w0.add("ip:192.0.2.7", 1)
    for _ in range(3):
        w1.add("ip:192.0.2.7", 1)
    w1.add("net:192.0.2.0/24", 5)
    assert w0.get("ip:192.0.2.7") == w1.get("ip:192.0.2.7") == 7
    assert w0.get("net:192.0.2.0/24") == 5 and w0.get("ip:192.0.2.8") == 0
    w0.add("ip:192.0.2.7", -1)
    assert w1.get("ip:192.0.2.7") == 6
    # worker 1 died with its connections; its successor's row starts empty, worker 0's count stays
    w1.close()
    w1 = HostCounts(path, 1)
    assert w0.get("ip:192.0.2.7") == 3 and w0.get("net:192.0.2.0/24") == 0
    w0.close()
    w1.close()


def test_many_clients_do_not_make_one_look_busy(tmp_path: Path) -> None:
    """Collisions only ever add; with 20,000 other clients connected (one each) a client that has
    none still reads near zero (a limit is tens), in every file (each has its own salt)."""
    for n in range(3):
        counts = HostCounts(HostCounts.create(tmp_path / f"c{n}", 1), 0)
        for i in range(20_000):
            counts.add(f"ip:10.{i // 65536}.{i // 256 % 256}.{i % 256}", 1)
        assert max(counts.get(f"ip:192.0.2.{i}") for i in range(256)) <= 3  # P(4) ~ 1e-7 a key
        assert counts.get("ip:10.0.0.1") >= 1
        counts.close()


def test_a_worker_without_a_row_is_refused(tmp_path: Path) -> None:
    path = HostCounts.create(tmp_path / "connections", 2)
    with pytest.raises(ValueError, match="worker 2 has no row"):
        HostCounts(path, 2)


def test_the_supervisor_clears_a_dead_workers_row(tmp_path: Path) -> None:
    path = HostCounts.create(tmp_path / "connections", 2)
    w0, w1 = HostCounts(path, 0), HostCounts(path, 1)
    w0.add("ip:192.0.2.7", 2)
    w1.add("ip:192.0.2.7", 3)
    HostCounts.clear(path, 1)  # worker 1 died: its three connections closed with it
    assert w0.get("ip:192.0.2.7") == 2
    w0.close()
    w1.close()


def test_the_connection_rate_is_one_for_the_host_not_one_per_worker(tmp_path: Path) -> None:
    """rate_per_ip 3/1m with two workers: the third connection from a client takes the last
    place wherever it lands, the fourth is refused by either worker; another client is not."""
    from queueguard.ratelimit.gcra import Limit, advance, decide

    path = HostCounts.create(tmp_path / "connections", 2)
    w0, w1 = HostCounts(path, 0), HostCounts(path, 1)
    limit = Limit(20.0, 3)

    def at(now: float) -> Callable[[float | None], float | None]:
        return lambda tat: advance(tat, now, limit) if decide(tat, now, limit).allowed else None

    assert [w0.take("rate:192.0.2.7", at(1000)), w1.take("rate:192.0.2.7", at(1000)),
            w0.take("rate:192.0.2.7", at(1000))] == [True, True, True]
    assert not w1.take("rate:192.0.2.7", at(1000)) and not w0.take("rate:192.0.2.7", at(1001))
    assert w1.take("rate:192.0.2.8", at(1000))
    assert w1.take("rate:192.0.2.7", at(1020))  # one interval later, one place again
    HostCounts.clear(path, 1)  # a dead worker's row goes; the host's rate stays
    assert not w0.take("rate:192.0.2.7", at(1020))
    w0.close()
    w1.close()
