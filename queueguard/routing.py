"""Routes: which downstream group takes a recipient, and per-route caps.

A route is a named failover group of downstreams (settings `routes:`) with
recipient patterns; everything else goes to `default`. The Router is an
RcptCheck: at RCPT it defers when the route is at its concurrency or
per-minute cap, or when the host behind it reported memory pressure, so a
spam wave for the ticket system's info@ cannot fork unbounded workers there
(incident 2022-10-17: the MX was healthy, the ticket host ran out of memory).

A transaction stays on one route. A RCPT for another route gets 452 4.5.3
("too many recipients", RFC 5321 4.5.3.1.10, RFC 3463): a reply to RCPT is per
recipient (RFC 5321 3.3), so the client delivers to the recipients accepted
and retries the refused ones in a later, separate transaction. The sender
splits the message; no DATA answer covers two downstreams and nothing is
delivered twice (docs/routes.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from queueguard import metrics
from queueguard.model import RuleHit, Transaction
from queueguard.policy.match import AddressMatcher
from queueguard.policy.schema import Policy
from queueguard.settings import Route, RoutePressure, Settings
from queueguard.shared_state import raise_if_cancelling
from queueguard.stage import NOTHING, RcptContext, StageResult

log = logging.getLogger("queueguard.routing")

Clock = Callable[[], float]
LEVELS = ("normal", "soften", "shed")
WINDOW = 60.0


@dataclass(frozen=True)
class PressureReport:
    """What the host behind a route says about itself (format: queueguard/pressure/publish.py)."""

    level: str
    queue: int | None = None
    node: str = ""


class PressureSource(Protocol):
    """Where a route's pressure report comes from (Redis key, HTTP status page)."""

    async def read(self) -> PressureReport | None:
        """The current report; None when there is none (expired, never published).
        Raises when the source cannot be asked or the report is unreadable."""
        ...


def missing_level(on_missing: str) -> str:
    """`keep` means the configured caps, i.e. the normal level."""
    return "normal" if on_missing == "keep" else on_missing


def next_level(current: str, reported: str | None, now: float, seen_at: float | None, p: RoutePressure) -> str:
    """The level to apply: a fresh report wins; without one the last report holds for
    `stale_after`, then `on_missing` applies."""
    if reported is not None:
        return reported
    if seen_at is not None and now - seen_at <= p.stale_after:
        return current
    return missing_level(p.on_missing)


