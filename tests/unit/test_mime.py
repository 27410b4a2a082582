"""parse_message: decoding of headers, QP/base64, HTML, attachments; bounded and never raising on junk."""

from __future__ import annotations

import base64
import email.message
import email.parser
import email.policy
import random

import pytest

from queueguard import mime
from queueguard.html_text import html_to_text
from queueguard.mime import _URL_RE, email_message, find_urls, parse_message, single_part

MULTIPART = (
    b"""From: =?utf-8?q?J=C3=BCrgen?= <j@example.org>
Subject: =?utf-8?b?SGVsbG8gd29ybGQ=?=
List-Id: <team.lists.example.org>
In-Reply-To: <a@b>
Message-ID: <m1@example.org>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="B"

--B
Content-Type: multipart/alternative; boundary="C"

--C
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Hello J=C3=BCrgen, see https://www.Example.com/a?b=3D1 now.
--C
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: base64

"""
    + base64.encodebytes(
        b'<html><head><style>p{}</style></head><p>Hello <a href="http://evil.example.net/x">here</a></p>'
        b"<script>hidden()</script></html>"
    )
    + b"""
--C--
--B
Content-Type: application/pdf; name="offer.pdf"
Content-Disposition: attachment; filename="offer.pdf"
Content-Transfer-Encoding: base64

JVBERi0xLjQK
--B--
"""
)


def test_headers_decoded_and_threading_fields() -> None:
    p = parse_message(MULTIPART)
    assert p.subject == "Hello world"
    assert p.from_ == "Jürgen <j@example.org>"
    assert p.message_id == "<m1@example.org>"
    assert p.list_id == "<team.lists.example.org>"
    assert p.in_reply_to == "<a@b>"
    assert p.is_list_traffic and p.is_reply
    assert p.header("subject") == "Hello world"


def test_text_of_the_shown_alternative_and_links_of_all() -> None:
    """The HTML alternative is what a client shows: its text is the message's; the plain one's
    (quoted-printable, here) only gives its links."""
    p = parse_message(MULTIPART)
    assert p.text.strip() == "Hello here"
    assert "hidden()" not in p.text and "p{}" not in p.text
    assert p.url_hosts == ["evil.example.net", "www.example.com"]
    plain_only = MULTIPART.replace(b"Content-Type: text/html", b"Content-Type: text/x-other")
    assert "Hello Jürgen, see https://www.Example.com/a?b=1 now." in parse_message(plain_only).text


def alternative(*parts: tuple[str, bytes]) -> bytes:
    body = b"".join(b"--A\r\nContent-Type: %s; charset=utf-8\r\n\r\n%s\r\n" % (t.encode(), b) for t, b in parts)
    head = b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=A\r\n\r\n"
    return head + body + b"--A--\r\n"


SPAM = b"<p>Buy cheap replica watches today, the finest quality at the lowest price online.</p>"


@pytest.mark.parametrize("decoys", [
    [("text/plain", b" " * 200_001)],  # spaces a client never shows, which used up the text budget
    [("text/plain", b"")] * 150,  # empty alternatives, which used up the part cap
    [("text/plain", b"Our quarterly meeting notes are attached; let me know what you think. " * 30)],  # dilution
])
def test_alternatives_a_client_does_not_show_neither_hide_nor_dilute_the_text(
        decoys: list[tuple[str, bytes]]) -> None:
    p = parse_message(alternative(*decoys, ("text/html", SPAM)), max_parts=100)
    assert p.text.strip() == "Buy cheap replica watches today, the finest quality at the lowest price online."


def test_whitespace_runs_do_not_use_up_the_text_budget() -> None:
    raw = (b"Subject: x\r\nContent-Type: text/html\r\n\r\n<div>" + b" \r\n" * 150_000 + b"</div>"
           + b"<p></p>" * 100_000 + SPAM)
    assert "replica watches" in parse_message(raw).text


def test_attachment_hash_and_size() -> None:
    (att,) = parse_message(MULTIPART).attachments
    assert (att.filename, att.content_type, att.size) == ("offer.pdf", "application/pdf", 9)
    assert att.sha256 == "e5c62df5dab5c87b6a015ef3d43597074d1eec433b15f51aec63b8582d0e4ab4"


def test_garbage_and_empty_input_do_not_raise() -> None:
    for raw in (
        b"",
        b"\x00\xff\xfe",
        b"garbage\n\n\xff",
        b"Subject: \xff\xfe\n\nbody",
        b"Content-Type: multipart/x\n\n",
    ):
        p = parse_message(raw)
        assert isinstance(p.text, str)
    assert parse_message(b"Subject: \xc3\xa9t\xc3\xa9\n\nx").subject == "été"


def test_unknown_charset_and_bad_base64_are_defects_not_errors() -> None:
    raw = b"Content-Type: text/plain; charset=x-nonsense\nContent-Transfer-Encoding: base64\n\nSGVsbG8=@@@not-base64\n"
    p = parse_message(raw)
    assert "unknown charset 'x-nonsense'" in p.defects
    assert p.text.startswith("Hello")


