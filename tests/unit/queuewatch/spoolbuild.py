"""Build real spool directories the way each MTA lays them out (shared by unit and integration tests)."""

from __future__ import annotations

import os
from pathlib import Path

from queueguard.queuewatch.spools import exim_id_for_time, postfix_long_id_for_time


def exim_message(spool: Path, arrived: int, pid: int, *, split: bool = False, frozen: bool = False) -> str:
    """An Exim message: <id>-H (flag lines as Exim writes them) and <id>-D; returns the id."""
    mid = exim_id_for_time(arrived, pid)
    directory = spool / "input" / (mid[5] if split else "")
    directory.mkdir(parents=True, exist_ok=True)
    flags = f"-frozen {arrived + 60}\n" if frozen else ""
    (directory / f"{mid}-H").write_text(
        f"{mid}-H\nDebian-exim 106 110\n<sender@example.org>\n{arrived} 0\n-received_time_usec .000000\n"
        f"-ident Debian-exim\n{flags}XX\n1\nrcpt@example.net\n\n049P Received: from x\n"
    )
    (directory / f"{mid}-D").write_text(f"{mid}-D\nbody\n")
    return mid


def postfix_message(queue_dir: Path, queue: str, name: str, mtime: float | None = None) -> Path:
    """A Postfix queue file hashed one level by the first character, as Postfix does by default."""
    sub = queue_dir / queue / name[0]
    sub.mkdir(parents=True, exist_ok=True)
    path = sub / name
    path.write_bytes(b"C 1 2 3\n")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def postfix_long(arrived: int, n: int) -> str:
    return postfix_long_id_for_time(arrived, usec=n % 1_000_000, inode=1000 + n)


def mailman_message(queue_dir: Path, queue: str, enqueued: float, n: int, suffix: str = ".pck") -> Path:
    d = queue_dir / queue
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{enqueued!r}+{n:040x}{suffix}"
    path.write_bytes(b"\x80\x04pickle")
    return path
