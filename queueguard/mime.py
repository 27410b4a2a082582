"""Decode a received message once, with bounded work, for the checks that read content.

Built on the stdlib `email` package with the compat32 policy: it is the most
forgiving parser there (it records defects instead of raising on broken
headers), and we only need decoded payloads, not header objects. Spam is
often malformed on purpose, so nothing here raises: every problem becomes a
string in `defects`, and whatever could be decoded is still returned.
"""

from __future__ import annotations

import codecs
import email.header
import email.message
import email.parser
import email.policy
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from queueguard.html_text import html_to_text

MAX_HEADERS = 1000
"""Header fields parsed: the first ones, plus the first of each field the checks and MIME read
wherever it stands (bounded_head)."""
MAX_FIELD_BYTES = 65536
"""Bytes of one header field parsed (continuation lines and all)."""
MAX_HEADER_VALUE = 8192
MAX_URLS = 500
HTML_INPUT_FACTOR = 4
"""HTML is mostly markup: convert at most this many times `max_text` characters of it."""

_URL_RE = re.compile(r"""(?i)\b(?:https?://|www\.)[^\s<>"'()\[\]{}]+""")
_URL_AT = re.compile(r"""(?i)(?:https?://|www\.)[^\s<>"'()\[\]{}]+""")


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ParsedMessage:
    headers: list[tuple[str, str]]
    subject: str = ""
    from_: str = ""
    message_id: str = ""
    list_id: str | None = None
    list_unsubscribe: str | None = None
    in_reply_to: str | None = None
    references: str | None = None
    text: str = ""
    urls: list[str] = field(default_factory=list)
    url_hosts: list[str] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """The first header called `name` (case-insensitive), decoded."""
        lname = name.lower()
        return next((v for n, v in self.headers if n.lower() == lname), None)

    @property
    def is_list_traffic(self) -> bool:
        return bool(self.list_id or self.list_unsubscribe)

    @property
    def is_reply(self) -> bool:
        return bool(self.in_reply_to or self.references)