def test_part_count_bounded() -> None:
    parts = b"".join(b"--b\nContent-Type: text/plain\n\npart %d\n" % i for i in range(500))
    p = parse_message(b"Content-Type: multipart/mixed; boundary=b\n\n" + parts + b"--b--\n", max_parts=50)
    assert "more than 50 MIME parts" in p.defects
    assert "part 48" in p.text and "part 60" not in p.text


def test_deep_nesting_bounded() -> None:
    nested = b"".join(b"--a%d\nContent-Type: multipart/mixed; boundary=a%d\n\n" % (i, i + 1) for i in range(5000))
    p = parse_message(b"Content-Type: multipart/mixed; boundary=a0\n\n" + nested)
    assert p.defects


def test_text_truncated_at_max_text() -> None:
    p = parse_message(b"Subject: x\n\n" + b"word " * 100_000, max_text=1000)
    assert len(p.text) == 1000
    assert "text truncated at 1000 characters" in p.defects


def test_html_to_text_survives_broken_markup() -> None:
    text, links = html_to_text('<p>a<b>b</p><a href="https://x.example/">c</a><!bogus <![CDATA[ <p')
    assert "a" in text and links == ["https://x.example/"]


def _answers(msg: email.message.Message) -> list[tuple[object, ...]]:
    """What parse_message asks of each part."""
    return [(p.get_content_type(), p.get_filename(), p.get_content_charset(), str(p.get("Content-Disposition")),
             p.get_payload(decode=True) if not p.is_multipart() else None,
             [type(d).__name__ for d in p.defects]) for p in msg.walk()]


SINGLE_PART_VARIANTS = [
    b"Subject: plain\r\nFrom: a@b\r\n\r\nHello\r\nworld\r\n",
    b"Subject: qp\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nJ=C3=BCrgen =\r\nsoft\r\n",
    b"Subject: b64\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + base64.encodebytes(b"<p>Hi <a href='https://x.example/'>x</a></p>").replace(b"\n", b"\r\n"),
    b"Subject: no body\r\n\r\n",
    b"Subject: 8bit \xc3\xa4\r\n\r\nbody \xff\xfe bytes\r\n\r\n\r\nand blank lines\r\n",
    b"Subject: folded\r\n continued\r\nX-A: 1\r\n\r\nbody\r\n",
    b"Subject:\r\n\tfolded from empty\r\nX-Empty:   \r\nX-Trail: v  \r\nX-Odd.Name_1: x:y\r\n\r\nb\r\n",
    b"Content-Type: text/plain;\r\n charset=\"iso-8859-1\"\r\nSubject: =?utf-8?q?a?=\r\n\r\n\xe4\r\n",
    b"content-TYPE: text/html; name=a.html\r\nX-A: 1\r\nContent-Type: text/plain\r\nCONTENT-DISPOSITION: attachment;"
    b" filename*=utf-8''%C3%A9.txt\r\ncontent-transfer-encoding: Base64\r\n\r\nSGk=\r\n",
    b"Content-Type: application/pdf; name=\"\xc3\xa9.pdf\"\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nnot uu\r\n",
]
FULL_PARSE_VARIANTS = [
    MULTIPART.replace(b"\n", b"\r\n"),
    b"Subject: rfc822\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body\r\n",
    b"Subject: lf only\nFrom: a@b\n\nbody\n",
    b"Subject: x\r\nnot a header line\r\nX-B: 2\r\n\r\nbody\r\n",
    b"Subject: no separator\r\nFrom: a@b\r\n",
    b"Content-Type: multipart/mixed\r\n\r\nno boundary given\r\n",
    b"From someone@example.org Sat Jan  1 00:00:00 2000\r\nSubject: mbox\r\n\r\nb\r\n",
    b" continued first\r\nSubject: x\r\n\r\nb\r\n",
    b":no name\r\nSubject: x\r\n\r\nb\r\n",
    b"Bad Name: spaces\r\nSubject: x\r\n\r\nb\r\n",
    b"Subject: stray\rCR\r\n\r\nb\r\n",
    b"\r\n\r\nno headers at all\r\n",
]


def test_single_part_fast_path_answers_what_the_full_parse_answers() -> None:
    """email_message skips the feed parser for a single-part body and keeps only the fields its
    part is asked about; no field and no answer may differ."""
    for raw in SINGLE_PART_VARIANTS + FULL_PARSE_VARIANTS:
        fields, msg = email_message(raw)
        full = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw)
        assert fields == list(full.raw_items()), raw
        assert _answers(msg) == _answers(full), raw


def test_fast_path_is_taken_only_for_a_clean_single_part_header_block() -> None:
    assert all(single_part(raw) is not None for raw in SINGLE_PART_VARIANTS)
    assert [raw for raw in FULL_PARSE_VARIANTS if single_part(raw) is not None] == []


