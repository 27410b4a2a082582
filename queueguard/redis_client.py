"""The one way queueguard opens Redis: fail fast and never retry inside a mail transaction.

Rate limits and burst counts are asked at RCPT/DATA time; a slow or dead Redis must turn into
the policy's `state.on_error` within half a second, not hold the sender. Background readers and
publishers (route pressure, membership) may wait longer.

URL forms (settings `state`, docs/settings.md):
  redis://[[user]:password@]host:port/db, rediss://… (TLS), unix:///path/redis.sock?db=N
  redis+sentinel://[[user]:password@]host:port[,host:port…]/service[/db][?sentinel_password=…]
The Sentinel form asks the sentinels for the service's master (redis-py's Sentinel client) whenever
it opens a connection: after a failover the next connection goes to the promoted replica, and a
connection still open to a demoted master is dropped at its first READONLY answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

IN_TRANSACTION = 0.5
BACKGROUND = 2.0
PLAIN = ("redis://", "rediss://", "unix://")
SENTINEL = "redis+sentinel://"


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def parse(url: str) -> str | SentinelTarget:
    """A plain Redis URL as it is, a Sentinel URL taken apart; ValueError says what is wrong."""
    if url.startswith(PLAIN):
        return url
    if not url.startswith(SENTINEL):
        raise ValueError("state must be 'memory', a redis://, rediss:// or unix:// URL, or redis+sentinel://")
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    sentinels = []
    for item in hostlist.split(","):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"redis+sentinel:// needs host:port for every sentinel, got {item!r}")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("redis+sentinel:// needs the service name after the sentinels: …/service[/db]")
    query = parse_qs(parts.query)
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"redis+sentinel:// takes no option {', '.join(sorted(unknown))}")
    return SentinelTarget(
        sentinels, unquote(path[0]), int(path[1]) if len(path) == 2 else 0,
        unquote(user) or None, unquote(password) or None,
        query["sentinel_password"][0] if "sentinel_password" in query else None,
    )


class SentinelMaster(Redis):
    """The service's master through Sentinel; closing it closes the sentinel connections too."""

    sentinels: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinels is not None:
            await self.sentinels.aclose()


def connect(url: str, timeout: float = IN_TRANSACTION) -> Redis:
    target = parse(url)
    fail_fast: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                                 "retry": Retry(NoBackoff(), 0)}
    if isinstance(target, str):
        return Redis.from_url(target, health_check_interval=30, **fail_fast)
    sentinel = Sentinel(target.sentinels, sentinel_kwargs={**fail_fast, "password": target.sentinel_password})
    master = sentinel.master_for(target.service, redis_class=SentinelMaster, db=target.db,
                                 username=target.username, password=target.password,
                                 health_check_interval=30, **fail_fast)
    assert isinstance(master, SentinelMaster)
    master.sentinels = sentinel
    return master
