"""Rate-limit keys: parsing and values, null sender, client networks."""

from __future__ import annotations

import pytest

from queueguard.model import Connection, Transaction, parse_ip
from queueguard.policy.keys import KeyPart, key_value, parse_key


def txn(sender: str = "Alice@Example.ORG", ip: str | None = "192.0.2.77", helo: str = "MX.example.net") -> Transaction:
    return Transaction(Connection(parse_ip(ip), helo=helo), sender)


def test_parse() -> None:
    assert parse_key("recipient") == (KeyPart("recipient"),)
    assert parse_key("sender + recipient") == (KeyPart("sender"), KeyPart("recipient"))
    assert parse_key("client_net/16") == (KeyPart("client_net", 16, 64),)
    assert parse_key("client_net/16/48") == (KeyPart("client_net", 16, 48),)


@pytest.mark.parametrize("bad", ["", "rcpt", "sender+", "client_net/33", "client_net/x", "client_net/24/129",
                                 "sender/24", "sender+sender"])
def test_parse_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="bad rate-limit key"):
        parse_key(bad)


@pytest.mark.parametrize(("spec", "expected"), [
    ("recipient", "info@example.org"),
    ("sender", "alice@example.org"),
    ("sender_domain", "example.org"),
    ("client_ip", "192.0.2.77"),
    ("client_net", "192.0.2.0/24"),
    ("client_net/16", "192.0.0.0/16"),
    ("helo", "mx.example.net"),
    ("sender+recipient", "alice@example.org|info@example.org"),
])
def test_values(spec: str, expected: str) -> None:
    assert key_value(spec, txn(), "<Info@Example.org>") == expected


def test_ipv6_and_v4_mapped_networks() -> None:
    assert key_value("client_net", txn(ip="2001:db8:1:2:3:4:5:6"), "x@y") == "2001:db8:1:2::/64"
    assert key_value("client_net/24/48", txn(ip="2001:db8:1:2::1"), "x@y") == "2001:db8:1::/48"
    assert key_value("client_ip", txn(ip="::ffff:192.0.2.1"), "x@y") == "192.0.2.1"


def test_null_sender_skips_sender_keys_but_not_recipient_keys() -> None:
    bounce = txn(sender="")
    assert key_value("sender", bounce, "x@y") is None
    assert key_value("sender_domain+recipient", bounce, "x@y") is None
    assert key_value("recipient", bounce, "x@y") == "x@y"
    assert key_value("client_ip+recipient", bounce, "x@y") == "192.0.2.77|x@y"


def test_missing_facts_skip_the_rule() -> None:
    assert key_value("client_ip", txn(ip=None), "x@y") is None
    assert key_value("helo", txn(helo=""), "x@y") is None


@pytest.mark.parametrize("spelling", [
    "info@example.org", "<INFO@Example.ORG>", '"info"@example.org', '"in\\fo"@example.org',
    '"\\i\\n\\f\\o"@example.org',
    "<@relay.example:info@example.org>", "<@a.example,@[IPv6:::1]:Info@example.org>", "info@example.org.",
    "info(1)@example.org", "(x)info@example.org", "info@(x)example.org", "info@example.org(x)", "in\\fo@example.org",
    "info((nested)x)@example.org", "info @ example.org", "info%example.org@mx.example.net",
    "example.org!info@mx.example.net", "info%example.org%mx.example.net@mx.example.net",
    '"info@example.org"@example.org', '"info@example.org@example.org"@example.org.',
    '"info' + "@example.org" * 40 + '"@example.org', '"info@example.org"@mx.example.net',
])
def test_one_mailbox_is_one_key_however_it_is_spelled(spelling: str) -> None:
    """Exim and Postfix deliver every one of these to info@ (checked against the real ones; the
    percent hack, the bang path and an `@` in a quoted local part resolved again are Postfix's
    defaults, which Exim refuses): each
    spelling its own key would give a flood to one address a budget per spelling, and a sender can
    spell it in endless ways (backslashes, comments, source routes)."""
    assert key_value("recipient", txn(), spelling) == "info@example.org"
    assert key_value("sender+sender_domain", txn(spelling), "x@y.example") == "info@example.org|example.org"


@pytest.mark.parametrize("spelling", [
    "info@bücher.example", "INFO@BÜCHER.example", "info@xn--bcher-kva.example", "info@XN--BCHER-KVA.example.",
    "info@bu\u0308cher.example", "info@\uff42\u00fccher\uff0eexample", "info@bücher\u3002example",
    '"info"@bücher.example',
])
def test_an_internationalised_domain_is_one_key_however_it_is_written(spelling: str) -> None:
    """With SMTPUTF8 a client may write a domain as Unicode (any case, composed or decomposed,
    fullwidth) or as its A-label; Postfix's UTS #46 conversion resolves all of them to one domain,
    so a flood alternating them gets one budget."""
    assert key_value("recipient", txn(), spelling) == "info@xn--bcher-kva.example"
    assert key_value("sender_domain", txn(spelling), "x@y.example") == "xn--bcher-kva.example"


def test_distinct_internationalised_names_stay_distinct() -> None:
    """ß is its own letter in IDNA2008 (faß.de is not fass.de); local parts are left as written."""
    assert key_value("recipient", txn(), "info@faß.de") == "info@xn--fa-hia.de"
    assert key_value("recipient", txn(), "jörg@example.org") != key_value("recipient", txn(), "jorg@example.org")


def test_distinct_mailboxes_stay_distinct() -> None:
    values = {key_value("recipient", txn(), r) for r in
              ['"a b"@example.org', "ab@example.org", '"a@b"@example.org', "b@example.org", "info@example.net"]}
    assert len(values) == 5
    assert key_value("sender_domain", txn("postmaster"), "x@y.example") is None
    # a route inside a quoted local part is part of the local part, not a route to strip
    assert key_value("recipient", txn(), '"@evil.example:info"@example.org') != "info@example.org"
    # an unclosed comment or quote is not lexed away with the rest of the address
    assert key_value("sender_domain", txn("spam(@evil.example"), "x@y.example") == "evil.example"


def test_address_extensions_are_cut_where_the_policy_says_the_mta_splits_them() -> None:
    from queueguard.model import without_extension

    assert key_value("recipient", txn(), "<Info+Tag@example.org>", "+") == "info@example.org"
    assert key_value("recipient", txn(), "<info-tag+x@example.org>", "+-") == "info@example.org"
    assert key_value("recipient", txn(), "<info+tag@example.org>") == "info+tag@example.org"  # no delimiter set
    assert without_extension("+info@example.org", "+") == "+info@example.org"  # nothing before it
    assert without_extension("postmaster+x", "+") == "postmaster"


@pytest.mark.parametrize(("spellings", "key"), [
    (["info@[127.0.0.1]", "info@[127.000.000.001]", "<INFO@[127.0.00.1]>", '"info"@[127.0.0.01]'], "info@[127.0.0.1]"),
    (["info@[IPv6:::1]", "info@[ipv6:0:0:0:0:0:0:0:1]", "info@[IPV6:0::0:1]"], "info@[IPv6:::1]"),
])
def test_one_address_literal_is_one_key(spellings: list[str], key: str) -> None:
    """Postfix delivers `info@[127.000.000.001]` to the same mailbox as `info@[127.0.0.1]` (it
    reads the leading zeros): 27 spellings of one literal must not be 27 budgets."""
    assert {key_value("recipient", txn(), s) for s in spellings} == {key}
