"""One behaviour contract, two backends (memory and a real redis-server); exact shared limits
across instances under concurrency; membership; Redis crashing or hanging mid-flood.

Real redis-server on a free loopback port (tests/components/redis.py); no mocks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from queueguard import metrics
from queueguard.model import Connection, Transaction, parse_ip
from queueguard.policy.schema import Policy
from queueguard.ratelimit.check import RateLimitCheck
from queueguard.ratelimit.gcra import Ask, Limit
from queueguard.ratelimit.redis_store import RedisStore
from queueguard.ratelimit.store import MemoryStore, Owed, RateStore, make_store
from queueguard.redis_client import connect
from queueguard.shared_state import MEMBERS_KEY, Membership
from queueguard.stage import RcptContext
from tests.components.redis import RedisServer

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


POLICY = Policy.model_validate({"ratelimits": [
    {"name": "flood", "key": "recipient", "rate": "3/1m"},
    {"name": "per-sender", "key": "sender", "rate": "5/1m", "burst": 5},
]})


async def message(check: RateLimitCheck, *rcpts: str, sender: str = "a@example.org",
                  policy: Policy = POLICY) -> list[int]:
    txn = Transaction(Connection(parse_ip("192.0.2.1")), sender, policy=policy)
    codes = []
    for to in rcpts:
        r = await check.on_rcpt(RcptContext(txn, to, policy))
        if r.verdict is None:
            txn.recipients.append(to)
        codes.append(250 if r.verdict is None else r.verdict.code)
    await check.on_end(txn, True)
    return codes


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RateStore]:
    if request.param == "memory":
        yield make_store("memory", 10_000)
        return
    with RedisServer(tmp_path / "redis") as server:
        s = make_store(server.url, 10_000)
        yield s
        await s.close()


async def test_same_contract_on_both_backends(store: RateStore) -> None:
    clock = Clock()
    check = RateLimitCheck(store, clock=clock)
    assert [await message(check, "info@example.org", sender=f"s{i}@x.example") for i in range(4)] == [
        [250], [250], [250], [451]]
    # Other recipients of the same message go on; refused RCPTs do not use budget.
    assert await message(check, "info@example.org", "sales@example.org", sender="t@x.example") == [451, 250]
    # Earlier recipients of the same transaction count (sender limit 5: 1 used above by t@).
    assert await message(check, *(f"r{i}@example.org" for i in range(6)), sender="t@x.example") == [
        250, 250, 250, 250, 451, 451]
    clock.t += 20  # one interval of 'flood' (3/1m)
    assert await message(check, "info@example.org", sender="u@x.example") == [250]
    assert await message(check, "info@example.org", sender="v@x.example") == [451]
    clock.t += 3600  # long quiet: full burst again; a mailbox named four times in one message counts once
    assert await message(check, "info@example.org", "info@example.org", "info@example.org",
                         "info@example.org", sender="w@x.example") == [250, 250, 250, 250]
    assert [await message(check, "info@example.org", sender=f"x{i}@x.example") for i in range(3)] == [
        [250], [250], [451]]


async def test_reserve_refund_reconcile_agree_on_both_backends(store: RateStore) -> None:
    """The Lua script is gcra.py's arithmetic: the same answers, to the microsecond."""
    now = 1_700_000_000.0
    limit = Limit(interval=10.0, burst=3)
    asks = [Ask("a", limit), Ask("b", Limit(interval=1.0, burst=100), gate=False)]
    got = [await store.reserve(asks, now) for _ in range(4)]
    assert [r.reserved for r in got] == [True, True, True, False]
    assert got[2].tats == [now + 30.0, now + 3.0] and got[3].waits == [10.0, 0.0]
    assert got[3].tats == [now + 30.0, now + 3.0]  # refused: nothing taken
    assert await store.refund([("a", 10.0), ("b", 1.0), ("c", 5.0)], now + 1) == [now + 20.0, now + 2.0, None]
    no_gate = [Ask("s", Limit(5.0, 1), gate=False)]  # a shadow or quarantine rule: counted over its limit
    assert (await store.reserve(no_gate, now)).reserved
    over = await store.reserve(no_gate, now)
    assert over.reserved and over.waits == [5.0] and over.tats == [now + 10.0]
    assert await store.reconcile([Owed("a", now + 100.0, 20.0), Owed("d", None, 7.5)], now + 1) == [
        now + 120.0, now + 8.5]


