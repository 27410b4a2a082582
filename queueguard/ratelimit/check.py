"""The rate-limit stage: checked at RCPT, recorded after the final verdict.

`on_rcpt` peeks at every rule that applies to this recipient and returns a
hit for each one over its limit; queueguard/resolve.py makes the reply:
  tempfail   -> `451 4.7.1` on this RCPT only; the message's other recipients go on
  reject     -> `550 5.7.1`
  quarantine -> no RCPT verdict: the recipient is accepted and the pipeline
                quarantines the message at end of DATA
A tempfail/reject rule wins over a quarantine rule earlier in the list (deferring
loses nothing; quarantining would take mail a later rule wanted deferred).
Shadow rules over their limit are counted, logged and returned as shadow hits; they
change nothing. Nothing is consumed at RCPT: `on_end` (once the message was
delivered or quarantined) adds one event per accepted recipient to every rule that
applies, so refused mail does not use up budget. Earlier recipients of the same
transaction are counted as pending at RCPT, so one message to 500 recipients cannot
slip under a limit of 100.

Checking and recording apart means concurrent transactions can each see the same
remaining budget: a limit can be overshot by at most the number of messages in
flight for one key at once, which is small next to a flood.

Null sender: bounces are counted like any mail by recipient and client keys; rules
keyed on sender or sender_domain skip them (see `keys`).

When the shared store fails, `policy.state.on_error` decides, as for burst counts
(queueguard/shared_state.py): an in-process limiter, 451 4.3.0, or no rate limits.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from queueguard import metrics
from queueguard.model import RuleHit, Transaction
from queueguard.policy.keys import key_value
from queueguard.policy.match import rule_applies
from queueguard.policy.schema import Mode, Policy, RateLimitRule
from queueguard.ratelimit.gcra import Limit, decide
from queueguard.ratelimit.store import MemoryStore, RateStore
from queueguard.shared_state import SharedState
from queueguard.stage import NOTHING, RcptContext, StageResult

log = logging.getLogger("queueguard.ratelimit")
TOP_WINDOW = 3600.0
TOP_MAX = 1000


def applicable(policy: Policy, txn: Transaction, recipient: str) -> list[tuple[RateLimitRule, str]]:
    """(rule, storage key) for every rate-limit rule that applies to this recipient."""
    out = []
    for rule in policy.ratelimits:
        if rule_applies(rule, policy, txn, recipient):
            key = key_value(rule.key, txn, recipient)
            if key is not None:
                out.append((rule, f"{rule.name}:{key}"))
    return out


@dataclass
class _Pending:
    """Per transaction (Transaction.check_data): the keys each recipient counted against, and how many
    earlier accepted recipients count against each key."""

    by_rcpt: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    """recipient -> (key, emission interval) for every rule that applied to it"""
    counted: int = 0
    counts: Counter[str] = field(default_factory=Counter)

    def sync(self, accepted: list[str]) -> None:
        for rcpt in accepted[self.counted:]:
            self.counts.update(key for key, _ in self.by_rcpt.get(rcpt, ()))
        self.counted = len(accepted)


class RateLimitCheck:
    name = "ratelimit"

    def __init__(
        self, store: RateStore, *, clock: Callable[[], float] = time.time,
        fallback: MemoryStore | None = None, retry_after: float = 5.0,
    ) -> None:
        fallback = fallback if fallback is not None else (
            store if isinstance(store, MemoryStore) else MemoryStore(100_000))
        self.state: SharedState[RateStore] = SharedState("ratelimit", store, fallback, backend=store.name,
                                                         clock=clock, retry_after=retry_after)
        self.clock = clock
        self._top: Counter[tuple[str, str]] = Counter()
        self._top_since = clock()

    # --- the stage ---------------------------------------------------------------------------------

    async def on_rcpt(self, ctx: RcptContext) -> StageResult:
        txn, policy = ctx.txn, ctx.policy
        items = applicable(policy, txn, ctx.recipient)
        pending = txn.check_data(_Pending)
        pending.sync(txn.recipients)
        pending.by_rcpt[ctx.recipient] = [(k, Limit.of(rule).interval) for rule, k in items]
        if not items:
            return NOTHING
        tats = await self.state.run(policy.state.on_error, lambda s: s.peek([k for _, k in items]))
        if tats is None:
            return NOTHING
        now = self.clock()
        hits: list[RuleHit] = []
        for (rule, key), tat in zip(items, tats, strict=True):
            d = decide(tat, now, Limit.of(rule), pending.counts[key] + 1)
            if d.allowed:
                continue
            shadow = rule.mode is Mode.shadow
            detail = f"key={key.partition(':')[2]} retry_after={d.retry_after:.0f}s"
            hits.append(RuleHit(rule.name, "ratelimit", rule.action, shadow, detail, ctx.recipient, d.retry_after))
            (metrics.ratelimit_shadow_hits if shadow else metrics.ratelimit_hits).labels(rule.name, rule.action).inc()
            if not shadow:
                self._count_limited(rule.name, key.partition(":")[2], now)
            log.info("ratelimit %s%s %s rcpt=%s %s txn=%s", rule.name, " (shadow) would" if shadow else ":",
                     rule.action, ctx.recipient, detail, txn.id)
        return StageResult(hits) if hits else NOTHING

    async def on_end(self, txn: Transaction, passed: bool) -> None:
        """For mail that went through: one event per accepted recipient for every rule that
        applies (as found at its RCPT: the pinned policy and the envelope have not changed since)."""
        policy = txn.policy
        if not passed or not txn.recipients or not isinstance(policy, Policy):
            return
        pending = txn.check_data(_Pending)
        increments: dict[str, float] = {}
        for rcpt in txn.recipients:
            found = pending.by_rcpt.get(rcpt)
            if found is None:
                found = [(key, Limit.of(rule).interval) for rule, key in applicable(policy, txn, rcpt)]
            for key, interval in found:
                increments[key] = increments.get(key, 0.0) + interval
        if not increments:
            return
        now = self.clock()
        updates = list(increments.items())
        await self.state.run(policy.state.on_error, lambda s: s.advance(updates, now))

    def _count_limited(self, rule: str, key: str, now: float) -> None:
        """For the status page: the most-limited keys, over roughly the last hour, bounded."""
        if now - self._top_since > TOP_WINDOW:
            self._top.clear()
            self._top_since = now
        self._top[(rule, key)] += 1
        if len(self._top) > TOP_MAX:
            self._top = Counter(dict(self._top.most_common(TOP_MAX // 2)))

    def status(self) -> dict[str, object]:
        state = self.state
        return {
            "top": [{"key": key, "rule": rule, "count": n} for (rule, key), n in self._top.most_common(10)],
            "backend": state.backend,
            "shared_state_down": state.down,
            "keys_tracked": state.shared.tracked(),
            "fallback_keys": state.fallback.tracked() if state.fallback is not state.shared else None,
        }

    async def close(self) -> None:
        await self.state.shared.close()
