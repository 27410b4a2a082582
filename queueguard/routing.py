"""Routes: which downstream group takes a recipient, and per-route caps.

A route is a named failover group of downstreams (settings `routes:`) with
recipient patterns; everything else goes to `default`. The Router is an
RcptCheck: at RCPT it defers when the route is at its concurrency or
per-minute cap, or when the host behind it reported memory pressure, so a
spam wave for the ticket system's info@ cannot fork unbounded workers there.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from queueguard import metrics
from queueguard.model import Transaction, domain_of
from queueguard.policy.schema import Policy
from queueguard.settings import Route, Settings
from queueguard.stage import NOTHING, RcptContext, StageResult
from queueguard.verdict import tempfail

log = logging.getLogger("queueguard.routing")

Clock = Callable[[], float]
PressureReader = Callable[[], Coroutine[Any, Any, str | None]]


def recipient_matches(pattern: str, recipient: str) -> bool:
    """Address glob (`*@tickets.example.org`, `info@example.org`) or bare domain (and its subdomains)."""
    rcpt = recipient.lower()
    pat = pattern.lower()
    if "@" in pat:
        return fnmatch.fnmatchcase(rcpt, pat)
    dom = domain_of(rcpt)
    return dom == pat.lstrip(".") or dom.endswith("." + pat.lstrip("."))


@dataclass
class RouteState:
    """Live counters of one route: open transactions and a one-minute window."""

    name: str
    spec: Route | None
    active: set[str] = field(default_factory=set)
    recent: deque[float] = field(default_factory=deque)
    pressure: str = "normal"
    pressure_seen: float = 0.0

    def cap(self) -> int | None:
        if self.spec is None:
            return None
        if self.pressure == "soften" and self.spec.soften_concurrent:
            return self.spec.soften_concurrent
        return self.spec.max_concurrent


class Router:
    """Maps recipients to routes and enforces each route's caps."""

    name = "route"

    def __init__(self, settings: Settings, policy: Callable[[], Policy], clock: Clock = time.monotonic) -> None:
        self.routes = settings.routes
        self.policy = policy
        self.clock = clock
        self.states = {"default": RouteState("default", None)}
        self.states.update({name: RouteState(name, spec) for name, spec in self.routes.items()})
        self.readers: dict[str, PressureReader] = {}

    def route_for(self, recipient: str) -> str:
        lists = self.policy().lists
        for name, spec in self.routes.items():
            for entry in spec.recipients:
                patterns = lists.get(entry, [entry])
                if any(recipient_matches(p, recipient) for p in patterns):
                    return name
        return "default"

    async def on_rcpt(self, ctx: RcptContext) -> StageResult:
        txn = ctx.txn
        route = self.route_for(ctx.recipient)
        if txn.route is not None and txn.route != route:
            return StageResult(tempfail("4.5.3", f"Please send mail for <{ctx.recipient}> in a separate transaction "
                                        f"(route {route})", reason="route_split", code=452, rule=route))
        state = self.states[route]
        if txn.id in state.active or state.spec is None:
            return NOTHING
        if state.pressure == "shed":
            return StageResult(tempfail("4.3.2", f"Route {route} is shedding load (memory pressure downstream), "
                                        "try again later", reason="route_pressure", rule=route))
        cap = state.cap()
        if cap is not None and len(state.active) >= cap:
            return StageResult(tempfail("4.3.2", f"Route {route} is at its concurrency limit ({cap}), "
                                        "try again later", reason="route_concurrency", rule=route))
        now = self.clock()
        while state.recent and now - state.recent[0] >= 60.0:
            state.recent.popleft()
        per_min = state.spec.max_per_minute
        if per_min is not None and len(state.recent) >= per_min:
            return StageResult(tempfail("4.7.1", f"Route {route} is at its rate limit ({per_min}/min), "
                                        "try again later", reason="route_rate", rule=route))
        state.active.add(txn.id)
        state.recent.append(now)
        metrics.route_active.labels(route).set(len(state.active))
        return NOTHING

    async def commit(self, txn: Transaction, policy: Policy) -> None:
        """Nothing to record: the window counted the transaction when it opened."""

    def release(self, txn: Transaction) -> None:
        """Called when a transaction ends, however it ended."""
        for state in self.states.values():
            if txn.id in state.active:
                state.active.discard(txn.id)
                metrics.route_active.labels(state.name).set(len(state.active))

    def status(self) -> list[dict[str, object]]:
        return [
            {"route": s.name, "active": len(s.active), "cap": s.cap(), "pressure": s.pressure,
             "last_minute": len(s.recent)}
            for s in self.states.values()
        ]

    def background(self) -> list[Coroutine[Any, Any, None]]:
        return [self._poll(name, reader) for name, reader in self.readers.items()]

    async def _poll(self, name: str, reader: PressureReader) -> None:
        """Follow the pressure the host behind a route publishes (issue: routes)."""
        state = self.states[name]
        spec = state.spec
        assert spec is not None and spec.pressure is not None
        missing_logged = False
        while True:
            try:
                level = await reader()
            except Exception as e:
                level = None
                if not missing_logged:
                    log.warning("route=%s pressure source failed: %s", name, e)
            now = self.clock()
            if level in ("normal", "soften", "shed"):
                state.pressure_seen = now
                missing_logged = False
            elif now - state.pressure_seen > spec.pressure.stale_after:
                level = {"keep": "normal"}.get(spec.pressure.on_missing, spec.pressure.on_missing)
                if not missing_logged:
                    log.warning("route=%s pressure report missing or stale; treating as %s", name, level)
                    missing_logged = True
            if level is not None and level != state.pressure:
                log.info("route=%s pressure %s -> %s", name, state.pressure, level)
                state.pressure = level
                metrics.route_pressure.labels(name).set({"normal": 0, "soften": 1, "shed": 2}[level])
            await asyncio.sleep(1.0)
