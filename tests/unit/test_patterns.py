"""PatternCheck: every given matcher must match; RE2 keeps hostile patterns linear; actions as bursts."""

from __future__ import annotations

from pathlib import Path

import pytest

from queueguard.mime import parse_message
from queueguard.model import Connection, Transaction, parse_ip
from queueguard.patterns import PatternCheck, compiled_patterns
from queueguard.policy.loader import PolicyError, load_policy_dir
from queueguard.policy.schema import Policy
from queueguard.resolve import resolve
from queueguard.stage import MessageContext
from queueguard.verdict import Action

MINI = (
    b"From: Promo <promo@cars.example>\r\nSubject: Win a Mini  Cooper today\r\nX-Mailer: BulkBlaster 9\r\n\r\n"
    b"Claim your prize at https://win.example/\r\n"
)


def policy(*rules: dict[str, object]) -> Policy:
    return Policy.model_validate({"patterns": list(rules)})


def ctx(
    raw: bytes, pol: Policy, sender: str = "promo@cars.example", rcpts: tuple[str, ...] = ("info@example.org",)
) -> MessageContext:
    txn = Transaction(Connection(parse_ip("192.0.2.9")), sender, recipients=list(rcpts), policy=pol)
    return MessageContext(txn, raw, pol, parse_message)


async def test_subject_pattern_quarantines_and_records_fingerprints() -> None:
    pol = policy({"name": "mini-cooper-wave", "subject": r"(?i)mini\s*cooper"})
    c = ctx(MINI, pol)
    r = await PatternCheck().on_message(c)
    assert r.verdict is not None and r.verdict.action is Action.QUARANTINE
    assert (r.verdict.rule, r.verdict.reason) == ("mini-cooper-wave", "pattern")
    assert r.hits[0].detail == "subject"
    assert "subject" in c.fingerprints


async def test_all_given_matchers_must_match() -> None:
    rule = {
        "name": "r",
        "subject": "(?i)mini",
        "body": "prize",
        "sender": "@cars\\.example$",
        "recipient": "^info@",
        "headers": {"X-Mailer": "BulkBlaster"},
    }
    r = await PatternCheck().on_message(ctx(MINI, policy(rule)))
    assert r.verdict is not None and r.hits[0].detail == "sender+recipient+x-mailer+subject+body"
    for change in (
        {"body": "nothing-like-this"},
        {"headers": {"X-Mailer": "Thunderbird"}},
        {"recipient": "^sales@"},
        {"sender": "@other\\.example$"},
    ):
        r = await PatternCheck().on_message(ctx(MINI, policy({**rule, **change})))
        assert r.verdict is None and not r.hits, change


@pytest.mark.parametrize("spelling", ['"info"@example.org', '"in\\fo"@example.org', "@relay.example:info@example.org",
                                      "<INFO@example.org>"])
async def test_address_patterns_see_the_mailbox_however_it_is_spelled(spelling: str) -> None:
    rule = {"name": "r", "sender": "^info@example\\.org$", "recipient": "^info@example\\.org$"}
    r = await PatternCheck().on_message(ctx(MINI, policy(rule), sender=spelling, rcpts=("bob@x.example", spelling)))
    assert r.verdict is not None and r.hits[0].detail == "sender+recipient"


async def test_missing_header_does_not_match() -> None:
    r = await PatternCheck().on_message(ctx(MINI, policy({"name": "r", "headers": {"X-Spam": "."}})))
    assert r.verdict is None


async def test_actions_and_shadow() -> None:
    for action, code in (("tempfail", 451), ("reject", 550)):
        r = await PatternCheck().on_message(ctx(MINI, policy({"name": "r", "subject": "Mini", "action": action})))
        assert r.verdict is not None and r.verdict.code == code and "r" in r.verdict.text
    r = await PatternCheck().on_message(ctx(MINI, policy({"name": "t", "subject": "Mini", "action": "tag"})))
    assert r.verdict is None and resolve(r.hits, "X-QG").headers == [("X-QG-Pattern", "t")]
    r = await PatternCheck().on_message(ctx(MINI, policy({"name": "s", "subject": "Mini", "mode": "shadow"})))
    assert r.verdict is None and r.hits[0].shadow


async def test_unless_condition_skips_rule() -> None:
    pol = Policy.model_validate(
        {
            "lists": {"ok": ["*@cars.example"]},
            "patterns": [{"name": "r", "subject": "Mini", "unless": {"sender_in": "ok"}}],
        }
    )
    assert (await PatternCheck().on_message(ctx(MINI, pol))).verdict is None


async def test_catastrophic_pattern_runs_in_linear_time() -> None:
    """`(a+)+$` backtracks exponentially in Python's re; under RE2 this returns at once."""
    body = b"Subject: x\r\n\r\n" + b"a" * 50_000 + b"!\r\n"
    r = await PatternCheck().on_message(ctx(body, policy({"name": "evil", "body": "(a+)+$"})))
    assert r.verdict is None


def test_backtracking_only_constructs_refused_by_check(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("patterns:\n  - name: backref\n    subject: '(a)\\1'\n")
    with pytest.raises(PolicyError) as e:
        load_policy_dir(tmp_path)
    assert any("RE2" in str(p) and "p.yaml:3" in str(p) for p in e.value.issues), e.value.issues


def test_compiled_once_per_policy_object() -> None:
    pol = policy({"name": "r", "subject": "Mini"})
    assert compiled_patterns(pol) is compiled_patterns(pol)
    assert compiled_patterns(policy({"name": "r", "subject": "Mini"})) is not compiled_patterns(pol)
