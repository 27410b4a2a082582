"""Shared state (Redis) with its in-process stand-in: one outage handling for every check that counts.

Rate limits and burst counts both keep their state in a store that several
MX hosts share. When that store fails, the policy's `state.on_error` decides,
the same way for both:
  fallback (default)  the in-process store answers until the shared one does again
  tempfail            StateUnavailable: the pipeline answers 451 4.3.0 (reason `state_error`)
  accept              None: the check counts nothing and lets the message pass
After a failure the shared store is not asked again for `retry_after` seconds
(a dead Redis must not cost every message a timeout); the outage is logged
once when it starts and once when it ends, and shown as metrics per component.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from queueguard import metrics
from queueguard.stage import StateUnavailable

log = logging.getLogger("queueguard.state")
S = TypeVar("S")
T = TypeVar("T")

THEN = {"fallback": "using in-process state", "tempfail": "answering 451 4.3.0", "accept": "not counting"}


class SharedState(Generic[S]):
    """`shared` is the store hosts share; `fallback` stands in for it (they may be one object
    when there is no shared store: `state: memory`)."""

    def __init__(self, component: str, shared: S, fallback: S, *, backend: str,
                 clock: Callable[[], float] = time.monotonic, retry_after: float = 5.0) -> None:
        self.component = component
        self.shared = shared
        self.fallback = fallback
        self.backend = backend
        self.clock = clock
        self.retry_after = retry_after
        self.down_until: float | None = None

    @property
    def down(self) -> bool:
        return self.down_until is not None

    async def run(self, on_error: str, op: Callable[[S], Awaitable[T]]) -> T | None:
        """`op` on the shared store; on its failure what `on_error` says (see the module doc)."""
        if self.shared is self.fallback:
            return await op(self.shared)
        now = self.clock()
        if self.down_until is None or now >= self.down_until:
            try:
                result = await op(self.shared)
            except Exception as e:  # any failure of the shared state becomes the policy's choice
                self._failed(e, now, on_error)
            else:
                if self.down_until is not None:
                    self.down_until = None
                    metrics.state_fallback_active.labels(self.component).set(0)
                    log.warning("%s state %s answers again", self.component, self.backend)
                return result
        if on_error == "fallback":
            return await op(self.fallback)
        if on_error == "tempfail":
            raise StateUnavailable(f"{self.component} state {self.backend} unavailable")
        return None

    def _failed(self, error: Exception, now: float, on_error: str) -> None:
        metrics.state_errors.labels(self.component, self.backend).inc()
        first = self.down_until is None
        self.down_until = now + self.retry_after
        metrics.state_fallback_active.labels(self.component).set(1 if on_error == "fallback" else 0)
        if first:
            log.error("%s state %s failed (%s: %s); %s until it answers again (retried every %.0f s)",
                      self.component, self.backend, type(error).__name__, error, THEN[on_error],
                      self.retry_after)
