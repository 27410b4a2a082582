"""Burst rules: hold the copies of a wave once too many similar messages arrived in a window.

For a `body` rule each message is linked to its campaign (campaign.py: near-duplicate copies and
the variants they link, in memory or in Redis) and the rule counts the campaign in its sliding
window; for `subject`, `url_hosts` and `attachment` rules each key is counted as it is. The
message is part of a burst when the count is over the threshold's number, this message
included: `threshold: 40 in 10m` lets 40 messages of a campaign through in ten minutes and holds
the 41st and later ones. The campaign (id, first sight, copies, signals) goes into
ctx.fingerprints, so the quarantine entry can say why the message was held.

Exempt messages (authenticated submissions, `only`/`unless`, and the header-only flags an admin
may still set, which `queueguard check` warns about) are neither judged nor counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from queueguard import metrics
from queueguard.burst.campaign import Campaign, Sighting, sighting
from queueguard.burst.fingerprint import Fingerprints, fingerprints, subject_skeleton
from queueguard.burst.window import MemoryWindow, RedisWindow, WindowCounter, WindowShare
from queueguard.model import RuleHit
from queueguard.policy.match import rule_applies
from queueguard.policy.schema import BurstRule, Mode
from queueguard.redis_client import connect
from queueguard.shared_state import Membership, SharedState
from queueguard.stage import MessageContext, StageResult

if TYPE_CHECKING:
    from queueguard.settings import Settings

log = logging.getLogger("queueguard.burst")

TRACK_MAX = 1000
"""Active bursts remembered for the status page (the largest counts win)."""
METRIC_TOP = 10
METRIC_INTERVAL = 5.0


@dataclass
class ActiveBurst:
    rule: str
    fingerprint: str
    count: int
    since: float
    last: float
    period: float


def exempt(rule: BurstRule, ctx: MessageContext) -> bool:
    """The rule's own exemptions, then its only/unless conditions."""
    parsed = ctx.parsed
    if rule.exempt_list_traffic and parsed.is_list_traffic:
        return True
    if rule.exempt_replies and parsed.is_reply:
        return True
    if rule.exempt_authenticated and ctx.txn.connection.authenticated:
        return True
    return not rule_applies(rule, ctx.policy, ctx.txn, None, parsed=parsed)


