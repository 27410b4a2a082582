"""The rate-limit stage: checked at RCPT, recorded after the final verdict.

`on_rcpt` peeks at every rule that applies to this recipient and answers
with the first enforced rule that is over its limit:
  tempfail   -> `451 4.7.1` on this RCPT only; the message's other recipients go on
  reject     -> `550 5.7.1`
  quarantine -> no RCPT verdict: the recipient is accepted and a RuleHit with
                action "quarantine" is returned; the pipeline quarantines the
                message at end of DATA when it sees such a hit
A tempfail/reject rule wins over a quarantine rule earlier in the list (deferring
loses nothing; quarantining would take mail a later rule wanted deferred).
Shadow rules over their limit are counted, logged and returned as shadow hits; they
change nothing. Nothing is consumed at RCPT: `commit` (called once the message was
delivered or quarantined) adds one event per accepted recipient to every rule that
applies, so refused mail does not use up budget. Earlier recipients of the same
transaction are counted as pending at RCPT, so one message to 500 recipients cannot
slip under a limit of 100.

Checking and recording apart means concurrent transactions can each see the same
remaining budget: a limit can be overshot by at most the number of messages in
flight for one key at once, which is small next to a flood.

Null sender: bounces are counted like any mail by recipient and client keys; rules
keyed on sender or sender_domain skip them (see `keys`).

When the shared store fails, `policy.state.on_error` decides: `fallback` (default)
uses an in-process limiter until the store answers again (retried every
`retry_after` seconds; logged once per outage, `ratelimit_fallback_active` = 1),
`tempfail` answers `451 4.3.0`, `accept` skips rate limits. Never a 5xx, never an
exception.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from queueguard import metrics
from queueguard.model import RuleHit, Transaction
from queueguard.policy.keys import key_value
from queueguard.policy.match import rule_applies
from queueguard.policy.schema import Mode, Policy, RateLimitRule
from queueguard.ratelimit.gcra import Limit, decide
from queueguard.ratelimit.store import MemoryStore, RateStore
from queueguard.stage import NOTHING, RcptContext, StageResult
from queueguard.verdict import Verdict, reject, tempfail

log = logging.getLogger("queueguard.ratelimit")
TOP_WINDOW = 3600.0
TOP_MAX = 1000
T = TypeVar("T")

STATE_UNAVAILABLE = tempfail(
    "4.3.0", "Temporary local problem (rate-limit state unavailable), please try again later",
    reason="ratelimit_state",
)


def applicable(policy: Policy, txn: Transaction, recipient: str) -> list[tuple[RateLimitRule, str]]:
    """(rule, storage key) for every rate-limit rule that applies to this recipient."""
    out = []
    for rule in policy.ratelimits:
        if rule_applies(rule, policy, txn, recipient):
            key = key_value(rule.key, txn, recipient)
            if key is not None:
                out.append((rule, f"{rule.name}:{key}"))
    return out


def verdict_for(rule: RateLimitRule, retry_after: float) -> Verdict | None:
    if rule.action == "tempfail":
        return tempfail("4.7.1", f"Rate limit exceeded (rule {rule.name}), try again in {max(1, round(retry_after))}s",
                        reason="ratelimit", rule=rule.name)
    if rule.action == "reject":
        return reject("5.7.1", f"Rate limit exceeded (rule {rule.name})", reason="ratelimit", rule=rule.name)
    return None


@dataclass
class _Pending:
    """Per transaction: the keys each recipient counted against, and how many earlier
    accepted recipients count against each key."""

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
        self.store = store
        self.fallback = fallback if fallback is not None else (
            store if isinstance(store, MemoryStore) else MemoryStore(100_000))
        self.clock = clock
        self.retry_after = retry_after
        self._down_until: float | None = None
        self._pending: dict[int, _Pending] = {}
        self._top: Counter[tuple[str, str]] = Counter()
        self._top_since = clock()

    # --- the stage ---------------------------------------------------------------------------------

    async def on_rcpt(self, ctx: RcptContext) -> StageResult:
        txn, policy = ctx.txn, ctx.policy
        items = applicable(policy, txn, ctx.recipient)
        pending = self._pending_for(txn)
        pending.by_rcpt[ctx.recipient] = [(k, Limit.of(rule).interval) for rule, k in items]
        if not items:
            return NOTHING
        tats = await self._with_store(policy, lambda s: s.peek([k for _, k in items]))
        if tats is None:
            return StageResult(STATE_UNAVAILABLE) if policy.state.on_error == "tempfail" else NOTHING
        now = self.clock()
        verdict: Verdict | None = None
        acted: list[RuleHit] = []
        shadow_hits: list[RuleHit] = []
        quarantine_hits: list[RuleHit] = []
        for (rule, key), tat in zip(items, tats, strict=True):
            d = decide(tat, now, Limit.of(rule), pending.counts[key] + 1)
            if d.allowed:
                continue
            shadow = rule.mode is Mode.shadow
            detail = f"key={key.partition(':')[2]} retry_after={d.retry_after:.0f}s"
            hit = RuleHit(rule.name, "ratelimit", rule.action, shadow, detail, ctx.recipient)
            (metrics.ratelimit_shadow_hits if shadow else metrics.ratelimit_hits).labels(rule.name, rule.action).inc()
            if not shadow:
                self._count_limited(rule.name, key.partition(":")[2], now)
            log.info("ratelimit %s%s %s rcpt=%s %s txn=%s", rule.name, " (shadow) would" if shadow else ":",
                     rule.action, ctx.recipient, detail, txn.id)
            if shadow:
                shadow_hits.append(hit)
            elif rule.action == "quarantine":
                quarantine_hits.append(hit)
            elif verdict is None:
                verdict, acted = verdict_for(rule, d.retry_after), [hit]
        # A refused RCPT keeps no quarantine hits: they must not mark the rest of the message.
        hits = [*shadow_hits, *(acted if verdict is not None else quarantine_hits)]
        return StageResult(verdict, hits) if verdict is not None or hits else NOTHING

    async def commit(self, txn: Transaction, policy: Policy) -> None:
        """Record one event per accepted recipient for every rule that applies (as found at
        its RCPT: the pinned policy and the envelope have not changed since)."""
        pending = self._pending.pop(id(txn), None)
        increments: dict[str, float] = {}
        for rcpt in txn.recipients:
            found = pending.by_rcpt.get(rcpt) if pending is not None else None
            if found is None:
                found = [(key, Limit.of(rule).interval) for rule, key in applicable(policy, txn, rcpt)]
            for key, interval in found:
                increments[key] = increments.get(key, 0.0) + interval
        if not increments:
            return
        now = self.clock()
        updates = list(increments.items())
        await self._with_store(policy, lambda s: s.advance(updates, now))

    # --- state and its failures ----------------------------------------------------------------------

    def _pending_for(self, txn: Transaction) -> _Pending:
        key = id(txn)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending()
            weakref.finalize(txn, self._pending.pop, key, None)
        pending.sync(txn.recipients)
        return pending

    async def _with_store(self, policy: Policy, op: Callable[[RateStore], Awaitable[T]]) -> T | None:
        """Run `op` on the shared store; on failure, on the fallback or not at all (None)."""
        if self.store is self.fallback:
            return await op(self.store)
        now = self.clock()
        if self._down_until is None or now >= self._down_until:
            try:
                result = await op(self.store)
            except Exception as e:  # any failure of the shared state becomes the policy's choice
                self._failed(e, now, policy.state.on_error)
            else:
                if self._down_until is not None:
                    self._down_until = None
                    metrics.ratelimit_fallback_active.set(0)
                    log.warning("rate-limit state %s answers again; shared limits are back", self.store.name)
                return result
        if policy.state.on_error == "fallback":
            return await op(self.fallback)
        return None

    def _failed(self, error: Exception, now: float, on_error: str) -> None:
        metrics.ratelimit_backend_errors.labels(self.store.name).inc()
        first = self._down_until is None
        self._down_until = now + self.retry_after
        if on_error == "fallback":
            metrics.ratelimit_fallback_active.set(1)
        if first:
            then = {"fallback": "using the in-process limiter", "tempfail": "answering 451 4.3.0",
                    "accept": "not rate limiting"}[on_error]
            log.error("rate-limit state %s failed (%s: %s); %s until it answers again",
                      self.store.name, type(error).__name__, error, then)

    def _count_limited(self, rule: str, key: str, now: float) -> None:
        """For the status page: the most-limited keys, over roughly the last hour, bounded."""
        if now - self._top_since > TOP_WINDOW:
            self._top.clear()
            self._top_since = now
        self._top[(rule, key)] += 1
        if len(self._top) > TOP_MAX:
            self._top = Counter(dict(self._top.most_common(TOP_MAX // 2)))

    def status(self) -> dict[str, object]:
        return {
            "top": [{"key": key, "rule": rule, "count": n} for (rule, key), n in self._top.most_common(10)],
            "backend": self.store.name,
            "shared_state_down": self._down_until is not None,
            "keys_tracked": self.store.tracked(),
            "fallback_keys": self.fallback.tracked() if self.fallback is not self.store else None,
        }

    async def close(self) -> None:
        await self.store.close()
