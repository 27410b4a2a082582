"""Count queued messages and estimate their arrival times from spool directories.

Each scanner returns one `QueueScan` per queue: the message ids in it and an
arrival time for each. Ids matter because departures are counted by comparing
one scan's ids with the next (see flow.py); arrival times give the oldest age.
Arrival times come from the name where the MTA encodes it, so a scan of a big
queue costs one `scandir` per directory and no `stat` per file:

- Exim: the first six base-62 characters of the message id are its arrival
  second (all versions, including the longer 4.97 ids).
- Postfix: long queue ids (`enable_long_queue_ids = yes`) start with the
  arrival second in base 52; short ids do not, so those files are stat'ed once
  (first sight) and the estimate is carried forward by id. Postfix sets the
  mtime of a deferred file to its next retry time, so the estimate is
  min(mtime, ctime): for a message first seen in `deferred` this is a lower
  bound on its age (the last delivery attempt), exact with long ids.
- Mailman 3: queue files are named `<time.time()>+<sha1>.pck`.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_B62 = {c: i for i, c in enumerate(BASE62)}
POSTFIX_B52 = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"
_B52 = {c: i for i, c in enumerate(POSTFIX_B52)}

EXIM_HEADER_RE = re.compile(r"^[0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4}-H$")
POSTFIX_LONG_RE = re.compile(
    r"^[0-9BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz]{10}z[0-9BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxy]+$"
)
POSTFIX_QUEUES = ("incoming", "active", "deferred", "hold")
MAILMAN_SUFFIXES = (".pck", ".bak", ".psv")
FROZEN_SCAN_LIMIT = 5000
"""Exim records "frozen" only inside each -H file, so counting frozen messages
means opening every -H file: done only while the queue holds at most this many
messages (reading 4 KiB of 5,000 files takes ~50 ms); above it frozen is unknown."""
FROZEN_READ_BYTES = 4096


@dataclass(frozen=True)
class QueueScan:
    """One queue directory at one moment."""

    mta: str
    queue: str
    arrivals: dict[str, float] = field(default_factory=dict)
    frozen: int | None = None

    @property
    def messages(self) -> int:
        return len(self.arrivals)

    def oldest_arrival(self) -> float | None:
        return min(self.arrivals.values()) if self.arrivals else None


def exim_id_time(message_id: str) -> int | None:
    """Arrival second encoded in an Exim message id (base 62, first 6 chars)."""
    head = message_id[:6]
    if len(head) < 6:
        return None
    value = 0
    for c in head:
        digit = _B62.get(c)
        if digit is None:
            return None
        value = value * 62 + digit
    return value


def exim_id_for_time(seconds: int, pid: int = 1, frac: int = 0) -> str:
    """An Exim-4.96-style id for `seconds` (tests and benchmarks build spools with it)."""
    return f"{_base62(seconds, 6)}-{_base62(pid, 6)}-{_base62(frac, 2)}"


def postfix_long_id_time(queue_id: str) -> int | None:
    """Arrival second of a Postfix long queue id (6 base-52 digits), None for short ids."""
    if not POSTFIX_LONG_RE.match(queue_id):
        return None
    value = 0
    for c in queue_id[:6]:
        value = value * 52 + _B52[c]
    return value


def postfix_long_id_for_time(seconds: int, usec: int = 0, inode: int = 1) -> str:
    """A Postfix long queue id for `seconds` (tests and benchmarks)."""
    sec = _encode(seconds, POSTFIX_B52, 6)
    us = _encode(usec, POSTFIX_B52, 4)
    ino = _encode(inode, POSTFIX_B52[:51], 1)
    return f"{sec}{us}z{ino}"


def mailman_file_time(name: str) -> float | None:
    """Enqueue time in a Mailman 3 queue file name `<time>+<hash>.pck`."""
    stamp, plus, _ = name.partition("+")
    if not plus:
        return None
    try:
        return float(stamp)
    except ValueError:
        return None


def scan_exim(spool: Path, frozen_limit: int = FROZEN_SCAN_LIMIT) -> QueueScan:
    """Messages in an Exim spool: one `<id>-H` file each in input/ or input/<c>/.

    Both layouts are read at once, since a spool keeps old flat files after
    split_spool_directory is switched on.
    """
    arrivals: dict[str, float] = {}
    headers: list[str] = []
    for directory, entry in _exim_entries(spool / "input"):
        name = entry.name
        if not EXIM_HEADER_RE.match(name) or not _is_file(entry):
            continue
        message_id = name[:-2]
        when = exim_id_time(message_id)
        if when is None:
            continue
        arrivals[message_id] = float(when)
        if len(headers) <= frozen_limit:
            headers.append(os.path.join(directory, name))
    frozen = count_exim_frozen(headers) if len(arrivals) <= frozen_limit else None
    return QueueScan("exim", "main", arrivals, frozen)


def _exim_entries(input_dir: Path) -> Iterator[tuple[str, os.DirEntry[str]]]:
    top = str(input_dir)
    with os.scandir(top) as it:
        subdirs: list[str] = []
        for entry in it:
            if len(entry.name) == 1 and entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.path)
            else:
                yield top, entry
    for sub in subdirs:
        try:
            it = os.scandir(sub)
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed (or replaced) since the listing above: it holds no messages now
        with it:
            yield from ((sub, entry) for entry in it)


def _is_file(entry: os.DirEntry[str]) -> bool:
    """Only a regular file can be a message; anything else named like one is noise, not an error."""
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False


def count_exim_frozen(header_paths: list[str]) -> int:
    """Frozen messages: their -H file has a `-frozen <time>` flag line near the top.

    A path that is gone (delivered), unreadable, or not a regular file by now is
    skipped: a plain open() of a FIFO would block the scan thread for good.
    """
    frozen = 0
    for path in header_paths:
        try:
            head = _read_regular(path, FROZEN_READ_BYTES)
        except OSError:
            continue
        if head is not None and b"\n-frozen " in head:
            frozen += 1
    return frozen


def _read_regular(path: str, limit: int) -> bytes | None:
    """Up to `limit` bytes of a regular file; None for anything else (never blocks, never follows a link)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit)
    finally:
        os.close(fd)


