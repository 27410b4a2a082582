"""Burst counts in a real Redis: two MX hosts (two BurstChecks) count one wave together; Redis down follows
the policy's state.on_error."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from queueguard.burst.check import BurstCheck
from queueguard.burst.window import RedisWindow
from queueguard.mime import parse_message
from queueguard.model import Connection, Transaction, parse_ip
from queueguard.policy.schema import Policy
from queueguard.replay.corpus import campaign
from queueguard.stage import MessageContext, StateUnavailable
from queueguard.verdict import Action
from tests.components.redis import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as r:
        yield r


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    c = Redis.from_url(redis_server.url, socket_timeout=1.0, socket_connect_timeout=1.0)
    yield c
    await c.aclose()


def policy(on_error: str = "fallback") -> Policy:
    return Policy.model_validate(
        {"bursts": [{"name": "wave", "threshold": "6 in 10m"}], "state": {"on_error": on_error}}
    )


def ctx(raw: bytes, pol: Policy) -> MessageContext:
    txn = Transaction(Connection(parse_ip("203.0.113.5")), "x@spam.example", recipients=["info@example.org"])
    return MessageContext(txn, raw, pol, parse_message)


async def test_two_hosts_share_counts(client: Redis) -> None:
    mx1 = BurstCheck(RedisWindow(client), clock=lambda: 5000.0)
    mx2 = BurstCheck(RedisWindow(client), clock=lambda: 5001.0)
    pol = policy()
    verdicts = []
    for i, copy in enumerate(campaign(random.Random(4), "c", 10)):
        result = await (mx1 if i % 2 else mx2).on_message(ctx(copy.raw, pol))
        verdicts.append(result.verdict.action if result.verdict else None)
    # each host saw only five copies, below the threshold of six: only shared counts catch the wave
    assert verdicts[:6] == [None] * 6
    assert verdicts[6:] == [Action.QUARANTINE] * 4
    keys = [k async for k in client.scan_iter("qg:burst:wave:*")]
    ttls = [await client.pttl(k) for k in keys]
    assert keys and all(0 < t <= 661_000 for t in ttls)


async def test_redis_down_falls_back_or_tempfails(redis_server: RedisServer, client: Redis) -> None:
    copies = [c.raw for c in campaign(random.Random(5), "c", 8)]
    redis_server.kill()
    check = BurstCheck(RedisWindow(client), clock=lambda: 5000.0)
    results = [await check.on_message(ctx(raw, policy("fallback"))) for raw in copies]
    assert results[-1].verdict is not None and results[-1].verdict.action is Action.QUARANTINE  # in-process counts
    with pytest.raises(StateUnavailable):  # the pipeline answers it with 451 4.3.0 (tests/unit/test_pipeline.py)
        await check.on_message(ctx(copies[0], policy("tempfail")))


async def test_redis_links_campaigns_like_memory(client: Redis) -> None:
    """campaign.lua and MemoryWindow.link_now apply the same rules: the same messages in the same order
    (two campaigns of variants, distinct mail, text-less image spam counted by its shape) give the same
    campaign counts, variants and signals (ids differ: they are random)."""
    from queueguard.burst.campaign import sighting
    from queueguard.burst.fingerprint import fingerprints, subject_skeleton
    from queueguard.burst.window import MemoryWindow
    from queueguard.replay.corpus import distinct

    rng = random.Random(9)
    variants = [campaign(random.Random(seed), f"v{seed}", 6) for seed in (21, 22)]
    image_spam = [b"Subject: Cheap meds %d\r\nContent-Type: text/html\r\n\r\n<a href='http://x%d.pharma.example/'>"
                  b"<img src='http://img.pharma.example/a.gif'></a>\r\n" % (i, i) for i in range(6)]
    stream = [m.raw for pair in zip(*variants, strict=True) for m in pair] + [m.raw for m in distinct(rng, 20)]
    stream += image_spam
    rng.shuffle(stream)
    memory, shared = MemoryWindow(), RedisWindow(client)
    for i, raw in enumerate(stream):
        parsed = parse_message(raw)
        seen = sighting(fingerprints(parsed), subject_skeleton(parsed.subject), parsed.url_hosts)
        if not seen:
            continue
        a = memory.link_now("r:", seen, 600, 5000.0 + i)
        b = await shared.link("r:", seen, 600, 5000.0 + i)
        assert (a.count, a.variants, a.signals) == (b.count, b.variants, b.signals), i