def route_cap(spec: Route, level: str) -> int | None:
    """Concurrency cap at a pressure level; soften without soften_concurrent halves max_concurrent."""
    if level == "soften":
        if spec.soften_concurrent:
            return spec.soften_concurrent
        if spec.max_concurrent:
            return max(1, spec.max_concurrent // 2)
    return spec.max_concurrent


@dataclass
class RouteState:
    """Live counters of one route: open transactions and the last minute's admissions."""

    name: str
    spec: Route | None
    active: set[str] = field(default_factory=set)
    recent: dict[str, float] = field(default_factory=dict)
    """txn id -> admission time, oldest first (dicts keep insertion order)."""
    pressure: str = "normal"
    pressure_seen: float | None = None
    queue: int | None = None
    missing: bool = False
    failing: bool = False

    def cap(self) -> int | None:
        return None if self.spec is None else route_cap(self.spec, self.pressure)

    def prune(self, now: float) -> None:
        while self.recent:
            txn_id, at = next(iter(self.recent.items()))
            if now - at < WINDOW:
                return
            del self.recent[txn_id]


def _defer(route: str, reason: str, limit: str = "") -> StageResult:
    """A hit resolve.py answers (split: 452 4.5.3; shed, concurrency: 451 4.3.2; rate: 451 4.7.1)."""
    metrics.route_deferrals.labels(route, reason).inc()
    return StageResult([RuleHit(rule=route, kind="route", action="tempfail",
                                detail=f"{reason}: {limit}" if limit else reason)])


class Router:
    """Maps recipients to routes and enforces each route's caps (an RcptCheck)."""

    name = "route"

    def __init__(self, settings: Settings, policy: Callable[[], Policy], clock: Clock = time.monotonic) -> None:
        self.routes = settings.routes
        self.policy = policy
        self.clock = clock
        self.states = {"default": RouteState("default", None)}
        self.states.update({name: RouteState(name, spec) for name, spec in self.routes.items()})
        self.readers: dict[str, PressureSource] = {}
        self._compiled: tuple[Policy, list[tuple[str, AddressMatcher]]] | None = None
        for name in self.states:
            metrics.route_active.labels(name).set(0)
            metrics.route_pressure.labels(name).set(0)

    # --- routing ----------------------------------------------------------------

    def _matchers(self) -> list[tuple[str, AddressMatcher]]:
        """Per loaded policy: each route's entries with list names expanded (policy/match.py forms)."""
        policy = self.policy()
        if self._compiled is None or self._compiled[0] is not policy:
            out = []
            for name, spec in self.routes.items():
                entries: list[str] = []
                for entry in spec.recipients:
                    if entry in policy.lists:
                        entries.extend(policy.lists[entry])
                    else:
                        if "@" not in entry and "." not in entry and not set("*?[") & set(entry):
                            log.warning("route=%s recipient entry %r is neither a list in the policy nor an "
                                        "address or domain; it matches nothing", name, entry)
                        entries.append(entry)
                out.append((name, AddressMatcher.build(entries)))
            self._compiled = (policy, out)
        return self._compiled[1]

    def route_for(self, recipient: str) -> str:
        """The first route (settings order) whose entries match; else `default`."""
        for name, matches in self._matchers():
            if matches(recipient):
                return name
        return "default"

    # --- RCPT check ---------------------------------------------------------------

    async def on_rcpt(self, ctx: RcptContext) -> StageResult:
        txn = ctx.txn
        route = self.route_for(ctx.recipient)
        if txn.route is not None and txn.route != route:
            return _defer(route, "split")
        state = self.states[route]
        if txn.id in state.active:
            return NOTHING
        if txn.route is None:
            self._forget(txn, keep=route)  # an earlier RCPT was admitted elsewhere but never reached it
        now = self.clock()
        state.prune(now)
        spec = state.spec
        if spec is not None:
            if state.pressure == "shed":
                return _defer(route, "shed")
            cap = state.cap()
            if cap is not None and len(state.active) >= cap:
                why = " (lowered: memory pressure there)" if state.pressure == "soften" else ""
                return _defer(route, "concurrency", f"{cap} concurrent transactions{why}")
            if spec.max_per_minute is not None and len(state.recent) >= spec.max_per_minute:
                return _defer(route, "rate", f"{spec.max_per_minute} messages per minute")
        state.active.add(txn.id)
        state.recent[txn.id] = now
        metrics.route_active.labels(route).set(len(state.active))
        return NOTHING

    async def on_end(self, txn: Transaction, passed: bool) -> None:
        """The transaction gives its concurrency slot back; one that never reached DATA
        downstream gives its place in the per-minute window back too."""
        self._forget(txn, keep=None, delivered=bool(txn.downstream))

    def _forget(self, txn: Transaction, keep: str | None, delivered: bool = False) -> None:
        for state in self.states.values():
            if state.name != keep and txn.id in state.active:
                state.active.discard(txn.id)
                if not delivered:
                    state.recent.pop(txn.id, None)
                metrics.route_active.labels(state.name).set(len(state.active))

    # --- pressure from the host behind a route ----------------------------------

    async def poll_once(self, name: str) -> str:
        """Read the route's source once and apply what it says; returns the level now applied."""
        state = self.states[name]
        assert state.spec is not None and state.spec.pressure is not None
        p = state.spec.pressure
        report: PressureReport | None = None
        try:
            report = await self.readers[name].read()
            if state.failing:
                log.info("route=%s pressure source answers again", name)
            state.failing = False
        except Exception as e:
            raise_if_cancelling(e)
            if not state.failing:
                log.warning("route=%s pressure source failed: %s", name, e)
            state.failing = True
        now = self.clock()
        if report is not None:
            if state.missing:
                log.info("route=%s pressure report back: %s", name, report.level)
            state.pressure_seen, state.queue, state.missing = now, report.queue, False
        elif not state.missing and (state.pressure_seen is None or now - state.pressure_seen > p.stale_after):
            log.warning("route=%s pressure report missing or stale; applying on_missing=%s", name, p.on_missing)
            state.missing, state.queue = True, None
        level = next_level(state.pressure, report.level if report else None, now, state.pressure_seen, p)
        self._apply(state, level)
        return level

    def _apply(self, state: RouteState, level: str) -> None:
        if level != state.pressure:
            log.warning("route=%s pressure %s -> %s", state.name, state.pressure, level)
            state.pressure = level
        metrics.route_pressure.labels(state.name).set(LEVELS.index(level))
        if state.queue is not None:
            metrics.route_reported_queue.labels(state.name).set(state.queue)

    def background(self) -> list[Coroutine[Any, Any, None]]:
        return [self._poll(name) for name in self.readers]

    async def _poll(self, name: str) -> None:
        """Follow the pressure the host behind a route publishes."""
        spec = self.states[name].spec
        assert spec is not None and spec.pressure is not None
        while True:
            await self.poll_once(name)
            raise_if_cancelling()
            await asyncio.sleep(spec.pressure.interval)

    def status(self) -> list[dict[str, object]]:
        now = self.clock()
        out: list[dict[str, object]] = []
        for s in self.states.values():
            s.prune(now)
            out.append({"route": s.name, "active": len(s.active), "cap": s.cap(), "pressure": s.pressure,
                        "last_minute": len(s.recent), "reported_queue": s.queue,
                        "max_per_minute": s.spec.max_per_minute if s.spec else None})
        return out