def scan_postfix(queue_dir: Path, known: Mapping[str, float], now: float) -> list[QueueScan]:
    """Postfix incoming/active/deferred/hold, each hashed to any depth.

    `known` maps ids seen by an earlier scan (in any queue) to their arrival
    estimate, so a short-id file is stat'ed only the first time it is seen.
    A missing queue directory is an error: a wrong path must not read as empty.
    """
    scans = []
    for queue in POSTFIX_QUEUES:
        arrivals: dict[str, float] = {}
        for entry in _walk_files(queue_dir / queue, depth=3):
            qid = entry.name
            when = known.get(qid)
            if when is None:
                long_time = postfix_long_id_time(qid)
                when = float(long_time) if long_time is not None else _postfix_estimate(entry, now)
            if when is not None:
                arrivals[qid] = when
        scans.append(QueueScan("postfix", queue, arrivals))
    return scans


def _postfix_estimate(entry: os.DirEntry[str], now: float) -> float | None:
    try:
        st = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None
    return min(st.st_mtime, st.st_ctime, now)


def scan_mailman(queue_dir: Path) -> list[QueueScan]:
    """Every subdirectory of Mailman's var/queue is a queue; .pck waiting, .bak in a runner, .psv kept.

    The directory name is the `queue` label, made encodable by `label_safe`.
    """
    scans = []
    with os.scandir(queue_dir) as it:
        names = sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    labels: dict[str, str] = {}
    for name in names:
        labels.setdefault(label_safe(name), name)
    for queue, directory in sorted(labels.items()):
        arrivals: dict[str, float] = {}
        try:
            it = os.scandir(queue_dir / directory)
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed since the listing above
        with it:
            for entry in it:
                name = entry.name
                if not name.endswith(MAILMAN_SUFFIXES):
                    continue
                when = mailman_file_time(name)
                if when is None:
                    stat_time = _stat_mtime(entry)
                    if stat_time is None:
                        continue
                    when = stat_time
                arrivals[name[:-4]] = when
        scans.append(QueueScan("mailman", queue, arrivals))
    return scans


def label_safe(name: str) -> str:
    """A file name fit to be a metric label: undecodable bytes (kept by Python as lone
    surrogates, which cannot be encoded) become `\\xff` escapes. One such label made
    every /metrics scrape fail."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _walk_files(top: Path, depth: int) -> Iterator[os.DirEntry[str]]:
    with os.scandir(top) as it:
        subdirs = []
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                if depth > 0:
                    subdirs.append(entry.path)
            elif entry.is_file(follow_symlinks=False):
                yield entry
    for sub in subdirs:
        try:
            yield from _walk_files(Path(sub), depth - 1)
        except FileNotFoundError:
            continue


def _stat_mtime(entry: os.DirEntry[str]) -> float | None:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return None


def _base62(value: int, width: int) -> str:
    return _encode(value, BASE62, width)


def _encode(value: int, alphabet: str, width: int) -> str:
    base = len(alphabet)
    digits = []
    while value:
        value, d = divmod(value, base)
        digits.append(alphabet[d])
    return "".join(reversed(digits)).rjust(width, alphabet[0])
