"""Shared pieces of the incident replays: tagged messages, a sending Exim, and where mail ended up.

Every message a scenario sends carries `X-Replay-Id` (and a matching
Message-ID) and `X-Replay-Sent` (epoch seconds), so the accounting reads the
components' own state: downstream maildirs, the quarantine store, the
sending Exim's spool (-H files) and its mainlog (`**` lines for 5xx answers).
"""

from __future__ import annotations

import re
import smtplib
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from queueguard.harness.exim import LOCAL_DOMAIN, Exim
from queueguard.quarantine.protocol import QuarantineError
from queueguard.quarantine.store import QuarantineStore
from queueguard.replay.alerts import AlertOutcome, evaluate
from queueguard.replay.report import Summary, percentile
from queueguard.replay.scrape import Scrape
from queueguard.shipped import ALERT_RULES

SENDER_DOMAIN = "sender.example"
_ID_RE = re.compile(rb"^X-Replay-Id: *(\S+)", re.M | re.I)
_SENT_RE = re.compile(rb"^X-Replay-Sent: *([0-9.]+)", re.M | re.I)


def tag(raw: bytes, mid: str) -> bytes:
    """Prepend the replay id headers (CRLF line ends throughout, as on the wire);
    `stamp` adds the send time when the message is actually handed over."""
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return f"X-Replay-Id: {mid}\r\nMessage-ID: <{mid}@replay.test>\r\n".encode() + raw


def stamp(raw: bytes) -> bytes:
    return f"X-Replay-Sent: {time.time():.6f}\r\n".encode() + raw


def simple(mid: str, subject: str, body: str, sender: str = "app@services.example") -> bytes:
    return tag(f"From: {sender}\r\nSubject: {subject}\r\n\r\n{body}\r\n".encode(), mid)


def subdir(workdir: Path, name: str) -> Path:
    d = workdir / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def replay_id(raw: bytes) -> str | None:
    m = _ID_RE.search(raw[:8192])
    return m.group(1).decode() if m else None


@dataclass(frozen=True)
class Delivered:
    mid: str
    sent_at: float
    delivered_at: float
    where: str


def maildir_messages(root: Path, where: str = "") -> list[Delivered]:
    """Every tagged message under root/*/{new,cur}; delivery time = file mtime."""
    out = []
    for f in root.glob("*/*/*"):
        if f.parent.name not in ("new", "cur") or not f.is_file():
            continue
        head = f.read_bytes()[:8192]
        mid, sent = _ID_RE.search(head), _SENT_RE.search(head)
        if mid and sent:
            out.append(Delivered(mid.group(1).decode(), float(sent.group(1)), f.stat().st_mtime, where))
    return out


def quarantined_ids(directory: Path) -> tuple[list[str], list[str]]:
    """(replay ids of quarantined messages, ids of entries that could not be read back whole)."""
    if not directory.exists():
        return [], []
    store = QuarantineStore(directory, min_free_bytes=0, min_free_inodes=0)
    ids, broken = [], []
    for entry in store.list():
        try:
            raw = store.raw(entry.id)
        except QuarantineError:
            broken.append(entry.id)
            continue
        mid = replay_id(raw)
        if mid is None or len(raw) != entry.size:
            broken.append(entry.id)
        else:
            ids.append(mid)
    return ids, broken


def latency(delivered: Iterable[Delivered]) -> dict[str, float | None]:
    values = [d.delivered_at - d.sent_at for d in delivered]
    p50, p99 = percentile(values, 50), percentile(values, 99)
    return {"p50_s": None if p50 is None else round(p50, 3), "p99_s": None if p99 is None else round(p99, 3)}


class SendingExim(Exim):
    """An Exim that relays everything to a smarthost (the guard): `test.example` is not local here.

    The harness's Exim treats test.example as its local domain; the sending side
    must relay it, so its config gets its own local domain.
    """

    def write_config(self) -> None:
        super().write_config()
        text = self.config_path.read_text()
        text = text.replace(f"domainlist local_domains = {LOCAL_DOMAIN}",
                            f"domainlist local_domains = {SENDER_DOMAIN}")
        self.config_path.write_text(text)

    def queued_ids(self) -> list[str]:
        """Replay ids of messages in the queue, from the spool's -H files."""
        ids = []
        for h in (self.dir / "spool" / "input").rglob("*-H"):
            try:
                m = re.search(rb"X-Replay-Id: *(\S+)", h.read_bytes(), re.I)
            except FileNotFoundError:
                continue  # delivered while we listed
            if m:
                ids.append(m.group(1).decode())
        return ids

    def rejections(self) -> dict[str, str]:
        """Replay id -> stated reason, for messages the guard refused with 5xx (Exim's `**` lines)."""
        log = self.mainlog()
        by_exim = dict(re.findall(r"^\S+ \S+ (\S+) <= .*? id=(\S+)@replay\.test", log, re.M))
        out = {}
        for exim_id, text in re.findall(r"^\S+ \S+ (\S+) \*\* .*?: (5\d\d .*)$", log, re.M):
            mid = by_exim.get(exim_id)
            if mid is None:
                continue
            tag_ = re.search(r"\((\w+:[\w.-]+)\)\s*$", text)
            out[mid] = tag_.group(1) if tag_ else text[:40]
        return out

    def flush(self, rounds: int = 1) -> None:
        """`exim -qff` (every queued message, retry times ignored), `rounds` times."""
        for _ in range(rounds):
            self.run_queue()


def inject(port: int, messages: Sequence[tuple[str, str, str, bytes]], *, per_connection: int = 50) -> list[str]:
    """SMTP the (id, sender, recipient, raw) messages into a sending MTA, reusing connections.
    Returns the ids it accepted (the rest were refused at once and count as never sent)."""
    accepted: list[str] = []
    for start in range(0, len(messages), per_connection):
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
            c.ehlo("injector.replay.test")
            for mid, sender, rcpt, raw in messages[start:start + per_connection]:
                try:
                    c.sendmail(sender, [rcpt], stamp(raw))
                    accepted.append(mid)
                except smtplib.SMTPException:
                    c.rset()
    return accepted


@contextmanager
def background(fn: object, interval: float) -> Iterator[threading.Event]:
    """Call fn() every `interval` seconds in a thread until the block ends (a queue runner, a sampler)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            fn()  # type: ignore[operator]

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield stop
    finally:
        stop.set()
        t.join(60)


def check_alerts(summary: Summary, scrapes: Sequence[Scrape], workdir: Path, *, page: Sequence[str],
                 report: Sequence[str] = (), match: dict[str, dict[str, str]] | None = None) -> list[AlertOutcome]:
    """Evaluate the shipped rules over the recorded scrapes (scrape i = minute i): every `page` alert
    must fire within its `for:` window; `report` alerts are only described."""
    outcomes = evaluate(ALERT_RULES, scrapes, [*page, *report], workdir / "promtool", match)
    for o in outcomes:
        if o.alert in page:
            summary.check(f"alert {o.alert}", o.within_for and o.witness_ok, o.describe())
        else:
            summary.notes.append(o.describe())
    summary.figures["scrapes (1 scrape = 1 alert-minute)"] = len(scrapes)
    summary.figures["alerts"] = [o.as_dict() for o in outcomes]
    return outcomes
