"""Disk and inode floors on a real small filesystem (tmpfs): 4xx instead of filling it, guard keeps running."""

from __future__ import annotations

import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from queueguard.harness.guard import Guard
from queueguard.harness.sink import RecordingSink
from queueguard.model import Connection, RuleHit, Transaction, parse_ip
from queueguard.quarantine import QuarantineFull, QuarantineStore
from queueguard.verdict import quarantine


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs with 64 inodes, unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,nr_inodes=64,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


async def put(store: QuarantineStore, raw: bytes) -> str:
    txn = Transaction(Connection(parse_ip("192.0.2.1")), "s@spam.example", recipients=["r@example.org"])
    return await store.put(
        txn, raw, quarantine("Ok", reason="pattern", rule="r"), [RuleHit("r", "pattern", "quarantine")], {}
    )


async def test_byte_floor(small_fs: Path) -> None:
    store = QuarantineStore(small_fs / "q", min_free_bytes=512 * 1024, min_free_inodes=0)
    stored = []
    with pytest.raises(QuarantineFull, match="bytes free"):
        for _ in range(50):
            stored.append(await put(store, b"Subject: big\r\n\r\n" + b"x" * 200_000))
    assert 3 <= len(stored) < 10
    assert all(store.get(q) is not None and len(store.raw(q)) == 200_016 for q in stored)
    free = store.filesystem()["free_bytes"]
    assert free >= 512 * 1024 - 200_000, "the floor was crossed"


async def test_inode_floor(small_fs: Path) -> None:
    store = QuarantineStore(small_fs / "q", min_free_bytes=0, min_free_inodes=20)
    stored = []
    with pytest.raises(QuarantineFull, match="inodes free"):
        for _ in range(64):
            stored.append(await put(store, b"Subject: small\r\n\r\nx\r\n"))
    assert stored and all(store.get(q) is not None for q in stored)
    assert store.filesystem()["free_inodes"] >= 20


def test_guard_answers_452_when_quarantine_full_and_keeps_running(small_fs: Path, tmp_path: Path) -> None:
    policy = "patterns:\n  - name: hold-wave\n    subject: 'wave'\n    action: quarantine\n"
    with (
        RecordingSink() as sink,
        Guard(
            {
                "downstreams": [{"address": f"127.0.0.1:{sink.port}"}],
                "quarantine": {"directory": str(small_fs / "q"), "min_free_bytes": 600 * 1024, "min_free_inodes": 10},
            },
            {"p.yaml": policy},
            workdir=tmp_path,
        ) as guard,
    ):
        replies = []
        for i in range(12):
            with guard.smtp() as c:
                msg = f"Subject: wave {i}\r\n\r\n".encode() + (b"y" * 998 + b"\r\n") * 250
                try:
                    c.sendmail("s@spam.example", ["info@example.org"], msg)
                    replies.append("250")
                except smtplib.SMTPDataError as e:
                    replies.append(f"{e.smtp_code} {e.smtp_error.decode()}")
        assert replies[0] == "250"
        refused = [r for r in replies if r != "250"]
        assert refused and all(r.startswith("452 4.3.1") for r in refused), replies
        assert sink.messages == []  # nothing held was delivered
        with guard.smtp() as c:  # still running and delivering what is not held
            c.sendmail("a@good.example", ["info@example.org"], b"Subject: hello\r\n\r\nhi\r\n")
        assert len(sink.messages) == 1
        stored = QuarantineStore(small_fs / "q").list()
        assert len(stored) == replies.count("250")
