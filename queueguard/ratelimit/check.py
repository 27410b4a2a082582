"""The rate-limit stage: a reservation at RCPT, given back if the mail does not go through.

`on_rcpt` takes every rule that applies to this recipient and, in one atomic store call
(gcra.reserve; one Lua script call in Redis), checks all of their keys and takes one event on
each unless an enforced tempfail/reject rule is over its limit. A hit for each rule over its
limit; queueguard/resolve.py makes the reply:
  tempfail   -> `451 4.7.1` on this RCPT only; the message's other recipients go on
  reject     -> `550 5.7.1`
  quarantine -> no RCPT verdict: the recipient is accepted and the pipeline
                quarantines the message at end of DATA
A tempfail/reject rule wins over a quarantine rule earlier in the list (deferring
loses nothing; quarantining would take mail a later rule wanted deferred).
Shadow rules over their limit are counted, logged and returned as shadow hits; they
change nothing.

Refused mail does not use up budget: a refused RCPT reserves nothing, and a reservation
is given back (`refund`) when its RCPT was refused after us (a later check, the
downstream) or the transaction ended without the message going through. Checking and
taking in one step is what makes a limit exact across hosts and workers: concurrent
transactions cannot each see the same room (the old peek-then-record overshot by the
messages in flight). Earlier recipients of the same transaction have already reserved,
so one message to 500 recipients cannot slip under a limit of 100.

Null sender: bounces are counted like any mail by recipient and client keys; rules
keyed on sender or sender_domain skip them (see `keys`).

When the shared store fails, `policy.state.on_error` decides, as for burst counts
(queueguard/shared_state.py): `fallback` enforces from this process's mirror of the
shared state, taking its share of each limit, and adds what it admitted when Redis
answers again (store.LocalShare); `tempfail` is 451 4.3.0; `accept` skips rate limits.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from queueguard import metrics
from queueguard.model import RuleHit, Transaction, canonical_address, without_extension
from queueguard.policy.keys import key_value
from queueguard.policy.match import rule_applies
from queueguard.policy.schema import Mode, Policy, RateLimitRule
from queueguard.ratelimit.gcra import Ask, Limit, Reservation
from queueguard.ratelimit.store import LocalShare, MemoryStore, RateStore
from queueguard.redis_client import BACKGROUND, connect
from queueguard.shared_state import Membership, SharedState
from queueguard.stage import NOTHING, RcptContext, StageResult, StateUnavailable

if TYPE_CHECKING:
    from queueguard.settings import Settings

log = logging.getLogger("queueguard.ratelimit")
TOP_WINDOW = 3600.0
TOP_MAX = 1000
RECONCILE_CHUNK = 500


def applicable(policy: Policy, txn: Transaction, recipient: str) -> list[tuple[RateLimitRule, str]]:
    """(rule, storage key) for every rate-limit rule that applies to this recipient."""
    out = []
    for rule in policy.ratelimits:
        if rule_applies(rule, policy, txn, recipient):
            key = key_value(rule.key, txn, recipient, policy.addresses.recipient_delimiter)
            if key is not None:
                out.append((rule, f"{rule.name}:{key}"))
    return out


def _again(policy: Policy, txn: Transaction, recipient: str) -> bool:
    """This mailbox is already a recipient of the transaction: the MTA delivers the message to
    it once, so it is counted once (ten RCPTs of info@ in one message used ten of its budget)."""
    delimiters = policy.addresses.recipient_delimiter
    mailbox = without_extension(canonical_address(recipient), delimiters)
    return any(without_extension(canonical_address(r), delimiters) == mailbox for r in txn.recipients)


def ask(rule: RateLimitRule, key: str) -> Ask:
    """Only an enforced refusing rule gates the reservation; shadow and quarantine rules count along."""
    return Ask(key, Limit.of(rule), rule.mode is Mode.enforce and rule.action in ("tempfail", "reject"))


@dataclass
class _Held:
    """One RCPT's reservation: its (key, interval) pairs, and how many recipients the transaction
    had accepted before it (it was accepted itself if that list grew past `at`)."""

    at: int
    refunds: list[tuple[str, float]]


@dataclass
class _Reserved:
    """Per transaction (Transaction.check_data): reservations of accepted recipients, and the last
    RCPT's, not yet known to be accepted (RCPTs are one at a time)."""

    on_error: str = "fallback"
    kept: list[_Held] = field(default_factory=list)
    last: _Held | None = None

    def settle(self, accepted: int) -> list[tuple[str, float]]:
        """What to give back now that `accepted` recipients are in: the last RCPT's reservation
        if it was refused after this check (a later check or the downstream)."""
        held, self.last = self.last, None
        if held is None:
            return []
        if accepted > held.at:
            self.kept.append(held)
            return []
        return held.refunds

    def all(self) -> list[tuple[str, float]]:
        out = [r for held in self.kept for r in held.refunds]
        self.kept = []
        return out


