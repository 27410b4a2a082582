"""Rate-limit benchmark: decisions per second and memory per key.

    .venv/bin/python -m bench.ratelimit_bench [--sizes 1000,100000,1000000] [--decisions 200000]

Memory backend, at each size: fill N keys, then
  - memory per key: tracemalloc's traced bytes after the fill / N (key strings are
    not kept by the store, so only its own structures count), and the RSS delta;
  - store decisions/s: one atomic check-and-reserve on a random existing key;
  - check decisions/s: a full RateLimitCheck RCPT check + transaction end for one
    recipient (rule matching, key building, one store call) with two rules.
Redis backend (a redis-server started here on a free loopback port), one process:
  - store decisions/s: RedisStore.reserve (one EVALSHA of gcra.lua each) from 1, 32
    and 256 concurrent callers; concurrent calls share round trips (pipelining);
  - check decisions/s: the whole RCPT check + transaction end, the same concurrency.
Client and server share the CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import tracemalloc
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from queueguard.model import Connection, Transaction, parse_ip
from queueguard.policy.schema import Policy
from queueguard.ratelimit.check import RateLimitCheck
from queueguard.ratelimit.gcra import Ask, Limit
from queueguard.ratelimit.redis_store import RedisStore
from queueguard.ratelimit.store import MemoryStore, RateStore
from queueguard.stage import RcptContext

POLICY = Policy.model_validate({
    "lists": {"bulk": ["*@lists.example.org", "example.net"]},
    "ratelimits": [
        {"name": "flood", "key": "recipient", "rate": "120/10m", "burst": 30, "unless": {"sender_in": "bulk"}},
        {"name": "net", "key": "client_net", "rate": "600/10m"},
    ],
})
LIMIT = Limit(interval=5.0, burst=30)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def fill(store: MemoryStore, n: int, now: float) -> None:
    for i in range(n):
        store.add(f"flood:user{i}@example.org", 3600.0, now)


def memory_per_key(n: int, now: float) -> float:
    """tracemalloc's bytes held by a store of n keys, per key."""
    gc.collect()
    tracemalloc.start()
    store = MemoryStore(max_keys=max(n, 1000))
    fill(store, n, now)
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert store.tracked() == n, store.tracked()
    return traced / n


def _rss_child(n: int, now: float, out: Any) -> None:
    gc.collect()
    before = rss_bytes()
    store = MemoryStore(max_keys=max(n, 1000))
    fill(store, n, now)
    out.put((rss_bytes() - before) / n)


def rss_per_key(n: int, now: float) -> float:
    """RSS growth per key, measured in a fresh interpreter (no tracemalloc, no reused arenas)."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_rss_child, args=(n, now, out))
    proc.start()
    value = float(out.get())
    proc.join()
    return value


async def store_decisions(store: RateStore, n: int, count: int, now: float, concurrency: int = 1) -> float:
    """Atomic check-and-reserve calls on random keys, from `concurrency` callers at once."""
    asks = [[Ask(f"flood:user{random.randrange(n)}@example.org", LIMIT)] for _ in range(count)]

    async def worker(items: list[list[Ask]]) -> None:
        for a in items:
            await store.reserve(a, now)

    start = time.perf_counter()
    await asyncio.gather(*(worker(asks[i::concurrency]) for i in range(concurrency)))
    return count / (time.perf_counter() - start)


async def check_once(check: RateLimitCheck, rcpt: str, ip: str) -> bool:
    """One transaction's RCPT check and its end (the message went through: reservations kept)."""
    txn = Transaction(Connection(parse_ip(ip)), "sender@example.com", policy=POLICY)
    result = await check.on_rcpt(RcptContext(txn, rcpt, POLICY))
    if result.verdict is None:
        txn.recipients.append(rcpt)
    await check.on_end(txn, True)
    return result.verdict is None


async def check_decisions(store: RateStore, n: int, count: int, concurrency: int = 1) -> float:
    check = RateLimitCheck(store)
    work = [(f"user{random.randrange(n)}@example.org", f"198.51.{random.randrange(256)}.{random.randrange(256)}")
            for _ in range(count)]

    async def worker(items: list[tuple[str, str]]) -> None:
        for rcpt, ip in items:
            await check_once(check, rcpt, ip)

    start = time.perf_counter()
    await asyncio.gather(*(worker(work[i::concurrency]) for i in range(concurrency)))
    return count / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def redis_cpu(store: RedisStore) -> float:
    """Seconds of CPU the redis-server has used (INFO cpu)."""
    info = await store.client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def measured(store: RedisStore, count: int, run: Coroutine[Any, Any, float]) -> tuple[float, float, float]:
    """Decisions/s by the wall clock, and CPU µs per decision in this process and in redis-server: on a
    shared, loaded machine the CPU figures say what one process could do with a core to itself."""
    client, server = time.process_time(), await redis_cpu(store)
    rate = await run
    client, server = time.process_time() - client, await redis_cpu(store) - server
    return rate, client / count * 1e6, server / count * 1e6


async def redis_bench(count: int) -> list[str]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server not found: install redis-server (setup.sh does)")
    d = Path(tempfile.mkdtemp(prefix="qg-bench-redis-"))
    port = free_port()
    await asyncio.to_thread(
        subprocess.run, [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                         "--daemonize", "yes", "--dir", str(d), "--pidfile", str(d / "redis.pid")], check=True)
    lines = []
    try:
        for _ in range(200):
            if (d / "redis.pid").exists():
                break
            await asyncio.sleep(0.01)
        store = RedisStore(f"redis://127.0.0.1:{port}/0")
        for attempt in range(100):
            try:
                await store.client.ping()
                break
            except Exception:
                if attempt == 99:
                    raise
                await asyncio.sleep(0.02)
        now = time.time()
        await check_decisions(store, 100_000, count // 4, 32)  # warm up and fill some keys
        for what, run in (("store decision (RedisStore.reserve)", lambda c: store_decisions(store, 100_000, count,
                                                                                              now, c)),
                          ("RCPT check + transaction end", lambda c: check_decisions(store, 100_000, count, c))):
            for conc in (1, 32, 256):
                rate, client_us, server_us = await measured(store, count, run(conc))
                lines.append(f"| {what} | {conc} | {rate:,.0f} | {client_us:.1f} | {server_us:.1f} |")
        await store.close()
    finally:
        os.kill(int((d / "redis.pid").read_text()), signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)
    return lines


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,100000,1000000")
    ap.add_argument("--decisions", type=int, default=200_000)
    ap.add_argument("--redis-decisions", type=int, default=20_000)
    args = ap.parse_args()
    random.seed(1)
    now = time.time()
    print("| keys | traced bytes/key | RSS bytes/key | store decisions/s | check decisions/s |")
    print("|---:|---:|---:|---:|---:|")
    for n in (int(s) for s in args.sizes.split(",")):
        traced, rss = memory_per_key(n, now), rss_per_key(n, now)
        store = MemoryStore(max_keys=max(n, 1000) * 2)
        fill(store, n, now)
        sd = await store_decisions(store, n, args.decisions, now)
        cd = await check_decisions(store, n, args.decisions // 4)
        print(f"| {n:,} | {traced:.0f} | {rss:.0f} | {sd:,.0f} | {cd:,.0f} |")
        del store
        gc.collect()
    print()
    print("| Redis: what | concurrent | decisions/s | client CPU µs/decision | redis-server CPU µs/decision |")
    print("|---|---:|---:|---:|---:|")
    for line in await redis_bench(args.redis_decisions):
        print(line)


if __name__ == "__main__":
    asyncio.run(main())
