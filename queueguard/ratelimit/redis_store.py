"""Shared rate-limit state in Redis, so several queueguard hosts enforce one limit exactly.

Every operation is one call of the Lua script in `gcra.lua` (shipped as package data): the check
and the update of a decision happen in one atomic step inside Redis, so concurrent transactions on
any number of hosts cannot each see the same room. The script is loaded once with SCRIPT LOAD and
run with EVALSHA (re-loaded if Redis restarted, or a replica took over, and forgot it).

Calls are pipelined: whatever decisions the event loop asks for while one round trip is in flight
go together in the next one (no waiting to fill a batch: one call alone goes at once). That is
what gets one process past ~20,000 decisions/s (docs/benchmarks.md); each call is still its own
atomic script run.

Values are microseconds since the epoch; keys carry a TTL so Redis forgets idle keys by itself.
Times come from the caller's clock (hosts are NTP-synced; a few ms of skew is small against
intervals of seconds). Multi-key calls assume one Redis (or one Sentinel-managed master), not a
Cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from importlib import resources

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from queueguard.ratelimit.gcra import Ask, Reservation
from queueguard.ratelimit.store import Owed
from queueguard.redis_client import IN_TRANSACTION, connect

LUA = resources.files("queueguard.ratelimit").joinpath("gcra.lua").read_text()
US = 1_000_000

_Call = tuple[list[str], list[str], "asyncio.Future[list[int]]"]


def _us(seconds: float) -> int:
    return round(seconds * US)


def _tat(value: int) -> float | None:
    return value / US if value > 0 else None


class RedisStore:
    name = "redis"

    def __init__(self, url_or_client: str | Redis, *, prefix: str = "qg:rl:",
                 timeout: float = IN_TRANSACTION) -> None:
        # Fail fast and let the caller fall back: a rate limit must not hold up a RCPT for long.
        self.client = connect(url_or_client, timeout) if isinstance(url_or_client, str) else url_or_client
        self.prefix = prefix
        self._sha: str | None = None
        self._queue: list[_Call] = []
        self._sender: asyncio.Task[None] | None = None

    async def reserve(self, asks: Sequence[Ask], now: float) -> Reservation:
        if not asks:
            return Reservation(True, [], [])
        args = ["reserve", str(_us(now))]
        for a in asks:
            args += [str(max(1, _us(a.limit.interval))), str(_us(a.limit.tolerance)), "1" if a.gate else "0"]
        out = await self._call([a.key for a in asks], args)
        return Reservation(out[0] == 1, [_tat(out[2 * i + 1]) for i in range(len(asks))],
                           [out[2 * i + 2] / US for i in range(len(asks))])

    async def refund(self, refunds: Sequence[tuple[str, float]], now: float) -> list[float | None]:
        if not refunds:
            return []
        out = await self._call([k for k, _ in refunds], ["refund", str(_us(now)), *(str(_us(i)) for _, i in refunds)])
        return [_tat(v) for v in out]

    async def reconcile(self, owed: Sequence[Owed], now: float) -> list[float | None]:
        if not owed:
            return []
        args = ["reconcile", str(_us(now))]
        for o in owed:
            args += [str(_us(o.floor or 0.0)), str(_us(o.increment))]
        return [_tat(v) for v in await self._call([o.key for o in owed], args)]

    # --- pipelined script calls ------------------------------------------------------------------

    async def _call(self, keys: list[str], args: list[str]) -> list[int]:
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._queue.append(([self.prefix + k for k in keys], args, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())
        return await future

    async def _send(self) -> None:
        """One round trip at a time; what queued meanwhile goes in the next one."""
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                results = await self._run(batch)
            except Exception as e:  # the callers' SharedState turns it into the policy's on_error
                results = [e] * len(batch)
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result([int(v) for v in result])

    async def _run(self, batch: list[_Call]) -> list[list[int] | BaseException]:
        if self._sha is None:
            self._sha = await self.client.script_load(LUA)
        results = await self._pipeline(batch)
        if any(isinstance(r, NoScriptError) for r in results):  # Redis restarted, or a replica took over
            self._sha = await self.client.script_load(LUA)
            results = await self._pipeline(batch)
        return results

    async def _pipeline(self, batch: list[_Call]) -> list[list[int] | BaseException]:
        assert self._sha is not None
        if len(batch) == 1:
            keys, args, _ = batch[0]
            try:
                return [await self.client.evalsha(self._sha, len(keys), *keys, *args)]
            except NoScriptError as e:
                return [e]
        pipe = self.client.pipeline(transaction=False)
        for keys, args, _ in batch:
            pipe.evalsha(self._sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))

    def tracked(self) -> int | None:
        return None

    async def close(self) -> None:
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)
        await self.client.aclose()
