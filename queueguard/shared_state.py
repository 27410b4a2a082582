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
The fallback is a mirror of what the shared store answered, and each process
takes its share during the outage (ratelimit/store.py LocalShare, burst/window.py
WindowShare). When it answers again, `recover` (if given) runs first: rate limits
add what this host admitted meanwhile.

`Membership` counts the guard processes sharing one Redis while it is up, so
that during an outage each can take its share of a limit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Generic, TypeVar

from queueguard import metrics
from queueguard.stage import StateUnavailable

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("queueguard.state")
S = TypeVar("S")
T = TypeVar("T")

THEN = {"fallback": "using in-process state", "tempfail": "answering 451 4.3.0", "accept": "not counting"}


def raise_if_cancelling(cause: BaseException | None = None) -> None:
    """redis-py can swallow a cancellation that hits one of its calls, or turn it into an error
    of its own. A caller that handles errors and goes on (a background loop, the outage fallback)
    checks here, so it still stops when its task is being cancelled: a stopping worker waited
    forever for its membership loop, and a client leaving mid-command must not look like Redis
    failing."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from cause


class SharedState(Generic[S]):
    """`shared` is the store hosts share; `fallback` stands in for it (they may be one object
    when there is no shared store: `state: memory`)."""

    def __init__(self, component: str, shared: S, fallback: S, *, backend: str,
                 clock: Callable[[], float] = time.monotonic, retry_after: float = 5.0,
                 recover: Callable[[], Awaitable[None]] | None = None) -> None:
        self.component = component
        self.shared = shared
        self.fallback = fallback
        self.backend = backend
        self.clock = clock
        self.retry_after = retry_after
        self.recover = recover
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
                if self.down_until is not None and self.recover is not None:
                    await self.recover()
                result = await op(self.shared)
            except Exception as e:  # any failure of the shared state becomes the policy's choice
                raise_if_cancelling(e)
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


MEMBERS_KEY = "qg:members"


def live_count(answer: int) -> int:
    """Members counted in Redis, this one included even when its own entry was not there yet."""
    return max(1, answer)


class Membership:
    """How many guard processes share the state, as last counted while Redis answered.

    Each process is one member, `node:pid` (a worker process enforces alone when Redis fails, so
    it takes its own share), renewed every `every` seconds in one sorted set whose score is the
    member's expiry: a process that stops renewing drops out after `ttl`. One small key rather
    than a key per member, so counting needs no SCAN over millions of rate-limit keys. The count
    is never below `processes`, this host's own workers: before their first renewals (or with
    Redis down from the start) a worker that counted only itself took the whole limit, each of them.
    """

    def __init__(self, client: Redis, node: str, *, ttl: float = 15.0, every: float = 5.0,
                 clock: Callable[[], float] = time.time, processes: int = 1) -> None:
        self.client = client
        self.node = node
        self.ttl = ttl
        self.every = every
        self.clock = clock
        self.processes = max(1, processes)
        self.hosts = self.processes

    @property
    def member(self) -> str:
        """Read at every renewal: a worker forked after start-up is a member of its own."""
        return f"{self.node}:{os.getpid()}"

    async def beat(self) -> int:
        """Renew this member, forget expired ones, count; returns the count (also kept in `hosts`)."""
        now = self.clock()
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(MEMBERS_KEY, {self.member: now + self.ttl})
        pipe.zremrangebyscore(MEMBERS_KEY, "-inf", now)
        pipe.zcard(MEMBERS_KEY)
        pipe.pexpire(MEMBERS_KEY, int(self.ttl * 1000))
        _, _, count, _ = await pipe.execute()
        self.hosts = max(live_count(int(count)), self.processes)
        metrics.state_members.set(self.hosts)
        return self.hosts

    async def run(self) -> None:
        """Background task; a failed renewal keeps the last count (that is what an outage uses)."""
        while True:
            try:
                await self.beat()
            except Exception as e:
                raise_if_cancelling(e)
                log.debug("state membership not renewed (%s: %s); keeping %d", type(e).__name__, e, self.hosts)
            raise_if_cancelling()
            await asyncio.sleep(self.every)

    async def leave(self) -> None:
        """On a clean stop: the others' share grows at once instead of after `ttl`."""
        try:
            await self.client.zrem(MEMBERS_KEY, self.member)
        except Exception as e:
            log.debug("state membership not removed (%s: %s)", type(e).__name__, e)

    async def close(self) -> None:
        await self.leave()
        await self.client.aclose()
