"""What the pipeline needs of a quarantine, and the two ways a write can fail.

The pipeline answers 452 4.3.1 for QuarantineFull (the sender keeps the
message and retries) and 451 for any other QuarantineError; it says 250
only after `put` returned an id, i.e. after the message is on disk.
"""

from __future__ import annotations

from typing import Protocol

from queueguard.model import RuleHit, Transaction
from queueguard.verdict import Verdict


class QuarantineError(Exception):
    """The message could not be stored (I/O error, bad directory): answer 451."""


class QuarantineFull(QuarantineError):
    """The quarantine's filesystem is below its free-space or free-inode floor: answer 452 4.3.1."""


class Quarantine(Protocol):
    async def put(
        self, txn: Transaction, raw: bytes, verdict: Verdict, hits: list[RuleHit], fingerprints: dict[str, str]
    ) -> str:
        """Store `raw` exactly as received with its metadata, durably; return the entry's id."""
        ...
