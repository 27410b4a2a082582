"""What a message's bytes must be before any check sees them or any downstream gets them.

Both steps are pure functions over the raw message, so each front end (and
the fuzz tests) gets the same answer for the same bytes.
"""

from __future__ import annotations

import re

from queueguard.verdict import Verdict, reject

_OWN_NAME = re.compile(rb"[!-9;-~]+")


def smuggling_verdict(raw: bytes) -> Verdict | None:
    """Refuse a NUL octet, a bare LF or a bare CR anywhere in DATA (SMTP smuggling, 2023).

    We end DATA only at CRLF.CRLF, so every end-of-data variant of the
    smuggling research (LF.LF, LF.CRLF, CR.CR, CRLF.LF, CRLF.CR, a NUL before
    or after the dot, ...) reaches us as message content holding a NUL, a bare
    LF or a bare CR. A downstream that ends DATA on any of them would run what
    follows as a second transaction the client never sent us, so such content
    never reaches a downstream: refused whatever it sits next to, as Postfix's
    `smtpd_forbid_bare_newline` and `smtpd_forbid_unauth_pipelining` era fixes do.
    """
    crlf = raw.count(b"\r\n")
    if b"\0" in raw:
        what = "NUL octet"
    elif raw.count(b"\n") != crlf:
        what = "bare <LF>"
    elif raw.count(b"\r") != crlf:
        what = "bare <CR>"
    else:
        return None
    return reject("5.5.2", f"Message refused: {what} in message data (SMTP smuggling protection); "
                  "lines must end with CRLF", reason="bare_newline", code=554)


def header_block_end(raw: bytes) -> int:
    """Offset of the empty line that ends the header block (len(raw) if there is none)."""
    if raw.startswith(b"\r\n"):
        return 0
    end = raw.find(b"\r\n\r\n")
    return len(raw) if end < 0 else end + 2


def own_header_spans(raw: bytes, prefix: str) -> list[tuple[int, int]]:
    """(start, end) of each header field, continuation lines included, whose name starts with
    `<prefix>-` (case-insensitive): our verdict headers, which only we may write."""
    wanted = prefix.lower().encode("ascii") + b"-"
    limit = header_block_end(raw)
    spans: list[tuple[int, int]] = []
    pos = 0
    while pos < limit:
        end = raw.find(b"\r\n", pos, limit)
        end = limit if end < 0 else end + 2
        while end < limit and raw[end:end + 1] in (b" ", b"\t"):
            nxt = raw.find(b"\r\n", end, limit)
            end = limit if nxt < 0 else nxt + 2
        name, colon, _ = raw[pos:end].partition(b":")
        if colon and _OWN_NAME.fullmatch(name.rstrip(b" \t")) and name.lower().startswith(wanted):
            spans.append((pos, end))
        pos = end
    return spans


def strip_own_headers(raw: bytes, prefix: str) -> bytes:
    """The message without any `<prefix>-*` header a sender wrote: SpamAssassin, rspamd and Exim
    remove their own header names from incoming mail so nothing downstream believes a forged one."""
    if prefix.lower().encode("ascii") + b"-" not in raw[:header_block_end(raw)].lower():
        return raw  # the common case, without walking the header lines
    spans = own_header_spans(raw, prefix)
    if not spans:
        return raw
    parts, pos = [], 0
    for start, end in spans:
        parts.append(raw[pos:start])
        pos = end
    parts.append(raw[pos:])
    return b"".join(parts)
