"""Filesystem space and inodes, and which processes run (from /proc)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAILMAN_RUNNERS = ("archive", "bounces", "command", "in", "out", "pipeline", "virgin")
"""Expected Mailman runners when settings name none: the ones that move list mail."""


@dataclass(frozen=True)
class FsUsage:
    path: str
    free_bytes: int
    size_bytes: int
    free_inodes: int
    inodes: int
    """0 on filesystems without a fixed inode table (btrfs): inode checks do not apply."""


def fs_usage(path: Path) -> FsUsage:
    """Space and inodes left to unprivileged writers (f_bavail, f_favail): what the MTA sees."""
    st = os.statvfs(path)
    return FsUsage(str(path), st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, st.f_favail, st.f_files)


@dataclass(frozen=True)
class Proc:
    pid: int
    comm: str
    argv: tuple[str, ...]


def list_processes(proc_root: Path = Path("/proc")) -> list[Proc]:
    """All processes visible in /proc; ones that exit while we read are skipped."""
    procs = []
    with os.scandir(proc_root) as it:
        pids = [e.name for e in it if e.name.isdigit()]
    for pid in pids:
        base = proc_root / pid
        try:
            # bytes, not read_text(): a process can name itself anything, and one name that
            # is not UTF-8 must not fail the whole round
            comm = (base / "comm").read_bytes().decode(errors="replace").rstrip("\n")
            raw = (base / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
        procs.append(Proc(int(pid), comm, argv))
    return procs


def process_matches(name: str, proc: Proc) -> bool:
    """By kernel name (15 chars), program basename, or script basename (`python3 /usr/bin/x`)."""
    return proc.comm == name or name in (_basename(proc.argv, 0), _basename(proc.argv, 1))


def count_processes(names: Iterable[str], procs: Sequence[Proc]) -> dict[str, int]:
    return {n: sum(1 for p in procs if process_matches(n, p)) for n in names}


def mailman_runner_name(proc: Proc) -> str | None:
    """Runner of a Mailman 3 runner process: `python3 .../bin/runner -C cfg --runner=out:0:1` -> 'out'."""
    if "runner" not in (_basename(proc.argv, 0), _basename(proc.argv, 1)):
        return None
    args = proc.argv
    for i, arg in enumerate(args):
        value = None
        if arg.startswith("--runner="):
            value = arg[len("--runner="):]
        elif arg in ("--runner", "-r") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("-r") and len(arg) > 2 and not arg.startswith("--"):
            value = arg[2:]
        if value:
            return value.split(":", 1)[0]
    return None


def count_runners(procs: Sequence[Proc]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in procs:
        runner = mailman_runner_name(p)
        if runner:
            counts[runner] = counts.get(runner, 0) + 1
    return counts


def _basename(argv: tuple[str, ...], i: int) -> str:
    return os.path.basename(argv[i]) if len(argv) > i else ""
