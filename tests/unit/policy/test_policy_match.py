"""Matchers: address globs, domains, CIDRs v4/v6, HELO, authenticated, only/unless, DATA-stage facts."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import pytest

from queueguard.model import Connection, Transaction, parse_ip
from queueguard.policy import match
from queueguard.policy.match import AddressMatcher, HostMatcher, NetMatcher, compiled, rule_applies
from queueguard.policy.schema import Policy


def txn(sender: str = "a@example.org", ip: str | None = "192.0.2.10", helo: str = "mx.example.org",
        auth: str | None = None, rcpts: tuple[str, ...] = ()) -> Transaction:
    t = Transaction(Connection(parse_ip(ip), helo=helo, authenticated=auth), sender)
    t.recipients.extend(rcpts)
    return t


def policy(rule_extra: dict[str, object], lists: dict[str, list[str]] | None = None) -> Policy:
    return Policy.model_validate({
        "lists": lists or {},
        "ratelimits": [{"name": "r", "key": "recipient", "rate": "1/1m", **rule_extra}],
    })


@pytest.mark.parametrize(("entry", "address", "expected"), [
    ("info@example.org", "Info@Example.ORG", True),
    ("info@example.org", "<info@example.org>", True),
    ("info@example.org", "info2@example.org", False),
    ("*@lists.example.org", "dev@lists.example.org", True),
    ("*@lists.example.org", "dev@example.org", False),
    ("info@*", "info@anything.example", True),
    ("a?c@x.example", "abc@x.example", True),
    ("example.org", "a@example.org", True),
    ("example.org", "a@sub.example.org", True),
    ("example.org", "a@badexample.org", False),
    ("@example.org", "a@example.org", True),
    ("@example.org", "a@sub.example.org", False),
])
def test_address_entries(entry: str, address: str, expected: bool) -> None:
    assert AddressMatcher.build([entry])(address) is expected


def test_address_matcher_never_matches_the_null_sender_by_domain() -> None:
    m = AddressMatcher.build(["example.org", "@example.org", "x@example.org"])
    assert not m("") and not m("<>")


@pytest.mark.parametrize(("entry", "ip", "expected"), [
    ("192.0.2.0/24", "192.0.2.77", True),
    ("192.0.2.0/24", "192.0.3.1", False),
    ("192.0.2.7", "192.0.2.7", True),
    ("0.0.0.0/0", "203.0.113.5", True),
    ("2001:db8::/32", "2001:db8:ffff::1", True),
    ("2001:db8::/32", "2001:db9::1", False),
    ("::1", "::1", True),
    ("192.0.2.0/24", "::ffff:192.0.2.9", True),      # v4-mapped client on a dual-stack socket
    ("::ffff:192.0.2.0/120", "192.0.2.9", True),     # v4-mapped entry
    ("192.0.2.0/24", "2001:db8::1", False),
])
def test_network_entries(entry: str, ip: str, expected: bool) -> None:
    assert NetMatcher.build([entry])(parse_ip(ip)) is expected


def test_network_matcher_without_client_address() -> None:
    assert not NetMatcher.build(["0.0.0.0/0"])(None)


@pytest.mark.parametrize(("entry", "helo", "expected"), [
    ("example.org", "mx1.example.org", True),
    ("example.org", "example.org.", True),
    ("example.org", "evil-example.org", False),
    ("*.dyn.example.net", "host-1.dyn.example.net", True),
    ("[192.0.2.*]", "[192.0.2.5]", False),  # '[' starts a glob character class; use plain globs for literals
    ("localhost", "", False),
])
def test_helo_entries(entry: str, helo: str, expected: bool) -> None:
    assert HostMatcher.build([entry])(helo) is expected


def test_only_and_unless() -> None:
    p = policy({"only": {"client_in": "nets"}, "unless": {"sender_in": "bulk"}},
               {"nets": ["192.0.2.0/24", "2001:db8::/32"], "bulk": ["*@lists.example.org"]})
    rule = p.ratelimits[0]
    assert rule_applies(rule, p, txn(), "x@y")
    assert rule_applies(rule, p, txn(ip="2001:db8::5"), "x@y")
    assert not rule_applies(rule, p, txn(ip="198.51.100.1"), "x@y")
    assert not rule_applies(rule, p, txn(sender="d@lists.example.org"), "x@y")


def test_condition_needs_all_facts() -> None:
    p = policy({"only": {"client_in": ["192.0.2.0/24"], "authenticated": False, "helo_in": ["example.org"]}})
    rule = p.ratelimits[0]
    assert rule_applies(rule, p, txn(), "x@y")
    assert not rule_applies(rule, p, txn(auth="alice"), "x@y")
    assert not rule_applies(rule, p, txn(helo="other.example"), "x@y")


def test_recipient_in_per_rcpt_and_for_the_whole_message() -> None:
    p = policy({"only": {"recipient_in": ["info@example.org"]}})
    rule = p.ratelimits[0]
    assert rule_applies(rule, p, txn(), "info@example.org")
    assert not rule_applies(rule, p, txn(), "sales@example.org")
    # Message stage (no single recipient): any accepted recipient counts.
    assert rule_applies(rule, p, txn(rcpts=("sales@example.org", "info@example.org")), None)
    assert not rule_applies(rule, p, txn(rcpts=("sales@example.org",)), None)


def test_null_sender_and_sender_lists() -> None:
    p = policy({"only": {"null_sender": True}})
    assert rule_applies(p.ratelimits[0], p, txn(sender=""), "x@y")
    assert not rule_applies(p.ratelimits[0], p, txn(), "x@y")
    p2 = policy({"only": {"sender_in": ["*"]}})
    assert not rule_applies(p2.ratelimits[0], p2, txn(sender="<>"), "x@y")  # no sender to match


@dataclass
class Parsed:
    list_id: str | None = None
    in_reply_to: str | None = None
    references: str | None = None


def test_list_traffic_and_reply_need_the_parsed_message() -> None:
    p = policy({"unless": {"list_traffic": True}})
    rule = p.ratelimits[0]
    assert not rule_applies(rule, p, txn(), None, Parsed(list_id="<dev.lists.example.org>"))
    assert rule_applies(rule, p, txn(), None, Parsed())
    assert rule_applies(rule, p, txn(), "x@y", None)  # RCPT time: the condition does not match
    p2 = policy({"only": {"reply": True}})
    assert rule_applies(p2.ratelimits[0], p2, txn(), None, Parsed(references="<a@b>"))
    assert not rule_applies(p2.ratelimits[0], p2, txn(), None, Parsed())
    assert not rule_applies(p2.ratelimits[0], p2, txn(), "x@y", None)


def test_matchers_are_compiled_once_per_policy_and_freed_with_it() -> None:
    p = policy({"only": {"sender_in": "l"}}, {"l": ["example.org"]})
    cp = compiled(p)
    assert compiled(p) is cp
    cond = cp.condition(p.ratelimits[0].only)  # type: ignore[arg-type]
    assert cp.condition(p.ratelimits[0].only) is cond  # type: ignore[arg-type]
    assert cond.sender is cp.addresses("l")
    key = id(p)
    del p, cp, cond
    gc.collect()
    assert key not in match._cache


@pytest.mark.parametrize(("entry", "header", "expected"), [
    ("lists.example.org", "Team <team.lists.example.org>", True),   # a domain covers its lists
    ("team.lists.example.org", "<team.lists.example.org>", True),
    ("team.lists.example.org", "<other.lists.example.org>", False),
    ("*.lists.example.org", "TEAM.Lists.Example.org", True),        # globs, any case, brackets optional
    ("lists.example.org", "<lists.example.org.evil.example>", False),
    ("lists.example.org", None, False),                             # no List-Id: nothing to match
])
def test_list_id_in_matches_the_bracketed_id(entry: str, header: str | None, expected: bool) -> None:
    p = policy({"unless": {"list_id_in": [entry]}})
    assert rule_applies(p.ratelimits[0], p, txn(), None, Parsed(list_id=header)) is not expected


def test_unless_list_skips_the_rule_when_any_condition_matches() -> None:
    p = policy({"unless": [{"sender_in": ["*@news.example.org"]}, {"list_id_in": ["lists.example.org"]}]})
    rule = p.ratelimits[0]
    assert not rule_applies(rule, p, txn(sender="a@news.example.org"), None, Parsed())
    assert not rule_applies(rule, p, txn(), None, Parsed(list_id="<team.lists.example.org>"))
    assert rule_applies(rule, p, txn(), None, Parsed(list_id="<offers.spam.example>"))


def test_list_entries_are_spelled_as_the_addresses_they_are_compared_with() -> None:
    from queueguard.policy.match import AddressMatcher

    m = AddressMatcher.build(['"john doe"@example.org', "user@example.org.", "@example.net.", "example.com."])
    assert m('"John Doe"@Example.org') and m("<user@example.org>")
    assert m("a@example.net") and m("b@sub.example.com") and not m("john@example.org")
    idn = AddressMatcher.build(["bücher.example", "@faß.de", "info@BÜCHER.example"])
    assert idn("x@sub.xn--bcher-kva.example") and idn("x@XN--FA-HIA.de") and idn("info@xn--bcher-kva.example")
    assert AddressMatcher.build(["xn--bcher-kva.example"])("x@Bücher.example")


def test_lists_and_patterns_see_past_an_address_extension_when_the_policy_names_a_delimiter() -> None:
    from queueguard.policy.match import AddressMatcher

    assert AddressMatcher.build(["info@example.org"], "+")("<info+tickets@example.org>")
    assert not AddressMatcher.build(["info@example.org"])("<info+tickets@example.org>")
    assert AddressMatcher.build(["info+tickets@example.org"], "+")("info+tickets@example.org")