def _fix_surrogates(text: str) -> str:
    """8-bit header bytes arrive as surrogate escapes; show them as UTF-8 or U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def decode_header_value(value: str) -> str:
    """RFC 2047 encoded words to text; undecodable parts are kept as they were."""
    value = _fix_surrogates(str(value))[:MAX_HEADER_VALUE]
    if "=?" not in value:
        return " ".join(value.split())
    try:
        decoded = str(email.header.make_header(email.header.decode_header(value)))
    except Exception:
        return " ".join(value.split())
    return " ".join(decoded.split())


def _charset(part: email.message.Message, defects: list[str]) -> str:
    name = part.get_content_charset() or "us-ascii"
    try:
        codecs.lookup(name)
    except LookupError:
        defects.append(f"unknown charset {name[:40]!r}")
        return "latin-1"
    return name


READABLE_ATTACHMENTS = ("text/plain", "text/html")
"""Attachments whose text is the message's text too: a client opens them in one click, and a
wave that moves its text into one (a line of body text and the offer as `offer.html`) must not
leave nothing to compare."""
_LONG_SPACE = re.compile(r"[ \t\r\n]{16,}")
_LONG_SPACE_BYTES = re.compile(rb"[ \t\r\n]{16,}")
"""Runs of whitespace no reader sees as more than a break: squeezed before the text budget is
charged, so 200,000 spaces cannot use it up ahead of the text a client shows."""


def _squeeze(m: re.Match[str]) -> str:
    """A long whitespace run as the break it reads as: a paragraph, a line or a space."""
    lines = m.group().count("\n")
    return "\n\n" if lines >= 2 else "\n" if lines else " "


def _squeeze_bytes(m: re.Match[bytes]) -> bytes:
    lines = m.group().count(b"\n")
    return b"\n\n" if lines >= 2 else b"\n" if lines else b" "


_AS_SPACE = bytes.maketrans(b"\t\r\n", b"   ")
_LONG_RUN = b" " * 16


def squeeze_bytes(data: bytes) -> bytes:
    """Runs of 16 or more whitespace characters as one space, newline or blank line. The regex
    costs ~9 ns a byte even where there is no such run (37 µs for 4 KB, 3 % of a worker's CPU per
    message); a translate and a find tell first whether there is one (2 µs)."""
    if _LONG_RUN not in data.translate(_AS_SPACE):
        return data
    return _LONG_SPACE_BYTES.sub(_squeeze_bytes, data)


def _read_text(part: email.message.Message, html: bool, data: bytes, limit: int,
               defects: list[str]) -> tuple[str, list[str], int]:
    """(text, links, characters read) of a text part, reading at most `limit` characters of it
    (HTML converted, long whitespace runs squeezed first)."""
    data = squeeze_bytes(data)
    text = data[: limit * 4].decode(_charset(part, defects), "replace")[:limit]
    if not html:
        return text, [], len(text)
    shown, links = html_to_text(text)
    return _LONG_SPACE.sub(_squeeze, shown), links, len(text)


def shown_parts(msg: email.message.Message) -> Iterator[tuple[email.message.Message, bool]]:
    """Every part, depth first in order (containers too), and whether a mail client shows it: of
    a multipart/alternative only the last alternative that is text/plain, text/html or multipart
    (RFC 2046 5.1.4: the last is the one preferred). The text of the others must neither hide
    nor dilute the text that is displayed (a first alternative of spaces, or of ham sentences);
    their links still count. Iterative, so deep nesting cannot exhaust the recursion limit."""
    stack = [(msg, True)]
    while stack:
        part, shown = stack.pop()
        yield part, shown
        payload = part.get_payload() if part.is_multipart() else None
        if not isinstance(payload, list):
            continue
        children = [(c, shown) for c in payload if isinstance(c, email.message.Message)]
        if part.get_content_type() == "multipart/alternative":
            preferred = [i for i, (c, _) in enumerate(children) if c.get_content_type() in ("text/plain", "text/html")
                         or c.get_content_maintype() == "multipart"]
            last = preferred[-1] if preferred else len(children) - 1
            children = [(c, shown and i == last) for i, (c, _) in enumerate(children)]
        stack.extend(reversed(children))


def _is_attachment(part: email.message.Message, maintype: str) -> bool:
    disposition = (part.get("Content-Disposition") or "").split(";", 1)[0].strip().lower()
    if disposition == "attachment" or (_may_name_a_file(part) and part.get_filename()):
        return True
    return maintype not in ("text", "multipart", "message")


def _may_name_a_file(part: email.message.Message) -> bool:
    """False when get_filename() is None for certain, and cannot raise: no Content-Disposition,
    and a Content-Type without `name` in any case in it (parameter names are cut from it; no
    other character lower-cases to n, a, m or e) and without `*` (only RFC 2231 parameters can
    make the parse raise). Spares a parse of the parameters (9 µs for a corpus text part) that
    get_content_charset makes anyway."""
    if "Content-Disposition" in part:
        return True
    ctype = str(part.get("Content-Type", ""))
    return "name" in ctype.lower() or "*" in ctype


def find_urls(text: str) -> list[str]:
    """What `_URL_RE.findall(text)` finds, ten times faster.

    The regex tries its case-blind alternation at every position (80 µs for a 4 KB body,
    7 % of the proxy's CPU); here str.find picks the few places where a URL can start
    and the regex is only tried there, with the same word-boundary rule and no overlaps.
    Text with no h and no w in either case (the load generator's 4 KB of "XXX" lines) has
    no URL: four memchr scans tell in 0.2 µs, where lower-casing and searching take 5.7.
    """
    if not ("h" in text or "w" in text or "H" in text or "W" in text):
        return []
    low = text.lower()
    if len(low) != len(text):  # a few characters lower-case to two: positions would not line up
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


_PLAIN_NETLOC = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([A-Za-z0-9._-]*)(?::[0-9]*)?(?=[/?#]|\Z)")
"""A URL whose host urlsplit reads as the group, lower-cased: a scheme, then a netloc of plain
host characters (no user, brackets, tabs or newlines, which urlsplit treats specially) ending
where urlsplit ends it."""


def _hosts(urls: list[str]) -> list[str]:
    """The distinct hosts of `urls`, as urlsplit names them. urlsplit and its hostname cost ~3 µs
    a URL (21 µs for a corpus message's 6.6 URLs); a plain one is read with one regex match
    (4.6 µs for the same URLs)."""
    hosts: set[str] = set()
    for url in urls:
        if plain := _PLAIN_NETLOC.match(url if "://" in url else "http://" + url):
            if netloc := plain.group(1):
                hosts.add(netloc.rstrip(".").lower())
            continue
        try:
            host = urlsplit(url if "://" in url else "http://" + url).hostname
        except ValueError:
            continue
        if host:
            hosts.add(host.rstrip(".").lower())
    return sorted(hosts)


def email_message(raw: bytes) -> tuple[list[tuple[str, str]], email.message.Message]:
    """The header fields of `raw` (raw, as compat32 stores them) and the email package's parse
    of it, without running a single-part body through the feed parser.

    The feed parser splits every body line even when the part is not multipart (two thirds
    of the parse time for a plain 4 KB message). When the header block ends cleanly and does
    not announce parts, the body becomes the payload as is, of a part that answers every
    question the MIME walk asks as the full parse's message does (single_part).
    """
    single = single_part(raw)
    if single is not None:
        return single
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw)
    return list(msg.raw_items()), msg


MIME_FIELDS = frozenset({"content-type", "content-transfer-encoding", "content-disposition"})
"""The fields a single part's type, charset, filename and decoding are read from."""


def single_part(raw: bytes) -> tuple[list[tuple[str, str]], email.message.Message] | None:
    """(header fields, the body as a part holding only its MIME_FIELDS) when the fast path may
    be taken; None for multipart, message/*, a header block the feed parser would flag, or one
    without a CRLF CRLF end. Each of the walk's ~10 lookups scans the part's fields with a
    lower-case per field; a corpus message has 24 fields, of which these are one to three
    (10 µs saved per message)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    fields = _plain_headers(head) if sep else None
    if fields is None:
        return None
    part = email.message.Message(policy=email.policy.compat32)
    for name, value in fields:
        if name.lower() in MIME_FIELDS:
            part.set_raw(name, value)
    if part.get_content_maintype() in ("multipart", "message"):
        return None
    part.set_payload(body.decode("ascii", "surrogateescape"))
    return fields, part


_HEADER_NAME = re.compile(r"[\041-\071\073-\176]+")
"""The feed parser's header-name characters: printable ASCII but ':'."""


def _plain_headers(head: bytes) -> list[tuple[str, str]] | None:
    """(name, value) pairs as the feed parser's compat32 policy stores them, for a header block
    whose lines all end in CRLF and are headers or their continuations; None for anything the
    feed parser would treat specially (a Unix From line, a defect, a stray CR or LF)."""
    text = head.decode("ascii", "surrogateescape")
    if not text or text.startswith("From ") or text[0] in " \t":
        return None
    headers: list[tuple[str, list[str]]] = []
    for line in text.split("\r\n"):
        if "\r" in line or "\n" in line:
            return None
        if line[:1] in (" ", "\t"):
            headers[-1][1].append(line)
            continue
        name, colon, value = line.partition(":")
        if not colon or not _HEADER_NAME.fullmatch(name):
            return None
        headers.append((name, [value.lstrip(" \t")]))
    return [(name, "\r\n".join(parts).rstrip("\r\n")) for name, parts in headers]


READ_FIELDS = ("subject", "from", "message-id", "list-id", "list-unsubscribe", "in-reply-to", "references",
               "mime-version", "content-type", "content-transfer-encoding", "content-disposition")
"""Fields the checks and the MIME structure depend on: never lost to the bound on fields."""
_HEAD_END = re.compile(rb"\r?\n(?:\r?\n|(?![ \t]|[!-9;-~]+[ \t]*:))")
"""Where the header block ends: at the blank line, or (no blank line) before the first line that
is neither a field nor a continuation, where the email parser ends it too."""
_NEXT_FIELD = re.compile(rb"\n(?![ \t])")
_FIELD_NAME = re.compile(rb"([^:\s]+)[ \t]*:")
_READ_FIELD = re.compile(rb"(?im)^(" + "|".join(READ_FIELDS).encode() + rb")[ \t]*:")


def bounded_head(raw: bytes) -> tuple[bytes, bool]:
    """`raw` with a header block the parser can afford, and whether it had to be cut.

    Any sender can send millions of tiny header fields (12 MB of `a:` lines took the email package
    6 s and 700 MB, holding the interpreter lock) or one field folded over millions of lines. The
    parse keeps the first MAX_HEADERS fields, each cut at MAX_FIELD_BYTES, and after them the first
    of each READ_FIELDS field not yet seen, wherever it stands, so junk fields cannot push the
    Subject or the Content-Type out of sight. Only the parse sees the cut: the message is relayed
    and stored as it came."""
    # The block ends at or before its first CRLF CRLF: when that comes early enough, the
    # regex search (the text before the end tried at every byte: 2.3 µs for the load
    # generator's 4 fields, 21 µs for a corpus message's 24) is not needed to know it is small.
    blank = raw.find(b"\r\n\r\n")
    if 0 <= blank <= MAX_FIELD_BYTES and raw.count(b"\n", 0, blank) < MAX_HEADERS:
        return raw, False
    m = _HEAD_END.search(raw)
    head_end = m.start() if m else len(raw)
    if head_end <= MAX_FIELD_BYTES and raw.count(b"\n", 0, head_end) < MAX_HEADERS:
        return raw, False
    head, kept, seen, pos = raw[:head_end], [], set(), 0

    def take(start: int) -> int:
        """Keep the field at `start` (cut at MAX_FIELD_BYTES); where the next one starts."""
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


def _decoded_fields(fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`fields` (raw: 8-bit bytes kept as surrogates) with names as _fix_surrogates shows them
    and values decoded (decode_header_value). A plain ASCII field without encoded words only
    needs its blanks squeezed, done here without the calls: 9 µs instead of 13 for a corpus
    message's 24 fields."""
    return [(n, " ".join(v[:MAX_HEADER_VALUE].split())) if n.isascii() and v.isascii() and "=?" not in v
            else (_fix_surrogates(n), decode_header_value(v)) for n, v in fields]


SUMMARY_FIELDS = frozenset({"subject", "from", "message-id", "list-id", "list-unsubscribe", "in-reply-to",
                            "references"})


def _first_values(headers: list[tuple[str, str]], names: frozenset[str]) -> dict[str, str]:
    """The first value of each field in `names` (lower case), in one pass over the fields: a
    pass per name lower-cased every field name seven times (3.3 µs for 4 fields, 7.5 for a
    corpus message's 24; 0.6 and 2 in one pass)."""
    first: dict[str, str] = {}
    for name, value in headers:
        lname = name.lower()
        if lname in names and lname not in first:
            first[lname] = value
    return first


def parse_message(raw: bytes, *, max_text: int = 200_000, max_parts: int = 100) -> ParsedMessage:
    """Decode `raw` into headers, text, URLs and attachments; never raises.

    Work is bounded: at most `max_parts` non-empty MIME parts are decoded, text
    is cut at `max_text` characters, HTML input at a multiple of that (and the
    alternatives no client shows share one such allowance), headers and URLs at
    fixed caps.
    """
    defects: list[str] = []
    raw, cut = bounded_head(raw)
    if cut:
        defects.append(f"header block over {MAX_HEADERS} fields or {MAX_FIELD_BYTES} bytes: parsed in part")
    try:
        raw_headers, msg = email_message(raw)
    except Exception as e:  # deep nesting can exhaust the recursion limit
        defects.append(f"unparseable: {type(e).__name__}")
        try:
            msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw, headersonly=True)
        except Exception:
            return ParsedMessage(headers=[], defects=defects)
        raw_headers = list(msg.raw_items())
    headers = _decoded_fields(raw_headers)
    first = _first_values(headers, SUMMARY_FIELDS)

    texts: list[str] = []
    links: list[str] = []
    attachments: list[Attachment] = []
    hidden: list[tuple[email.message.Message, bool, bytes]] = []
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
                continue  # empty parts cost nothing, and must not use up the cap below
            looked += 1
            if looked > max_parts:
                defects.append(f"more than {max_parts} MIME parts")
                break
            ctype = part.get_content_type()
            maintype, _, subtype = ctype.partition("/")  # get_content_type always has one "/"
            if _is_attachment(part, maintype):
                attachments.append(
                    Attachment(
                        decode_header_value(part.get_filename() or ""),
                        ctype,
                        len(data),
                        hashlib.sha256(data).hexdigest(),
                    )
                )
                if ctype not in READABLE_ATTACHMENTS:
                    continue
            if maintype != "text":
                continue
            html = subtype == "html"
            if not shown:
                hidden.append((part, html, data))  # for its links, once the shown text is in (below)
                continue
            if budget <= 0:
                continue
            text, found, _ = _read_text(part, html, data, budget * HTML_INPUT_FACTOR if html else budget, defects)
            links.extend(found)
            texts.append(text[:budget])
            budget -= len(texts[-1])
        unread = max_text * HTML_INPUT_FACTOR  # alternatives no client shows: one more part's reading
        for part, html, data in hidden:
            if unread <= 0:
                break
            text, found, read = _read_text(part, html, data, unread, defects)
            links.extend([*found, *find_urls(text)])
            unread -= read
    except Exception as e:
        defects.append(f"MIME walk stopped: {type(e).__name__}")
    body = "\n\n".join(texts)[:max_text]
    if budget <= 0:
        defects.append(f"text truncated at {max_text} characters")
    urls = list(dict.fromkeys([*links, *find_urls(body)]))[:MAX_URLS]
    return ParsedMessage(
        headers=headers,
        subject=first.get("subject") or "",
        from_=first.get("from") or "",
        message_id=first.get("message-id") or "",
        list_id=first.get("list-id"),
        list_unsubscribe=first.get("list-unsubscribe"),
        in_reply_to=first.get("in-reply-to"),
        references=first.get("references"),
        text=body,
        urls=urls,
        url_hosts=_hosts(urls),
        attachments=attachments,
        defects=list(dict.fromkeys(defects)),
    )
