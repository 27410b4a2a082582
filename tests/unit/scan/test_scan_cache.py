"""The cache of scan answers: which differences between two messages make them the same content
to clamd (content_key), and when a cached answer stops counting (ScanCache). With a real clamd:
tests/integration/test_scan_clamd.py."""

from __future__ import annotations

import collections
import email
import random
from pathlib import Path

import pytest

from bench import spamassassin as sa
from queueguard.scan.cache import VOLATILE, ScanCache, content_key, fields
from queueguard.scan.clamd import ScanResult
from queueguard.scan.health import database_stamp
from tests.unit.pressure.test_governor import Clock

BODY = (b"--B\r\nContent-Type: text/plain\r\n\r\nhello\r\n--B\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nQUJD\r\n--B--\r\n")


def copy(to: str = "a@rcpt.example", msgid: str = "1@x", *, extra: bytes = b"", subject: bytes = b"offer",
         ctype: bytes = b'multipart/mixed; boundary="B"', body: bytes = BODY) -> bytes:
    return (
        b"Received: from mx.sender.example ([192.0.2.1])\r\n\tby us with ESMTP id " + msgid.encode() + b"\r\n"
        + extra + b"From: shop@sender.example\r\nTo: " + to.encode() + b"\r\nMessage-ID: <" + msgid.encode()
        + b">\r\nDate: Mon, 7 Dec 2026 11:00:0" + msgid[:1].encode() + b" +0000\r\nSubject: " + subject
        + b"\r\nMIME-Version: 1.0\r\nContent-Type: " + ctype + b"\r\n\r\n" + body
    )


def test_copies_of_a_wave_share_a_key() -> None:
    """What differs from copy to copy: trace, addressing, id, date, and signatures over them."""
    first = content_key(copy())
    assert content_key(copy("b@rcpt.example", "2@x")) == first
    assert content_key(copy("c@rcpt.example", "3@x", extra=(
        b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.example;\r\n\tb=AAAA\r\nCc: d@rcpt.example\r\n"
        b"ARC-Seal: i=1; a=rsa-sha256; b=BBBB\r\nResent-To: e@rcpt.example\r\nReturn-Path: <x@y>\r\n"
        b"Delivered-To: c@rcpt.example\r\nAuthentication-Results: mx; spf=pass\r\n"))) == first


@pytest.mark.parametrize("change", [
    {"subject": b"offer!"},
    {"ctype": b'multipart/mixed; boundary="C"'},  # the same body parses as other parts
    {"body": BODY.replace(b"QUJD", b"QUJE")},
    {"body": BODY + b"\r\n"},
    {"extra": b"Content-Transfer-Encoding: base64\r\n"},
    {"extra": b"X-Mailer: other\r\n"},
])
def test_anything_else_makes_another_key(change: dict[str, bytes]) -> None:
    assert content_key(copy(**change)) != content_key(copy())  # type: ignore[arg-type]


def test_folded_lines_belong_to_their_field() -> None:
    """A folded line of a per-copy field is left out with it; one of a kept field is kept; and no
    bytes can move between the fields or from the header into the body unnoticed."""
    folded_to = copy(to="a@rcpt.example,\r\n\tb@rcpt.example")
    assert content_key(folded_to) == content_key(copy())
    folded_subject = copy(subject=b"offer\r\n\tpart two")
    assert content_key(folded_subject) != content_key(copy(subject=b"offer part two"))
    assert content_key(b"A: 1\r\nB: 2\r\n\r\nx") != content_key(b"A: 1\r\n\r\nB: 2\r\n\r\nx")
    assert content_key(b"A: 12\r\n\r\nx") != content_key(b"A: 1\r\n2\r\n\r\nx")


