"""The Session's decisions with small stand-in checks (no network).

The stand-ins are checks written for the test, not mocks of a component:
the pipeline's contract is "run checks, record hits, resolve them in one
place, turn failures into 4xx, end every transaction exactly once". A check
that raises is fault injection: that is how a bug in a check looks.
"""

from __future__ import annotations

import ipaddress

import pytest

from queueguard import metrics
from queueguard.model import Connection, RuleHit, Transaction
from queueguard.pipeline import End, Pipeline, Session
from queueguard.pipeline.hygiene import own_header_spans, smuggling_verdict, strip_own_headers
from queueguard.policy.schema import Policy
from queueguard.quarantine.protocol import QuarantineFull
from queueguard.stage import NOTHING, MessageContext, RcptContext, StageResult, StateUnavailable
from queueguard.verdict import Action, Verdict

MSG = b"Subject: hi\r\n\r\nbody\r\n"


def conn() -> Connection:
    return Connection(ipaddress.ip_address("192.0.2.1"), 4000, helo="client.example")


class Recorder:
    """An RcptCheck that refuses listed recipients and records how transactions end."""

    name = "recorder"

    def __init__(self, refuse: set[str] | None = None, hit: RuleHit | None = None) -> None:
        self.refuse = refuse or set()
        self.hit = hit
        self.ends: list[tuple[list[str], bool]] = []

    async def on_rcpt(self, ctx: RcptContext) -> StageResult:
        hits = [self.hit] if self.hit else []
        if ctx.recipient in self.refuse:
            hits.append(RuleHit("r1", "ratelimit", "tempfail", retry_after=30))
        return StageResult(hits)

    async def on_end(self, txn: Transaction, passed: bool) -> None:
        self.ends.append((list(txn.recipients), passed))


class Boom:
    name = "boom"

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error or RuntimeError("bug in a check")

    async def on_rcpt(self, ctx: RcptContext) -> StageResult:
        raise self.error

    async def on_end(self, txn: Transaction, passed: bool) -> None:
        raise RuntimeError("bug in on_end")

    async def on_message(self, ctx: MessageContext) -> StageResult:
        raise self.error


class Hits:
    """A MessageCheck answering fixed hits."""

    name = "fixed"

    def __init__(self, *hits: RuleHit) -> None:
        self.hits = list(hits)
        self.seen = 0

    async def on_message(self, ctx: MessageContext) -> StageResult:
        self.seen += 1
        return StageResult(list(self.hits))


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


def session(**kw: object) -> Session:
    return Pipeline(frontend="test", policy=Policy, **kw).open(conn())  # type: ignore[arg-type]


QUARANTINE_HIT = RuleHit("wave", "burst", "quarantine")


async def test_refused_recipient_gets_its_verdict_others_go_on() -> None:
    rec = Recorder(refuse={"flooded@example.org"})
    s = session(rcpt_checks=[rec])
    assert not (await s.mail("<a@example.net>")).final
    assert s.txn is not None and s.txn.sender == "a@example.net"
    v = await s.rcpt("<flooded@example.org>")
    assert v.reply() == "451 4.7.1 Rate limit exceeded (rule r1), try again in 30s"
    assert not (await s.rcpt("other@example.org", ["NOTIFY=NEVER"])).final
    txn = s.txn
    assert txn.recipients == ["other@example.org"] and txn.rcpt_options == {"other@example.org": ("NOTIFY=NEVER",)}
    outcome = await s.data(MSG)
    assert outcome.verdict.action is Action.ACCEPT and s.txn is None
    assert rec.ends == [(["other@example.org"], True)]


async def test_refused_mail_does_not_use_budget() -> None:
    rec = Recorder()
    s = session(rcpt_checks=[rec], message_checks=[Hits(RuleHit("busy_queue", "scan", "tempfail"))])
    await s.mail("a@example.net")
    await s.rcpt("b@example.org")
    assert (await s.data(MSG)).verdict.reply().startswith("451 4.3.2")
    assert rec.ends == [(["b@example.org"], False)]


