"""Throughput of Postfix with the queueguard milter and with the policy service, side by side.

    .venv/bin/python -m bench.milter_bench [--messages 2000] [--sessions 20] [--repeat 3] [--json out.json]

Postfix (private instance, tests/components/postfix.py, the contrib/postfix
snippets) relays to smtp-sink; Postfix's smtp-source sends 4 KB messages, a
new connection per message. Rows (median of --repeat runs, msg/s accepted by
Postfix's smtpd):
- Postfix alone;
- Postfix + queueguard milter over loopback TCP, and over a unix socket;
- the same at one session (where per-message round trips show);
- Postfix + queueguard policy service (one request per RCPT).
queueguard runs the shipped policy with every rule in shadow mode, so every
check does its work but the single-recipient load is not deferred.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench.proxy_bench import shadow_default_policy, smtp_source
from queueguard.harness.guard import Guard
from queueguard.harness.ports import free_port
from queueguard.harness.sink import SmtpSink
from tests.components.postfix import Postfix


@contextmanager
def milter_guard(unix: bool) -> Iterator[tuple[Guard, str]]:
    """A guard with the milter; yields it and the address as Postfix writes it."""
    workdir = Path(tempfile.mkdtemp(prefix="qg-milter-"))
    workdir.chmod(0o755)
    sock = workdir / "milter.sock"
    if unix:
        listen, postfix_side = f"unix:{sock}", f"unix:{sock}"
    else:
        port = free_port()
        listen, postfix_side = f"inet:{port}@127.0.0.1", f"inet:127.0.0.1:{port}"
    try:
        with Guard({"milter": {"enabled": True, "listen": listen}, "log_level": "warning"},
                   {"policy.yaml": shadow_default_policy()}) as g:
            if unix:
                _wait_path(sock)
                sock.chmod(0o666)  # smtpd runs as postfix; deployment would use a shared group
            yield g, postfix_side
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_path(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.02)


def measure(port: int, messages: int, sessions: int, repeat: int) -> float:
    return statistics.median(smtp_source(port, messages, sessions) for _ in range(repeat))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    n, s, r = args.messages, args.sessions, args.repeat
    one = max(200, n // 10)
    rows: list[tuple[str, float]] = []
    with SmtpSink() as sink:
        with Postfix(relay_port=sink.port) as pf:
            rows.append((f"Postfix alone, {s} sessions", measure(pf.port, n, s, r)))
            rows.append(("Postfix alone, 1 session", measure(pf.port, one, 1, r)))
        for unix in (False, True):
            kind = "unix socket" if unix else "loopback TCP"
            with ExitStack() as stack:
                _, spec = stack.enter_context(milter_guard(unix))
                pf = stack.enter_context(Postfix(relay_port=sink.port, milter=spec))
                rows.append((f"Postfix + milter ({kind}), {s} sessions", measure(pf.port, n, s, r)))
                rows.append((f"Postfix + milter ({kind}), 1 session", measure(pf.port, one, 1, r)))
        with ExitStack() as stack:
            listen = f"127.0.0.1:{free_port()}"
            stack.enter_context(Guard({"policy_socket": {"enabled": True, "listen": listen}, "log_level": "warning"},
                                      {"policy.yaml": shadow_default_policy()}))
            pf = stack.enter_context(Postfix(relay_port=sink.port, policy=listen))
            rows.append((f"Postfix + policy service, {s} sessions", measure(pf.port, n, s, r)))
            rows.append(("Postfix + policy service, 1 session", measure(pf.port, one, 1, r)))
    width = max(len(name) for name, _ in rows)
    print(f"{'setup':<{width}}  msg/s")
    for name, rate in rows:
        print(f"{name:<{width}}  {rate:7.0f}")
    if args.json:
        args.json.write_text(json.dumps(dict(rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
