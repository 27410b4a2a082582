"""Scale-out on one host: 1 worker vs 2 workers vs a bare aiosmtpd sink, side by side in one run.

    .venv/bin/python -m bench.workers_bench [--messages 4000] [--sessions 20] [--rounds 3] [--corpus DIR]
                                            [--json out.json]

Every queueguard row uses Redis state on loopback (more than one worker needs it) and the
shipped policy with every rule in shadow (all checks do their work; a one-recipient load is not
deferred), relaying to smtp-sink. Rows are alternated round by round and each figure is the
median over the rounds, so a noisy shared machine moves every row alike; compare ratios.

- smtp-source rows: Postfix's load generator, new connection per message, 4 KB of filler lines
  (no words: no body fingerprint is computed, so these under-state the per-message cost);
- corpus rows (with --corpus, the directory fetch-dev-corpus.sh printed): real spam and ham of the
  SpamAssassin development split, sent by a fast asyncio client, new connection per message.
CPU per message: CPU seconds of the queueguard processes (supervisor and workers) / messages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from redis import Redis

from bench.proxy_bench import aiosmtpd_sink, shadow_default_policy, smtp_source
from queueguard.harness.guard import Guard
from queueguard.harness.sink import SmtpSink
from tests.components.redis import RedisServer

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(root: int) -> float:
    """utime+stime of `root` and its children (the workers), from /proc."""
    pids = [root, *(int(p) for p in subprocess.run(["pgrep", "-P", str(root)], capture_output=True,
                                                   text=True).stdout.split())]
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def load_corpus(directory: Path, limit: int) -> list[bytes]:
    """Real messages with CRLF line ends (spam and ham alternated), at most `limit`."""
    spam = sorted((directory / "spam").iterdir())
    ham = sorted((directory / "ham").iterdir())
    out: list[bytes] = []
    for s, h in zip(spam, ham, strict=False):
        for path in (s, h):
            raw = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\r", b"").replace(b"\0", b"")
            out.append(raw.replace(b"\n", b"\r\n"))
    return out[:limit]


async def _send_one(port: int, raw: bytes) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async def reply() -> bytes:
            while True:
                line = await reader.readline()
                if line[3:4] != b"-":
                    return line

        await reply()
        stuffed = b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in raw.split(b"\r\n"))
        for cmd in (b"EHLO bench.example\r\n", b"MAIL FROM:<bench@client.example>\r\n",
                    b"RCPT TO:<bob@test.example>\r\n", b"DATA\r\n"):
            writer.write(cmd)
            await reply()
        writer.write(stuffed + (b"" if stuffed.endswith(b"\r\n") else b"\r\n") + b".\r\n")
        ok = (await reply()).startswith(b"250")
        writer.write(b"QUIT\r\n")
        await reply()
        return ok
    finally:
        writer.close()


def corpus_rate(port: int, messages: list[bytes], sessions: int) -> float:
    """msg/s for `sessions` concurrent senders over the messages, new connection per message."""
    async def run() -> float:
        queue = list(messages)
        started = time.monotonic()

        async def worker() -> None:
            while queue:
                await _send_one(port, queue.pop())

        await asyncio.gather(*(worker() for _ in range(sessions)))
        return len(messages) / (time.monotonic() - started)

    return asyncio.run(run())


@contextmanager
def guard(workers: int, redis_url: str, sink_port: int) -> Iterator[Guard]:
    g = Guard({"workers": workers, "state": redis_url, "downstreams": [{"address": f"127.0.0.1:{sink_port}"}]},
              {"default.yaml": shadow_default_policy()})
    g.start(timeout=60)
    try:
        if workers > 1:  # every worker listening before the clock starts
            deadline = time.monotonic() + 30
            while g.log().count("queueguard ready: ") < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
        yield g
    finally:
        g.stop(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--corpus", type=Path, help="directory printed by ../shared/corpus/fetch-dev-corpus.sh")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    corpus = load_corpus(args.corpus, args.messages) if args.corpus else []
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def record(row: str, rate: float, cpu_per_msg: float | None = None) -> None:
        rates.setdefault(row, []).append(rate)
        if cpu_per_msg is not None:
            cpu.setdefault(row, []).append(cpu_per_msg)
        print(f"  {row}: {rate:,.0f} msg/s" + (f", {cpu_per_msg * 1000:.2f} ms CPU/msg" if cpu_per_msg else ""),
              flush=True)

    def measured(g: Guard, send: Callable[[], float], n: int) -> tuple[float, float]:
        assert g.proc is not None
        before = cpu_seconds(g.proc.pid)
        rate = send()
        return rate, (cpu_seconds(g.proc.pid) - before) / n

    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as redis, SmtpSink() as sink:
        for r in range(args.rounds):
            print(f"round {r + 1}", flush=True)
            with aiosmtpd_sink() as port:
                record("bare aiosmtpd sink, smtp-source", smtp_source(port, args.messages, args.sessions))
                if corpus:
                    record("bare aiosmtpd sink, corpus", corpus_rate(port, corpus, args.sessions))
            for n in (1, 2):
                Redis.from_url(redis.url).flushall()
                with guard(n, redis.url, sink.port) as g:
                    rate, c = measured(g, partial(smtp_source, g.port, args.messages, args.sessions), args.messages)
                    record(f"queueguard {n} worker{'s' if n > 1 else ''}, smtp-source", rate, c)
                    if corpus:
                        rate, c = measured(g, partial(corpus_rate, g.port, corpus, args.sessions), len(corpus))
                        record(f"queueguard {n} worker{'s' if n > 1 else ''}, corpus", rate, c)
    summary: dict[str, dict[str, Any]] = {
        row: {"msg_s": round(statistics.median(v)), "runs": [round(x) for x in v],
              "cpu_ms_per_msg": round(statistics.median(cpu[row]) * 1000, 2) if row in cpu else None}
        for row, v in rates.items()}
    for kind in ("smtp-source", "corpus"):
        bare = rates.get(f"bare aiosmtpd sink, {kind}")
        for workers in ("1 worker", "2 workers"):
            name = f"queueguard {workers}, {kind}"
            if bare and name in rates:
                # Each round's rate over that round's bare sink: the box's load moves whole rounds.
                per_round = [x / b for x, b in zip(rates[name], bare, strict=True)]
                summary[name]["x_bare_sink_rounds"] = [round(x, 2) for x in per_round]
                summary[name]["x_bare_sink"] = round(statistics.median(per_round), 2)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