def test_find_urls_finds_what_the_regex_finds() -> None:
    """find_urls only narrows where the URL regex is tried; on random text with URLs, word
    characters before them, overlaps and odd case, both give the same list."""
    rng = random.Random(7)
    pieces = ["http://a.example/x", "HTTPS://B.example", "www.c.example/p?q=1", "xwww.d.example", "_http://e",
              "http://www.f.example", "httpx", "wWw.", "(http://g.example)", "Ünïcödé", "İstanbul", "ß", " ", "\n",
              "word", "é", "9", "<https://h.example/>", "http", "www"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert find_urls(text) == _URL_RE.findall(text), text


def test_text_attachments_are_read_and_listed() -> None:
    """A wave that moves its text into `offer.html` must still leave text to compare."""
    raw = (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=M\r\n\r\n"
           b"--M\r\nContent-Type: text/plain\r\n\r\nSee the attached offer.\r\n"
           b"--M\r\nContent-Type: text/html; name=offer.html\r\n"
           b"Content-Disposition: attachment; filename=offer.html\r\n\r\n" + SPAM + b"\r\n"
           b"--M\r\nContent-Type: application/octet-stream; name=a.bin\r\n\r\nbinary words here\r\n--M--\r\n")
    p = parse_message(raw)
    assert "See the attached offer." in p.text and "replica watches" in p.text
    assert "binary words" not in p.text
    assert [a.filename for a in p.attachments] == ["offer.html", "a.bin"]


def test_alternatives_no_client_shows_are_read_within_one_more_part(monkeypatch: pytest.MonkeyPatch) -> None:
    """Their links count, but 50 of them must not cost 50 parts' reading (the shown one's text
    is read first, so they cannot use up anything it needs either)."""
    read: list[int] = []
    real = mime.html_to_text

    def counting(doc: str) -> tuple[str, list[str]]:
        read.append(len(doc))
        return real(doc)

    monkeypatch.setattr(mime, "html_to_text", counting)
    junk = b"<b></b>" * 2_000 + b"<a href='https://hidden.example/'>x</a>"
    p = parse_message(alternative(*[("text/html", junk)] * 50, ("text/html", SPAM)), max_text=1_000)
    assert p.text.strip().startswith("Buy cheap replica watches")
    assert read[0] == len(SPAM) and sum(read[1:]) <= 1_000 * mime.HTML_INPUT_FACTOR


def test_a_header_block_of_junk_fields_is_parsed_in_bounded_part() -> None:
    """Any sender can send a million tiny fields (the email package took 6 s and 700 MB over 3
    million, holding the interpreter lock) or one field folded over a million lines. The parse keeps
    the first MAX_HEADERS fields and then the first of each field the checks and MIME read, so the
    junk cannot hide the Subject, the From or the Content-Type behind it either."""
    from queueguard.mime import MAX_FIELD_BYTES, MAX_HEADERS, READ_FIELDS

    raw = (b"X-First: 1\r\n" + b"a:\r\n" * 200_000 + b"Subject: =?utf-8?q?Hidden_offer?=\r\nFrom: z@spam.example\r\n"
           b"Content-Type: text/html\r\n\r\n<p>Buy <b>now</b></p>\r\n")
    p = parse_message(raw)
    assert len(p.headers) <= MAX_HEADERS + len(READ_FIELDS)
    assert (p.subject, p.from_, p.text.split()) == ("Hidden offer", "z@spam.example", ["Buy", "now"])
    assert any("parsed in part" in d for d in p.defects)
    multipart = (b"Subject: s\r\n" + b"a:\r\n" * 200_000 + b"Content-Type: multipart/alternative; boundary=b\r\n\r\n"
                 b"--b\r\nContent-Type: text/plain\r\n\r\nplain words\r\n--b\r\nContent-Type: text/html\r\n\r\n"
                 b"<p>shown words</p>\r\n--b--\r\n")
    assert parse_message(multipart).text.split() == ["shown", "words"]
    folded = b"Subject: s\r\nX-Long: a\r\n" + b" b\r\n" * 1_000_000 + b"From: f@x.example\r\n\r\nbody\r\n"
    p = parse_message(folded)
    assert p.from_ == "f@x.example" and p.text.strip() == "body"
    assert all(len(v) <= MAX_FIELD_BYTES for _, v in p.headers)
    small = b"Subject: s\r\nFrom: f@x.example\r\n\r\nbody\r\n"
    assert parse_message(small).defects == []
    # no blank line: the header block ends at the first line that is not a field, as the email
    # parser has it, so what follows is body however long it is
    unseparated = b"Subject: s\r\nContent-Type: text/plain\r\n" + b"junk line\r\n" * 1500 + b"PAYLOAD\r\n"
    assert "PAYLOAD" in parse_message(unseparated).text


@pytest.mark.parametrize("seed", range(200))
def test_whitespace_runs_squeeze_as_the_regex_squeezes_them(seed: int) -> None:
    """The quick look for a long whitespace run never skips one the regex would squeeze."""
    rng = random.Random(seed)
    data = bytes(rng.choice(b" \t\r\nx\x0b") for _ in range(rng.randrange(0, 200)))
    assert mime.squeeze_bytes(data) == mime._LONG_SPACE_BYTES.sub(mime._squeeze_bytes, data)
    assert mime.squeeze_bytes(data + b" \t\r\n" * 4) == mime._LONG_SPACE_BYTES.sub(mime._squeeze_bytes,
                                                                                   data + b" \t\r\n" * 4)