class RateLimitCheck:
    name = "ratelimit"

    def __init__(
        self, store: RateStore, *, clock: Callable[[], float] = time.time,
        fallback: MemoryStore | None = None, retry_after: float = 5.0, members: Membership | None = None,
    ) -> None:
        """`store` is shared (Redis) or this process's own (MemoryStore). With a shared store,
        `fallback` is the mirror that stands in for it (store.LocalShare) and `members` counts the
        processes sharing it."""
        self.members = members
        self.local: LocalShare | None = None
        stand_in: RateStore = store
        if not isinstance(store, MemoryStore):
            self.local = LocalShare(fallback or MemoryStore(100_000),
                                    (lambda: members.hosts) if members is not None else (lambda: 1))
            stand_in = self.local
        self.state: SharedState[RateStore] = SharedState("ratelimit", store, stand_in, backend=store.name,
                                                         clock=clock, retry_after=retry_after,
                                                         recover=self._recover)
        self.clock = clock
        self._top: Counter[tuple[str, str]] = Counter()
        self._top_since = clock()

    @classmethod
    def from_settings(cls, settings: Settings, processes: int = 1) -> RateLimitCheck:
        """`state: memory`: this process only. A Redis URL: shared, with the mirror sized like the
        memory store and this process counted as a member (of at least `processes`, the workers
        of this host)."""
        if settings.state == "memory":
            return cls(MemoryStore(settings.state_max_keys))
        from queueguard.ratelimit.redis_store import RedisStore

        members = Membership(connect(settings.state, BACKGROUND), settings.node or socket.gethostname(),
                             processes=processes)
        return cls(RedisStore(settings.state), fallback=MemoryStore(settings.state_max_keys), members=members)

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """Tasks the app runs: renewing this process's membership (shared state only)."""
        return [self.members.run()] if self.members is not None else []

    # --- the stage ---------------------------------------------------------------------------------

    async def on_rcpt(self, ctx: RcptContext) -> StageResult:
        txn, policy = ctx.txn, ctx.policy
        held = txn.check_data(_Reserved)
        held.on_error = policy.state.on_error
        await self._refund(held.settle(len(txn.recipients)), held.on_error)
        if _again(policy, txn, ctx.recipient):
            return NOTHING
        items = applicable(policy, txn, ctx.recipient)
        if not items:
            return NOTHING
        asks = [ask(rule, key) for rule, key in items]
        now = self.clock()
        result = await self.state.run(policy.state.on_error, lambda s: self._reserve(s, asks, now))
        if result is None:
            return NOTHING
        if result.reserved:
            held.last = _Held(len(txn.recipients), [(a.key, a.limit.interval) for a in asks])
        hits: list[RuleHit] = []
        for (rule, key), wait in zip(items, result.waits, strict=True):
            if wait <= 0:
                continue
            shadow = rule.mode is Mode.shadow
            detail = f"key={key.partition(':')[2]} retry_after={wait:.0f}s"
            hits.append(RuleHit(rule.name, "ratelimit", rule.action, shadow, detail, ctx.recipient, wait))
            (metrics.ratelimit_shadow_hits if shadow else metrics.ratelimit_hits).labels(rule.name, rule.action).inc()
            if not shadow:
                self._count_limited(rule.name, key.partition(":")[2], now)
            log.info("ratelimit %s%s %s rcpt=%s %s txn=%s", rule.name, " (shadow) would" if shadow else ":",
                     rule.action, ctx.recipient, detail, txn.id)
        return StageResult(hits) if hits else NOTHING

    async def on_end(self, txn: Transaction, passed: bool) -> None:
        """Mail that went through keeps the reservations of its accepted recipients; everything
        else is given back."""
        held = txn.check_data(_Reserved)
        refunds = held.settle(len(txn.recipients))
        kept = held.all()
        await self._refund(refunds if passed else refunds + kept, held.on_error)

    async def _reserve(self, store: RateStore, asks: Sequence[Ask], now: float) -> Reservation:
        """The shared store's answers keep this process's mirror warm for an outage, and the mirror
        is each key's floor there (Ask.floor: a Redis that lost the key starts from it)."""
        if self.local is not None and store is self.state.shared:
            mirror = self.local.mirror
            asks = [Ask(a.key, a.limit, a.gate, mirror.get(a.key)) for a in asks]
        result = await store.reserve(asks, now)
        self._observe(store, [a.key for a in asks], result.tats, now)
        return result

    def _observe(self, store: RateStore, keys: Sequence[str], tats: Sequence[float | None], now: float) -> None:
        if self.local is not None and store is self.state.shared:
            self.local.observe(keys, tats, now)

    async def _refund(self, refunds: list[tuple[str, float]], on_error: str) -> None:
        if not refunds:
            return
        now = self.clock()

        async def op(store: RateStore) -> None:
            self._observe(store, [k for k, _ in refunds], await store.refund(refunds, now), now)

        with contextlib.suppress(StateUnavailable):  # on_error tempfail: it stays counted, the safe side
            await self.state.run(on_error, op)

    async def _recover(self) -> None:
        """The shared store answers again: add what this process admitted meanwhile, in chunks
        (one that fails stays owed and is sent at the next try)."""
        if self.local is None:
            return
        while owed := self.local.take_owed(RECONCILE_CHUNK):
            now = self.clock()
            try:
                tats = await self.state.shared.reconcile(owed, now)
            except BaseException:
                self.local.restore(owed)
                raise
            self.local.observe([o.key for o in owed], tats, now)
            log.info("ratelimit: %d keys reconciled with %s after its outage", len(owed), self.state.backend)

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
            "members": self.members.hosts if self.members is not None else None,
        }

    async def close(self) -> None:
        await self.state.shared.close()
        if self.members is not None:
            await self.members.close()
