"""Crash safety: a process writing quarantine entries, SIGKILLed at random points, leaves complete entries or none.

The writer prints each id only after `put` returned — the moment the pipeline
would answer 250 — so every printed id must be a complete entry afterwards:
no sender got a 250 for a message that is not stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from queueguard.quarantine import QuarantineStore

WRITER = r"""
import asyncio, os, sys
from queueguard.model import Connection, RuleHit, Transaction, parse_ip
from queueguard.quarantine import QuarantineStore
from queueguard.verdict import quarantine

async def main() -> None:
    store = QuarantineStore(sys.argv[1])
    seed = int(sys.argv[2])
    n = 0
    while True:
        n += 1
        size = (seed * 7919 + n * 104729) % 3_000_000 + 100
        raw = b"Subject: wave %d\r\n\r\n" % n + (b"%d-%d " % (seed, n)) * (size // 10)
        txn = Transaction(Connection(parse_ip("192.0.2.1"), helo="h"), "s@spam.example", recipients=["r@example.org"])
        qid = await store.put(txn, raw, quarantine("Ok", reason="burst", rule="wave"),
                              [RuleHit("wave", "burst", "quarantine")], {"body": "b00:1"})
        sys.stdout.write(qid + "\n")
        sys.stdout.flush()

asyncio.run(main())
"""


def complete(store: QuarantineStore, qid: str) -> bool:
    eml, meta_path = store.paths(qid)
    meta = json.loads(meta_path.read_bytes())
    raw = eml.read_bytes()
    return meta["size"] == len(raw) and meta["sha256"] == hashlib.sha256(raw).hexdigest()


def test_sigkill_during_writes_leaves_complete_entries_or_none(tmp_path: Path) -> None:
    qdir = tmp_path / "q"
    rng = random.Random(42)
    acknowledged: list[str] = []
    for round_ in range(12):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(qdir), str(round_)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the first entry is in (start-up takes long on a loaded box) ...
        time.sleep(rng.random() * 0.3)  # ... then somewhere inside a later write
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL, err.decode()
        acknowledged += (first + out).decode().split()

    store = QuarantineStore(qdir)
    assert len(acknowledged) >= 12, "the writer never got an entry in: the test would prove nothing"
    for qid in acknowledged:
        assert store.get(qid) is not None, f"{qid} was acknowledged but is not stored"
        assert complete(store, qid), f"{qid} is incomplete"

    # every entry on disk is complete; leftovers are temp files or .eml files without metadata,
    # which are not entries
    meta_files = list((qdir / "msg").glob("*/*.json"))
    for m in meta_files:
        assert complete(store, m.stem)
    leftovers = [
        p
        for p in (qdir / "msg").glob("*/*")
        if p.suffix != ".json" and not (p.suffix == ".eml" and p.with_suffix(".json").exists())
    ]
    assert all(p.name.endswith(".tmp") or p.suffix == ".eml" for p in leftovers)
    assert {e.id for e in store.list()} <= {m.stem for m in meta_files}
    store.recover()
    assert {e.id for e in store.list()} == {m.stem for m in meta_files}
    assert set(acknowledged) <= {m.stem for m in meta_files}
