"""SMTP smuggling (SEC Consult, Timo Longin, 2023, and its 2024 follow-ups): no end-of-data
variant gets a second transaction past the guard, not even to a downstream that would accept it.

The research's variants end DATA at a dot framed by something other than CRLF on both sides:
<LF>.<LF>, <LF>.<CR><LF>, <CR>.<CR>, <CR><LF>.<CR>, <CR>.<CR><LF>, <CR><LF>.<LF>, and with a NUL
before or after the dot (<CR><LF>\\x00.<CR><LF>, <CR><LF>.\\x00<CR><LF>; the follow-ups on
Postfix, Sendmail, Exim and Cisco's parsers added the NUL forms and the CR-only ones). Rather
than list what was published, the test takes every combination: line break before the dot in
{LF, CR, CRLF} x after it in {LF, CR, CRLF} x a NUL none/before/after/both, less the one legal
end (CRLF.CRLF without NUL): 35 variants. Each carries a smuggled `MAIL FROM:<evil@...>`
transaction behind it, sent through the SMTP proxy to a deliberately lenient downstream
(tests/components/lenient_smtp.py) that would end DATA at any of them.
"""

from __future__ import annotations

import itertools
import socket
import time

import pytest

from queueguard.harness.guard import Guard
from tests.components.lenient_smtp import LenientSmtp

pytestmark = pytest.mark.integration

BREAKS = {"LF": b"\n", "CR": b"\r", "CRLF": b"\r\n"}
NULS = {"": (b"", b""), "NUL.": (b"\x00", b""), ".NUL": (b"", b"\x00"), "NUL.NUL": (b"\x00", b"\x00")}
VARIANTS = {
    f"{before}{nul or '.'}{after}": bb + n1 + b"." + n2 + ab
    for (before, bb), (after, ab), (nul, (n1, n2)) in itertools.product(BREAKS.items(), BREAKS.items(), NULS.items())
    if not (before == after == "CRLF" and nul == "")
}
SMUGGLED = (b"MAIL FROM:<evil@smuggled.example>\r\nRCPT TO:<bob@test.example>\r\nDATA\r\n"
            b"From: ceo@bank.example\r\nSubject: smuggled\r\n\r\npay now\r\n.\r\n")


def test_variant_count() -> None:
    assert len(VARIANTS) == 35 and b"\n\x00.\n" in VARIANTS.values() and b"\r\n.\n" in VARIANTS.values()


def dialogue(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO attacker.example\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        for cmd in (b"MAIL FROM:<good@client.example>\r\n", b"RCPT TO:<bob@test.example>\r\n", b"DATA\r\n"):
            s.sendall(cmd)
            f.readline()
        s.sendall(payload + b"\r\n.\r\n")  # the real end, for the guard
        reply = f.readline()
        s.sendall(b"QUIT\r\n")
        return reply


def test_no_variant_reaches_a_lenient_downstream() -> None:
    with LenientSmtp() as weak, Guard({"downstreams": [{"address": f"127.0.0.1:{weak.port}"}]}) as guard:
        replies = {name: dialogue(guard.port, b"Subject: hi\r\n\r\nhello" + end + SMUGGLED)
                   for name, end in VARIANTS.items()}
        bad = {name: r for name, r in replies.items() if not r.startswith(b"554 5.5.2 ")}
        assert not bad, bad
        assert weak.messages == [] and "<evil@smuggled.example>" not in weak.senders
        assert guard.metric("queueguard_protocol_errors_total", kind="bare_newline") == 35
        # The lenient server is lenient indeed: the same bytes straight to it smuggle.
        dialogue(weak.port, b"Subject: hi\r\n\r\nhello\n.\n" + SMUGGLED)
        deadline = time.monotonic() + 10
        while "<evil@smuggled.example>" not in weak.senders:
            assert time.monotonic() < deadline, weak.senders
            time.sleep(0.02)
