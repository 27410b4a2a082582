"""SMTP command syntax (smtp_syntax): the path parser answers what aiosmtpd's RFC 5322 parsing
answered when it was the proxy's front end (apart from quoted local parts, kept as written), and
MAIL/RCPT parameters get Exim's leniency and aiosmtpd's replies."""

from __future__ import annotations

import pytest
from aiosmtpd.smtp import SMTP

from queueguard.frontends.smtp_syntax import SIZE_EXCEEDED, mail_params, parse_path, rcpt_params, strip_keyword

CASES = [
    "<bob@test.example>", "<bob@test.example> SIZE=1000 BODY=8BITMIME", "<a.b+tag@x-y.example.org>",
    "<>", "<> SIZE=10", "<\"quoted local\"@example.org>", "<.bad@example.org>", "<bad.@example.org>",
    "<a..b@example.org>", "<a@[192.0.2.1]>", "bob@test.example", "<bob@test.example", "<@route:bob@x.example>",
    "<bob@test.example>trailing", "< bob@test.example >", "<jörg@example.org>", "<a@b>", "<" + "x" * 70 + "@e.org>",
    "<bob@test.example> SMTPUTF8", "<bob@test.example>  \t SIZE=1", "<bob@test.example> (comment) SIZE=1",
    "<postmaster>", "<sp ace@x.example>", "<a(c)@b.example>", "", "<<a@b>>", "<a@b@c>",
]
SYNTAX = "501 Syntax: MAIL FROM: <address> [SP <mail-parameters>]"


@pytest.mark.parametrize("arg", CASES)
def test_paths_parse_as_aiosmtpd_parsed_them(arg: str) -> None:
    address, rest = SMTP(object(), hostname="x", enable_SMTPUTF8=True)._getaddr(arg)
    assert parse_path(arg) == (address, rest or "")


def test_a_quoted_local_part_is_kept_as_written() -> None:
    """The email package rewrites `".a"@x` to `.a@x`, which is no address (and another mailbox)."""
    assert parse_path('<".a"@x.example> SIZE=1') == ('".a"@x.example', "SIZE=1")
    assert parse_path('<"a\\"b"@x.example>') == ('"a\\"b"@x.example', "")


def test_keyword() -> None:
    assert strip_keyword("FROM:", "from: <a@b>") == "<a@b>"
    assert strip_keyword("FROM:", "<a@b>") is None


@pytest.mark.parametrize(("rest", "options", "error"), [
    ("", [], ""),
    ("size=100 body=8bitmime smtputf8", ["SIZE=100", "BODY=8BITMIME", "SMTPUTF8"], ""),
    # Exim takes and ignores these without DSN or AUTH; an unparseable SIZE is no SIZE
    ("RET=HDRS ENVID=x AUTH=<> SIZE= SIZE=²", ["AUTH=<>"], ""),
    ("SIZE=999999999", [], SIZE_EXCEEDED),
    ("BODY=BINARYMIME", [], "501 Error: BODY can only be one of 7BIT, 8BITMIME"),
    ("SMTPUTF8=yes", [], "501 Error: SMTPUTF8 takes no arguments"),
    ("XFOO=1", [], "555 MAIL FROM parameters not recognized or not implemented"),
    ("BAD-NAME=1", [], SYNTAX),
    ("BODY=", [], SYNTAX),
])
def test_mail_parameters(rest: str, options: list[str], error: str) -> None:
    got = mail_params(rest, 1000, SYNTAX)
    assert (got.options if not got.error else [], got.error) == (options, error)


def test_rcpt_parameters_are_not_offered() -> None:
    assert rcpt_params("", SYNTAX) == ""
    assert rcpt_params("NOTIFY=NEVER", SYNTAX) == "555 RCPT TO parameters not recognized or not implemented"
    assert rcpt_params("NO-TIFY=NEVER", SYNTAX) == SYNTAX
