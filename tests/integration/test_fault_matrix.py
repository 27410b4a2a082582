"""The fault matrix (bench/faults.py) at CI scale: 100 messages per fault, every fault.

Real sending Exim (queue, retries), queueguard, downstream Exim(s), clamd, Redis, a tmpfs and a
memory cgroup; only the garbage-answering downstream is a script (no MTA does that on demand).
Each row must account for every message offered, and its fault must have hit the mail (the
row's witness: an OOM kill, deferrals with the fault's reply, a refused reload ...).

A duplicate is allowed only where SMTP itself cannot avoid one (RFC 1047): the sender's
transaction was cut after the whole body went out, so the downstream may have taken the
message while the sender never heard our 250. Any other duplicate fails the row.
The full-scale table and its command: docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.faults import FAULTS, Fault, run_fault

pytestmark = pytest.mark.integration

MESSAGES = 100


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_every_message_accounted_for(fault: Fault, tmp_path: Path) -> None:
    row = run_fault(fault, MESSAGES, tmp_path)
    assert row.offered == MESSAGES, row
    assert row.lost == 0, (row.lost_ids, row.notes)
    assert not row.unexplained_ids, row.notes
    assert row.delivered + row.quarantined + row.rejected + row.queued == row.offered, row
    assert row.queued == 0, f"still queued at the sender after the fault was removed and its queue flushed: {row}"
    assert row.misplaced == 0, f"held, rejected and clean mail must end where the policy puts them: {row}"
    assert row.witnessed, f"the fault did not hit the mail: {row.witness}"