async def test_concurrent_reservations_from_four_clients_take_exactly_the_burst(redis_server: RedisServer) -> None:
    """Four stores (as four guard processes: one connection pool each) flood one key at once."""
    stores = [RedisStore(redis_server.url) for _ in range(4)]
    now = time.time()
    asks = [Ask("flood:info@example.org", Limit(interval=3600.0, burst=25))]
    results = await asyncio.gather(*(s.reserve(asks, now) for _ in range(50) for s in stores))
    assert sum(r.reserved for r in results) == 25
    for s in stores:
        await s.close()


async def test_membership_counts_live_processes(redis_server: RedisServer) -> None:
    clock = Clock()
    a = Membership(connect(redis_server.url), "mx1", ttl=15.0, clock=clock)
    b = Membership(connect(redis_server.url), "mx2", ttl=15.0, clock=clock)
    assert await a.beat() == 1
    assert await b.beat() == 2
    assert await a.beat() == 2 and a.member.startswith("mx1:")
    await b.leave()
    assert await a.beat() == 1
    await b.beat()
    clock.t += 16  # b stopped renewing: gone after its TTL
    assert await a.beat() == 1
    assert 0 < await a.client.pttl(MEMBERS_KEY) <= 15_000  # the set goes when every member is gone
    await a.close()
    await b.client.aclose()