@pytest.mark.parametrize("why", list(End))
async def test_every_end_ends_once_and_charges_nothing(why: End) -> None:
    rec = Recorder()
    s = session(rcpt_checks=[rec])
    await s.mail("a@example.net")
    await s.rcpt("b@example.org")
    reply = await s.end(why)
    assert (reply is not None) == (why is End.OVERSIZE)
    assert reply is None or reply.reply().startswith("552 5.3.4")
    assert await s.end(why) is None and rec.ends == [(["b@example.org"], False)]
    await s.close()
    assert len(rec.ends) == 1


async def test_new_mail_and_helo_end_the_open_transaction() -> None:
    rec = Recorder()
    s = session(rcpt_checks=[rec])
    await s.mail("a@example.net")
    await s.rcpt("b@example.org")
    await s.mail("c@example.net")
    await s.helo("other.example")
    assert s.txn is None and s.conn.helo == "other.example" and len(rec.ends) == 2


async def test_exception_in_a_check_is_451_4_3_0_never_5xx() -> None:
    before = metrics.internal_errors.labels("rcpt")._value.get()
    s = session(rcpt_checks=[Boom()], message_checks=[Boom()])
    await s.mail("a@example.net")
    assert (await s.rcpt("b@example.org")).reply().startswith("451 4.3.0")
    assert metrics.internal_errors.labels("rcpt")._value.get() == before + 1
    assert s.txn is not None
    s.txn.recipients.append("b@example.org")
    assert (await s.data(MSG)).verdict.reply().startswith("451 4.3.0")  # a failing on_end is logged


async def test_shared_state_unavailable_is_one_verdict() -> None:
    s = session(rcpt_checks=[Boom(StateUnavailable("ratelimit state redis unavailable"))])
    await s.mail("a@example.net")
    v = await s.rcpt("b@example.org")
    assert (v.code, v.status, v.reason) == (451, "4.3.0", "state_error")


async def test_shadow_hits_are_recorded_and_change_nothing() -> None:
    shadow = RuleHit("flood", "ratelimit", "tempfail", shadow=True)
    s = session(rcpt_checks=[Recorder(hit=shadow)])
    await s.mail("a@example.net")
    assert not (await s.rcpt("b@example.org")).final
    txn = s.txn
    assert txn is not None and txn.hits == [RuleHit("flood", "ratelimit", "tempfail", True, "", "b@example.org")]
    assert ("X-Queueguard-Hits", "ratelimit:flood(shadow)") in s.headers(txn)


async def test_quarantine_verdict_is_stored_before_250() -> None:
    store = Store()
    later = Hits()
    s = session(message_checks=[Hits(QUARANTINE_HIT), later], quarantine=store)
    await s.mail("a@example.net")
    await s.rcpt("b@example.org")
    txn = s.txn
    assert txn is not None
    v = (await s.data(MSG)).verdict
    assert v.reply() == f"250 2.0.0 Ok: quarantined as q-{txn.id}"
    assert store.stored[0][1] == MSG
    assert later.seen == 0, "checks after a final verdict must not run"


async def test_hold_in_mta_passes_the_quarantine_verdict_unstored() -> None:
    rec = Recorder()
    s = session(rcpt_checks=[rec], message_checks=[Hits(QUARANTINE_HIT)], hold_in_mta=True)
    await s.mail("a@example.net")
    await s.rcpt("b@example.org")
    outcome = await s.data(MSG)
    assert outcome.verdict.action is Action.QUARANTINE and outcome.verdict.code == 250
    assert ("X-Queueguard-Hits", "burst:wave") in outcome.headers and rec.ends[0][1] is True


@pytest.mark.parametrize(("error", "reply"), [
    (QuarantineFull("inodes"), "452 4.3.1"),
    (OSError(28, "No space left on device"), "451 4.3.0"),
])
async def test_quarantine_failure_defers(error: Exception, reply: str) -> None:
    s = session(message_checks=[Hits(QUARANTINE_HIT)], quarantine=Store(error))
    await s.mail("a@example.net")
    await s.rcpt("b@example.org")
    assert (await s.data(MSG)).verdict.reply().startswith(reply)


async def test_no_quarantine_configured_defers() -> None:
    s = session(message_checks=[Hits(QUARANTINE_HIT)])
    await s.mail("a@example.net")
    await s.rcpt("b@example.org")
    assert (await s.data(MSG)).verdict.code == 451


