"""Throughput and added latency of the SMTP proxy, measured side by side in one run.

    .venv/bin/python -m bench.proxy_bench [--messages 4000] [--sessions 20] [--json out.json]

Rows (each the median of --repeat runs of Postfix's smtp-source, 4 KB messages):
- smtp-sink direct: the loopback ceiling of the load generator;
- bare aiosmtpd sink: a Python SMTP server doing nothing (the proxy received with aiosmtpd until
  2026-12-07; it is the reference the targets are stated against);
- queueguard → smtp-sink: the proxy with the shipped default policy (every rule in shadow mode, so
  all its work is done but a one-recipient load is not deferred), relaying every message;
- queueguard with an empty policy: the transport alone (our front end in, our relay out);
- queueguard + clamd: the default policy and a real clamd scan of every message (unix socket);
- Exim direct vs queueguard → Exim (PROXY v2, queue-only), one session and many, new
  connection per message (Exim delays its 221 by 200 ms; the proxy pools downstream connections).
Added latency: one client, connection reused, time from MAIL to the DATA reply, direct to
smtp-sink vs through the proxy; p50/p99 of each and of the difference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from queueguard.harness.clamd import Clamd
from queueguard.harness.exim import Exim
from queueguard.harness.guard import Guard
from queueguard.harness.ports import free_port, wait_port
from queueguard.harness.sink import SmtpSink

REPO = Path(__file__).resolve().parents[1]
EXIM_BENCH = "smtp_accept_max = 500\nsmtp_accept_max_per_host = 500\n"
BODY = b"Subject: bench\r\n\r\n" + (b"x" * 70 + b"\r\n") * 56


def shadow_default_policy(max_concurrent: int | None = None) -> str:
    """The shipped policy with every rule in shadow mode: all the checks' work is done (keys
    computed, counters updated, fingerprints taken) but a one-recipient load is not deferred."""
    import yaml

    doc = yaml.safe_load((REPO / "policies" / "default.yaml").read_text())
    for kind in ("ratelimits", "bursts", "patterns"):
        for rule in doc.get(kind, []):
            rule["mode"] = "shadow"
    if max_concurrent:
        doc["scan"]["max_concurrent"] = max_concurrent
        doc["scan"]["max_waiting"] = 200
    return str(yaml.safe_dump(doc))


def smtp_source(port: int, messages: int, sessions: int, reuse: bool = False) -> float:
    """msg/s for smtp-source against 127.0.0.1:port."""
    exe = shutil.which("smtp-source")
    assert exe, "smtp-source missing (postfix package): ./setup.sh --no-run"
    args = [exe, "-s", str(sessions), "-m", str(messages), "-l", "4096", "-f", "a@test.example",
            "-t", "bob@test.example"]
    if reuse:
        args.append("-d")
    started = time.monotonic()
    subprocess.run([*args, f"127.0.0.1:{port}"], check=True, timeout=900, capture_output=True)
    return messages / (time.monotonic() - started)


def median_rate(fn: Callable[[], float], repeat: int) -> float:
    return statistics.median(fn() for _ in range(repeat))


@contextmanager
def aiosmtpd_sink() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.aiosmtpd_sink", str(port)], cwd=REPO)
    try:
        wait_port("127.0.0.1", port, 10)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def latencies(port: int, n: int) -> list[float]:
    out = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("bench.example")
        for _ in range(n):
            t = time.perf_counter()
            c.sendmail("a@test.example", ["bob@test.example"], BODY)
            out.append(time.perf_counter() - t)
    return out


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--exim-messages", type=int, default=200)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rows: list[tuple[str, float]] = []
    result: dict[str, object] = {}

    with SmtpSink() as sink:
        rows.append(("smtp-sink direct, new connection per message",
                     median_rate(lambda: smtp_source(sink.port, a.messages, a.sessions), a.repeat)))
        with aiosmtpd_sink() as bare:
            bare_rate = median_rate(lambda: smtp_source(bare, a.messages, a.sessions), a.repeat)
            rows.append(("bare aiosmtpd sink, new connection per message", bare_rate))
            bare_reuse = median_rate(lambda: smtp_source(bare, a.messages, a.sessions, True), a.repeat)
            rows.append(("bare aiosmtpd sink, connection reuse", bare_reuse))
        with Guard({"downstreams": [{"address": f"127.0.0.1:{sink.port}", "max_connections": 32}]},
                   policies={"default.yaml": shadow_default_policy()}) as g:
            proxy_rate = median_rate(lambda: smtp_source(g.port, a.messages, a.sessions), a.repeat)
            rows.append(("queueguard → smtp-sink, new connection per message", proxy_rate))
            proxy_reuse = median_rate(lambda: smtp_source(g.port, a.messages, a.sessions, True), a.repeat)
            rows.append(("queueguard → smtp-sink, connection reuse", proxy_reuse))
            direct_lat = latencies(sink.port, 500)
            proxy_lat = latencies(g.port, 500)
        with Guard({"downstreams": [{"address": f"127.0.0.1:{sink.port}", "max_connections": 32}]}) as g:
            bare_proxy = median_rate(lambda: smtp_source(g.port, a.messages, a.sessions), a.repeat)
            rows.append(("queueguard, empty policy (transport only) → smtp-sink, new connection per message",
                         bare_proxy))
            bare_proxy_reuse = median_rate(lambda: smtp_source(g.port, a.messages, a.sessions, True), a.repeat)
            rows.append(("queueguard, empty policy (transport only) → smtp-sink, connection reuse", bare_proxy_reuse))
        with tempfile.TemporaryDirectory(prefix="qg-bench-clamd-") as tmp, \
                Clamd(Path(tmp), max_threads=8) as clamd, \
                Guard({"downstreams": [{"address": f"127.0.0.1:{sink.port}", "max_connections": 32}],
                       "clamd": {"enabled": True, "address": str(clamd.socket), "pid_file": str(clamd.pid_file)}},
                      policies={"default.yaml": shadow_default_policy(max_concurrent=6)}) as g:
            scan_rate = median_rate(lambda: smtp_source(g.port, a.messages, a.sessions), a.repeat)
            rows.append(("queueguard + clamd scan (unix socket) → smtp-sink, new connection per message", scan_rate))
            scanned = g.metric("queueguard_scans_total", result="clean")
            deferred = g.metric("queueguard_verdicts_total", stage="final", action="tempfail")
    result["scan_msgs_per_s"] = scan_rate
    result["scan_vs_rspamd_clamav_200"] = scan_rate / 200
    result["scan_results_counted"] = scanned
    result["scan_deferred"] = deferred
    result["transport_vs_bare_new_conn"] = bare_proxy / bare_rate
    result["transport_vs_bare_reuse"] = bare_proxy_reuse / bare_reuse
    result["proxy_vs_bare_new_conn"] = proxy_rate / bare_rate
    result["proxy_vs_bare_reuse"] = proxy_reuse / bare_reuse

    n = a.exim_messages
    with Exim(queue_only=True, main_config=EXIM_BENCH) as exim:
        exim_1 = smtp_source(exim.port, n, 1)
        exim_20 = smtp_source(exim.port, n * 5, a.sessions)
        queued = exim.queue_count()
    with Exim(proxy=True, queue_only=True, main_config=EXIM_BENCH) as exim:
        with Guard({"downstreams": [{"address": f"127.0.0.1:{exim.port}", "proxy_protocol": "v2",
                                     "max_connections": 32}]},
                   policies={"default.yaml": shadow_default_policy()}) as g:
            via_1 = smtp_source(g.port, n, 1)
            via_20 = smtp_source(g.port, n * 5, a.sessions)
        queued += exim.queue_count()
    rows += [("Exim direct, 1 session, new connection per message", exim_1),
             ("queueguard → Exim, 1 session, new connection per message", via_1),
             (f"Exim direct, {a.sessions} sessions, new connection per message", exim_20),
             (f"queueguard → Exim, {a.sessions} sessions, new connection per message", via_20)]
    result["exim_ratio_1_session"] = via_1 / exim_1
    result[f"exim_ratio_{a.sessions}_sessions"] = via_20 / exim_20
    result["exim_queued"] = queued
    result["exim_expected"] = 2 * (n + n * 5)

    lat = {
        "direct_p50_ms": pct(direct_lat, 0.5) * 1e3, "direct_p99_ms": pct(direct_lat, 0.99) * 1e3,
        "proxy_p50_ms": pct(proxy_lat, 0.5) * 1e3, "proxy_p99_ms": pct(proxy_lat, 0.99) * 1e3,
    }
    lat["added_p50_ms"] = lat["proxy_p50_ms"] - lat["direct_p50_ms"]
    lat["added_p99_ms"] = lat["proxy_p99_ms"] - lat["direct_p99_ms"]
    result["latency"] = lat
    result["rows"] = [{"what": w, "msg_per_s": round(r, 1)} for w, r in rows]

    print("| what | msg/s |\n|---|---:|")
    for what, rate in rows:
        print(f"| {what} | {rate:,.0f} |")
    print()
    for k, v in result.items():
        if k not in ("rows", "latency"):
            print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    print("latency (ms): " + ", ".join(f"{k}={v:.2f}" for k, v in lat.items()))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
