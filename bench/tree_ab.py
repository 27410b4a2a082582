"""Two source trees of queueguard side by side in one run: a change's cost or gain, alternated.

    git worktree add /tmp/before <commit>
    .venv/bin/python -m bench.tree_ab /tmp/before . [--workers 2] [--state redis|memory]
                                      [--messages 4000] [--sessions 20] [--rounds 3] [--exim]
                                      [--together]

Each round measures the bare aiosmtpd sink, then a guard started from each tree (its `queueguard
serve` imports the tree first on PYTHONPATH), in alternating order, under the same smtp-source
load as bench.workers_bench: the shipped policy with every rule in shadow, relaying to smtp-sink,
new connection per message. A shared machine's noise moves a whole round; the per-round ratio
to the bare sink and the CPU per message (the guard's processes) are what to compare. With
--exim the downstream is a real Exim (queue-only, PROXY v2, as in bench.proxy_bench) instead of
smtp-sink, and the bare sink is not measured.

With --together both guards run at once, each under its own smtp-source load (half the
sessions each), and only their CPU per message is compared: on a shared machine whose load
moves by more than the change being measured (10-30 % from one run to the next), running at the
same time gives both trees the same noise. Throughput is not comparable in this mode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from redis import Redis

from bench.proxy_bench import EXIM_BENCH, aiosmtpd_sink, shadow_default_policy, smtp_source
from bench.workers_bench import cpu_seconds
from queueguard.harness.exim import Exim
from queueguard.harness.guard import Guard
from queueguard.harness.sink import SmtpSink
from tests.components.redis import RedisServer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--state", choices=("redis", "memory"), default="redis")
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--exim", action="store_true", help="relay to a real Exim instead of smtp-sink")
    ap.add_argument("--together", action="store_true", help="both trees at once; CPU per message only")
    args = ap.parse_args()
    if args.together:
        return together(args)
    trees = {"before": str(args.before.resolve()), "after": str(args.after.resolve())}
    got: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        if args.exim:
            exim = stack.enter_context(Exim(proxy=True, queue_only=True, main_config=EXIM_BENCH))
            downstream = {"address": f"127.0.0.1:{exim.port}", "proxy_protocol": "v2", "max_connections": 32}
        else:
            downstream = {"address": f"127.0.0.1:{stack.enter_context(SmtpSink()).port}"}
        redis = stack.enter_context(RedisServer(Path(tmp) / "redis")) if args.state == "redis" else None
        for r in range(args.rounds):
            bare = float("nan")
            if not args.exim:
                with aiosmtpd_sink() as port:
                    bare = smtp_source(port, args.messages, args.sessions)
            print(f"round {r + 1}" + ("" if args.exim else f": bare aiosmtpd sink {bare:,.0f} msg/s"), flush=True)
            for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
                settings: dict[str, object] = {"workers": args.workers, "downstreams": [downstream]}
                if redis is not None:
                    Redis.from_url(redis.url).flushall()
                    settings["state"] = redis.url
                os.environ["PYTHONPATH"] = trees[name]
                guard = Guard(settings, {"default.yaml": shadow_default_policy()})
                guard.start(timeout=60)
                try:
                    deadline = time.monotonic() + 30  # every worker listening before the clock starts
                    while guard.log().count("queueguard ready: ") < 1 and time.monotonic() < deadline:
                        time.sleep(0.1)
                    assert guard.proc is not None
                    before = cpu_seconds(guard.proc.pid)
                    rate = smtp_source(guard.port, args.messages, args.sessions)
                    cpu = (cpu_seconds(guard.proc.pid) - before) / args.messages * 1000
                finally:
                    guard.stop(timeout=60)
                got[name].append((rate, cpu, rate / bare))
                ratio = "" if args.exim else f", {rate / bare:.2f} x bare sink"
                print(f"  {name}: {rate:,.0f} msg/s, {cpu:.2f} ms CPU/msg{ratio}", flush=True)
    for name, rows in got.items():
        ratio = "" if args.exim else f", {statistics.median(x for _, _, x in rows):.2f} x bare sink"
        print(f"{name} ({trees[name]}): median {statistics.median(r for r, _, _ in rows):,.0f} msg/s, "
              f"{statistics.median(c for _, c, _ in rows):.2f} ms CPU/msg{ratio}")
    return 0


def together(args: argparse.Namespace) -> int:
    trees = {"before": str(args.before.resolve()), "after": str(args.after.resolve())}
    cpu: dict[str, list[float]] = {name: [] for name in trees}
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        redis = {name: stack.enter_context(RedisServer(Path(tmp) / f"redis-{name}")) for name in trees} \
            if args.state == "redis" else {}
        for r in range(args.rounds):
            with ExitStack() as round_stack:
                guards: dict[str, Guard] = {}
                for name, tree in trees.items():
                    settings: dict[str, object] = {
                        "workers": args.workers,
                        "downstreams": [{"address": f"127.0.0.1:{round_stack.enter_context(SmtpSink()).port}"}]}
                    if name in redis:
                        settings["state"] = redis[name].url
                    os.environ["PYTHONPATH"] = tree
                    guards[name] = round_stack.enter_context(Guard(settings, {"default.yaml": shadow_default_policy()}))
                used = {name: cpu_seconds(g.proc.pid) for name, g in guards.items() if g.proc is not None}
                with ThreadPoolExecutor(2) as pool:
                    list(pool.map(lambda g: smtp_source(g.port, args.messages, max(1, args.sessions // 2)),
                                  guards.values()))
                for name, g in guards.items():
                    assert g.proc is not None
                    cpu[name].append((cpu_seconds(g.proc.pid) - used[name]) / args.messages * 1000)
            print(f"round {r + 1}: before {cpu['before'][-1]:.3f} ms, after {cpu['after'][-1]:.3f} ms CPU/msg, "
                  f"after/before {cpu['after'][-1] / cpu['before'][-1]:.3f}", flush=True)
    ratios = [a / b for a, b in zip(cpu["after"], cpu["before"], strict=True)]
    print(f"median CPU/msg: before {statistics.median(cpu['before']):.3f} ms, after "
          f"{statistics.median(cpu['after']):.3f} ms; after/before per round: median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