async def test_rate_limit_quarantine_hit_at_rcpt_quarantines_at_data() -> None:
    store = Store()
    s = session(rcpt_checks=[Recorder(hit=RuleHit("flood", "ratelimit", "quarantine"))], quarantine=store)
    await s.mail("a@example.net")
    assert not (await s.rcpt("b@example.org")).final
    assert (await s.data(MSG)).verdict.action is Action.QUARANTINE and len(store.stored) == 1


async def test_quarantine_hit_of_a_refused_recipient_does_not_mark_the_message() -> None:
    hit = RuleHit("flood", "ratelimit", "quarantine")
    s = session(rcpt_checks=[Recorder(refuse={"x@example.org"}, hit=hit)], quarantine=Store())
    await s.mail("a@example.net")
    assert (await s.rcpt("x@example.org")).code == 451  # refusal wins over quarantine
    s2_hit = s.txn.quarantine_hit() if s.txn else None
    assert s2_hit is None


async def test_tag_headers_are_added_to_delivered_message() -> None:
    s = session(message_checks=[Hits(RuleHit("wave", "burst", "tag"))])
    await s.mail("a@example.net")
    await s.rcpt("b@example.org")
    outcome = await s.data(MSG)
    assert not outcome.verdict.final and outcome.headers[0] == ("X-Queueguard-Burst", "wave")
    s = session(message_checks=[Hits(RuleHit("wave", "burst", "tag"))], add_headers=False)
    await s.mail("a@example.net")
    await s.rcpt("b@example.org")
    assert (await s.data(MSG)).headers == []


async def test_forged_verdict_headers_never_reach_checks_or_the_store() -> None:
    store = Store()
    forged = (b"X-Queueguard-Scan: clean\r\nSubject: hi\r\nx-queueguard-hits: none,\r\n\tfolded\r\n"
              b"X-Queueguard-Hitsnot: kept? no: prefix-\r\nX-Other: kept\r\n\r\nX-Queueguard-Scan: body\r\n")
    s = session(message_checks=[Hits(QUARANTINE_HIT)], quarantine=store)
    await s.mail("a@example.net")
    await s.rcpt("b@example.org")
    await s.data(forged)
    assert store.stored[0][1] == b"Subject: hi\r\nX-Other: kept\r\n\r\nX-Queueguard-Scan: body\r\n"


def test_own_header_spans_is_case_blind_and_keeps_other_prefixes() -> None:
    raw = b"X-QUEUEGUARD-BURST: a\r\nX-Queueguardian: b\r\n\r\n"
    assert own_header_spans(raw, "X-Queueguard") == [(0, 23)]
    assert strip_own_headers(raw, "X-Queueguard") == b"X-Queueguardian: b\r\n\r\n"
    assert strip_own_headers(MSG, "X-Queueguard") is MSG


@pytest.mark.parametrize("body", [b"a\r\n\x00.\r\nMAIL FROM:<e@x>\r\n", b"a\x00b\r\n"])
def test_nul_octet_is_refused_as_smuggling(body: bytes) -> None:
    v = smuggling_verdict(body)
    assert v is not None and v.code == 554 and "NUL" in v.text


async def test_policy_is_pinned_for_the_whole_transaction() -> None:
    current = [Policy()]
    seen: list[object] = []

    class Spy:
        name = "spy"

        async def on_message(self, ctx: MessageContext) -> StageResult:
            seen.append(ctx.policy)
            return NOTHING

    s = Pipeline(frontend="test", policy=lambda: current[0], message_checks=[Spy()]).open(conn())
    await s.mail("a@example.net")
    first = s.txn.policy if s.txn else None
    current[0] = Policy(lists={"x": ["a@b"]})
    await s.rcpt("b@example.org")
    await s.data(MSG)
    assert seen == [first]


async def test_connect_checks_refuse_at_the_door() -> None:
    class Shed:
        name = "pressure"

        async def on_connect(self, c: Connection, policy: Policy) -> StageResult:
            return StageResult([RuleHit("shed", "pressure", "tempfail", detail="psi_memory")])

    s = Pipeline(frontend="test", policy=Policy, connect_checks=[Shed()]).open(conn())
    v = await s.connect()
    assert v.final and v.status == "4.3.2" and v.reason == "shed" and "(pressure:shed)" in v.text