async def test_redis_keys_expire_by_themselves(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    check = RateLimitCheck(store)
    await message(check, "info@example.org")
    ttl = await store.client.pttl("qg:rl:flood:info@example.org")
    assert 0 < ttl <= 20_000 + 1000  # one interval (+1 s slack)
    assert await store.client.pttl("qg:rl:per-sender:a@example.org") > 0
    await store.close()


async def test_two_instances_share_one_limit(redis_server: RedisServer) -> None:
    clock = Clock()
    a = RateLimitCheck(RedisStore(redis_server.url), clock=clock)
    b = RateLimitCheck(RedisStore(redis_server.url), clock=clock)
    codes = [(await message(a if i % 2 else b, "info@example.org", sender=f"s{i}@x.example"))[0]
             for i in range(10)]
    assert codes == [250, 250, 250] + [451] * 7  # 3 in total, not 3 each
    await a.close()
    await b.close()


async def test_redis_killed_mid_flood_falls_back_and_recovers(redis_server: RedisServer) -> None:
    clock = Clock()
    store = RedisStore(redis_server.url)
    check = RateLimitCheck(store, clock=clock, retry_after=5.0, fallback=MemoryStore(10_000))
    codes = [(await message(check, "info@example.org", sender=f"s{i}@x.example"))[0] for i in range(2)]
    errors = metrics.state_errors.labels("ratelimit", "redis")._value.get()
    redis_server.kill()
    # The in-process stand-in takes over from its mirror of what Redis answered (2 of 3 used),
    # not from an empty store; it answers only 250/451.
    codes += [(await message(check, "info@example.org", sender=f"k{i}@x.example"))[0] for i in range(5)]
    assert codes == [250, 250, 250, 451, 451, 451, 451]
    assert metrics.state_fallback_active.labels("ratelimit")._value.get() == 1
    assert metrics.state_errors.labels("ratelimit", "redis")._value.get() == errors + 1
    redis_server.start()  # same port, empty, no script cached: EVALSHA must reload it
    clock.t += 5
    assert await message(check, "sales@example.org") == [250]
    assert metrics.state_fallback_active.labels("ratelimit")._value.get() == 0
    assert await store.client.get("qg:rl:flood:sales@example.org") is not None  # recorded in Redis again
    # reconciled: the empty Redis got what was known before the crash (2) and admitted during it (1)
    assert await message(check, "info@example.org", sender="after@x.example") == [451]
    await check.close()


async def test_redis_hanging_times_out_into_the_fallback(redis_server: RedisServer) -> None:
    clock = Clock()
    store = RedisStore(redis_server.url, timeout=0.3)
    check = RateLimitCheck(store, clock=clock)
    assert await message(check, "info@example.org") == [250]
    redis_server.pause()
    try:
        assert await message(check, "info@example.org", "x@example.org") == [250, 250]
        assert check.status()["shared_state_down"] is True
    finally:
        redis_server.resume()
    await check.close()


async def test_a_redis_that_lost_a_key_starts_it_from_the_floor_and_a_refund_is_not_undone(
        redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    now, limit = time.time(), Limit(10.0, 3)  # a burst of 3: 20 s of tolerance
    gone = await store.reserve([Ask("lost", limit, floor=now + 25.0)], now)  # Redis has no entry
    assert gone.reserved is False and gone.waits[0] > 0 and await store.client.get("qg:rl:lost") is None
    kept = await store.reserve([Ask("fresh", limit)], now)
    assert kept.reserved and kept.tats[0] == pytest.approx(now + 10.0)
    # an entry Redis has wins over a caller's floor, even one another host's refund lowered to zero
    assert (await store.refund([("fresh", 10.0)], now)) == [None]
    again = await store.reserve([Ask("fresh", limit, floor=now + 10.0)], now)
    assert again.reserved and again.tats[0] == pytest.approx(now + 10.0)
    # a partial refund keeps the entry as long as the TAT before it would have: expiring with the
    # lowered TAT, it would leave a window in which another host's floor puts the refund back
    await store.reserve([Ask("fresh", limit)], now)  # TAT now + 20 s
    before = await store.client.pttl("qg:rl:fresh")
    assert (await store.refund([("fresh", 10.0)], now))[0] == pytest.approx(now + 10.0)
    assert await store.client.pttl("qg:rl:fresh") >= before - 1000 > 15_000
    await store.close()


async def test_a_key_spent_before_redis_restarted_empty_stays_spent(redis_server: RedisServer) -> None:
    """info@ used up its limit; Redis crashes and comes back empty (no persistence) and info@ is not
    asked for during the outage, so nothing about it is owed. Without floors the empty Redis gave it
    a fresh burst; with the mirror's TAT as its floor it goes on from where it stood."""
    clock = Clock()
    store = RedisStore(redis_server.url)
    check = RateLimitCheck(store, clock=clock, retry_after=5.0, fallback=MemoryStore(10_000))
    codes = [(await message(check, "info@example.org", sender=f"s{i}@x.example"))[0] for i in range(4)]
    assert codes == [250, 250, 250, 451]
    redis_server.kill()
    assert await message(check, "sales@example.org") == [250]  # fails over to the mirror
    assert metrics.state_fallback_active.labels("ratelimit")._value.get() == 1
    redis_server.start()  # empty
    clock.t += 5
    assert await message(check, "bob@example.org") == [250]
    assert metrics.state_fallback_active.labels("ratelimit")._value.get() == 0
    assert await message(check, "info@example.org", sender="after@x.example") == [451]
    assert await store.client.get("qg:rl:flood:info@example.org") is None  # refused: nothing stored
    await check.close()


async def test_a_worker_counts_its_hosts_other_workers_before_they_register(redis_server: RedisServer) -> None:
    """Two workers, the first renewal of one of them not yet done (or Redis failing from the
    start): counting only itself, each took the whole limit in an outage. The count is never
    below this host's workers."""
    clock = Clock()
    a = Membership(connect(redis_server.url), "mx1", ttl=15.0, clock=clock, processes=2)
    assert a.hosts == 2  # before any count
    assert await a.beat() == 2  # Redis knows only a so far
    b = Membership(connect(redis_server.url), "mx2", ttl=15.0, clock=clock)
    await b.beat()
    c = Membership(connect(redis_server.url), "mx3", ttl=15.0, clock=clock)
    assert await c.beat() == 3 and await a.beat() == 3  # more than our own: the real count
    for m in (a, b, c):
        await m.close()
