"""Spool scanners on real directories laid out like Exim, Postfix and Mailman lay them out."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

from queueguard.queuewatch.spools import (
    QueueScan,
    _exim_entries,
    count_exim_frozen,
    exim_id_for_time,
    exim_id_time,
    mailman_file_time,
    postfix_long_id_for_time,
    postfix_long_id_time,
    scan_exim,
    scan_mailman,
    scan_postfix,
)
from tests.unit.queuewatch.spoolbuild import exim_message, mailman_message, postfix_long, postfix_message

NOW = 1_700_000_000


def test_exim_id_time_base62() -> None:
    # digits 0-9, then A-Z (10-35), then a-z (36-61); the integration test checks real Exim ids
    assert exim_id_time("00000A-000001-00") == 10
    assert exim_id_time("000010-000001-00") == 62
    assert exim_id_time("00000a-000001-00") == 36
    assert exim_id_time("zzzzzz-000001-00") == 62**6 - 1
    assert exim_id_time(exim_id_for_time(NOW, 4242)) == NOW
    # 4.97 long ids keep the same 6-character time prefix
    assert exim_id_time(exim_id_for_time(NOW) + "xxxx") == NOW


@pytest.mark.parametrize("bad", ["", "1qZq", "1q_qkO-0004Vf-2b"])
def test_exim_id_time_rejects_garbage(bad: str) -> None:
    assert exim_id_time(bad) is None


def test_postfix_long_id_roundtrip_and_short_ids() -> None:
    qid = postfix_long_id_for_time(NOW, usec=123456, inode=98765)
    assert postfix_long_id_time(qid) == NOW
    assert postfix_long_id_time("3F1B2C4D5E") is None  # short id: hex, no time in it
    assert postfix_long_id_time("4SpA6R0mQ1z1") is None  # vowels are not in the alphabet
    assert postfix_long_id_time("4SpB6R0mQ1z1z") is None  # z only separates, never an inode digit


def test_mailman_file_time() -> None:
    assert mailman_file_time("1678200000.123456+0a1b.pck") == pytest.approx(1678200000.123456)
    assert mailman_file_time("no-plus.pck") is None
    assert mailman_file_time("abc+0a1b.pck") is None


def test_exim_flat_and_split_spool_counts_ages_and_frozen(tmp_path: Path) -> None:
    ids = [exim_message(tmp_path, NOW - 3600, 1)]
    ids += [exim_message(tmp_path, NOW - 60 * i, 10 + i, split=True) for i in range(1, 6)]
    ids.append(exim_message(tmp_path, NOW - 7200, 99, split=True, frozen=True))
    # noise Exim leaves in input/: journal and a half-written header, neither is a message
    (tmp_path / "input" / f"{ids[0]}-J").write_text("j")
    (tmp_path / "input" / "hdr.12345").write_text("h")
    scan = scan_exim(tmp_path)
    assert scan.mta == "exim" and scan.queue == "main"
    assert scan.messages == 7
    assert set(scan.arrivals) == set(ids)
    assert scan.oldest_arrival() == NOW - 7200
    assert scan.frozen == 1


def test_exim_frozen_unknown_above_the_limit(tmp_path: Path) -> None:
    for i in range(5):
        exim_message(tmp_path, NOW - i, i, frozen=True)
    assert scan_exim(tmp_path, frozen_limit=5).frozen == 5
    assert scan_exim(tmp_path, frozen_limit=4).frozen is None
    assert scan_exim(tmp_path, frozen_limit=4).messages == 5


def test_exim_empty_and_missing_spool(tmp_path: Path) -> None:
    (tmp_path / "input").mkdir()
    assert scan_exim(tmp_path).messages == 0
    assert scan_exim(tmp_path).oldest_arrival() is None
    with pytest.raises(FileNotFoundError):
        scan_exim(tmp_path / "nope")


def test_postfix_queues_hashed_long_and_short_ids(tmp_path: Path) -> None:
    for q in ("incoming", "active", "deferred", "hold"):
        (tmp_path / q).mkdir()
    postfix_message(tmp_path, "active", postfix_long(NOW - 500, 1))
    postfix_message(tmp_path, "incoming", "A1B2C3D4E5", mtime=NOW - 30)
    # deferred: Postfix sets mtime to the next retry (future); the estimate falls back to ctime (now)
    postfix_message(tmp_path, "deferred", "B00000000F", mtime=NOW + 3600)
    postfix_message(tmp_path, "deferred", postfix_long(NOW - 86400, 2), mtime=NOW + 600)
    deep = tmp_path / "hold" / "C" / "D"  # hash_queue_depth = 2
    deep.mkdir(parents=True)
    (deep / "CD12345678").write_bytes(b"x")
    os.utime(deep / "CD12345678", (NOW - 100, NOW - 100))
    scans = {s.queue: s for s in scan_postfix(tmp_path, {}, now=NOW)}
    assert [scans[q].messages for q in ("incoming", "active", "deferred", "hold")] == [1, 1, 2, 1]
    assert scans["active"].oldest_arrival() == NOW - 500
    assert scans["incoming"].oldest_arrival() == NOW - 30
    assert scans["deferred"].oldest_arrival() == NOW - 86400
    assert scans["deferred"].arrivals["B00000000F"] <= NOW  # never in the future
    assert scans["hold"].oldest_arrival() == NOW - 100


def test_postfix_known_ids_keep_their_first_estimate(tmp_path: Path) -> None:
    for q in ("incoming", "active", "deferred", "hold"):
        (tmp_path / q).mkdir()
    postfix_message(tmp_path, "deferred", "B00000000F", mtime=NOW + 3600)
    scans = {s.queue: s for s in scan_postfix(tmp_path, {"B00000000F": NOW - 999.0}, now=NOW)}
    assert scans["deferred"].arrivals == {"B00000000F": NOW - 999.0}


def test_postfix_missing_queue_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        scan_postfix(tmp_path, {}, now=NOW)


def test_mailman_queues(tmp_path: Path) -> None:
    for i in range(3):
        mailman_message(tmp_path, "out", NOW - 100 - i, i)
    mailman_message(tmp_path, "out", NOW - 5000, 9, ".bak")  # being delivered by the out runner
    mailman_message(tmp_path, "bad", NOW - 9000, 1, ".psv")
    (tmp_path / "in").mkdir()
    (tmp_path / "out" / "x.tmp").write_bytes(b"")  # not a queue entry
    scans = {s.queue: s for s in scan_mailman(tmp_path)}
    assert sorted(scans) == ["bad", "in", "out"]
    assert scans["out"].messages == 4
    assert scans["out"].oldest_arrival() == pytest.approx(NOW - 5000)
    assert scans["bad"].messages == 1
    assert scans["in"].messages == 0


def test_mailman_queue_name_that_is_not_utf8_becomes_an_escaped_label(tmp_path: Path) -> None:
    """A label holding a lone surrogate cannot be encoded, and failed every /metrics scrape."""
    mailman_message(tmp_path, "in", NOW - 10, 1)
    bad = os.fsencode(tmp_path) + b"/bad\xff"
    os.mkdir(bad)
    open(bad + b"/" + f"{NOW - 20}.5+{2:040x}.pck".encode(), "wb").close()
    scans = {s.queue: s for s in scan_mailman(tmp_path)}
    assert sorted(scans) == ["bad\\xff", "in"]
    assert scans["bad\\xff"].messages == 1
    for queue in scans:
        queue.encode("utf-8")  # raised UnicodeEncodeError


def scan_with_deadline(spool: Path, fifos: list[Path]) -> QueueScan:
    """scan_exim in a thread bounded to 5 s; on a hang, open the FIFOs for writing (which
    releases the blocked reader) and fail."""
    out: list[QueueScan] = []
    worker = threading.Thread(target=lambda: out.append(scan_exim(spool)), daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():
        for fifo in fifos:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5)
        pytest.fail("scan_exim blocked on a FIFO named like a -H file")
    return out[0]


def test_exim_fifo_named_like_a_header_neither_blocks_nor_counts(tmp_path: Path) -> None:
    ids = [exim_message(tmp_path, NOW - 60, 1, frozen=True), exim_message(tmp_path, NOW - 50, 2, split=True)]
    fifos = [tmp_path / "input" / f"{exim_id_for_time(NOW - 30, 3)}-H",
             tmp_path / "input" / ids[1][5] / f"{exim_id_for_time(NOW - 20, 4)}-H"]
    for fifo in fifos:
        os.mkfifo(fifo)
    scan = scan_with_deadline(tmp_path, fifos)
    assert set(scan.arrivals) == set(ids)
    assert scan.frozen == 1


def test_exim_odd_entries_named_like_headers_are_skipped(tmp_path: Path) -> None:
    """A directory, a symlink (even to a real frozen header) and a socket named <id>-H are
    not messages; each once failed the whole Exim watcher or was counted."""
    ids = [exim_message(tmp_path, NOW - 60, 1), exim_message(tmp_path, NOW - 40, 2, frozen=True)]
    inp = tmp_path / "input"
    (inp / f"{exim_id_for_time(NOW - 30, 3)}-H").mkdir()
    (inp / f"{exim_id_for_time(NOW - 25, 4)}-H").symlink_to(inp / f"{ids[1]}-H")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(inp / f"{exim_id_for_time(NOW - 20, 5)}-H"))
    try:
        scan = scan_exim(tmp_path)
    finally:
        sock.close()
    assert set(scan.arrivals) == set(ids)
    assert scan.frozen == 1


def test_exim_frozen_count_skips_what_is_no_longer_a_readable_file(tmp_path: Path) -> None:
    """Between the listing and the read a -H path may become anything: each is skipped alone."""
    frozen = tmp_path / "input" / f"{exim_message(tmp_path, NOW - 60, 1, frozen=True)}-H"
    odd = {"dir": tmp_path / "d-H", "link": tmp_path / "l-H", "fifo": tmp_path / "f-H", "gone": tmp_path / "g-H"}
    odd["dir"].mkdir()
    odd["link"].symlink_to(frozen)  # O_NOFOLLOW: ELOOP
    os.mkfifo(odd["fifo"])
    paths = [str(p) for p in odd.values()]
    out: list[int] = []
    worker = threading.Thread(target=lambda: out.append(count_exim_frozen([*paths, str(frozen)])), daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():
        os.close(os.open(odd["fifo"], os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5)
        pytest.fail("count_exim_frozen blocked on a FIFO")
    assert out == [1]


def test_exim_split_directory_removed_mid_scan(tmp_path: Path) -> None:
    """Listed, then gone before it is read: no messages there, not a failed watcher."""
    flat = exim_message(tmp_path, NOW - 60, 1)
    split = exim_message(tmp_path, NOW - 50, 2, split=True)
    entries = _exim_entries(tmp_path / "input")
    first = next(entries)  # input/ is listed, subdirectory included; subdirectories are read last
    shutil.rmtree(tmp_path / "input" / split[5])
    names = {first[1].name, *(e.name for _, e in entries)}
    assert names == {f"{flat}-H", f"{flat}-D"}
