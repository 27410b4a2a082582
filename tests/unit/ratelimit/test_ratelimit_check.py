"""RateLimitCheck: verdicts and reservations at RCPT, refunds for mail that did not pass, shadow, null sender,
store failures."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytest

from queueguard import metrics
from queueguard.model import Connection, Transaction, parse_ip
from queueguard.policy.schema import Policy
from queueguard.ratelimit.check import RateLimitCheck
from queueguard.ratelimit.gcra import Ask, Reservation
from queueguard.ratelimit.store import MemoryStore, Owed
from queueguard.resolve import refusal
from queueguard.stage import RcptContext, StageResult, StateUnavailable


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_policy(*rules: dict[str, Any], on_error: str = "fallback") -> Policy:
    return Policy.model_validate({
        "ratelimits": [{"key": "recipient", "rate": "2/1m", **r} for r in rules],
        "state": {"on_error": on_error},
    })


def new_txn(sender: str = "a@example.org", ip: str = "192.0.2.1") -> Transaction:
    return Transaction(Connection(parse_ip(ip)), sender)


async def rcpt(check: RateLimitCheck, txn: Transaction, policy: Policy, to: str) -> StageResult:
    """Ask at RCPT; the pipeline would then accept the recipient if there is no verdict."""
    result = await check.on_rcpt(RcptContext(txn, to, policy))
    if not refusal(result.verdict):
        txn.recipients.append(to)
    return result


async def message(check: RateLimitCheck, policy: Policy, *rcpts: str, sender: str = "a@example.org",
                  ip: str = "192.0.2.1") -> list[str]:
    """One transaction: RCPT for each recipient, then commit what was accepted. Returns the replies."""
    txn = new_txn(sender, ip)
    replies = []
    for to in rcpts:
        r = await rcpt(check, txn, policy, to)
        replies.append(r.verdict.reply() if refusal(r.verdict) and r.verdict else "250")
    txn.policy = policy
    await check.on_end(txn, True)
    return replies


def counter(metric: Any, *labels: str) -> float:
    return float((metric.labels(*labels) if labels else metric)._value.get())


async def test_excess_gets_451_on_that_rcpt_only_and_others_go_on() -> None:
    clock = Clock()
    check = RateLimitCheck(MemoryStore(), clock=clock)
    policy = make_policy({"name": "flood"})
    assert await message(check, policy, "info@example.org") == ["250"]
    assert await message(check, policy, "info@example.org") == ["250"]
    replies = await message(check, policy, "info@example.org", "sales@example.org")
    assert replies[0].startswith("451 4.7.1 ") and "rule flood" in replies[0] and "try again in 30s" in replies[0]
    assert replies[1] == "250"
    clock.t += 30  # one interval later: one more is allowed (a real sender's retry gets through)
    assert await message(check, policy, "info@example.org") == ["250"]


async def test_refused_recipients_do_not_use_budget() -> None:
    clock = Clock()
    check = RateLimitCheck(MemoryStore(), clock=clock)
    policy = make_policy({"name": "flood"})
    await message(check, policy, "info@example.org")
    await message(check, policy, "info@example.org")
    for _ in range(20):  # refused at RCPT: nothing recorded
        assert (await message(check, policy, "info@example.org"))[0].startswith("451")
    clock.t += 30
    assert await message(check, policy, "info@example.org") == ["250"]


async def test_earlier_recipients_of_the_same_transaction_count() -> None:
    check = RateLimitCheck(MemoryStore(), clock=Clock())
    policy = make_policy({"name": "per-sender", "key": "sender", "rate": "3/1h"})
    replies = await message(check, policy, "a@x.example", "b@x.example", "c@x.example", "d@x.example")
    assert replies[:3] == ["250"] * 3 and replies[3].startswith("451 4.7.1")


async def test_abandoned_transaction_consumes_nothing() -> None:
    check = RateLimitCheck(MemoryStore(), clock=Clock())
    policy = make_policy({"name": "flood"})
    for _ in range(5):  # RCPT accepted (reserved), then the client quits before DATA: given back
        txn = new_txn()
        assert (await rcpt(check, txn, policy, "info@example.org")).verdict is None
        await check.on_end(txn, False)
    assert await message(check, policy, "info@example.org", "info@example.org") == ["250", "250"]


async def test_a_reservation_holds_the_budget_while_its_transaction_is_open() -> None:
    """Two transactions in flight at once cannot both take the last slot (the old peek-then-record
    let each see the same room)."""
    check = RateLimitCheck(MemoryStore(), clock=Clock())
    policy = make_policy({"name": "flood", "rate": "1/1h"})
    first, second = new_txn(), new_txn()
    assert (await rcpt(check, first, policy, "info@example.org")).verdict is None
    r = await rcpt(check, second, policy, "info@example.org")
    assert r.verdict is not None and r.verdict.code == 451
    await check.on_end(second, False)
    await check.on_end(first, False)  # the first one's mail was refused at DATA: its slot is free again
    assert await message(check, policy, "info@example.org") == ["250"]


async def test_a_recipient_refused_after_the_check_gives_its_reservation_back() -> None:
    """A later check (pressure, route caps) or the downstream refuses the RCPT: not accepted, not counted."""
    check = RateLimitCheck(MemoryStore(), clock=Clock())
    policy = make_policy({"name": "flood", "key": "sender", "rate": "2/1h"})
    txn = new_txn()
    for to in ("a@x.example", "b@x.example"):
        assert (await check.on_rcpt(RcptContext(txn, to, policy))).verdict is None  # refused after us
    assert (await rcpt(check, txn, policy, "c@x.example")).verdict is None  # 'b' was given back here
    assert (await rcpt(check, txn, policy, "d@x.example")).verdict is None
    r = await rcpt(check, txn, policy, "e@x.example")
    assert r.verdict is not None and r.verdict.code == 451
    assert (await check.on_rcpt(RcptContext(txn, "f@x.example", policy))).verdict is not None
    txn.policy = policy
    await check.on_end(txn, True)  # c and d keep theirs
    r = await rcpt(check, new_txn(), policy, "g@x.example")
    assert r.verdict is not None and r.verdict.code == 451


async def test_shadow_counts_and_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    check = RateLimitCheck(MemoryStore(), clock=Clock())
    policy = make_policy({"name": "trial", "mode": "shadow", "rate": "1/1h"})
    before = counter(metrics.ratelimit_shadow_hits, "trial", "tempfail")
    await message(check, policy, "info@example.org")
    txn = new_txn()
    with caplog.at_level(logging.INFO, "queueguard.ratelimit"):
        r = await rcpt(check, txn, policy, "info@example.org")
    assert r.verdict is None
    assert [(h.rule, h.shadow, h.action) for h in r.hits] == [("trial", True, "tempfail")]
    assert counter(metrics.ratelimit_shadow_hits, "trial", "tempfail") == before + 1
    assert "ratelimit trial (shadow) would tempfail rcpt=info@example.org" in caplog.text


async def test_reject_action() -> None:
    check = RateLimitCheck(MemoryStore(), clock=Clock())
    policy = make_policy({"name": "hard", "rate": "1/1h", "action": "reject"})
    assert await message(check, policy, "x@example.org") == ["250"]
    assert (await message(check, policy, "x@example.org"))[0] == "550 5.7.1 Rate limit exceeded (rule hard)"


async def test_quarantine_marks_the_rcpt_without_a_verdict() -> None:
    check = RateLimitCheck(MemoryStore(), clock=Clock())
    policy = make_policy({"name": "q", "rate": "1/1h", "action": "quarantine"},
                         {"name": "t", "key": "sender", "rate": "1/1h"})
    await message(check, policy, "x@example.org", sender="s1@example.org")
    txn = new_txn("s2@example.org")
    r = await rcpt(check, txn, policy, "x@example.org")
    assert not refusal(r.verdict) and [(h.rule, h.action, h.shadow) for h in r.hits] == [("q", "quarantine", False)]
    # When another rule refuses the RCPT, the refusal wins; the quarantine hit stays a record of a
    # recipient that was not accepted (Transaction.quarantine_hit looks only at accepted ones).
    txn = new_txn("s1@example.org")
    r = await rcpt(check, txn, policy, "x@example.org")
    assert r.verdict is not None and r.verdict.code == 451 and sorted(h.rule for h in r.hits) == ["q", "t"]
    txn.hits.extend(r.hits)
    assert txn.recipients == [] and txn.quarantine_hit() is None


async def test_null_sender_counts_by_recipient_but_not_by_sender() -> None:
    check = RateLimitCheck(MemoryStore(), clock=Clock())
    policy = make_policy({"name": "by-sender", "key": "sender", "rate": "1/1h"},
                         {"name": "by-rcpt", "rate": "3/1h"})
    replies = [(await message(check, policy, "x@example.org", sender=""))[0] for _ in range(4)]
    assert replies[:3] == ["250"] * 3 and "rule by-rcpt" in replies[3]


async def test_only_and_unless_select_the_rules() -> None:
    check = RateLimitCheck(MemoryStore(), clock=Clock())
    policy = make_policy({"name": "r", "rate": "1/1h", "unless": {"sender_in": ["*@lists.example.org"]}})
    assert await message(check, policy, "x@e.example", sender="l@lists.example.org") == ["250"]
    assert await message(check, policy, "x@e.example", sender="l@lists.example.org") == ["250"]
    assert await message(check, policy, "x@e.example") == ["250"]
    assert (await message(check, policy, "x@e.example"))[0].startswith("451")


class BrokenStore:
    """Fault injection for unit tests: a shared store that fails every call (the integration
    test kills a real redis-server for the same path)."""

    name = "redis"

    def __init__(self) -> None:
        self.calls = 0
        self.fail = True
        self.inner = MemoryStore()
        self.reconciled: list[Owed] = []

    def _call(self) -> None:
        self.calls += 1
        if self.fail:
            raise ConnectionError("connection refused")

    async def reserve(self, asks: Sequence[Ask], now: float) -> Reservation:
        self._call()
        return await self.inner.reserve(asks, now)

    async def refund(self, refunds: Sequence[tuple[str, float]], now: float) -> list[float | None]:
        self._call()
        return await self.inner.refund(refunds, now)

    async def reconcile(self, owed: Sequence[Owed], now: float) -> list[float | None]:
        self._call()
        self.reconciled.extend(owed)
        return await self.inner.reconcile(owed, now)

    def tracked(self) -> int | None:
        return None

    async def close(self) -> None:
        return None


async def test_store_failure_falls_back_to_the_in_process_limiter(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    store = BrokenStore()
    check = RateLimitCheck(store, clock=clock, retry_after=5.0)
    policy = make_policy({"name": "flood"})
    errors = counter(metrics.state_errors, "ratelimit", "redis")
    with caplog.at_level(logging.ERROR, "queueguard.state"):
        replies = [(await message(check, policy, "info@example.org"))[0] for _ in range(3)]
    assert replies[:2] == ["250", "250"] and replies[2].startswith("451 4.7.1")  # still limited, in memory
    assert counter(metrics.state_fallback_active, "ratelimit") == 1
    assert counter(metrics.state_errors, "ratelimit", "redis") == errors + 1  # tried once, then waits
    assert store.calls == 1
    assert caplog.text.count("failed") == 1 and "using in-process state" in caplog.text
    store.fail = False
    clock.t += 5
    assert await message(check, policy, "other@example.org") == ["250"]
    assert counter(metrics.state_fallback_active, "ratelimit") == 0 and check.status()["shared_state_down"] is False


async def test_store_failure_with_tempfail_policy() -> None:
    check = RateLimitCheck(BrokenStore(), clock=Clock())
    policy = make_policy({"name": "flood"}, on_error="tempfail")
    with pytest.raises(StateUnavailable):  # the pipeline answers it: tests/unit/test_pipeline.py
        await message(check, policy, "info@example.org")


async def test_store_failure_with_accept_policy() -> None:
    check = RateLimitCheck(BrokenStore(), clock=Clock())
    policy = make_policy({"name": "flood", "rate": "1/1h"}, on_error="accept")
    assert [(await message(check, policy, "info@example.org"))[0] for _ in range(5)] == ["250"] * 5


async def test_rules_that_do_not_apply_cost_nothing() -> None:
    store = BrokenStore()
    check = RateLimitCheck(store, clock=Clock())
    policy = make_policy({"name": "r", "only": {"authenticated": True}})
    assert await message(check, policy, "info@example.org") == ["250"]
    assert store.calls == 0


async def test_status_lists_the_most_limited_keys() -> None:
    clock = Clock()
    check = RateLimitCheck(MemoryStore(), clock=clock)
    policy = make_policy({"name": "flood", "rate": "1/1h"})
    for _ in range(4):
        await message(check, policy, "info@example.org")
    await message(check, policy, "sales@example.org")
    await message(check, policy, "sales@example.org")
    top = check.status()["top"]
    assert top == [{"key": "info@example.org", "rule": "flood", "count": 3},
                   {"key": "sales@example.org", "rule": "flood", "count": 1}]
    clock.t += 3601
    await message(check, policy, "sales@example.org")
    await message(check, policy, "sales@example.org")  # limited again: the old hour is forgotten
    assert check.status()["top"] == [{"key": "sales@example.org", "rule": "flood", "count": 1}]


class Members:
    """The live count Membership would have read from Redis (tests/integration/test_ratelimit_outage.py
    runs the real one)."""

    def __init__(self, hosts: int) -> None:
        self.hosts = hosts


async def test_outage_enforces_from_the_mirror_and_takes_this_hosts_share() -> None:
    clock = Clock()
    store = BrokenStore()
    store.fail = False
    check = RateLimitCheck(store, clock=clock, retry_after=5.0, members=Members(2))
    policy = make_policy({"name": "flood", "rate": "10/1h"})
    assert [(await message(check, policy, "info@example.org"))[0] for _ in range(4)] == ["250"] * 4
    store.fail = True
    # 6 of 10 left; two hosts share them: this one admits 3, not a fresh burst of 10
    replies = [(await message(check, policy, "info@example.org"))[0] for _ in range(10)]
    assert replies[:3] == ["250"] * 3 and all(r.startswith("451 4.7.1") for r in replies[3:])
    assert check.status()["members"] == 2
    store.fail = False
    clock.t += 5
    assert (await message(check, policy, "other@example.org")) == ["250"]
    # on recovery the shared store got what this host admitted meanwhile: 4 + 3 = 7 of 10 used
    assert [(o.key, o.increment) for o in store.reconciled] == [("flood:info@example.org", 3 * 360.0)]
    replies = [(await message(check, policy, "info@example.org"))[0] for _ in range(5)]
    assert replies[:3] == ["250"] * 3 and replies[3].startswith("451")


async def test_reconciling_that_fails_keeps_it_owed() -> None:
    clock = Clock()
    store = BrokenStore()
    check = RateLimitCheck(store, clock=clock, retry_after=5.0)
    policy = make_policy({"name": "flood", "rate": "10/1h"})
    assert await message(check, policy, "info@example.org") == ["250"]  # in the stand-in: owed
    clock.t += 5
    assert await message(check, policy, "info@example.org") == ["250"]  # still down: owed again
    store.fail = False
    clock.t += 5
    assert await message(check, policy, "x@example.org") == ["250"]
    assert [(o.key, o.increment) for o in store.reconciled] == [("flood:info@example.org", 720.0)]


async def test_one_mailbox_named_twice_in_a_message_counts_once() -> None:
    """The MTA delivers a message once to a mailbox however often RCPT names it (any spelling):
    ten RCPTs of info@ in one message used ten of its budget, the whole burst for everyone."""
    check = RateLimitCheck(MemoryStore(), clock=Clock())
    policy = make_policy({"name": "flood"})
    assert await message(check, policy, "info@example.org", '"info"@example.org', "INFO@example.org",
                         "info(x)@example.org") == ["250"] * 4
    assert await message(check, policy, "info@example.org") == ["250"]
    assert (await message(check, policy, "info@example.org"))[0].startswith("451")
