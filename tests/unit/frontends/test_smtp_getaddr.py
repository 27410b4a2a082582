"""The fast path for `<local@domain>` in QueueguardSMTP._getaddr answers exactly what aiosmtpd's
own RFC 5322 parsing answers, for plain and for tricky inputs."""

from __future__ import annotations

import pytest
from aiosmtpd.smtp import SMTP

from queueguard.frontends.smtp_proxy import ProxyHandler, QueueguardSMTP
from queueguard.settings import SmtpSettings

CASES = [
    "<bob@test.example>", "<bob@test.example> SIZE=1000 BODY=8BITMIME", "<a.b+tag@x-y.example.org>",
    "<>", "<> SIZE=10", "<\"quoted local\"@example.org>", "<.bad@example.org>", "<bad.@example.org>",
    "<a..b@example.org>", "<a@[192.0.2.1]>", "bob@test.example", "<bob@test.example", "<@route:bob@x.example>",
    "<bob@test.example>trailing", "< bob@test.example >", "<jörg@example.org>", "<a@b>", "<" + "x" * 70 + "@e.org>",
    "<bob@test.example> SMTPUTF8", "<bob@test.example>  \t SIZE=1", "<bob@test.example> (comment) SIZE=1",
]


@pytest.mark.parametrize("arg", CASES)
async def test_fast_path_matches_aiosmtpd(arg: str) -> None:
    handler = ProxyHandler(None, SmtpSettings())  # type: ignore[arg-type]
    ours = QueueguardSMTP(handler, hostname="x", enable_SMTPUTF8=True)
    theirs = SMTP(handler, hostname="x", enable_SMTPUTF8=True)
    assert ours._getaddr(arg) == theirs._getaddr(arg)
