"""BurstCheck: thresholds, actions, shadow mode, exemptions, state failures, status."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from queueguard.burst.campaign import Campaign, Sighting
from queueguard.burst.check import BurstCheck
from queueguard.burst.window import MemoryWindow
from queueguard.mime import parse_message
from queueguard.model import Connection, Transaction, parse_ip
from queueguard.policy.schema import Policy
from queueguard.replay.corpus import campaign, mailing_list, notifications
from queueguard.resolve import resolve
from queueguard.stage import MessageContext, StageResult, StateUnavailable
from queueguard.verdict import Action


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class BrokenWindow:
    """Fault injection: a shared state that fails the way an unreachable Redis does."""

    async def add(self, keys: Sequence[str], period: float, now: float) -> list[int]:
        raise ConnectionError("redis down")

    async def link(self, scope: str, seen: Sighting, period: float, now: float) -> Campaign:
        raise ConnectionError("redis down")


def policy(**rule: object) -> Policy:
    base: dict[str, object] = {"name": "wave", "fingerprint": "body", "threshold": "5 in 10m"}
    return Policy.model_validate({"lists": {"bulk": ["*@phabricator.example.org"]}, "bursts": [{**base, **rule}]})


def ctx(raw: bytes, pol: Policy, sender: str = "x@spam.example", auth: str | None = None) -> MessageContext:
    conn = Connection(parse_ip("198.51.100.7"), helo="spam.example", authenticated=auth)
    txn = Transaction(conn, sender, recipients=["info@example.org"], policy=pol)
    return MessageContext(txn, raw, pol, parse_message)


def wave(n: int = 12, seed: int = 1) -> list[bytes]:
    return [s.raw for s in campaign(random.Random(seed), "c", n)]


async def contexts(check: BurstCheck, raws: list[bytes], pol: Policy, **kw: str) -> list[MessageContext]:
    out = []
    for raw in raws:
        c = ctx(raw, pol, **kw)
        await check.on_message(c)
        out.append(c)
    return out


async def run(check: BurstCheck, raws: list[bytes], pol: Policy, **kw: str) -> list[StageResult]:
    return [await check.on_message(ctx(raw, pol, **kw)) for raw in raws]


async def test_wave_quarantined_after_threshold() -> None:
    pol = policy()
    check = BurstCheck(MemoryWindow(), clock=Clock())
    results = await run(check, wave(), pol)
    actions = [r.verdict.action if r.verdict else None for r in results]
    assert actions[:5] == [None] * 5
    assert actions[5:] == [Action.QUARANTINE] * 7
    hit = results[5].hits[0]
    assert (hit.rule, hit.kind, hit.action, hit.shadow) == ("wave", "burst", "quarantine", False)
    assert "6>5/600s" in hit.detail
    assert results[5].verdict.rule == "wave" and results[5].verdict.reason == "burst"


async def test_fingerprints_and_burst_key_recorded_for_the_quarantine() -> None:
    done = await contexts(BurstCheck(MemoryWindow(), clock=Clock()), wave(7), policy())
    last = done[-1].fingerprints
    assert last["burst"] in last["body"].split()
    assert set(last) >= {"body", "subject", "url_hosts", "burst"}


async def test_window_slides() -> None:
    clock = Clock()
    check = BurstCheck(MemoryWindow(), clock=clock)
    pol = policy()
    raws = wave(10)
    await run(check, raws[:5], pol)
    clock.t += 700  # beyond the 10 minute window
    results = await run(check, raws[5:], pol)
    assert all(r.verdict is None for r in results)


async def test_actions_tempfail_reject_tag() -> None:
    for action, code, status in (("tempfail", 451, "4.7.1"), ("reject", 550, "5.7.1")):
        results = await run(BurstCheck(MemoryWindow(), clock=Clock()), wave(6), policy(action=action))
        v = results[-1].verdict
        assert (v.code, v.status) == (code, status) and "wave" in v.text
    check = BurstCheck(MemoryWindow(), clock=Clock())
    results = await run(check, wave(6), policy(action="tag"))
    assert results[-1].verdict is None and resolve(results[-1].hits, "X-QG").headers == [("X-QG-Burst", "wave")]


async def test_shadow_mode_only_records() -> None:
    results = await run(BurstCheck(MemoryWindow(), clock=Clock()), wave(8), policy(mode="shadow"))
    assert all(r.verdict is None and not resolve(r.hits).headers for r in results)
    assert [h.shadow for r in results for h in r.hits] == [True, True, True]


async def test_trusted_list_id_is_exempt_and_any_other_list_id_is_counted() -> None:
    posts = [s.raw for s in mailing_list(random.Random(2), 40)]
    same_post = [posts[0]] * 20  # even identical list copies
    trusted = policy(unless={"list_id_in": ["lists.example.org"]})
    results = await run(BurstCheck(MemoryWindow(), clock=Clock()), posts + same_post, trusted)
    assert all(r.verdict is None and not r.hits for r in results)
    # the same List-Id does not exempt anything when the policy does not trust it
    results = await run(BurstCheck(MemoryWindow(), clock=Clock()), posts + same_post, policy())
    assert [r.verdict is not None for r in results][-15:] == [True] * 15


async def test_header_only_flags_exempt_only_when_a_policy_asks() -> None:
    post = mailing_list(random.Random(2), 1)[0].raw
    results = await run(BurstCheck(MemoryWindow(), clock=Clock()), [post] * 6, policy())
    assert results[-1].verdict is not None  # the default: List-Id/List-Unsubscribe buy nothing
    results = await run(BurstCheck(MemoryWindow(), clock=Clock()), [post] * 6, policy(exempt_list_traffic=True))
    assert all(r.verdict is None for r in results)  # asked for (queueguard check warns about it)


async def test_notification_sender_in_unless_list_is_not_quarantined() -> None:
    mails = [m.raw for m in notifications(random.Random(3), 60)] + wave(20)
    pol = policy(unless={"sender_in": "bulk"})
    check = BurstCheck(MemoryWindow(), clock=Clock())
    results = await run(check, mails, pol, sender="no-reply@phabricator.example.org")
    assert all(r.verdict is None for r in results)
    # the same stream from a sender not in the list: its wave is a burst, the exemption is what saved it
    check = BurstCheck(MemoryWindow(), clock=Clock())
    results = await run(check, mails, pol, sender="x@elsewhere.example")
    assert [r.verdict is not None for r in results][-15:] == [True] * 15


async def test_authenticated_submissions_exempt() -> None:
    check = BurstCheck(MemoryWindow(), clock=Clock())
    results = await run(check, wave(8), policy(), auth="alice")
    assert all(r.verdict is None for r in results)


@pytest.mark.parametrize("header", ["List-Unsubscribe: <mailto:u@offers.example>", "List-Id: Offers <offers.example>",
                                    "In-Reply-To: <t1@example.org>", "References: <t1@example.org>"])
async def test_a_wave_carrying_an_exemption_header_is_held_like_one_without(header: str) -> None:
    plain = await run(BurstCheck(MemoryWindow(), clock=Clock()), wave(12), policy())
    carrying = [header.encode() + b"\r\n" + raw for raw in wave(12)]
    tagged = await run(BurstCheck(MemoryWindow(), clock=Clock()), carrying, policy())
    held = [r.verdict.action if r.verdict else None for r in plain]
    assert held == [r.verdict.action if r.verdict else None for r in tagged]
    assert held == [None] * 5 + [Action.QUARANTINE] * 7


async def test_subject_fingerprint_rule() -> None:
    raws = [f"Subject: Your parcel {i} is waiting x{i}q\r\n\r\nhello {i}\r\n".encode() for i in range(7)]
    results = await run(BurstCheck(MemoryWindow(), clock=Clock()), raws, policy(fingerprint="subject"))
    assert [r.verdict is not None for r in results] == [False] * 5 + [True] * 2


async def test_rules_count_separately_and_messages_without_keys_pass() -> None:
    raws = [b"Subject: hi\r\n\r\nshort\r\n"] * 10  # no body fingerprint: too little text
    results = await run(BurstCheck(MemoryWindow(), clock=Clock()), raws, policy())
    assert all(r.verdict is None and not r.hits for r in results)


async def test_state_failure_follows_policy_on_error() -> None:
    raws = wave(7)
    fallback = BurstCheck(BrokenWindow(), clock=Clock())
    results = await run(fallback, raws, policy())
    assert results[-1].verdict is not None and results[-1].verdict.action is Action.QUARANTINE

    pol = Policy.model_validate({**policy().model_dump(mode="json"), "state": {"on_error": "tempfail"}})
    with pytest.raises(StateUnavailable):  # the pipeline answers 451 4.3.0 state_error (test_pipeline.py)
        await run(BurstCheck(BrokenWindow(), clock=Clock()), raws[:1], pol)

    pol = Policy.model_validate({**policy().model_dump(mode="json"), "state": {"on_error": "accept"}})
    r = await run(BurstCheck(BrokenWindow(), clock=Clock()), raws, pol)
    assert all(x.verdict is None for x in r)


async def test_status_lists_active_bursts_and_forgets_old_ones() -> None:
    clock = Clock()
    check = BurstCheck(MemoryWindow(), clock=clock)
    await run(check, wave(9), policy())
    (top,) = check.status()[:1]
    assert top["rule"] == "wave" and top["count"] == 9 and str(top["fingerprint"]).startswith("c:")
    clock.t += 601
    assert check.status() == []