class BurstCheck:
    """MessageCheck for `bursts:` rules over a shared WindowCounter (memory or Redis)."""

    name = "burst"

    def __init__(
        self,
        window: WindowCounter,
        *,
        fallback: MemoryWindow | None = None,
        hosts: Callable[[], int] = lambda: 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`window` is shared (Redis) or this process's own (MemoryWindow). With a shared window,
        `fallback` is the mirror that stands in for it (window.WindowShare) and `hosts` counts the
        processes sharing it."""
        self.share: WindowShare | None = None
        stand_in: WindowCounter = window
        if not isinstance(window, MemoryWindow):
            self.share = stand_in = WindowShare(fallback or MemoryWindow(), hosts)
        self.state: SharedState[WindowCounter] = SharedState(
            "burst", window, stand_in, backend="memory" if self.share is None else "redis", clock=clock)
        self.clock = clock
        self._active: dict[tuple[str, str], ActiveBurst] = {}
        self._metrics_at = 0.0

    @classmethod
    def from_settings(cls, settings: Settings, members: Membership | None = None) -> BurstCheck:
        """Memory counts for `state: memory`; Redis counts (shared between MX hosts) for a redis://
        URL, with `members` (the rate limits' membership) telling how many processes share them."""
        if settings.state == "memory":
            return cls(MemoryWindow())
        return cls(RedisWindow(connect(settings.state)), fallback=MemoryWindow(),
                   hosts=(lambda: members.hosts) if members is not None else (lambda: 1))

    async def on_message(self, ctx: MessageContext) -> StageResult:
        rules = ctx.policy.bursts
        if not rules:
            return StageResult()
        skeleton = subject_skeleton(ctx.parsed.subject)
        fps = fingerprints(ctx.parsed, skeleton)
        ctx.fingerprints.update(fps.as_dict())
        seen = sighting(fps, skeleton, ctx.parsed.url_hosts)
        result = StageResult()
        now = self.clock()
        for rule in rules:
            if exempt(rule, ctx):
                continue
            counted = await self._count(rule, fps, now, ctx, seen)
            if counted is None:
                continue
            count, key, campaign = counted
            self._track(rule, key, count, now)
            if count > rule.threshold.count:
                if campaign is not None and "campaign" not in ctx.fingerprints:
                    ctx.fingerprints.update(campaign.as_dict())
                ctx.fingerprints.setdefault("burst", fps.body[0] if campaign is not None and fps.body else key)
                detail = f"{key} {count}>{rule.threshold.count}/{rule.threshold.period:g}s"
                result.hits.append(RuleHit(rule.name, "burst", rule.action, rule.mode is Mode.shadow, detail))
        self._publish(now)
        return result

    async def _count(
        self, rule: BurstRule, fps: Fingerprints, now: float, ctx: MessageContext, seen: Sighting
    ) -> tuple[int, str, Campaign | None] | None:
        """(highest count, its key, the campaign for a body rule); None when there is nothing to
        count (no key of this kind, or the shared state failed and the policy says accept:
        queueguard/shared_state.py)."""
        keys = fps.keys(rule.fingerprint)
        linking = rule.fingerprint == "body"
        if not (seen if linking else keys):
            return None
        period = rule.threshold.period
        on_error = ctx.policy.state.on_error
        if linking:
            campaign = await self.state.run(on_error, lambda w: self._link(w, f"{rule.name}:", seen, period, now))
            return None if campaign is None else (campaign.count, f"c:{campaign.id}", campaign)
        scoped = [f"{rule.name}:{k}" for k in keys]
        counts = await self.state.run(on_error, lambda w: self._add(w, scoped, period, now))
        if counts is None:
            return None
        best = max(range(len(keys)), key=lambda i: (counts[i], -i))
        return counts[best], keys[best], None

    async def _link(self, window: WindowCounter, scope: str, seen: Sighting, period: float, now: float) -> Campaign:
        """The shared window's answers keep this process's mirror warm for an outage, and the mirror
        stands in for what the shared window forgot (window.WindowShare)."""
        campaign = await window.link(scope, seen, period, now)
        if self.share is not None and window is self.state.shared:
            return self.share.observe_link(scope, seen, period, now, campaign)
        return campaign

    async def _add(self, window: WindowCounter, keys: list[str], period: float, now: float) -> list[int]:
        counts = await window.add(keys, period, now)
        if self.share is not None and window is self.state.shared:
            self.share.observe(keys, counts, period, now)
        return counts

    def _track(self, rule: BurstRule, key: str, count: int, now: float) -> None:
        """Remember keys at half their threshold or more, for status() and the metrics."""
        if count * 2 < rule.threshold.count:
            return
        entry = self._active.get((rule.name, key))
        if entry is None:
            self._active[(rule.name, key)] = ActiveBurst(rule.name, key, count, now, now, rule.threshold.period)
            if len(self._active) > TRACK_MAX:
                del self._active[min(self._active, key=lambda k: self._active[k].count)]
        else:
            entry.count, entry.last = max(entry.count, count), now

    def top(self, n: int = METRIC_TOP) -> list[ActiveBurst]:
        """Bursts seen within their window, largest first."""
        now = self.clock()
        for k in [k for k, b in self._active.items() if now - b.last > b.period]:
            del self._active[k]
        return sorted(self._active.values(), key=lambda b: -b.count)[:n]

    def status(self) -> list[dict[str, object]]:
        return [{"rule": b.rule, "fingerprint": b.fingerprint, "count": b.count, "since": b.since}
                for b in self.top(20)]

    def _publish(self, now: float) -> None:
        if now - self._metrics_at < METRIC_INTERVAL:
            return
        self._metrics_at = now
        metrics.burst_active.clear()
        for b in self.top():
            metrics.burst_active.labels(b.rule, b.fingerprint).set(b.count)
