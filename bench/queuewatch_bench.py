"""How long queue watch takes on big queues: 100,000 messages in each spool layout.

Builds real spools in a temp dir (Exim split spool with -H/-D files, Postfix deferred hashed by one
character with short ids, Mailman out queue), then times scans: the first (cold metadata for Postfix short
ids, which are stat'ed once), and repeated scans (what every interval costs). Also one full QueueWatch
round over all three. Page cache is warm (the files were just written); a cold-cache figure depends on the disk.

    .venv/bin/python bench/queuewatch_bench.py [--messages 100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from queueguard.queuewatch.service import QueueWatch
from queueguard.queuewatch.spools import exim_id_for_time, scan_exim, scan_mailman, scan_postfix
from queueguard.settings import QueueWatchSettings


def build(root: Path, n: int) -> QueueWatchSettings:
    now = int(time.time())
    exim = root / "exim"
    for c in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz":
        (exim / "input" / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        mid = exim_id_for_time(now - i, i)
        d = exim / "input" / mid[5]
        (d / f"{mid}-H").write_bytes(b"h")
        (d / f"{mid}-D").write_bytes(b"d")
    pf = root / "postfix"
    for q in ("incoming", "active", "deferred", "hold"):
        (pf / q).mkdir(parents=True)
    for i in range(n):
        qid = f"{i:010X}"
        d = pf / "deferred" / qid[-1]
        d.mkdir(exist_ok=True)
        (d / qid).write_bytes(b"q")
    mm = root / "mailman" / "out"
    mm.mkdir(parents=True)
    for i in range(n):
        (mm / f"{now - i}.{i:06d}+{i:040x}.pck").write_bytes(b"p")
    return QueueWatchSettings(exim_spool=exim, postfix_queue=pf, mailman_queue=root / "mailman")


def timed(fn: object, rounds: int) -> tuple[float, float]:
    assert callable(fn)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    n = args.messages
    with tempfile.TemporaryDirectory(prefix="qg-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        settings = build(root, n)
        print(f"built {n:,} messages per spool in {time.perf_counter() - t0:.1f}s under {tmp}")
        assert settings.exim_spool and settings.postfix_queue and settings.mailman_queue
        exim, pf, mm = settings.exim_spool, settings.postfix_queue, settings.mailman_queue

        assert scan_exim(exim).messages == n
        med, worst = timed(lambda: scan_exim(exim), args.rounds)
        print(f"exim split spool, {n:,} messages (frozen not counted above 5,000): median {med * 1000:.0f} ms, "
              f"max {worst * 1000:.0f} ms")

        start = time.perf_counter()
        first = scan_postfix(pf, {}, time.time())
        cold = time.perf_counter() - start
        assert sum(s.messages for s in first) == n
        known = {k: v for s in first for k, v in s.arrivals.items()}
        med, worst = timed(lambda: scan_postfix(pf, known, time.time()), args.rounds)
        print(f"postfix deferred, {n:,} short ids: first scan (stat each) {cold * 1000:.0f} ms; "
              f"later scans median {med * 1000:.0f} ms, max {worst * 1000:.0f} ms")

        assert sum(s.messages for s in scan_mailman(mm)) == n
        med, worst = timed(lambda: scan_mailman(mm), args.rounds)
        print(f"mailman out, {n:,} .pck files: median {med * 1000:.0f} ms, max {worst * 1000:.0f} ms")

        watch = QueueWatch(settings)
        asyncio.run(watch.collect())
        med, worst = timed(lambda: asyncio.run(watch.collect()), args.rounds)
        print(f"QueueWatch round over all three ({3 * n:,} messages, incl. departures diff and metrics): "
              f"median {med * 1000:.0f} ms, max {worst * 1000:.0f} ms")
        rss = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                       if line.startswith("VmHWM")).split()[1])
        print(f"peak RSS of this process: {rss / 1024:.0f} MiB (python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
