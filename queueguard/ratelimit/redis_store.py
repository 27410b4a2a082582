"""Shared rate-limit state in Redis, so several queueguard hosts enforce one limit exactly.

Every operation runs inside the Lua script in `gcra.lua` (shipped as package data): the check and
the update of a decision happen in one atomic step inside Redis, so concurrent transactions on any
number of hosts cannot each see the same room. The script is loaded once with SCRIPT LOAD and run
with EVALSHA (re-loaded if Redis restarted, or a replica took over, and forgot it).

Calls are batched: the decisions the event loop asks for while one call is in flight go together
in the next one, as one EVALSHA (no waiting to fill a batch: a call alone goes at once). A script
runs atomically, so each decision in it still does; one call and one short reply per batch is
what gets one process past 20,000 decisions/s (docs/benchmarks.md), where a command per decision
spends most of its time in redis-py's packing and parsing.

Values are microseconds since the epoch; keys carry a TTL so Redis forgets idle keys by itself.
Each reservation carries the key's TAT as the caller last saw it here (Ask.floor, from its mirror):
a Redis with no entry for the key (restarted empty, failed over to a replica that missed the last
writes, or evicted it) starts from that rather than a fresh burst.
Times come from the caller's clock (hosts are NTP-synced; a few ms of skew is small against
intervals of seconds). A call's keys must live on one server: one Redis or one Sentinel-managed
master, not a Cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from importlib import resources

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from queueguard.ratelimit.gcra import Ask, Reservation
from queueguard.ratelimit.store import Owed
from queueguard.redis_client import IN_TRANSACTION, connect

LUA = resources.files("queueguard.ratelimit").joinpath("gcra.lua").read_text()
US = 1_000_000
BATCH = 256
"""Most operations in one script call: Redis runs nothing else while a script runs (~1-2 ms at this)."""

_Call = tuple[list[str], str, "asyncio.Future[list[int]]"]


def resp_command(*args: str) -> bytes:
    """A command in RESP, as redis-py packs it (UTF-8): a fifth of the cost of its general packer."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


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
        self.timeout = timeout
        self._conn: AbstractConnection | None = None
        """The connection the batched script calls go on (_evalsha)."""
        self._sha: str | None = None
        self._queue: list[_Call] = []
        self._sender: asyncio.Task[None] | None = None

    async def reserve(self, asks: Sequence[Ask], now: float) -> Reservation:
        if not asks:
            return Reservation(True, [], [])
        groups = " ".join(f"{max(1, _us(a.limit.interval))} {_us(a.limit.tolerance)} {1 if a.gate else 0} "
                          f"{_us(a.floor or 0.0)}" for a in asks)
        out = await self._call([a.key for a in asks], f"r {_us(now)} {len(asks)} {groups}")
        return Reservation(out[0] == 1, [_tat(out[2 * i + 1]) for i in range(len(asks))],
                           [out[2 * i + 2] / US for i in range(len(asks))])

    async def refund(self, refunds: Sequence[tuple[str, float]], now: float) -> list[float | None]:
        if not refunds:
            return []
        groups = " ".join(str(_us(i)) for _, i in refunds)
        out = await self._call([k for k, _ in refunds], f"f {_us(now)} {len(refunds)} {groups}")
        return [_tat(v) for v in out]

    async def reconcile(self, owed: Sequence[Owed], now: float) -> list[float | None]:
        if not owed:
            return []
        groups = " ".join(f"{_us(o.floor or 0.0)} {_us(o.increment)}" for o in owed)
        out = await self._call([o.key for o in owed], f"c {_us(now)} {len(owed)} {groups}")
        return [_tat(v) for v in out]

    # --- batched script calls --------------------------------------------------------------------

    async def _call(self, keys: list[str], spec: str) -> list[int]:
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._queue.append(([self.prefix + k for k in keys], spec, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())
        return await future

    async def _send(self) -> None:
        """One call at a time; what queued meanwhile goes in the next one."""
        while self._queue:
            batch, self._queue = self._queue[:BATCH], self._queue[BATCH:]
            try:
                replies: list[list[int]] | Exception = await self._run(batch)
            except Exception as e:  # the callers' SharedState turns it into the policy's on_error
                replies = e
            for i, (_, _, future) in enumerate(batch):
                if future.done():
                    continue
                if isinstance(replies, Exception):
                    future.set_exception(replies)
                else:
                    future.set_result(replies[i])

    async def _run(self, batch: list[_Call]) -> list[list[int]]:
        keys = [k for call in batch for k in call[0]]
        specs = [call[1] for call in batch]
        if self._sha is None:
            self._sha = await self.client.script_load(LUA)
        try:
            reply = await self._evalsha(self._sha, keys, specs)
        except NoScriptError:  # Redis restarted, or a replica took over
            self._sha = await self.client.script_load(LUA)
            reply = await self._evalsha(self._sha, keys, specs)
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        return [[int(v) for v in line.split()] for line in text.split("\n")]

    async def _evalsha(self, sha: str, keys: list[str], specs: list[str]) -> object:
        """EVALSHA on a connection of the store's own, under one timeout for the whole call.

        Calls go one at a time (_send), so one connection is enough: made by the client's pool
        (address, AUTH, SELECT, TLS, Sentinel's current master, READONLY after a failover are
        redis-py's) and kept. Through the client's pool, retry and per-step timeouts (a Task per
        write in asyncio.wait_for) a reserve() cost 170-200 µs of CPU; this way 110-120.
        A connection the server closed meanwhile (a restart) is noticed before it is written to,
        as the pool does; a failure half-way leaves it disconnected, and the next call reconnects."""
        conn = self._conn
        if conn is None:
            conn = self._conn = self.client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            conn.socket_timeout = None  # the call's own timeout below bounds every step
        async with asyncio.timeout(self.timeout):
            if conn.is_connected:
                try:
                    stale = await conn.can_read()  # a reply nobody asked for, or the end: out of step
                except (RedisConnectionError, OSError):
                    stale = True
                if stale:
                    await conn.disconnect()
            if not conn.is_connected:
                await conn.connect()  # Sentinel's: asks for the current master (send would not)
            await conn.send_packed_command(resp_command("EVALSHA", sha, str(len(keys)), *keys, *specs))
            return await conn.read_response()

    def tracked(self) -> int | None:
        return None

    async def close(self) -> None:
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)
        if self._conn is not None:
            await self._conn.disconnect()
        await self.client.aclose()
