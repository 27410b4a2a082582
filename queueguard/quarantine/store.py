"""The durable quarantine: one message file and one JSON metadata file per entry, plus an index.

Layout under the quarantine directory:
    msg/<xx>/<id>.eml     the bytes exactly as received (0600)
    msg/<xx>/<id>.json    metadata: envelope, client, hits, fingerprints, campaign, reason (0600)
    index.sqlite          one row per entry, for listing and stats without opening files

<xx> is the last two hex digits of the id (random), so 256 shard directories
at most, created when first needed (a store on a small filesystem uses few inodes).

Durability: each file is written to a temporary name in its shard, fsync'd,
renamed; the JSON file is renamed last and is the commit point; then the
shard directory is fsync'd, and only then does `put` return the id (and the
pipeline say 250). A crash at any point leaves either a complete entry or
none: an .eml without its .json, and temporary files, are not entries and
`recover()` removes them. The index is derived data: a crash between the
commit and the index insert leaves an entry that `recover()` indexes again.
Several processes may use one store (the daemon's workers put, the CLI lists,
releases and deletes), and several threads of each (recovery, the summary
refresher, puts); SQLite does their locking, waiting up to OPEN_TIMEOUT for
the others, except in one place where it gives up at once: switching a fresh
index to WAL upgrades a read lock to a write lock, and SQLite answers
"database is locked" to that without calling its busy handler (two upgraders
would deadlock). So the index is set up once per store object (one thread
of it at a time), that switch is retried until the deadline, and WAL being
persistent in the file, no later connection switches again.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import errno
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from queueguard import metrics
from queueguard.mime import decode_header_value
from queueguard.model import RuleHit, Transaction, new_id
from queueguard.quarantine.protocol import QuarantineError, QuarantineFull
from queueguard.verdict import Verdict

_ID_RE = re.compile(r"[0-9a-f]{12,32}")
ENTRY_INODES = 3
"""Inodes one put may need: two files and, at worst, a new shard directory."""
ORPHAN_AGE = 3600.0
log = logging.getLogger("queueguard.quarantine")
SUMMARY_TTL = 10.0
OPEN_TIMEOUT = 30.0
"""How long an opener waits for the others' locks on the index before it fails, loudly."""
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY, time REAL NOT NULL, size INTEGER NOT NULL, sender TEXT NOT NULL,
    rule TEXT NOT NULL, released REAL, meta TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_time ON entries(time);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class InvalidId(ValueError):
    """Not a quarantine id (ids are 12-32 lower-case hex digits, so they cannot name another path)."""


def check_id(qid: str) -> str:
    if not _ID_RE.fullmatch(qid):
        raise InvalidId(f"invalid quarantine id {qid[:80]!r}: expected 12-32 hex digits")
    return qid


@dataclass(frozen=True)
class Entry:
    """One quarantined message as the index knows it; `meta` is the JSON metadata."""

    id: str
    time: float
    size: int
    sender: str
    rule: str
    released: float | None
    meta: dict[str, Any]

    @property
    def recipients(self) -> list[str]:
        return list(self.meta.get("envelope", {}).get("recipients", []))

    def tokens(self) -> set[str]:
        """Every fingerprint key of the entry (and the burst key that caught it)."""
        return {t for v in self.meta.get("fingerprints", {}).values() for t in str(v).split()}

    @property
    def campaign(self) -> str:
        """The id of the burst campaign that held it ('' when none did)."""
        return str((self.meta.get("campaign") or {}).get("id", ""))


@dataclass(frozen=True)
class Filter:
    """Which entries a list/release/delete/purge applies to; all given fields must match.

    sender/recipient are case-insensitive globs (`*@spam.example`); fingerprint
    matches any of the entry's fingerprint keys or a prefix of one (4+ characters).
    """

    rule: str | None = None
    sender: str | None = None
    recipient: str | None = None
    since: float | None = None
    until: float | None = None
    fingerprint: str | None = None
    campaign: str | None = None
    held_only: bool = False

    def matches(self, e: Entry) -> bool:
        if self.held_only and e.released is not None:
            return False
        if self.rule is not None and self.rule != e.rule and self.rule not in _hit_rules(e.meta):
            return False
        if self.sender is not None and not fnmatch.fnmatchcase(e.sender.lower(), self.sender.lower()):
            return False
        if self.recipient is not None and not any(
            fnmatch.fnmatchcase(r.lower(), self.recipient.lower()) for r in e.recipients
        ):
            return False
        if self.campaign is not None and e.campaign != self.campaign.removeprefix("c:"):
            return False
        if self.fingerprint is not None:
            fp = self.fingerprint
            return any(t == fp or (len(fp) >= 4 and t.startswith(fp)) for t in e.tokens())
        return True


