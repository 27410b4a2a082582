"""Clean answers of recent scans, by content: a wave's copies after the first skip clamd.

A spam or malware wave is the same message to many recipients; only its trace and addressing
fields differ from copy to copy. Scanning every copy is what took clamd's memory in the
2022-10-17 incident. amavisd-new keeps its virus results by a digest of the message body for
the same reason, and rspamd its antivirus results by content digest (`cache_expire`).

The key leaves out only the fields that differ per copy (`VOLATILE`) and keeps the rest of the
header, so what decides how clamd parses the message (Content-Type and its boundary, the
transfer encoding) stays in it; and it leaves them out only of a header that every parser reads
alike and that gives clamd no reason to stop reading (`fields`). An entry is good for `ttl`
seconds and for the signature version clamd reported when it was scanned: a database update
(clamd's VERSION, or a stamp of its files) empties the cache, and nothing is cached until clamd
has told us its version. Which answers hold for every copy is the scan stage's call (check.py
`_reusable`: clean ones).
"""

from __future__ import annotations

import collections
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from queueguard.scan.clamd import ScanResult

VOLATILE = frozenset({
    b"received", b"return-path", b"delivered-to", b"x-original-to", b"envelope-to", b"message-id",
    b"date", b"to", b"cc", b"dkim-signature", b"authentication-results", b"received-spf",
})
"""Fields a copy of the same message carries with its own value: trace, per-recipient
addressing, its id and date, and signatures and results over those (`resent-*` and `arc-*`
too, by prefix)."""
_VOLATILE_PREFIXES = (b"resent-", b"arc-")


_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")
"""A field's first line: a name of printable ASCII without colon (RFC 5322 ftext), then a colon."""
_FOLDED = re.compile(rb"[ \t]+[^ \t\r\n]")
"""A folded line: white space, then something (a line of white space only ends the header to
some parsers and not to others)."""
HEADER_LIMIT = 64 * 1024
"""Octets of header past which nothing is left out (Postfix's header_size_limit is 100 KB)."""
FIELD_LIMIT = 2048
"""Octets of one per-copy field, folded lines included, past which nothing is left out: ClamAV
stops reading a message's MIME structure after 262,144 folded lines of one field, or 256 KB
glued onto a Content-Type ending in `;` (and then answers OK), so a copy must not be able to
carry what makes clamd give up in a field the key does not see."""
LINE_LIMIT = 998
"""RFC 5322's longest line, CRLF apart."""
HASH_IN_THREAD = 512 * 1024
"""Messages larger than this are hashed off the event loop (hashlib lets go of the GIL)."""


@dataclass(frozen=True)
class Fields:
    """A header read the way every parser reads it: the name of its first field (clamd tells mail
    from text by the first bytes), the lines of the fields that are not per-copy, and where the
    blank line before the body starts."""

    first: bytes
    kept: tuple[bytes, ...]
    blank: int


def fields(raw: bytes) -> Fields | None:
    """The header's kept lines, or None where something might be left out that matters: a line
    that is neither a field nor a folded line (a line of white space only, a name with a space),
    a bare CR or a NUL, a line over 998 octets, a header over HEADER_LIMIT or a per-copy field
    over FIELD_LIMIT, and a field a parser could continue into the lines after it (a kept one
    ending in `;` before a per-copy field, any with an open quote: ClamAV joins lines until its
    quotes balance)."""
    kept: list[bytes] = []
    first = b""
    pos, keep, size, quotes, open_end = 0, True, 0, 0, False
    while pos < len(raw):
        if pos > HEADER_LIMIT:
            return None
        nl = raw.find(b"\n", pos, pos + LINE_LIMIT + 2)
        end = len(raw) if nl < 0 else nl + 1
        line = raw[pos:end]
        if line in (b"\r\n", b"\n"):  # the blank line: the body follows
            return None if quotes % 2 else Fields(first, tuple(kept), pos)
        content = line.rstrip(b"\r\n")
        if len(content) > LINE_LIMIT or b"\0" in line or b"\r" in content or line.endswith(b"\r\r\n"):
            return None
        if _FIELD.match(line):
            if quotes % 2:
                return None
            name = line.split(b":", 1)[0].rstrip(b" \t").lower()
            was_kept = keep
            keep = name not in VOLATILE and not name.startswith(_VOLATILE_PREFIXES)
            if was_kept and open_end and not keep:
                return None
            first = first or line.split(b":", 1)[0]
            size, quotes = 0, 0
        elif pos == 0 or not _FOLDED.match(line):
            return None
        size += len(line)
        quotes += line.count(b'"')
        if keep:
            kept.append(line)
            open_end = content.rstrip().endswith(b";")
        elif size > FIELD_LIMIT:
            return None
        pos = end
    return None if quotes % 2 else Fields(first, tuple(kept), len(raw))


def content_key(raw: bytes) -> bytes:
    """SHA-256 over the body, the first field's name and every header field but the per-copy
    ones (each line length-prefixed, so no bytes can move between fields or into the body); over
    the whole message where `fields` finds the header one to leave nothing out of."""
    found = fields(raw)
    digest = hashlib.sha256()
    if found is None:
        digest.update(b"\0whole\0")
        digest.update(raw)
        return digest.digest()
    digest.update(len(found.first).to_bytes(4, "big") + found.first)
    for line in found.kept:
        digest.update(len(line).to_bytes(4, "big") + line)
    digest.update(b"\0body\0")
    digest.update(memoryview(raw)[found.blank:])
    return digest.digest()


class ScanCache:
    """Least recently used first out, at most `max_entries`; `ttl` 0 turns it off. The answers
    belong to one signature version (`switch`): looked up or stored under another, they are a
    miss and not kept."""

    def __init__(self, ttl: float, max_entries: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self.version: str | None = None
        self._entries: collections.OrderedDict[bytes, tuple[float, ScanResult]] = collections.OrderedDict()

    def configure(self, ttl: float, max_entries: int) -> None:
        self.ttl, self.max_entries = ttl, max_entries
        if ttl <= 0:
            self._entries.clear()
        while len(self._entries) > max(0, max_entries):
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def switch(self, version: str | None) -> bool:
        """Answers for clamd's current signature `version` from now on (another one empties the
        cache); whether the cache is in use."""
        if version != self.version:
            self._entries.clear()
            self.version = version
        return version is not None and self.ttl > 0 and self.max_entries > 0

    def get(self, key: bytes, version: str | None) -> ScanResult | None:
        if version is None or version != self.version or self.ttl <= 0:
            return None
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock() - entry[0] >= self.ttl:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: bytes, version: str | None, result: ScanResult) -> None:
        if version is None or version != self.version or self.ttl <= 0 or self.max_entries <= 0:
            return
        self._entries[key] = (self.clock(), result)
        self._entries.move_to_end(key)
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
