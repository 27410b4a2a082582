"""The durable quarantine: store, its protocol for the pipeline, and the `queueguard quarantine` CLI."""

from queueguard.quarantine.protocol import Quarantine, QuarantineError, QuarantineFull
from queueguard.quarantine.store import Entry, Filter, InvalidId, QuarantineStore

__all__ = ["Entry", "Filter", "InvalidId", "Quarantine", "QuarantineError", "QuarantineFull", "QuarantineStore"]