@pytest.mark.parametrize("odd", [
    b'Content-Type: multipart/mixed; boundary="B\r\nX-Foo: bar\r\n',  # ClamAV joins lines until quotes balance
    b"X-Long: " + b"x" * 999 + b"\n",  # over 998 octets with a bare LF
    b"To: a@rcpt.example\r\n \r\n",  # a line of white space: the end of the header to some parsers
    b"To: a@rcpt.example\r\n\t\r\n",
    b"To: a@rcpt.example\rContent-Type: text/html\r\n",  # a bare CR: a line end to some parsers
    b"To: a@rcpt.example\x00\r\n",
    b"To: a@rcpt.example\r\r\n",
    b"Content-Type text/plain\r\n",  # no colon
    b"To is: a@rcpt.example\r\n",  # a name with a space
])
def test_a_header_parsers_may_read_differently_keeps_every_field(odd: bytes) -> None:
    """Where another parser (clamd's) might see the header's lines otherwise, nothing is left out:
    content hidden in what we would take for a per-copy field must reach clamd."""
    first, second = copy("a@rcpt.example", "1@x", extra=odd), copy("b@rcpt.example", "2@x", extra=odd)
    assert content_key(first) != content_key(second)
    assert content_key(b" folded first\r\nTo: a\r\n\r\nx") != content_key(b" folded first\r\nTo: b\r\n\r\nx")


@pytest.mark.parametrize("extra", [
    b"To: a@rcpt.example" + b",\r\n x@rcpt.example" * 200 + b"\r\n",  # ClamAV gives up after 262,144 folds
    b"Received: from " + b"x" * 1200 + b"\r\n",  # a line over 998 octets
    b"Subject: offer;\r\nCc: c@rcpt.example\r\n",  # a kept field a parser may continue into the next (per-copy) one
    b'Subject: "offer\r\nCc: c@rcpt.example\r\n',  # an open quote, likewise
    b"X-Pad: " + b"p" * 900 + b"\r\n" + b"X-Pad: " + b"p" * 900 + b"\r\n" * 1 + (b"X-Pad: y\r\n" * 8000),
])
def test_headers_that_could_make_clamd_give_up_keep_every_field(extra: bytes) -> None:
    """What a copy could use to make clamd stop reading its MIME structure (and answer OK) must
    not hide in a field the key leaves out: such a header keys the whole message."""
    first, second = copy("a@rcpt.example", "1@x", extra=extra), copy("b@rcpt.example", "2@x", extra=extra)
    assert fields(first) is None and content_key(first) != content_key(second)


def test_odd_messages_have_keys() -> None:
    """No body, no header, bare LF line ends, a line without a colon: a key, never an exception."""
    keys = {content_key(m) for m in (b"", b"\r\n", b"Subject: x", b"Subject: x\n\nbody\n", b"no colon\r\n\r\nx",
                                     b"\r\nbody only")}
    assert len(keys) == 6
    assert content_key(b"To: a\n\nbody\n") == content_key(b"To: b\n\nbody\n")


