"""Verdicts of recent scans, by content: a wave's copies after the first skip clamd.

A spam or malware wave is the same message to many recipients; only its trace and addressing
fields differ from copy to copy. Scanning every copy is what took clamd's memory in the
2022-10-17 incident. amavisd-new keeps its virus results by a digest of the message body for
the same reason, and rspamd its antivirus results by content digest (`cache_expire`).

The key leaves out only the fields that differ per copy (`VOLATILE`) and keeps the rest of the
header, so what decides how clamd parses the message (Content-Type and its boundary, the
transfer encoding) and any field a signature might match stay in it. An entry is good for
`ttl` seconds and for the signature version clamd reported when it was scanned: a database
update (clamd's VERSION changes) empties the cache, and nothing is cached until clamd has told
us its version. Only answers are cached (clean, or infected with a name), never a failure.
"""

from __future__ import annotations

import collections
import hashlib
import re
import time
from collections.abc import Callable

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


def content_key(raw: bytes) -> bytes:
    """SHA-256 over the body and every header field but the volatile ones (each field with its
    folded lines, length-prefixed, so no bytes can move between fields or into the body).

    Fields are left out only from a header every parser reads alike: a line that is neither a
    field nor a folded line, a bare CR or a NUL in the header, and the whole message is the key,
    so no one can hide content from clamd in a line we took for a per-copy field's and clamd
    for something else."""
    digest = hashlib.sha256()
    pos, keep = 0, True
    while pos < len(raw):
        nl = raw.find(b"\n", pos)
        end = len(raw) if nl < 0 else nl + 1
        line = raw[pos:end]
        if line in (b"\r\n", b"\n"):  # the blank line: the body follows
            break
        if _FIELD.match(line):
            name = line.split(b":", 1)[0].rstrip(b" \t").lower()
            keep = name not in VOLATILE and not name.startswith(_VOLATILE_PREFIXES)
        elif pos == 0 or not _FOLDED.match(line):
            return _whole(raw)
        if b"\0" in line or b"\r" in line.rstrip(b"\r\n") or line.endswith(b"\r\r\n"):
            return _whole(raw)
        if keep:
            digest.update(len(line).to_bytes(4, "big") + line)
        pos = end
    digest.update(b"\0body\0")
    digest.update(memoryview(raw)[pos:])
    return digest.digest()


def _whole(raw: bytes) -> bytes:
    return hashlib.sha256(b"\0whole\0" + raw).digest()


class ScanCache:
    """Least recently used first out, at most `max_entries`; `ttl` 0 turns it off."""

    def __init__(self, ttl: float, max_entries: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self.version: str | None = None
        self._entries: collections.OrderedDict[bytes, tuple[float, ScanResult]] = collections.OrderedDict()

    def configure(self, ttl: float, max_entries: int) -> None:
        self.ttl, self.max_entries = ttl, max_entries
        while len(self._entries) > max(0, max_entries):
            self._entries.popitem(last=False)

    def usable(self, version: str | None) -> bool:
        """Cached answers belong to one signature version; another one empties the cache."""
        if version != self.version:
            self._entries.clear()
            self.version = version
        return version is not None and self.ttl > 0 and self.max_entries > 0

    def get(self, key: bytes, version: str | None) -> ScanResult | None:
        if not self.usable(version):
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
        if not self.usable(version):
            return
        self._entries[key] = (self.clock(), result)
        self._entries.move_to_end(key)
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
