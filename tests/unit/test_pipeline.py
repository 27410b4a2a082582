"""Pipeline decisions with small stand-in checks (no network).

The stand-ins are checks written for the test, not mocks of a component:
the pipeline's contract is "run checks, record hits, turn failures into 4xx".
A check that raises is fault injection: that is how a bug in a check looks.
"""

from __future__ import annotations

import ipaddress

import pytest

from queueguard import metrics
from queueguard.model import Connection, RuleHit, Transaction
from queueguard.pipeline import Pipeline, QuarantineFull
from queueguard.policy.schema import Policy
from queueguard.stage import NOTHING, MessageContext, RcptContext, StageResult
from queueguard.verdict import Action, Verdict, quarantine, tempfail

CONN = Connection(ipaddress.ip_address("192.0.2.1"), 4000, helo="client.example")
MSG = b"Subject: hi\r\n\r\nbody\r\n"


class Recorder:
    """An RcptCheck that refuses listed recipients and records commits."""

    name = "recorder"

    def __init__(self, refuse: set[str] | None = None, hit: RuleHit | None = None) -> None:
        self.refuse = refuse or set()
        self.hit = hit
        self.commits: list[list[str]] = []

    async def on_rcpt(self, ctx: RcptContext) -> StageResult:
        hits = [self.hit] if self.hit else []
        if ctx.recipient in self.refuse:
            return StageResult(tempfail("4.7.1", "slow down", reason="ratelimit", rule="r1"), hits)
        return StageResult(None, hits)

    async def commit(self, txn: Transaction, policy: Policy) -> None:
        self.commits.append(list(txn.recipients))


class Boom:
    name = "boom"

    async def on_rcpt(self, ctx: RcptContext) -> StageResult:
        raise RuntimeError("bug in a check")

    async def commit(self, txn: Transaction, policy: Policy) -> None:
        raise RuntimeError("bug in commit")

    async def on_message(self, ctx: MessageContext) -> StageResult:
        raise RuntimeError("bug in a check")


class Verdicts:
    """A MessageCheck answering a fixed verdict."""

    name = "fixed"

    def __init__(self, verdict: Verdict | None, headers: list[tuple[str, str]] | None = None) -> None:
        self.verdict = verdict
        self.headers = headers or []
        self.seen = 0

    async def on_message(self, ctx: MessageContext) -> StageResult:
        self.seen += 1
        return StageResult(self.verdict, [], self.headers)


class Store:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.stored: list[tuple[str, bytes, dict[str, str]]] = []

    async def put(self, txn: Transaction, raw: bytes, verdict: Verdict, hits: list[RuleHit],
                  fingerprints: dict[str, str]) -> str:
        if self.error:
            raise self.error
        self.stored.append((txn.id, raw, fingerprints))
        return "q-" + txn.id


def pipeline(**kw: object) -> Pipeline:
    return Pipeline(frontend="test", policy=Policy, **kw)  # type: ignore[arg-type]


async def test_refused_recipient_gets_its_verdict_others_go_on() -> None:
    rec = Recorder(refuse={"flooded@example.org"})
    p = pipeline(rcpt_checks=[rec])
    txn, v = await p.mail(CONN, "<a@example.net>")
    assert not v.final and txn.sender == "a@example.net"
    assert (await p.rcpt(txn, "<flooded@example.org>")).reply().startswith("451 4.7.1")
    assert not (await p.rcpt(txn, "other@example.org")).final
    assert txn.recipients == ["other@example.org"]
    verdict = await p.message(txn, MSG)
    assert verdict.action is Action.ACCEPT
    await p.finish(txn, verdict)
    assert rec.commits == [["other@example.org"]]


async def test_refused_mail_does_not_use_budget() -> None:
    rec = Recorder()
    p = pipeline(rcpt_checks=[rec], message_checks=[Verdicts(tempfail("4.3.2", "busy", reason="scan_busy"))])
    txn, _ = await p.mail(CONN, "a@example.net")
    await p.rcpt(txn, "b@example.org")
    verdict = await p.message(txn, MSG)
    assert verdict.code == 451
    await p.finish(txn, verdict)
    assert rec.commits == []