def _kept(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """The fields and body content_key keeps, by the stdlib's parser (a second opinion)."""
    msg = email.message_from_bytes(raw)
    fields = [(k.lower(), str(v)) for k, v in msg.items()
              if k.lower().encode() not in VOLATILE and not k.lower().startswith(("resent-", "arc-"))]
    return fields, raw.split(b"\r\n\r\n", 1)[-1]


def test_real_mail_copies_share_a_key_and_distinct_mail_does_not() -> None:
    """Over the SpamAssassin dev split: each message resent with other per-copy fields keeps its
    key; two messages share one only if they are the same but for per-copy fields (the split has
    such a pair: one spam delivered twice, two days apart)."""
    directory = sa.corpus_dir()
    mails = sa.load(directory, "spam")[::3] + sa.load(directory, "ham")[::3]
    rng = random.Random(7)
    by_key: dict[bytes, list[bytes]] = collections.defaultdict(list)
    whole = 0
    for m in mails:
        n = rng.randrange(1_000_000)
        trace = (f"Received: from relay{n}.example ([198.51.100.{n % 250}])\r\n\tby mx.example; "
                 f"Mon, 7 Dec 2026 11:00:00 +0000\r\nDelivered-To: user{n}@example.org\r\n").encode()
        at = m.raw.index(b"\r\n") + 2  # after the first field (its name is in the key)
        while m.raw[at:at + 1] in (b" ", b"\t"):
            at = m.raw.index(b"\r\n", at) + 2
        resent = m.raw[:at] + trace + m.raw[at:]
        if fields(m.raw) is None:  # a To of 14,000 octets, an open quote: the whole message is the key
            whole += 1
            assert content_key(resent) != content_key(m.raw), m.name
        else:
            assert content_key(resent) == content_key(m.raw), m.name
        by_key[content_key(m.raw)].append(m.raw)
    assert len(mails) > 1000 and len(by_key) > 1000 and whole <= len(mails) // 50
    for same in by_key.values():
        assert all(_kept(raw) == _kept(same[0]) for raw in same[1:])


def test_answers_expire_and_the_oldest_goes_first() -> None:
    clock = Clock()
    cache = ScanCache(600, 2, clock=clock)
    assert cache.switch("v1")
    clean, virus = ScanResult(False), ScanResult(True, "Eicar")
    cache.put(b"a", "v1", clean)
    cache.put(b"b", "v1", virus)
    clock.now += 599
    assert cache.get(b"b", "v1") is virus and cache.get(b"a", "v1") is clean
    cache.put(b"c", "v1", clean)  # b was used before a: b is the least recently used
    assert cache.get(b"b", "v1") is None and cache.get(b"a", "v1") is clean
    clock.now += 1
    assert cache.get(b"a", "v1") is None and len(cache) == 1  # 600 s after its scan


def test_new_signatures_empty_the_cache() -> None:
    """Answers belong to one version: asked or told under another they are a miss and not kept
    (a scan that began before clamd's signatures changed); switching to another empties it."""
    cache = ScanCache(600, 10, clock=Clock())
    cache.switch("ClamAV 1.4.6/27480")
    cache.put(b"a", "ClamAV 1.4.6/27480", ScanResult(False))
    cache.put(b"b", "ClamAV 1.4.6/27479", ScanResult(False))
    assert cache.get(b"a", "ClamAV 1.4.6/27481") is None and len(cache) == 1
    assert cache.switch("ClamAV 1.4.6/27481") and len(cache) == 0
    assert not cache.switch(None)  # version unknown: nothing is reused
    cache.put(b"a", None, ScanResult(False))
    assert cache.get(b"a", None) is None and len(cache) == 0


def test_off_and_shrunk() -> None:
    cache = ScanCache(0, 10, clock=Clock())
    assert not cache.switch("v")
    cache.put(b"a", "v", ScanResult(False))
    assert cache.get(b"a", "v") is None and len(cache) == 0
    cache.configure(600, 3)
    assert cache.switch("v")
    for k in (b"a", b"b", b"c"):
        cache.put(k, "v", ScanResult(False))
    cache.configure(600, 1)
    assert len(cache) == 1 and cache.get(b"c", "v") is not None
    cache.configure(0, 1)
    assert len(cache) == 0


def test_database_stamp_follows_the_signature_files(tmp_path: Path) -> None:
    """Third-party and local signatures change no clamd VERSION; their files do."""
    assert database_stamp(tmp_path / "missing") is None and database_stamp(None) is None
    (tmp_path / "daily.cld").write_bytes(b"x")
    first = database_stamp(tmp_path)
    assert first is not None and database_stamp(tmp_path) == first
    (tmp_path / "local.ndb").write_text("Sig:0:*:41414141\n")
    second = database_stamp(tmp_path)
    (tmp_path / "local.ndb").write_text("Sig:0:*:4141414142\n")
    assert len({first, second, database_stamp(tmp_path)}) == 3
