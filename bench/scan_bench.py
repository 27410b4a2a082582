"""ClamAV scanning through queueguard's scan stage, with a real clamd (local EICAR database).

    .venv/bin/python -m bench.scan_bench [--messages 400] [--size 100000] [--limits 1,2,4,6]
                                         [--burst 1000] [--json out.json]

Part 1, throughput: --messages distinct messages (a base64 attachment of --size random
bytes each; distinct because clamd caches clean results by hash) pushed through
ScanCheck.on_message all at once, with a fixed concurrency limit (adaptive off, wait
bounds out of the way). Reports scans/s and clamd scan latency p50/p95/p99 per limit.

Part 2, burst: --burst messages arrive at once (90% 20 KB, 10% 1 MB) against the
default scan policy (max_concurrent 4, adaptive, max_waiting 32, max_wait 5s). Reports
how many were scanned and how many deferred (and why), elapsed time, the concurrency
limit at the end, and clamd's RSS peak (sampled every 10 ms from /proc).

clamd runs with MaxThreads 8 over its unix socket; the tiny database means these are
the costs of transport, MIME decoding and the gate, not of signature matching (the
official database adds its own per-byte cost and ~1.2 GiB of RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from queueguard.harness.clamd import Clamd
from queueguard.mime import parse_message
from queueguard.model import Connection, Transaction, parse_ip
from queueguard.policy.schema import Policy
from queueguard.scan.check import ScanCheck
from queueguard.settings import ClamdSettings
from queueguard.stage import MessageContext


def mail(size: int) -> bytes:
    b64 = base64.encodebytes(os.urandom(size)).replace(b"\n", b"\r\n")
    return (
        b"From: a@sender.example\r\nTo: b@rcpt.example\r\nSubject: bench\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
        b"--B\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + b64 + b"\r\n--B--\r\n"
    )


def ctx(raw: bytes, policy: Policy) -> MessageContext:
    txn = Transaction(Connection(parse_ip("192.0.2.1")), "a@sender.example", recipients=["b@rcpt.example"])
    return MessageContext(txn, raw, policy, parse_message)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


class RssPeak(threading.Thread):
    def __init__(self, clamd: Clamd) -> None:
        super().__init__(daemon=True)
        self.clamd, self.peak, self.stop = clamd, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, self.clamd.rss())
            time.sleep(0.01)


async def throughput(clamd: Clamd, limit: int, messages: list[bytes]) -> dict[str, Any]:
    check = ScanCheck(ClamdSettings(enabled=True, address=str(clamd.socket)), sensors=[])
    policy = Policy.model_validate(
        {"scan": {"max_concurrent": limit, "adaptive": False, "max_waiting": len(messages), "max_wait": "600s"}}
    )
    latencies: list[float] = []

    async def one(raw: bytes) -> None:
        r = await check.on_message(ctx(raw, policy))
        if r.verdict is not None:
            raise RuntimeError(f"unexpected verdict {r.verdict}")

    scanner = check.scanner
    original = scanner.instream

    async def timed(data: bytes) -> Any:
        t = time.monotonic()
        result = await original(data)
        latencies.append(time.monotonic() - t)
        return result

    scanner.instream = timed  # type: ignore[method-assign]
    start = time.monotonic()
    await asyncio.gather(*(one(m) for m in messages))
    elapsed = time.monotonic() - start
    return {
        "limit": limit, "messages": len(messages), "scans_per_s": round(len(messages) / elapsed, 1),
        "p50_ms": round(pct(latencies, 50) * 1000, 1), "p95_ms": round(pct(latencies, 95) * 1000, 1),
        "p99_ms": round(pct(latencies, 99) * 1000, 1), "peak_in_flight": check.gate.peak_in_flight,
    }


async def burst(clamd: Clamd, n: int, label: str, policy: Policy, spread: float) -> dict[str, Any]:
    """n messages arriving evenly over `spread` seconds (0: all at once)."""
    check = ScanCheck(ClamdSettings(enabled=True, address=str(clamd.socket)), sensors=[])
    messages = [mail(1_000_000 if i % 10 == 0 else 20_000) for i in range(n)]
    rss = RssPeak(clamd)
    rss_before = clamd.rss()
    rss.start()
    start = time.monotonic()

    async def arrive(i: int, raw: bytes) -> Any:
        await asyncio.sleep(spread * i / n)
        return await check.on_message(ctx(raw, policy))

    results = await asyncio.gather(*(arrive(i, m) for i, m in enumerate(messages)))
    elapsed = time.monotonic() - start
    rss.stop.set()
    rss.join()
    outcome: dict[str, int] = {}
    for r in results:
        key = "scanned" if r.verdict is None else f"451 {r.verdict.reason}"
        outcome[key] = outcome.get(key, 0) + 1
    return {
        "run": label, "messages": n, "spread_s": spread, "elapsed_s": round(elapsed, 2), "outcome": outcome,
        "peak_in_flight": check.gate.peak_in_flight, "limit_after": check.gate.limit,
        "clamd_rss_before_mib": round(rss_before / 2**20, 1), "clamd_rss_peak_mib": round(rss.peak / 2**20, 1),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--limits", default="1,2,4,6")
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out: dict[str, Any] = {"throughput": [], "burst": None}
    with tempfile.TemporaryDirectory() as d, Clamd(Path(d), max_threads=8, max_queue=200) as clamd:
        print(f"| limit | messages | scans/s | p50 ms | p95 ms | p99 ms | peak in flight |  ({args.size} B each)")
        print("|---|---|---|---|---|---|---|")
        for limit in (int(x) for x in args.limits.split(",")):
            messages = [mail(args.size) for _ in range(args.messages)]
            row = await throughput(clamd, limit, messages)
            out["throughput"].append(row)
            print(f"| {row['limit']} | {row['messages']} | {row['scans_per_s']} | {row['p50_ms']} | "
                  f"{row['p95_ms']} | {row['p99_ms']} | {row['peak_in_flight']} |")
        if args.burst:
            out["burst"] = []
            no_gate = Policy.model_validate(
                {"scan": {"max_concurrent": args.burst, "max_waiting": args.burst, "max_wait": "600s",
                          "adaptive": False}})
            for label, policy, spread in (("default policy, all at once", Policy(), 0.0),
                                          ("default policy, over 4 s", Policy(), 4.0),
                                          ("gate opened wide, all at once", no_gate, 0.0)):
                row = await burst(clamd, args.burst, label, policy, spread)
                out["burst"].append(row)
                print("burst:", json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