async def test_exception_in_a_check_is_451_4_3_0_never_5xx() -> None:
    before = metrics.internal_errors.labels("rcpt")._value.get()
    p = pipeline(rcpt_checks=[Boom()], message_checks=[Boom()])
    txn, _ = await p.mail(CONN, "a@example.net")
    v = await p.rcpt(txn, "b@example.org")
    assert v.reply().startswith("451 4.3.0")
    assert metrics.internal_errors.labels("rcpt")._value.get() == before + 1
    txn.recipients.append("b@example.org")
    assert (await p.message(txn, MSG)).reply().startswith("451 4.3.0")
    await p.finish(txn, Verdict(Action.ACCEPT))  # a failing commit is logged, not raised


async def test_shadow_hits_are_recorded_and_change_nothing() -> None:
    shadow = RuleHit("flood", "ratelimit", "tempfail", shadow=True)
    p = pipeline(rcpt_checks=[Recorder(hit=shadow)])
    txn, _ = await p.mail(CONN, "a@example.net")
    assert not (await p.rcpt(txn, "b@example.org")).final
    assert txn.hits == [RuleHit("flood", "ratelimit", "tempfail", True, "", "b@example.org")]
    assert "ratelimit:flood(shadow)" in p.with_headers(txn, MSG).decode()


async def test_quarantine_verdict_is_stored_before_250() -> None:
    store = Store()
    later = Verdicts(None)
    p = pipeline(message_checks=[Verdicts(quarantine("kept", reason="burst", rule="wave")), later],
                 quarantine=store)
    txn, _ = await p.mail(CONN, "a@example.net")
    await p.rcpt(txn, "b@example.org")
    v = await p.message(txn, MSG)
    assert v.reply() == f"250 2.0.0 Ok: quarantined as q-{txn.id}"
    assert store.stored[0][1] == MSG
    assert later.seen == 0, "checks after a final verdict must not run"


@pytest.mark.parametrize(("error", "reply"), [
    (QuarantineFull("inodes"), "452 4.3.1"),
    (OSError(28, "No space left on device"), "451 4.3.0"),
])
async def test_quarantine_failure_defers(error: Exception, reply: str) -> None:
    p = pipeline(message_checks=[Verdicts(quarantine("kept", reason="burst", rule="wave"))],
                 quarantine=Store(error))
    txn, _ = await p.mail(CONN, "a@example.net")
    await p.rcpt(txn, "b@example.org")
    assert (await p.message(txn, MSG)).reply().startswith(reply)


async def test_no_quarantine_configured_defers() -> None:
    p = pipeline(message_checks=[Verdicts(quarantine("kept", reason="burst", rule="wave"))])
    txn, _ = await p.mail(CONN, "a@example.net")
    await p.rcpt(txn, "b@example.org")
    assert (await p.message(txn, MSG)).code == 451


async def test_rate_limit_quarantine_hit_at_rcpt_quarantines_at_data() -> None:
    store = Store()
    p = pipeline(rcpt_checks=[Recorder(hit=RuleHit("flood", "ratelimit", "quarantine"))], quarantine=store)
    txn, _ = await p.mail(CONN, "a@example.net")
    assert not (await p.rcpt(txn, "b@example.org")).final
    v = await p.message(txn, MSG)
    assert v.action is Action.QUARANTINE and len(store.stored) == 1


async def test_tag_headers_are_added_to_delivered_message() -> None:
    p = pipeline(message_checks=[Verdicts(None, [("X-Queueguard-Burst", "wave")])])
    txn, _ = await p.mail(CONN, "a@example.net")
    await p.rcpt(txn, "b@example.org")
    assert not (await p.message(txn, MSG)).final
    assert p.with_headers(txn, MSG).startswith(b"X-Queueguard-Burst: wave\r\n")
    p.add_headers = False
    assert p.with_headers(txn, MSG) == MSG


async def test_policy_is_pinned_for_the_whole_transaction() -> None:
    current = [Policy()]
    p = Pipeline(frontend="test", policy=lambda: current[0])
    txn, _ = await p.mail(CONN, "a@example.net")
    first = txn.policy
    current[0] = Policy(lists={"x": ["a@b"]})
    seen: list[object] = []

    class Spy:
        name = "spy"

        async def on_message(self, ctx: MessageContext) -> StageResult:
            seen.append(ctx.policy)
            return NOTHING

    p.message_checks.append(Spy())
    await p.message(txn, MSG)
    assert seen == [first]
