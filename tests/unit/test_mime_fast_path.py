"""parse_message's fast paths give what the code they replaced gives, field by field, for every input.

The fast paths: a single part is kept under its MIME fields only (single_part), the summary fields
are found in one pass, plain ASCII header values skip decode_header_value's calls, get_filename is
skipped where it cannot name a file, the header bound is known from the first CRLF CRLF, find_urls
returns at once for text without an h or a w, and _hosts reads plain URLs with one regex. Compared
on the SpamAssassin dev split (fetched by ../shared/corpus/fetch-dev-corpus.sh: without it this test
fails, it never skips), on generated and mutated messages, and on test_mime's variants.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import hashlib
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import spamassassin as sa
from queueguard import mime
from queueguard.html_text import html_to_text
from queueguard.mime import (
    _FIELD_NAME,
    _HEAD_END,
    _LONG_SPACE,
    _NEXT_FIELD,
    _READ_FIELD,
    _URL_AT,
    _URL_RE,
    HTML_INPUT_FACTOR,
    MAX_FIELD_BYTES,
    MAX_HEADERS,
    MAX_URLS,
    READABLE_ATTACHMENTS,
    Attachment,
    ParsedMessage,
    _charset,
    _fix_surrogates,
    _plain_headers,
    _squeeze,
    decode_header_value,
    parse_message,
    shown_parts,
    squeeze_bytes,
)
from tests.fuzzcases import SEEDS, mutated
from tests.unit.test_mime import FULL_PARSE_VARIANTS, MULTIPART, SINGLE_PART_VARIANTS, alternative

# --- the reference: mime.py's functions as they were before the fast paths --------------------------
#
# Renamed with `ref_`, bodies verbatim but for the renames. The helpers no fast path replaced
# (_plain_headers, shown_parts, squeeze_bytes, _charset, decode_header_value, ...) are mime's own.


def ref_read_text(part: email.message.Message, data: bytes, limit: int,
                  defects: list[str]) -> tuple[str, list[str], int]:
    data = squeeze_bytes(data)
    text = data[: limit * 4].decode(_charset(part, defects), "replace")[:limit]
    if part.get_content_subtype() != "html":
        return text, [], len(text)
    shown, links = html_to_text(text)
    return _LONG_SPACE.sub(_squeeze, shown), links, len(text)


def ref_is_attachment(part: email.message.Message) -> bool:
    disposition = (part.get("Content-Disposition") or "").split(";", 1)[0].strip().lower()
    if disposition == "attachment" or part.get_filename():
        return True
    return part.get_content_maintype() not in ("text", "multipart", "message")


def ref_find_urls(text: str) -> list[str]:
    low = text.lower()
    if len(low) != len(text):
        return _URL_RE.findall(text)
    starts = []
    for needle in ("http", "www."):
        i = low.find(needle)
        while i != -1:
            starts.append(i)
            i = low.find(needle, i + 4)
    urls: list[str] = []
    end = 0
    for i in sorted(starts):
        if i < end or (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            continue
        m = _URL_AT.match(text, i)
        if m is not None:
            urls.append(m.group())
            end = m.end()
    return urls


def ref_hosts(urls: list[str]) -> list[str]:
    hosts: set[str] = set()
    for url in urls:
        try:
            host = urlsplit(url if "://" in url else "http://" + url).hostname
        except ValueError:
            continue
        if host:
            hosts.add(host.rstrip(".").lower())
    return sorted(hosts)


def ref_email_message(raw: bytes) -> email.message.Message:
    single = ref_single_part_head(raw)
    if single is None:
        return email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw)
    msg, body = single
    msg.set_payload(body.decode("ascii", "surrogateescape"))
    return msg


def ref_single_part_head(raw: bytes) -> tuple[email.message.Message, bytes] | None:
    head, sep, body = raw.partition(b"\r\n\r\n")
    headers = _plain_headers(head) if sep else None
    if headers is None:
        return None
    msg = email.message.Message(policy=email.policy.compat32)
    for name, value in headers:
        msg.set_raw(name, value)
    if msg.get_content_maintype() in ("multipart", "message"):
        return None
    return msg, body


def ref_bounded_head(raw: bytes) -> tuple[bytes, bool]:
    m = _HEAD_END.search(raw)
    head_end = m.start() if m else len(raw)
    if head_end <= MAX_FIELD_BYTES and raw.count(b"\n", 0, head_end) < MAX_HEADERS:
        return raw, False
    head, kept, seen, pos = raw[:head_end], [], set(), 0

    def take(start: int) -> int:
        nxt = _NEXT_FIELD.search(head, start)
        end = nxt.end() if nxt else head_end
        kept.append(head[start:min(end, start + MAX_FIELD_BYTES)].rstrip(b"\r\n"))
        return end

    while pos < head_end and len(kept) < MAX_HEADERS:
        if named := _FIELD_NAME.match(head, pos):
            seen.add(named.group(1).lower())
        pos = take(pos)
    for later in _READ_FIELD.finditer(head, pos):
        if (name := later.group(1).lower()) not in seen:
            seen.add(name)
            take(later.start())
    return b"\r\n".join(kept) + raw[head_end:], True


def ref_parse_message(raw: bytes, *, max_text: int = 200_000, max_parts: int = 100) -> ParsedMessage:
    defects: list[str] = []
    raw, cut = ref_bounded_head(raw)
    if cut:
        defects.append(f"header block over {MAX_HEADERS} fields or {MAX_FIELD_BYTES} bytes: parsed in part")
    try:
        msg = ref_email_message(raw)
    except Exception as e:
        defects.append(f"unparseable: {type(e).__name__}")
        try:
            msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw, headersonly=True)
        except Exception:
            return ParsedMessage(headers=[], defects=defects)
    raw_headers = list(msg.raw_items())
    headers = [(_fix_surrogates(n), decode_header_value(v)) for n, v in raw_headers]

    def first(name: str) -> str | None:
        lname = name.lower()
        return next((v for n, v in headers if n.lower() == lname), None)

    texts: list[str] = []
    links: list[str] = []
    attachments: list[Attachment] = []
    hidden: list[tuple[email.message.Message, bytes]] = []
    budget = max_text
    looked = 0
    try:
        for part, shown in shown_parts(msg):
            defects.extend(type(d).__name__ for d in part.defects)
            if part.is_multipart():
                continue
            payload = part.get_payload(decode=True)
            data = payload if isinstance(payload, bytes) else b""
            if not data:
                continue
            looked += 1
            if looked > max_parts:
                defects.append(f"more than {max_parts} MIME parts")
                break
            if ref_is_attachment(part):
                attachments.append(
                    Attachment(
                        decode_header_value(part.get_filename() or ""),
                        part.get_content_type(),
                        len(data),
                        hashlib.sha256(data).hexdigest(),
                    )
                )
                if part.get_content_type() not in READABLE_ATTACHMENTS:
                    continue
            if part.get_content_maintype() != "text":
                continue
            if not shown:
                hidden.append((part, data))
                continue
            if budget <= 0:
                continue
            text, found, _ = ref_read_text(part, data, budget * HTML_INPUT_FACTOR if
                                           part.get_content_subtype() == "html" else budget, defects)
            links.extend(found)
            texts.append(text[:budget])
            budget -= len(texts[-1])
        unread = max_text * HTML_INPUT_FACTOR
        for part, data in hidden:
            if unread <= 0:
                break
            text, found, read = ref_read_text(part, data, unread, defects)
            links.extend([*found, *ref_find_urls(text)])
            unread -= read
    except Exception as e:
        defects.append(f"MIME walk stopped: {type(e).__name__}")
    body = "\n\n".join(texts)[:max_text]
    if budget <= 0:
        defects.append(f"text truncated at {max_text} characters")
    urls = list(dict.fromkeys([*links, *ref_find_urls(body)]))[:MAX_URLS]
    return ParsedMessage(
        headers=headers,
        subject=first("Subject") or "",
        from_=first("From") or "",
        message_id=first("Message-ID") or "",
        list_id=first("List-Id"),
        list_unsubscribe=first("List-Unsubscribe"),
        in_reply_to=first("In-Reply-To"),
        references=first("References"),
        text=body,
        urls=urls,
        url_hosts=ref_hosts(urls),
        attachments=attachments,
        defects=list(dict.fromkeys(defects)),
    )


# --- the comparison ----------------------------------------------------------------------------------


def assert_parses_as_the_reference(raw: bytes, **limits: int) -> None:
    assert parse_message(raw, **limits) == ref_parse_message(raw, **limits), (raw[:300], limits)


@pytest.fixture(scope="module")
def corpus() -> tuple[list[bytes], list[bytes]]:
    """(each message as an MTA sends it, each as stored: an mbox `From ` line, LF made CRLF)."""
    directory = sa.corpus_dir()
    sent = [m.raw for kind in ("spam", "ham") for m in sa.load(directory, kind)]
    stored = [p.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
              for kind in ("spam", "ham") for p in sorted((directory / kind).iterdir())]
    return sent, stored


def test_real_mail_parses_as_the_reference_parses_it(corpus: tuple[list[bytes], list[bytes]]) -> None:
    """All of the dev split as sent (most of it takes the single-part path), a third of it as
    stored (the `From ` line sends it through the full parse), a seventh with tight limits."""
    sent, stored = corpus
    assert len(sent) > 2500
    assert sum(mime.single_part(raw) is not None for raw in sent) > len(sent) // 2
    for raw in sent:
        assert_parses_as_the_reference(raw)
    for raw in stored[::3]:
        assert_parses_as_the_reference(raw)
    for raw in sent[::7]:
        assert_parses_as_the_reference(raw, max_text=300, max_parts=1)


EXTRA_VARIANTS = [
    # a hidden alternative whose charset parameters make the parameter parse raise (TypeError):
    # the walk must stop where it stopped, not read on past it
    alternative(("text/plain; charset*=a; charset*0=b", b"plain https://a.example/"), ("text/html", b"<p>x</p>")),
    b"Subject: s\r\nContent-Type: application/x; charset*=a; charset*0=b\r\n\r\nbytes\r\n",
    b"Subject: s\r\nContent-Type: text/plain; charset*=a; charset*0=b\r\n\r\ntext\r\n",
    b"Subject: s\r\nContent-Type: name\r\n\r\ntext\r\n",
    b"Subject: s\r\nContent-Type: text/plain; NAME=\"a.txt\"\r\n\r\ntext\r\n",
    b"Subject: s\r\nContent-Type: text/plain; name*=utf-8''%C3%A9.txt\r\n\r\ntext\r\n",
    b"Subject: s\r\nContent-Type: image/png; n\xc3\xa4me=x\r\n\r\nbytes\r\n",
    b"Subject: s\r\nContent-Disposition: inline; filename=a.txt\r\n\r\ntext\r\n",
    b"Subject: s\r\nContent-Disposition: \xff attachment\r\n\r\ntext\r\n",
    b"Subject: =?utf-8?q?=C3=A9?= and \xc3\xa9\r\nFrom: a@b\r\nfrom: second@b\r\nSUBJECT: second\r\n\r\nb\r\n",
    b"Subject: " + b"=?" * 5000 + b"\r\n\r\nb\r\n",
    b"X-Long: " + b"a " * 5000 + b"=?utf-8?q?late?=\r\n\r\nb\r\n",
    b"Subject: s\r\n\r\nhttp://A.example./x www.b.example:8080/y http://[::1]/ http://u@c.example/ HTTP://\r\n",
    b"Subject: s\r\n\r\nno urls in \xc4\xb0 text, only XXX\r\n",
    b"Subject: s\r\n" + b"a: b\r\n" * 1200 + b"\r\nbody\r\n",
    b"Subject: s\r\nX: " + b"y" * (MAX_FIELD_BYTES + 10) + b"\r\n\r\nbody\r\n",
]


def test_known_variants_parse_as_the_reference_parses_them() -> None:
    for raw in [MULTIPART, *SINGLE_PART_VARIANTS, *FULL_PARSE_VARIANTS, *SEEDS, *EXTRA_VARIANTS]:
        for limits in ({}, {"max_text": 5, "max_parts": 1}, {"max_parts": 0}):
            assert_parses_as_the_reference(raw, **limits)


# --- generated input ---------------------------------------------------------------------------------

NAMES = ("Subject", "SUBJECT", "From", "from", "Message-ID", "List-Id", "List-Unsubscribe", "In-Reply-To",
         "References", "Content-Type", "content-TYPE", "Content-Transfer-Encoding", "Content-Disposition",
         "MIME-Version", "X-Odd.Name_1", "Received", "Bad Name", "", "From ")
VALUES = (
    b"", b"plain", b"  spaced   out  ", b"=?utf-8?q?J=C3=BCrgen?= <j@example.org>", b"=?utf-8?b?SGVsbG8=?=",
    b"=?bogus?q?x?=", b"=?utf-8?q?unterminated", b"\xc3\xa9t\xc3\xa9", b"\xff\xfe", b"<a@b.example>",
    b"text/plain; charset=utf-8", b"text/html", b"TEXT/HTML; CHARSET=iso-8859-1", b"text/plain; charset=x-nonsense",
    b"text/plain; name=a.txt", b'application/pdf; name="x.pdf"', b"text/plain; charset*=a; charset*0=b",
    b"text/plain; charset*=utf-8''%C3%A9", b"multipart/alternative; boundary=A", b"multipart/mixed; boundary=A",
    b"message/rfc822", b"image/png", b"text", b"text/plain/x", b"attachment; filename=a.exe", b"inline",
    b"attachment", b"quoted-printable", b"base64", b"x-uuencode", b"7bit", b"a\r\n folded", b"a\r\n\tfolded\r\n more",
    b"x" * 300,
)
BODY = (
    b"Hello world", b"http://a.example/x", b"www.B.example:80/p?q=1", b"https://[::1]:8/", b"http://user@h.example/",
    b"HTTP://X.EXAMPLE./", b"http://h\xc3\xa9.example/", b"<a href='http://y.example/a'>z</a>", b"<p>shown</p>",
    b" " * 20, b"\r\n" * 3, b"=C3=A9=\r\n", b"SGVsbG8gd29ybGQ=\r\n", b"begin 644 a\r\n#86)C\r\n`\r\nend\r\n", b"\xff",
    b"--A\r\nContent-Type: text/plain\r\n\r\npart one http://p.example/\r\n", b"--A\r\nContent-Type: text/html\r\n\r\n",
    b"--A\r\nContent-Type: application/octet-stream; name=b.bin\r\n\r\nbin\r\n", b"--A--\r\n", b"XXXXXXXX", b"\r\n",
)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """A header block of fields the parse reads (and some it must refuse), with CRLF or odd line
    ends, then a body of URLs, encodings, blank runs and MIME parts."""
    fields = draw(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from((b": ", b":", b": \t")),
                                     st.sampled_from(VALUES) | st.binary(max_size=12)), max_size=8))
    ends = st.sampled_from((b"\r\n",) * 8 + (b"\n", b"\r"))
    head = b"".join(name.encode() + colon + value + draw(ends) for name, colon, value in fields)
    body = b"".join(draw(st.lists(st.sampled_from(BODY) | st.binary(max_size=8), max_size=12)))
    return head + draw(st.sampled_from((b"\r\n", b"", b"\n"))) + body


LIMITS = st.fixed_dictionaries({}, optional={"max_text": st.integers(0, 100), "max_parts": st.integers(0, 3)})
SETTINGS = settings(max_examples=600, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(messages(), LIMITS)
def test_generated_messages_parse_as_the_reference_parses_them(raw: bytes, limits: dict[str, int]) -> None:
    assert_parses_as_the_reference(raw, **limits)


@SETTINGS
@given(mutated(), LIMITS)
def test_mutated_messages_parse_as_the_reference_parses_them(raw: bytes, limits: dict[str, int]) -> None:
    assert_parses_as_the_reference(raw, **limits)


URL_PIECES = st.sampled_from(("http://", "https://", "HTTP://", "www.", "://", "a", "Z", "0", ".", "-", "_", "+",
                              ":", "/", "?", "#", "@", "[", "]", "[::1]", "%", "\t", "\r", "\n", " ", "\x00", "é",
                              "\u2100", "\uff0f", ":80", "xn--p", ";")) | st.text(max_size=2)


@settings(max_examples=1000, deadline=None, database=None)
@given(st.lists(URL_PIECES, max_size=10).map("".join))
def test_hosts_are_the_hosts_urlsplit_names(url: str) -> None:
    assert mime._hosts([url]) == ref_hosts([url]), url


@settings(max_examples=1000, deadline=None, database=None)
@given(st.text() | st.lists(st.sampled_from(("h", "H", "w", "W", "WWW.", "HTTP://", "Http://", "ttp://a.b", "ww.",
                                             "XX", " ", "\u0130", "\u212a")), max_size=8).map("".join))
def test_find_urls_finds_what_the_regex_finds(text: str) -> None:
    """Whichever of h, H, w and W a text has or lacks."""
    assert mime.find_urls(text) == _URL_RE.findall(text), text


CTYPE_PIECES = ("text/plain", "; ", ";", "name", "NAME", "nAmE", "file", "=", '"', "*", "*0", "'", "%C3%A9", " ",
                "charset", "x")


@settings(max_examples=800, deadline=None, database=None)
@given(st.lists(st.sampled_from((*CTYPE_PIECES, "\udcc3\udca9", "\udcff")), max_size=12).map("".join)
       | st.lists(st.sampled_from((*CTYPE_PIECES, "é", "\u0130", "\u212a", "\ufb01", "\u1e9e")), max_size=12)
       .map("".join))
def test_a_file_is_named_only_where_get_filename_may_find_one(ctype: str) -> None:
    """Where _may_name_a_file says no, get_filename returns None and does not raise: for values
    as the parse stores them (8-bit bytes as surrogates) and for any other characters."""
    part = email.message.Message(policy=email.policy.compat32)
    part.set_raw("Content-Type", ctype)
    if not mime._may_name_a_file(part):
        assert part.get_filename() is None, ctype

