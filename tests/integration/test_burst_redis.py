"""Burst counts in a real Redis: two MX hosts (two BurstChecks) count one wave together; four real guard
processes flooded at once pass exactly the threshold; Redis down follows the policy's state.on_error,
and two real guards whose Redis is killed mid-wave go on from the counts it gave them."""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from queueguard.burst.check import BurstCheck
from queueguard.burst.window import RedisWindow
from queueguard.harness.guard import Guard
from queueguard.harness.sink import RecordingSink
from queueguard.mime import parse_message
from queueguard.model import Connection, Transaction, parse_ip
from queueguard.policy.schema import Policy
from queueguard.quarantine.store import QuarantineStore
from queueguard.replay.corpus import campaign
from queueguard.stage import MessageContext, StateUnavailable
from queueguard.verdict import Action
from tests.components.flood import Sent, flood, send, wait_for
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


def test_four_guards_flooded_at_once_pass_exactly_the_threshold(redis_server: RedisServer) -> None:
    """Each count is one atomic script call (window.lua), so 48 copies through four guards at once
    (two hosts x two workers) pass exactly as many as one guard would: the threshold."""
    copy = campaign(random.Random(6), "c", 1)[0].raw  # one message, sent 48 times: every key counts each
    wave = "bursts:\n  - name: wave\n    threshold: 10 in 1h\n    action: quarantine\n"
    with RecordingSink() as sink, contextlib.ExitStack() as stack:
        settings = {"downstreams": [{"address": f"127.0.0.1:{sink.port}"}], "state": redis_server.url}
        guards = [stack.enter_context(Guard(settings, {"bursts.yaml": wave})) for _ in range(4)]
        sent = flood([g.port for g in guards], 48, lambda n: [f"u{n}@dest.example"], threads=24,
                     message=lambda n: copy)
        assert all(s.data is not None and s.data[0] == 250 for s in sent)  # passed or quarantined, never refused
        held = [s for s in sent if s.data is not None and "quarantined as" in s.data[1]]
        assert len(sent) - len(held) == 10
        assert sink.wait_count(10) == 10
        assert sum(g.metric("queueguard_quarantined_total", rule="wave") for g in guards) == 38


def test_two_guards_keep_holding_a_wave_when_redis_is_killed(redis_server: RedisServer) -> None:
    """Two guards (two MX hosts) share a wave's count in Redis, which is killed mid-wave. Each goes
    on from the counts Redis gave it, counting its own copies for both (its share), so the wave is
    not let through again: the in-process fallback used to start at zero in each guard, and 2 x 8
    more copies passed. The copies held during the outage carry the campaign id Redis gave the wave,
    so one `delete --campaign` still takes them all."""
    copies = [c.raw for c in campaign(random.Random(12), "c", 24)]
    wave = "bursts:\n  - name: wave\n    threshold: 8 in 1h\n    action: quarantine\n"

    def held(s: Sent) -> str | None:
        assert s.data is not None and s.data[0] == 250, s.data  # passed or quarantined, never refused
        m = re.search(r"quarantined as (\w+)", s.data[1])
        return m.group(1) if m else None

    with RecordingSink() as sink, contextlib.ExitStack() as stack:
        settings = {"downstreams": [{"address": f"127.0.0.1:{sink.port}"}], "state": redis_server.url}
        a, b = (stack.enter_context(Guard(settings, {"bursts.yaml": wave})) for _ in range(2))
        wait_for("both guards to count two members", lambda: {a.metric("queueguard_state_members"),
                                                               b.metric("queueguard_state_members")} == {2})
        guards = (a, b)
        before = [held(send(guards[n % 2].port, ["info@dest.example"], n, message=lambda n: copies[n]))
                  for n in range(10)]
        assert [q is not None for q in before] == [False] * 8 + [True] * 2

        redis_server.kill()
        during = [held(send(guards[n % 2].port, ["info@dest.example"], n, message=lambda n: copies[n]))
                  for n in range(10, 24)]
        assert all(q is not None for q in during), during
        for g in guards:
            assert g.metric("queueguard_state_fallback_active", component="burst") == 1

    assert sink.wait_count(8) == 8 and len(sink.received()) == 8
    entries = [QuarantineStore(g.dir / "quarantine").get(q) for g in guards for q in (*before, *during) if q]
    found = [e for e in entries if e is not None]
    assert len(found) == 16 and len({e.campaign for e in found}) == 1, {e.campaign for e in found}


def test_two_guards_keep_holding_a_wave_when_redis_comes_back_empty(redis_server: RedisServer) -> None:
    """Redis crashes mid-wave and comes back empty (no persistence) before the wave is over. Redis
    then puts the next copies in a new campaign counted from one; each guard's mirror knows the wave
    was past its threshold and goes on from there, under the campaign id its held copies carry.
    Before, 8 more copies passed (the threshold again, counted from zero for both guards)."""
    copies = [c.raw for c in campaign(random.Random(13), "c", 26)]
    wave = "bursts:\n  - name: wave\n    threshold: 8 in 1h\n    action: quarantine\n"

    def held(s: Sent) -> str | None:
        assert s.data is not None and s.data[0] == 250, s.data
        m = re.search(r"quarantined as (\w+)", s.data[1])
        return m.group(1) if m else None

    with RecordingSink() as sink, contextlib.ExitStack() as stack:
        settings = {"downstreams": [{"address": f"127.0.0.1:{sink.port}"}], "state": redis_server.url}
        a, b = (stack.enter_context(Guard(settings, {"bursts.yaml": wave})) for _ in range(2))
        guards = (a, b)
        before = [held(send(guards[n % 2].port, ["info@dest.example"], n, message=lambda n: copies[n]))
                  for n in range(12)]
        assert [q is not None for q in before] == [False] * 8 + [True] * 4

        redis_server.kill()
        redis_server.start()  # same port, empty
        n = 12

        def back_on_redis() -> bool:  # each guard asks Redis again 5 s after its failure
            nonlocal n
            held(send(guards[n % 2].port, ["info@dest.example"], n, message=lambda n: copies[n]))
            n += 1
            return all(g.metric("queueguard_state_fallback_active", component="burst") == 0 for g in guards) \
                and n % 2 == 0
        wait_for("both guards back on Redis", back_on_redis, timeout=30)
        after = [held(send(guards[k % 2].port, ["info@dest.example"], k, message=lambda k: copies[k]))
                 for k in range(n, n + 6)]
        assert all(q is not None for q in after), after

    assert sink.wait_count(8) == 8 and len(sink.received()) == 8
    entries = [QuarantineStore(g.dir / "quarantine").get(q) for g in guards for q in (*before, *after) if q]
    assert len({e.campaign for e in entries if e is not None}) == 1
