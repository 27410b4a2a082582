"""Admission at the door under memory pressure, whether or not we scan.

In the 2022 incident (`shared/incidents/2022-10-17-...`) the ticket system's
own workers took the memory and clamd was the victim: the host needs
protecting from a wave even where no scanner runs. The governor's level
(PSI, MemAvailable, cgroup usage, clamd RSS where there is a clamd) decides:
  shed     new connections get 421 4.3.2, new recipients 451 4.3.2
  soften   recipients of a transaction already rate-limited, and messages
           larger than `pressure.soften.defer_larger_than`, get 451 4.3.2;
           the scan gate (when scanning) runs `pressure.soften.scan_concurrency`
           scans at once
  normal   nothing changes
Deferring loses nothing: senders retry, and the cost of a deferral is a few
bytes while the cost of admitting is a parse, a scan and a delivery.
"""

from __future__ import annotations

from queueguard import metrics
from queueguard.model import Connection, RuleHit, Transaction
from queueguard.policy.schema import Policy
from queueguard.pressure.governor import Governor, Level
from queueguard.stage import NOTHING, MessageContext, RcptContext, StageResult


def rate_limited(txn: Transaction) -> bool:
    """Some enforced rate limit already hit this transaction."""
    return any(h.kind == "ratelimit" and not h.shadow for h in txn.hits)


class Admission:
    """A ConnectCheck, an RcptCheck and a MessageCheck (queueguard/stage.py) over one governor."""

    name = "pressure"

    def __init__(self, governor: Governor) -> None:
        self.governor = governor

    def level(self, policy: Policy) -> Level:
        return self.governor.current(policy.pressure)

    def _defer(self, reason: str, detail: str | None = None) -> StageResult:
        metrics.pressure_deferrals.labels(reason).inc()
        return StageResult([RuleHit(reason, "pressure", "tempfail", detail=detail or self.governor.reason or "")])

    async def on_connect(self, conn: Connection, policy: Policy) -> StageResult:
        return self._defer("shed") if self.level(policy) is Level.SHED else NOTHING

    def on_disconnect(self, conn: Connection) -> None:
        """Nothing to give back: admission counts no connections."""

    async def on_rcpt(self, ctx: RcptContext) -> StageResult:
        level = self.level(ctx.policy)
        if level is Level.SHED:
            return self._defer("shed")
        if level is Level.SOFTEN and ctx.policy.pressure.soften.defer_rate_limited and rate_limited(ctx.txn):
            return self._defer("soften_rate_limited")
        return NOTHING

    async def on_end(self, txn: Transaction, passed: bool) -> None:
        """Nothing to record: admission keeps no budget."""

    async def on_message(self, ctx: MessageContext) -> StageResult:
        level = self.level(ctx.policy)
        soften = ctx.policy.pressure.soften
        if level is Level.SHED:
            return self._defer("shed")
        if level is Level.SOFTEN:
            if len(ctx.raw) > soften.defer_larger_than:
                return self._defer("soften_size", f"{len(ctx.raw)} bytes")
            if soften.defer_rate_limited and rate_limited(ctx.txn):
                return self._defer("soften_rate_limited")
        return NOTHING

    def status(self) -> dict[str, object]:
        return self.governor.status()
