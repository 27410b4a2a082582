"""Opening the quarantine index when openers meet: processes (the daemon's workers, the CLI) and threads
(the recovery and summary tasks) all opening a fresh store at the same moment.

Before the fix every run of the stress test below failed, a few of its 30 rounds with `database is
locked`: switching a fresh index to WAL upgrades a read lock to a write lock, and SQLite gives up on
that upgrade at once instead of waiting for the busy timeout.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.synchronize
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from queueguard.model import Connection, RuleHit, Transaction, new_id, parse_ip
from queueguard.pipeline import Pipeline
from queueguard.policy.schema import Policy
from queueguard.quarantine import QuarantineError, QuarantineStore
from queueguard.stage import MessageContext, StageResult
from queueguard.verdict import quarantine

ROUNDS = 30
PROCESSES = 4
RAW = b"Subject: wave\r\n\r\nbody\r\n"


def _txn() -> Transaction:
    return Transaction(Connection(parse_ip("198.51.100.7"), helo="spam.example"), "a@spam.example",
                       recipients=["info@example.org"])


class _Problems(logging.Handler):
    """Collects what the store logs at WARNING and above: a summary that could not read the index is
    logged, not raised, and counts as a failure here as much as an exception does."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


def _call(fn: Callable[[], object], name: str, failures: list[str]) -> None:
    try:
        fn()
    except Exception as e:
        failures.append(f"{name}: {type(e).__name__}: {e}")


def _opener(dirs: list[Path], barrier: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue[list[str]],
            ) -> None:
    """One process: per round, three threads make the first calls of the daemon and the CLI at once."""
    problems = _Problems()
    logging.getLogger("queueguard.quarantine").addHandler(problems)
    failures: list[str] = []
    for d in dirs:
        store = QuarantineStore(d)
        calls: list[Callable[[], object]] = [
            store.recover,  # the daemon's recovery task; the CLI's list and stats
            lambda store=store: store.summary(force=True),  # the daemon's summary refresher
            lambda store=store: store.put_sync(_txn(), RAW, quarantine("Ok", reason="burst", rule="wave"),
                                               [RuleHit("wave", "burst", "quarantine")], {}),  # a worker's put
        ]
        barrier.wait(timeout=60)
        threads = [threading.Thread(target=_call, args=(fn, d.parent.name, failures)) for fn in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    out.put(failures + [f"logged: {m}" for m in problems.seen])


def test_processes_and_threads_open_a_fresh_store_at_once(tmp_path: Path) -> None:
    dirs = [tmp_path / f"r{i:02d}" / "q" for i in range(ROUNDS)]
    ctx = multiprocessing.get_context("fork")  # the test process has no threads of its own running
    barrier = ctx.Barrier(PROCESSES)
    out: multiprocessing.Queue[list[str]] = ctx.Queue()
    procs = [ctx.Process(target=_opener, args=(dirs, barrier, out)) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    failures = [f for _ in procs for f in out.get(timeout=120)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert failures == [], f"{len(failures)} failed openings, e.g. {failures[:5]}"
    for d in dirs:
        with sqlite3.connect(d / "index.sqlite") as db:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert db.execute("SELECT COUNT(*) FROM entries").fetchone() == (PROCESSES,)
        assert len(list((d / "msg").glob("*/*.json"))) == PROCESSES


def _ids(out: multiprocessing.Queue[list[str]]) -> None:
    out.put([new_id()[-8:] for _ in range(4)])


def test_forked_workers_draw_their_own_ids() -> None:
    """Workers forked from one daemon put into one directory: the same ids in the same millisecond
    would make one rename replace the other's message."""
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[list[str]] = ctx.Queue()
    procs = [ctx.Process(target=_ids, args=(out,)) for _ in range(2)]
    for p in procs:
        p.start()
    first, second = out.get(timeout=30), out.get(timeout=30)
    for p in procs:
        p.join(timeout=30)
    mine = [new_id()[-8:] for _ in range(4)]
    assert not set(first) & set(second) and not set(first) & set(mine), (first, second, mine)


def _foreign_writer(index: Path) -> sqlite3.Connection:
    """Another opener (an admin's sqlite3 shell, a backup, another store) holding the write lock of a
    fresh index: what made the switch to WAL fail at once."""
    index.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(index, isolation_level=None, check_same_thread=False)
    db.execute("BEGIN IMMEDIATE")
    return db


def test_open_waits_for_another_opener_to_finish(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path / "q")
    foreign = _foreign_writer(store.index_path)
    release = threading.Timer(0.3, foreign.commit)
    release.start()
    try:
        assert store.recover() == {"indexed": 0, "dropped": 0, "removed": 0}
    finally:
        release.join()
        foreign.close()
    with sqlite3.connect(store.index_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


class _Quarantines:
    """A message check answering quarantine (the pipeline's contract, not a mock of a component)."""

    name = "always-quarantine"

    async def on_message(self, ctx: MessageContext) -> StageResult:
        return StageResult([RuleHit("wave", "burst", "quarantine")])


async def test_an_index_that_cannot_be_opened_is_a_logged_451_never_a_250(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = QuarantineStore(tmp_path / "q", open_timeout=0.2)
    pipeline = Pipeline(frontend="test", policy=Policy, message_checks=[_Quarantines()], quarantine=store)
    session = pipeline.open(Connection(parse_ip("198.51.100.7")))
    foreign = _foreign_writer(store.index_path)  # held past the store's deadline
    try:
        with pytest.raises(QuarantineError, match=r"index\.sqlite: cannot set it up: database is locked"):
            store.recover()
        await session.mail("a@spam.example")
        await session.rcpt("info@example.org")
        with caplog.at_level(logging.ERROR, logger="queueguard.pipeline"):
            verdict = (await session.data(RAW)).verdict
        assert verdict.reply().startswith("451 4.3.0"), verdict.reply()
        assert "quarantine write failed" in caplog.text and "database is locked" in caplog.text
        assert not list(store.msg_dir.rglob("*")), "nothing half-stored"
        assert store.summary(force=True) == {}  # logged, see the stress test; not raised into the refresher
    finally:
        foreign.commit()
        foreign.close()
    await session.mail("a@spam.example")
    await session.rcpt("info@example.org")
    verdict = (await session.data(RAW)).verdict
    assert verdict.code == 250 and verdict.text.startswith("Ok: quarantined as ")
    assert [e.id for e in store.list()] == [verdict.text.removeprefix("Ok: quarantined as ")]



async def test_an_index_locked_after_setup_is_a_quarantine_error_naming_it(tmp_path: Path) -> None:
    """Set up fine, then another writer holds the index past the deadline (a long `purge`, a
    backup tool): listing, deleting and releasing say which file and why, as QuarantineError
    (451 in the pipeline, one line from the CLI), never a bare sqlite3 exception."""
    store = QuarantineStore(tmp_path / "q", open_timeout=0.2)
    qid = store.put_sync(_txn(), RAW, quarantine("Ok", reason="burst", rule="wave"),
                         [RuleHit("wave", "burst", "quarantine")], {})
    foreign = _foreign_writer(store.index_path)
    try:
        for action in (lambda: store.mark_released(qid, "250 Ok", "mx"), lambda: store.delete(qid)):
            with pytest.raises(QuarantineError, match=r"quarantine index .*index\.sqlite: database is locked"):
                action()
    finally:
        foreign.commit()
        foreign.close()
    assert store.delete(qid)
