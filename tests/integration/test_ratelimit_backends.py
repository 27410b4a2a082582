"""One behaviour contract, two backends (memory and a real redis-server); shared limits
across instances; Redis crashing or hanging mid-flood.

Real redis-server on a free loopback port (tests/components/redis.py); no mocks.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from queueguard import metrics
from queueguard.model import Connection, Transaction, parse_ip
from queueguard.policy.schema import Policy
from queueguard.ratelimit.check import RateLimitCheck
from queueguard.ratelimit.redis_store import RedisStore
from queueguard.ratelimit.store import RateStore, make_store
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
    clock.t += 3600  # long quiet: full burst again
    assert await message(check, "info@example.org", "info@example.org", "info@example.org",
                         "info@example.org", sender="w@x.example") == [250, 250, 250, 451]


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
    check = RateLimitCheck(RedisStore(redis_server.url), clock=clock, retry_after=5.0)
    codes = [(await message(check, "info@example.org", sender=f"s{i}@x.example"))[0] for i in range(2)]
    errors = metrics.state_errors.labels("ratelimit", "redis")._value.get()
    redis_server.kill()
    # The in-process limiter takes over (empty: it did not see the first 2), answers only 250/451.
    codes += [(await message(check, "info@example.org", sender=f"k{i}@x.example"))[0] for i in range(5)]
    assert codes == [250, 250, 250, 250, 250, 451, 451]
    assert metrics.state_fallback_active.labels("ratelimit")._value.get() == 1
    assert metrics.state_errors.labels("ratelimit", "redis")._value.get() == errors + 1
    redis_server.start()  # same port, empty, no script cached: EVALSHA must reload it
    clock.t += 5
    assert await message(check, "sales@example.org") == [250]
    assert metrics.state_fallback_active.labels("ratelimit")._value.get() == 0
    assert await check.state.shared.peek(["flood:sales@example.org"]) != [None]  # recorded in Redis again
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
