"""Shared rate-limit state in Redis, so several queueguard hosts enforce one limit.

The update is the Lua script in `gcra.lua` (shipped as package data), loaded
once with SCRIPT LOAD and run with EVALSHA (re-loaded if Redis restarted and
forgot it). Reads are one MGET. Values are microseconds since the epoch;
keys carry a TTL so Redis forgets idle keys by itself. Times come from the
caller's clock (hosts are NTP-synced; a few ms of skew is small against
intervals of seconds). Multi-key calls assume a single Redis, not a cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

from redis.exceptions import NoScriptError

from queueguard.redis_client import connect

LUA = resources.files("queueguard.ratelimit").joinpath("gcra.lua").read_text()


class RedisStore:
    name = "redis"

    def __init__(self, url: str, *, prefix: str = "qg:rl:", timeout: float = 0.5) -> None:
        # Fail fast and let the caller fall back: a rate limit must not hold up a RCPT for long.
        self.client = connect(url, timeout)
        self.prefix = prefix
        self._sha: str | None = None

    async def peek(self, keys: Sequence[str]) -> list[float | None]:
        if not keys:
            return []
        values = await self.client.mget([self.prefix + k for k in keys])
        return [None if v is None else int(v) / 1e6 for v in values]

    async def advance(self, updates: Sequence[tuple[str, float]], now: float) -> None:
        if not updates:
            return
        keys = [self.prefix + k for k, _ in updates]
        args = [str(int(now * 1e6)), *(str(round(inc * 1e6)) for _, inc in updates)]
        if self._sha is None:
            self._sha = await self.client.script_load(LUA)
        try:
            await self.client.evalsha(self._sha, len(keys), *keys, *args)
        except NoScriptError:  # Redis restarted and lost its script cache
            self._sha = await self.client.script_load(LUA)
            await self.client.evalsha(self._sha, len(keys), *keys, *args)

    def tracked(self) -> int | None:
        return None

    async def close(self) -> None:
        await self.client.aclose()
