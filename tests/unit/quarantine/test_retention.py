"""quarantine.retention: the daemon deletes what is older, and nothing younger."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from queueguard.app import expire_quarantine
from queueguard.model import Connection, Transaction
from queueguard.quarantine.store import QuarantineStore
from queueguard.verdict import quarantine

DAY = 86400.0


async def test_expire_removes_only_entries_past_retention(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    store = QuarantineStore(tmp_path / "q", clock=lambda: now[0])
    txn = Transaction(Connection(ipaddress.ip_address("192.0.2.1")), "a@example.net", recipients=["b@example.org"])
    verdict = quarantine("held", reason="burst", rule="wave")
    old = [await store.put(txn, b"Subject: old\r\n\r\nx\r\n", verdict, [], {}) for _ in range(2)]
    now[0] += 10 * DAY
    young = await store.put(txn, b"Subject: new\r\n\r\nx\r\n", verdict, [], {})
    assert expire_quarantine(store, 5 * DAY, now[0]) == 2
    assert [e.id for e in store.list()] == [young]
    assert all(store.get(q) is None for q in old)
    assert expire_quarantine(store, 5 * DAY, now[0]) == 0
