"""A real Postfix asking the queueguard policy socket (contrib/postfix/main.cf.policy verbatim).

Shown: ordinary mail reaches the sink, a flood to one recipient is deferred
(defer_if_permit -> 450 4.7.1) while other recipients go on, a quarantine rule
puts the message on Postfix's hold queue, and with queueguard stopped Postfix
defers (default_action=DEFER_IF_PERMIT) instead of passing mail.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest

from queueguard.harness.guard import Guard
from queueguard.harness.ports import free_port
from queueguard.harness.sink import SmtpSink
from tests.components.postfix import Postfix, send

pytestmark = pytest.mark.integration

POLICY = """
ratelimits:
  - name: flood-to-one
    key: recipient
    rate: 3/1h
    burst: 3
    action: tempfail
    only: {recipient_in: ["flood@test.example"]}
  - name: hold-second
    key: recipient
    rate: 1/1h
    burst: 1
    action: quarantine
    only: {recipient_in: ["kept@test.example"]}
"""


def policy_guard() -> Guard:
    return Guard({"policy_socket": {"enabled": True, "listen": f"127.0.0.1:{free_port()}"}}, {"policy.yaml": POLICY})


@pytest.fixture(scope="module")
def sink() -> Iterator[SmtpSink]:
    with SmtpSink(dump=True) as s:
        yield s


@pytest.fixture(scope="module")
def guard() -> Iterator[Guard]:
    with policy_guard() as g:
        yield g


@pytest.fixture(scope="module")
def postfix(sink: SmtpSink, guard: Guard) -> Iterator[Postfix]:
    with Postfix(relay_port=sink.port, policy=guard.settings["policy_socket"]["listen"]) as pf:
        yield pf


def test_ordinary_mail_is_delivered(postfix: Postfix, sink: SmtpSink, guard: Guard) -> None:
    before = sink.count()
    assert send(postfix.port, ["alice@test.example", "bob@test.example"], "policy hello") == {}
    assert sink.wait_count(before + 1) == before + 1
    assert guard.metric("queueguard_verdicts_total", frontend="policy", stage="final", action="accept") >= 2


def test_flood_is_deferred_per_recipient(postfix: Postfix, sink: SmtpSink) -> None:
    before = sink.count()
    for i in range(3):
        assert send(postfix.port, ["flood@test.example"], f"policy wave {i}") == {}
    partly = send(postfix.port, ["flood@test.example", "carol@test.example"], "policy wave 3")
    assert list(partly) == ["flood@test.example"]
    code, text = partly["flood@test.example"]
    assert code == 450
    assert b"4.7.1 <flood@test.example>: Recipient address rejected: Rate limit exceeded (rule flood-to-one)" in text
    assert sink.wait_count(before + 4) == before + 4


def test_quarantine_rule_holds_the_message_in_postfix(postfix: Postfix, sink: SmtpSink) -> None:
    before = sink.count()
    assert send(postfix.port, ["kept@test.example"], "policy keep one") == {}
    assert send(postfix.port, ["kept@test.example"], "policy keep two") == {}
    assert postfix.wait_log(r"hold: RCPT from .*<kept@test.example>: .*Held for review \(rule hold-second\)")
    assert postfix.wait_queue_empty()["hold"] == 1
    assert sink.wait_count(before + 1) == before + 1


def test_postfix_defers_while_queueguard_is_down(sink: SmtpSink) -> None:
    g = policy_guard()
    with g, Postfix(relay_port=sink.port, policy=g.settings["policy_socket"]["listen"]) as pf:
        assert send(pf.port, ["dave@test.example"], "policy up") == {}
        g.stop()
        before = sink.count()
        with pytest.raises(smtplib.SMTPRecipientsRefused) as down:
            send(pf.port, ["dave@test.example"], "policy down")
        code, _ = down.value.recipients["dave@test.example"]
        assert 400 <= code < 500
        assert pf.wait_log(r"warning: problem talking to server")
        assert pf.wait_queue_empty() == dict.fromkeys(pf.queue_counts(), 0)
        assert sink.wait_count(before, timeout=1) == before