def split_campaign(fingerprints: dict[str, str]) -> tuple[dict[str, str], dict[str, Any] | None]:
    """The burst check passes its campaign in the fingerprints (Campaign.as_dict); metadata keeps
    it apart, typed, so `quarantine show` can name it and `delete --campaign` find it."""
    fps = {k: v for k, v in fingerprints.items() if not k.startswith("campaign")}
    cid = fingerprints.get("campaign")
    if not cid:
        return fps, None
    try:
        first = float(fingerprints.get("campaign_first_seen", "0"))
        copies, variants = int(fingerprints.get("campaign_count", "0")), int(fingerprints.get("campaign_variants", "0"))
    except ValueError:
        first, copies, variants = 0.0, 0, 0
    return fps, {"id": cid, "first_seen": first, "first_seen_iso": iso(first), "copies": copies,
                 "variants": variants, "signals": fingerprints.get("campaign_signals", "").split()}


def _hit_rules(meta: dict[str, Any]) -> set[str]:
    return {h.get("rule", "") for h in meta.get("hits", []) if not h.get("shadow")}


def _write_file(path: Path, data: bytes) -> None:
    """Create `path` (must not exist) with mode 0600, write everything, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _header_summary(raw: bytes) -> dict[str, str]:
    """Subject, From, Message-ID and Date for listings (headers only, first 64 KiB)."""
    try:
        msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw[:65536])
        return {k.lower(): decode_header_value(str(msg.get(k, ""))) for k in ("Subject", "From", "Message-ID", "Date")}
    except Exception:
        return {}


def _create_private(path: Path) -> None:
    """Create `path` empty and 0600 unless it exists: the index must never be readable by others,
    not even between its creation and a chmod."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _connect(path: Path, deadline: float) -> sqlite3.Connection:
    """A connection that waits (busy timeout) for other connections' locks until `deadline`."""
    db = sqlite3.connect(path, timeout=max(deadline - time.monotonic(), 0.0), isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=NORMAL")  # the index is derived data: recover() rebuilds it
    except BaseException:
        db.close()
        raise
    return db


def _use_wal(db: sqlite3.Connection, path: Path, deadline: float) -> None:
    """Switch the index to WAL (readers and one writer at a time do not block each other), retrying
    the immediate "database is locked" of the lock upgrade it needs until `deadline`."""
    delay = 0.001
    while True:
        try:
            (mode,) = db.execute("PRAGMA journal_mode=WAL").fetchone()
            break
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, 0.05)
    if mode != "wal":  # SQLite says so only where it cannot (no shared memory, e.g. some network filesystems)
        log.warning("quarantine index %s: journal mode %s, not WAL (not supported there): listing and putting "
                    "wait for each other", path, mode)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class QuarantineStore:
    """A quarantine directory. `put` is async (I/O in a thread); the rest is synchronous, for the CLI."""

    def __init__(
        self,
        directory: Path | str,
        min_free_bytes: int = 0,
        min_free_inodes: int = 0,
        clock: Callable[[], float] = time.time,
        *,
        statvfs: Callable[[Path], os.statvfs_result] = os.statvfs,
        open_timeout: float = OPEN_TIMEOUT,
    ) -> None:
        self.dir = Path(directory)
        self.msg_dir = self.dir / "msg"
        self.index_path = self.dir / "index.sqlite"
        self.stale_path = self.dir / "index.stale"
        """Present while the index may say held where a metadata file says released."""
        self.open_timeout = open_timeout
        self.min_free_bytes = min_free_bytes
        self.min_free_inodes = min_free_inodes
        self.clock = clock
        self.statvfs = statvfs
        self._ready = False
        self._setting_up = threading.Lock()
        self._summary: dict[str, Any] = {}
        self._summary_at = -SUMMARY_TTL
        self._seen_counters: dict[str, int] = {}

    # --- setup and the index ---------------------------------------------------------

    def _ensure(self) -> None:
        """Directories and the index (0600, WAL, schema), once per store object. QuarantineError when
        the index cannot be set up within open_timeout; OSError when the filesystem refuses."""
        if self._ready:
            return
        with self._setting_up:  # the recovery and summary threads start together
            if self._ready:
                return
            for d in (self.dir, self.msg_dir):
                if not d.is_dir():
                    d.mkdir(mode=0o700, parents=True, exist_ok=True)
                    _fsync_dir(d.parent)
            deadline = time.monotonic() + self.open_timeout
            try:
                _create_private(self.index_path)
                db = _connect(self.index_path, deadline)
                try:
                    _use_wal(db, self.index_path, deadline)
                    db.executescript(_SCHEMA)  # other openers' CREATEs wait for the busy timeout
                finally:
                    db.close()
            except sqlite3.Error as e:
                raise QuarantineError(f"quarantine index {self.index_path}: cannot set it up: {e}") from e
            self._ready = True

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A connection to the index as _ensure left it (WAL is persistent: nothing to switch).
        Any index error (locked past the timeout, damaged, disk I/O) is a QuarantineError that
        names the file: the pipeline answers 451, the CLI says what failed instead of a traceback."""
        try:
            db = _connect(self.index_path, time.monotonic() + self.open_timeout)
            try:
                yield db
            finally:
                db.close()
        except sqlite3.Error as e:
            raise QuarantineError(f"quarantine index {self.index_path}: {e}") from e

    def _index(self, db: sqlite3.Connection, meta: dict[str, Any]) -> None:
        """One row; the metadata as JSON (ASCII, so 8-bit envelope octets, which reach us as
        surrogate escapes, survive exactly) and the sender column as valid UTF-8 (sqlite's text)."""
        released = meta.get("released")
        sender = str(meta["envelope"]["sender"]).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        db.execute(
            "INSERT OR REPLACE INTO entries (id, time, size, sender, rule, released, meta) VALUES (?,?,?,?,?,?,?)",
            (meta["id"], meta["time"], meta["size"], sender, meta.get("rule") or "",
             released["time"] if released else None, json.dumps(meta)),
        )

    def _bump(self, db: sqlite3.Connection, name: str, n: int = 1) -> None:
        db.execute("INSERT INTO counters (name, value) VALUES (?, ?) "
                   "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, n))

    def paths(self, qid: str) -> tuple[Path, Path]:
        """(message file, metadata file) of an id; InvalidId for anything that is not one."""
        check_id(qid)
        shard = self.msg_dir / qid[-2:]
        return shard / f"{qid}.eml", shard / f"{qid}.json"

    # --- writing ---------------------------------------------------------------------------

    def check_space(self, size: int) -> None:
        """QuarantineFull when storing `size` more bytes would cross a floor."""
        try:
            st = self.statvfs(self.dir)
        except OSError as e:
            raise QuarantineError(f"cannot stat quarantine filesystem {self.dir}: {e}") from e
        free = st.f_bavail * st.f_frsize
        if free - size - 65536 < self.min_free_bytes:
            raise QuarantineFull(f"{self.dir}: {free} bytes free, floor {self.min_free_bytes}")
        if st.f_files and st.f_favail - ENTRY_INODES < self.min_free_inodes:
            raise QuarantineFull(f"{self.dir}: {st.f_favail} inodes free, floor {self.min_free_inodes}")

    async def put(
        self, txn: Transaction, raw: bytes, verdict: Verdict, hits: list[RuleHit], fingerprints: dict[str, str]
    ) -> str:
        """Store durably and return the id; QuarantineFull below a floor, QuarantineError otherwise."""
        try:
            qid = await asyncio.to_thread(self.put_sync, txn, raw, verdict, hits, fingerprints)
        except QuarantineFull:
            metrics.quarantine_refused.labels("full").inc()
            raise
        except QuarantineError:
            metrics.quarantine_refused.labels("error").inc()
            raise
        try:  # stored durably: a metrics failure must not turn that into a 451 (and a second copy)
            metrics.quarantined.labels(verdict.rule or verdict.reason or "").inc()
            self._count_put(verdict.rule or "", len(raw))
        except Exception:
            log.exception("quarantine %s: counting stored %s failed (it is stored)", self.dir, qid)
        return qid

    def _count_put(self, rule: str, size: int) -> None:
        """Keep the summary and gauges current between the periodic re-reads of the index."""
        summary = self._summary
        by_rule = dict(summary.get("by_rule", {}))
        by_rule[rule] = by_rule.get(rule, 0) + 1
        self._summary = {"messages": summary.get("messages", 0) + 1, "bytes": summary.get("bytes", 0) + size,
                         "by_rule": by_rule}
        metrics.quarantine_messages.inc()
        metrics.quarantine_bytes.inc(size)

    def metadata(
        self, qid: str, txn: Transaction, raw: bytes, verdict: Verdict, hits: list[RuleHit],
        fingerprints: dict[str, str],
    ) -> dict[str, Any]:
        conn = txn.connection
        now = self.clock()
        fps, campaign = split_campaign(fingerprints)
        return {
            "version": 1, "id": qid, "time": now, "time_iso": iso(now),
            "reason": verdict.reason, "rule": verdict.rule, "verdict": verdict.reply(),
            "envelope": {"sender": txn.sender, "recipients": list(txn.recipients),
                         "mail_options": list(txn.mail_options),
                         "rcpt_options": {k: list(v) for k, v in txn.rcpt_options.items()}},
            "client": {"ip": str(conn.client_ip) if conn.client_ip else None, "port": conn.client_port,
                       "name": conn.client_name, "tls": conn.tls, "authenticated": conn.authenticated,
                       "frontend": conn.frontend, "connection_id": conn.id},
            "helo": conn.helo, "transaction_id": txn.id, "route": txn.route,
            "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
            "headers": _header_summary(raw),
            "hits": [asdict(h) for h in hits], "fingerprints": fps, "campaign": campaign, "released": None,
        }

    def put_sync(
        self, txn: Transaction, raw: bytes, verdict: Verdict, hits: list[RuleHit], fingerprints: dict[str, str]
    ) -> str:
        qid = new_id()
        eml, meta_path = self.paths(qid)
        shard = eml.parent
        tmp_eml, tmp_meta = shard / f".{qid}.eml.tmp", shard / f".{qid}.json.tmp"
        try:
            self._ensure()
            self.check_space(len(raw))
            if not shard.is_dir():
                shard.mkdir(mode=0o700, exist_ok=True)
                _fsync_dir(self.msg_dir)
            meta = self.metadata(qid, txn, raw, verdict, hits, fingerprints)
            _write_file(tmp_eml, raw)
            _write_file(tmp_meta, json.dumps(meta, indent=1).encode())
            os.rename(tmp_eml, eml)
            os.rename(tmp_meta, meta_path)
            _fsync_dir(shard)
        except QuarantineError:
            raise
        except OSError as e:
            # Nothing half-written may stay: we answer 4xx, so the sender keeps the message.
            for p in (tmp_eml, tmp_meta, eml, meta_path):
                with contextlib.suppress(OSError):
                    p.unlink()
            if e.errno in _NO_SPACE:
                raise QuarantineFull(f"{self.dir}: {e.strerror}") from e
            raise QuarantineError(f"cannot store in {self.dir}: {e}") from e
        try:  # the entry is durable; a failed index insert is repaired by recover()
            with self._db() as db:
                self._index(db, meta)
        except (QuarantineError, ValueError) as e:
            log.warning("quarantine %s: stored %s but could not index it (%s); recover() at the next "
                        "start, or `queueguard quarantine stats`, re-indexes it", self.dir, qid, e)
        return qid

    # --- reading ----------------------------------------------------------------------------

    def get(self, qid: str) -> Entry | None:
        """The entry from its metadata file (authoritative), or None when there is no such entry."""
        _eml, meta_path = self.paths(qid)
        try:
            meta = json.loads(meta_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise QuarantineError(f"{meta_path}: {e}") from e
        return _entry(meta)

    def raw(self, qid: str) -> bytes:
        """The message as stored; QuarantineError when it cannot be read (deleted meanwhile)."""
        path = self.paths(qid)[0]
        try:
            return path.read_bytes()
        except OSError as e:
            raise QuarantineError(f"{path}: {e.strerror or e}") from e

    def list(self, flt: Filter | None = None) -> list[Entry]:
        """Entries from the index, oldest first."""
        flt = flt or Filter()
        self._ensure()
        sql, args = "SELECT meta FROM entries", []
        where = []
        if flt.since is not None:
            where.append("time >= ?")
            args.append(flt.since)
        if flt.until is not None:
            where.append("time < ?")
            args.append(flt.until)
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._db() as db:
            rows = db.execute(sql + " ORDER BY time, id", args).fetchall()
        entries = (_entry(json.loads(m)) for (m,) in rows)
        return [e for e in entries if flt.matches(e)]

    # --- changing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def claimed(self, qid: str) -> Iterator[bool]:
        """An exclusive claim on an entry while it is released: two release commands at once (two
        admins, a cron job) each delivered every message they both selected. An flock of a lock
        file beside the entry (gone with the process that held it); False when another process
        holds it. The holder re-reads the entry (get) before delivering: the metadata file, not
        the index, says whether it was released meanwhile. The lock file stays until the entry is
        deleted: unlinked after use, a waiter could lock the old file while a newcomer locked a
        new one, and both deliver."""
        lock = self.paths(qid)[0].with_name(f".{qid}.lock")
        fd = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def mark_released(self, qid: str, reply: str, downstream: str) -> None:
        """Record a successful release in the metadata file (atomically) and the index; the file is
        what counts (a stale index row is re-synced by recover())."""
        entry = self.get(qid)
        if entry is None:
            raise QuarantineError(f"no quarantine entry {qid}")
        meta = dict(entry.meta)
        meta["released"] = {"time": self.clock(), "reply": reply, "downstream": downstream}
        _eml, meta_path = self.paths(qid)
        tmp = meta_path.with_name(f".{qid}.json.rel.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        _write_file(tmp, json.dumps(meta, indent=1).encode())
        os.rename(tmp, meta_path)
        _fsync_dir(meta_path.parent)
        try:
            with self._db() as db:
                self._index(db, meta)
                self._bump(db, "released")
        except QuarantineError:
            with contextlib.suppress(OSError):  # recover() re-syncs the held rows while this exists
                self.stale_path.touch()
            raise

    def count_failed_release(self) -> None:
        with self._db() as db:
            self._bump(db, "release_failed")

    def delete(self, qid: str) -> bool:
        """Remove an entry (metadata first: the entry is gone as soon as that file is); False if absent."""
        eml, meta_path = self.paths(qid)
        self._ensure()
        existed = True
        try:
            meta_path.unlink()
        except FileNotFoundError:
            existed = False
        for path in (eml, eml.with_name(f".{qid}.lock")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with self._db() as db:
            cur = db.execute("DELETE FROM entries WHERE id = ?", (qid,))
            existed = existed or cur.rowcount > 0
            if existed:
                self._bump(db, "deleted")
        return existed

    def recover(self) -> dict[str, int]:
        """Remove temporary files and orphans of crashed writes; index entries the index lacks;
        re-sync rows that say held where the metadata file says released (only after a release
        whose index update failed, e.g. on a full disk, left `stale_path`: reading every held
        entry's file each time would slow every CLI call on a large quarantine); drop index rows
        whose entry is gone. Returns what it did, by kind."""
        self._ensure()
        done = {"indexed": 0, "dropped": 0, "removed": 0}
        now = time.time()
        stale = self.stale_path.exists()
        with self._db() as db:
            known = {qid for (qid,) in db.execute("SELECT id FROM entries")}
            held = {qid for (qid,) in db.execute("SELECT id FROM entries WHERE released IS NULL")} if stale else set()
        on_disk: set[str] = set()
        for shard in self.msg_dir.iterdir() if self.msg_dir.is_dir() else ():
            for f in shard.iterdir():
                name = f.name
                if name.endswith(".tmp") or (name.endswith(".eml") and not f.with_suffix(".json").exists()):
                    with contextlib.suppress(OSError):
                        if now - f.stat().st_mtime > ORPHAN_AGE:  # younger ones may be a put in progress
                            f.unlink()
                            done["removed"] += 1
                elif name.endswith(".json") and _ID_RE.fullmatch(name[:-5]):
                    on_disk.add(name[:-5])
        with self._db() as db:
            for qid in on_disk - known:
                entry = self._readable(qid)
                if entry is not None and self.paths(qid)[0].exists():
                    self._index(db, entry.meta)
                    done["indexed"] += 1
            for qid in held & on_disk:
                entry = self._readable(qid)
                if entry is not None and entry.released is not None:
                    self._index(db, entry.meta)
                    done["indexed"] += 1
            for qid in known - on_disk:
                db.execute("DELETE FROM entries WHERE id = ?", (qid,))
                done["dropped"] += 1
        if stale:
            self.stale_path.unlink(missing_ok=True)
        return done

    def _readable(self, qid: str) -> Entry | None:
        """get(), with an unreadable metadata file logged and skipped: one must not stop recover()
        (and with it every CLI command that selects)."""
        try:
            return self.get(qid)
        except QuarantineError as e:
            log.warning("quarantine %s: skipped: %s", self.dir, e)
            return None

    # --- numbers ---------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        self._ensure()
        with self._db() as db:
            return dict(db.execute("SELECT name, value FROM counters").fetchall())

    def usage(self) -> dict[str, int]:
        """Disk bytes and inodes the store really uses (walks the directory)."""
        inodes, used = 0, 0
        for root, dirs, files in os.walk(self.dir):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(root, name))
                    inodes += 1
                    used += st.st_blocks * 512
        return {"disk_bytes": used, "inodes": inodes + 1}

    def filesystem(self) -> dict[str, int]:
        st = self.statvfs(self.dir)
        return {"free_bytes": st.f_bavail * st.f_frsize, "size_bytes": st.f_blocks * st.f_frsize,
                "free_inodes": st.f_favail, "inodes": st.f_files}

    def cached_summary(self) -> dict[str, Any]:
        """The last summary(), without I/O: what the event loop may call."""
        return self._summary

    def summary(self, *, force: bool = False) -> dict[str, Any]:
        """{"messages", "bytes", "by_rule"} for the status page; re-read from the index at most every
        SUMMARY_TTL seconds (or now, with force), which also refreshes the quarantine gauges and counters.
        Blocking (SQLite, a directory listing): the daemon runs it in a thread."""
        now = time.monotonic()
        if not force and now - self._summary_at < SUMMARY_TTL:
            return self._summary
        self._summary_at = now
        try:
            self._ensure()
            with self._db() as db:
                messages, size = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries").fetchone()
                by_rule = dict(db.execute("SELECT rule, COUNT(*) FROM entries GROUP BY rule").fetchall())
                counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
            shards = sum(1 for _ in self.msg_dir.iterdir())
        except (OSError, QuarantineError) as e:
            log.warning("quarantine %s: cannot read its index for the summary: %s", self.dir, e)
            return self._summary
        self._summary = {"messages": messages, "bytes": size, "by_rule": by_rule}
        metrics.quarantine_messages.set(messages)
        metrics.quarantine_bytes.set(size)
        metrics.quarantine_inodes.set(2 * messages + shards + 4)
        for name, metric in (("released", metrics.quarantine_releases.labels("ok")),
                             ("release_failed", metrics.quarantine_releases.labels("failed")),
                             ("deleted", metrics.quarantine_deletions)):
            value = counters.get(name, 0)
            delta = value - self._seen_counters.get(name, 0)
            if delta > 0:
                metric.inc(delta)
            self._seen_counters[name] = value
        return self._summary


def _entry(meta: dict[str, Any]) -> Entry:
    released = meta.get("released")
    return Entry(
        id=meta["id"], time=float(meta["time"]), size=int(meta["size"]), sender=meta["envelope"]["sender"],
        rule=meta.get("rule") or "", released=float(released["time"]) if released else None, meta=meta,
    )
