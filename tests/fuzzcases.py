"""Seed messages and byte-level mutations for the fuzz tests (tests/unit/test_fuzz_mime.py,
tests/integration/test_fuzz_smtp.py).

Seeds are built the way real mail is: Python's email package for MIME structure (alternative
text/HTML, attachments in base64, quoted-printable, RFC 2047 words, a forwarded message/rfc822),
queueguard/replay/corpus.py's generated campaign and personal mail, and a few shapes from the wild that the
email package would not write (uuencode, a missing closing boundary, 8-bit headers, a
Content-Type without its boundary). Mutations are what a fuzzer does to bytes, plus splices of
tokens that steer the parser into its rarer branches.
"""

from __future__ import annotations

import random
from email.message import EmailMessage
from email.policy import SMTP

from hypothesis import strategies as st

from queueguard.replay.corpus import campaign, distinct

TOKENS = (
    b"\r\n", b"\r\n\r\n", b"\r\n--", b"--\r\n", b"boundary=", b'boundary=""', b"multipart/mixed; ",
    b"Content-Type: multipart/alternative; boundary=Z\r\n", b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n", b"Content-Type: message/rfc822\r\n\r\n",
    b"Content-Disposition: attachment; filename*=utf-8''%E2%82%AC.exe\r\n", b"charset=\"x-unknown\"",
    b"charset=utf-7", b"=?utf-8?b?", b"=?iso-8859-1?q?=E9=", b"?=", b"=\r\n", b"=XX", b"\x00", b"\xff\xfe",
    b"\xc3\x28", b"\xed\xa0\x80", b"<html><body><a href=\"http://", b"</a></p><script>", b"&#x1F600;",
    b"https://www.example.com/?u=", b"begin 644 f.txt\r\n", b"M" * 61, b"\t", b" ", b":", b";",
)


def _alternative() -> bytes:
    m = EmailMessage(policy=SMTP)
    m["From"] = "Jürgen Müller <j@example.org>"
    m["To"] = "info@test.example"
    m["Subject"] = "Rechnung für März - bitte prüfen"
    m["Message-ID"] = "<alt-1@example.org>"
    m.set_content("Hallo,\n\nanbei die Rechnung: https://billing.example.com/inv?id=42\n\nGrüße\n")
    m.add_alternative("<html><body><p>Hallo,</p><p>anbei die <a href='https://billing.example.com/inv?id=42'>"
                      "Rechnung</a>.</p></body></html>", subtype="html")
    m.add_attachment(bytes(range(256)) * 4, maintype="application", subtype="pdf", filename="rechnung.pdf")
    return m.as_bytes()


def _forwarded() -> bytes:
    inner = EmailMessage(policy=SMTP)
    inner["From"] = "a@example.net"
    inner["Subject"] = "=?utf-8?q?original_=E2=9C=93?="
    inner.set_content("the original text, quoted-printable: " + "é" * 40, cte="quoted-printable")
    outer = EmailMessage(policy=SMTP)
    outer["From"] = "b@example.net"
    outer["Subject"] = "Fwd: original"
    outer.set_content("see below")
    outer.add_attachment(inner)
    return outer.as_bytes()


WILD = (
    b"From: x@example.org\r\nSubject: uu\r\n\r\nbegin 644 a.txt\r\n#86)C\r\n`\r\nend\r\n",
    b"From: x@example.org\r\nContent-Type: multipart/mixed; boundary=\"Q\"\r\n\r\n--Q\r\nContent-Type: text/plain"
    b"\r\n\r\nno closing boundary\r\n--Q\r\nContent-Type: text/html\r\n\r\n<p>unclosed <a href=http://a.example/x",
    b"From: \xe9t\xe9@example.org\r\nSubject: 8-bit \xff header\r\nContent-Type: text/plain; charset=koi8-r\r\n"
    b"\r\n\xf0\xd2\xc9\xd7\xc5\xd4\r\n",
    b"Subject: no boundary\r\nContent-Type: multipart/related\r\n\r\n--x\r\n\r\nbody\r\n",
    b"Subject: base64 junk\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64===\r\n",
)


def seeds() -> list[bytes]:
    """The seed messages, CRLF throughout as on the wire."""
    rng = random.Random(5321)
    raws = [_alternative(), _forwarded(), *WILD]
    raws += [s.raw for s in campaign(rng, "mini-cooper", 2)] + [s.raw for s in distinct(rng, 2)]
    return [r.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for r in raws]


SEEDS = seeds()


@st.composite
def mutated(draw: st.DrawFn, max_ops: int = 8) -> bytes:
    """A seed with 0..max_ops byte mutations and token splices."""
    raw = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, max_ops))):
        op = draw(st.sampled_from(("flip", "insert", "delete", "duplicate", "token", "truncate")))
        at = draw(st.integers(0, len(raw)))
        if op == "flip" and at < len(raw):
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del raw[at:at + draw(st.integers(1, 64))]
        elif op == "duplicate":
            raw[at:at] = raw[at:at + draw(st.integers(1, 256))] * draw(st.integers(1, 8))
        elif op == "token":
            raw[at:at] = draw(st.sampled_from(TOKENS))
        elif op == "truncate":
            del raw[at:]
    return bytes(raw)
