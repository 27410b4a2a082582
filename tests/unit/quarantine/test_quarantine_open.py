"""Opening the quarantine index when openers meet: processes (the daemon's workers, the CLI) and threads
(the recovery and summary tasks) all opening a fresh store at the same moment."""

from __future__ import annotations

import multiprocessing

from queueguard.model import new_id


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
