"""QuarantineStore: exact bytes, metadata, 0600 files, ids that cannot traverse, floors, index, recovery."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from queueguard.model import Connection, RuleHit, Transaction, parse_ip
from queueguard.quarantine import Filter, InvalidId, QuarantineError, QuarantineFull, QuarantineStore
from queueguard.verdict import quarantine

RAW = b"Subject: =?utf-8?q?Mini_Cooper?=\r\nFrom: a@spam.example\r\n\r\nbare\nLF and \x00 bytes kept\r\n"


def txn(
    sender: str = "a@spam.example", rcpts: tuple[str, ...] = ("info@example.org", "bob@example.org")
) -> Transaction:
    conn = Connection(parse_ip("198.51.100.7"), 40000, "mx.spam.example", helo="spam.example", tls=True)
    t = Transaction(conn, sender, recipients=list(rcpts))
    t.route = "default"
    return t


async def put(
    store: QuarantineStore,
    rule: str = "wave",
    sender: str = "a@spam.example",
    raw: bytes = RAW,
    fps: dict[str, str] | None = None,
) -> str:
    hits = [RuleHit(rule, "burst", "quarantine", detail="b01:abc 41>40/600s"), RuleHit("x", "pattern", "tag", True)]
    return await store.put(
        txn(sender),
        raw,
        quarantine("Ok", reason="burst", rule=rule),
        hits,
        fps if fps is not None else {"body": "b00:1111 b01:abc", "burst": "b01:abc"},
    )


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


async def test_put_stores_exact_bytes_and_metadata(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path / "q", clock=Clock())
    qid = await put(store)
    assert store.raw(qid) == RAW
    entry = store.get(qid)
    assert entry is not None
    m = entry.meta
    assert m["id"] == qid and m["time"] == 1_700_000_000.0 and m["size"] == len(RAW)
    assert m["envelope"]["sender"] == "a@spam.example"
    assert m["envelope"]["recipients"] == ["info@example.org", "bob@example.org"]
    assert m["client"]["ip"] == "198.51.100.7" and m["helo"] == "spam.example" and m["client"]["tls"] is True
    assert m["reason"] == "burst" and m["rule"] == "wave"
    assert [h["rule"] for h in m["hits"]] == ["wave", "x"]
    assert m["fingerprints"]["burst"] == "b01:abc"
    assert m["headers"]["subject"] == "Mini Cooper"


async def test_files_are_0600_in_sharded_0700_dirs(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path / "q")
    qid = await put(store)
    eml, meta = store.paths(qid)
    assert eml.parent.name == qid[-2:]
    for f in (eml, meta, store.index_path):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert stat.S_IMODE(eml.parent.stat().st_mode) == 0o700
    assert not [p for p in eml.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "..",
        "",
        "ABCDEF0123456",
        "0123456789ab/../x",
        "0123456789ab\n",
        "/etc/passwd",
        "0" * 33,
        "0123456789a",
    ],
)
def test_ids_cannot_name_other_paths(tmp_path: Path, bad: str) -> None:
    store = QuarantineStore(tmp_path / "q")
    with pytest.raises(InvalidId):
        store.get(bad)
    with pytest.raises(InvalidId):
        store.delete(bad)
    with pytest.raises(InvalidId):
        store.raw(bad)


async def test_floors_raise_quarantine_full(tmp_path: Path) -> None:
    def fake(free_blocks: int, free_inodes: int) -> object:
        st = SimpleNamespace(f_bavail=free_blocks, f_frsize=4096, f_files=1000, f_favail=free_inodes)
        return lambda _path: st

    store = QuarantineStore(tmp_path / "q", 1_000_000, 100, statvfs=fake(100, 10_000))  # type: ignore[arg-type]
    with pytest.raises(QuarantineFull, match="bytes free"):
        await put(store)
    store = QuarantineStore(tmp_path / "q", 1_000_000, 100, statvfs=fake(10_000, 50))  # type: ignore[arg-type]
    with pytest.raises(QuarantineFull, match="inodes free"):
        await put(store)
    assert not list((tmp_path / "q" / "msg").iterdir())


async def test_unwritable_directory_is_quarantine_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(QuarantineError) as e:
        await put(QuarantineStore(blocker / "q"))
    assert not isinstance(e.value, QuarantineFull)


async def test_list_filters(tmp_path: Path) -> None:
    clock = Clock()
    store = QuarantineStore(tmp_path / "q", clock=clock)
    a = await put(store, rule="wave")
    clock.t += 3600
    b = await put(store, rule="mini-cooper", sender="promo@cars.example", fps={"subject": "s:feedbeef"})
    assert [e.id for e in store.list()] == [a, b]
    assert [e.id for e in store.list(Filter(rule="mini-cooper"))] == [b]
    assert [e.id for e in store.list(Filter(rule="x"))] == []  # shadow hits do not count
    assert [e.id for e in store.list(Filter(sender="*@CARS.example"))] == [b]
    assert [e.id for e in store.list(Filter(recipient="bob@*"))] == [a, b]
    assert [e.id for e in store.list(Filter(since=clock.t - 10))] == [b]
    assert [e.id for e in store.list(Filter(until=clock.t - 10))] == [a]
    assert [e.id for e in store.list(Filter(fingerprint="b01:abc"))] == [a]
    assert [e.id for e in store.list(Filter(fingerprint="s:fee"))] == [b]


async def test_release_mark_delete_and_counters(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path / "q")
    qid = await put(store)
    store.mark_released(qid, "250 2.0.0 OK", "127.0.0.1:2526")
    entry = store.get(qid)
    assert entry is not None and entry.released is not None
    assert json.loads(store.paths(qid)[1].read_bytes())["released"]["reply"] == "250 2.0.0 OK"
    assert store.list(Filter(held_only=True)) == []
    assert store.delete(qid) is True
    assert store.delete(qid) is False
    assert store.get(qid) is None and store.list() == []
    assert store.counters() == {"released": 1, "deleted": 1}


async def test_recover_indexes_entries_and_drops_orphans(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path / "q")
    kept = await put(store)
    gone = await put(store)
    with store._db() as db:
        db.execute("DELETE FROM entries WHERE id = ?", (kept,))  # as if the index insert never happened
    store.paths(gone)[1].unlink()  # as if the metadata never committed
    old = store.paths(gone)[0]
    os.utime(old, (0, 0))
    stale_tmp = old.parent / f".{gone}.json.tmp"
    stale_tmp.write_bytes(b"{")
    os.utime(stale_tmp, (0, 0))
    done = store.recover()
    assert done == {"indexed": 1, "dropped": 1, "removed": 2}
    assert [e.id for e in store.list()] == [kept]
    assert not old.exists() and not stale_tmp.exists()


async def test_summary_counts_by_rule(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path / "q")
    await put(store, rule="wave")
    await put(store, rule="wave")
    await put(store, rule="mini")
    assert store.summary() == {"messages": 3, "bytes": 3 * len(RAW), "by_rule": {"wave": 2, "mini": 1}}


async def test_campaign_is_kept_apart_typed_and_selectable(tmp_path: Path) -> None:
    """The burst check passes its campaign in the fingerprints (Campaign.as_dict); the entry keeps it as a
    mapping that show can print, and Filter(campaign=) selects the wave."""
    from queueguard.burst.campaign import Campaign

    store = QuarantineStore(tmp_path / "q", clock=Clock())
    camp = Campaign("1a2b3c4d5e6f70819", 1_699_999_940.5, 57, 3, ("similar-text", "text"))
    a = await put(store, fps={"body": "b00:1111", "burst": "b00:1111", **camp.as_dict()})
    b = await put(store)
    entry = store.get(a)
    assert entry is not None and entry.campaign == camp.id
    assert entry.meta["campaign"] == {"id": camp.id, "first_seen": 1_699_999_940.5,
                                      "first_seen_iso": "2023-11-14T22:12:20Z", "copies": 57, "variants": 3,
                                      "signals": ["similar-text", "text"]}
    assert set(entry.meta["fingerprints"]) == {"body", "burst"}
    assert store.get(b).meta["campaign"] is None  # type: ignore[union-attr]
    assert [e.id for e in store.list(Filter(campaign=camp.id))] == [a]
    assert [e.id for e in store.list(Filter(campaign=f"c:{camp.id}"))] == [a]


async def test_an_8bit_envelope_is_stored_indexed_and_recovered(tmp_path: Path) -> None:
    """Sendmail (and Postfix without SMTPUTF8) pass 8-bit envelope octets through; they reach us as
    surrogate escapes. The index refused them (not UTF-8), so the entry was written but put() failed:
    the sender got 451 and retried, leaving an unlisted copy per retry, and recover() and the CLI
    failed on it. Now stored, indexed, listed, and the envelope kept exactly (for a release)."""
    sender = b"\xe9ric@remote.example".decode("utf-8", "surrogateescape")
    store = QuarantineStore(tmp_path / "q", clock=Clock())
    qid = await put(store, sender=sender)
    assert [e.id for e in store.list()] == [qid]
    entry = store.get(qid)
    assert entry is not None and entry.meta["envelope"]["sender"] == sender
    store.index_path.unlink()
    QuarantineStore(tmp_path / "q", clock=Clock()).recover()
    assert [e.id for e in QuarantineStore(tmp_path / "q").list()] == [qid]


async def test_a_release_claim_is_one_file_for_everyone_who_waits(tmp_path: Path) -> None:
    """A second release that opened the lock file while the first held it locks that same file
    afterwards; a third must not get a claim of its own. Before, the first unlinked the file on
    its way out, so the third made a new one and both delivered."""
    import fcntl

    store = QuarantineStore(tmp_path)
    qid = await put(store)
    lock = store.paths(qid)[0].with_name(f".{qid}.lock")
    with store.claimed(qid) as first:
        assert first
        waiter = os.open(lock, os.O_RDWR)
        with store.claimed(qid) as meanwhile:
            assert not meanwhile
    try:
        fcntl.flock(waiter, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with store.claimed(qid) as third:
            assert not third
    finally:
        os.close(waiter)
    assert store.delete(qid) and not lock.exists()


async def test_a_lock_file_planted_as_a_link_is_not_followed(tmp_path: Path) -> None:
    store = QuarantineStore(tmp_path / "q")
    qid = await put(store)
    target = tmp_path / "elsewhere"
    store.paths(qid)[0].with_name(f".{qid}.lock").symlink_to(target)
    with pytest.raises(OSError), store.claimed(qid):
        pass
    assert not target.exists()
