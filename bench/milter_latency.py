"""The milter's own latency at a paced rate, without Postfix: what the milter adds per message.

    .venv/bin/python -m bench.milter_latency [--rate 200] [--messages 1000] [--rounds 3]

bench/milter_peers.py `--latency` measures the same through Postfix and a counting relay; on
this 2-core box that figure is mostly Postfix's own processes and the relay's hops competing
for the cores. Here an asyncio client speaks milter protocol 6 (queueguard's codec) straight to
`queueguard serve`'s unix socket the way Postfix does, one connection per message, paced at
`--rate` messages a second: OPTNEG, CONNECT, HELO, MAIL, RCPT, two headers, EOH, a 4 KB body,
EOM, QUIT, each packet sent only after the one before was answered if the milter asked for an
answer. The wait of a message is the sum of the times from sending a command to reading its
answer (the commands the milter negotiated no reply for cost nothing here, as at Postfix). The
guard runs the shipped policy with every rule in shadow mode (all the checks' work is done) and
no clamd (the issue's latency target is "without scanning"). The client's own Python work is
inside the figures, so they over-state the milter's part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import time
from pathlib import Path

from bench.milter_peers import at_rate, pct
from bench.proxy_bench import shadow_default_policy
from queueguard.frontends import milter_protocol as mp
from queueguard.harness.guard import Guard

BODY = b"".join(b"%d" % i + b"X" * 78 + b"\r\n" for i in range(50))
STEPS = (
    mp.connect("mail.example.net", mp.FAMILY_INET, 40000, "192.0.2.5"),
    mp.strings(mp.HELO, ["client.example"]),
    mp.strings(mp.MAIL, ["<a@test.example>"]),
    mp.strings(mp.RCPT, ["<bob@test.example>"]),
    mp.header("From", b"<a@test.example>"),
    mp.header("Subject", b"report"),
    mp.packet(mp.EOH),
    mp.packet(mp.BODY, BODY),
    mp.packet(mp.EOM),
)
EVERY_STEP = 0x1FFFFF
EVERY_ACTION = 0x1FF


async def _read(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    size, command = struct.unpack(">IB", await reader.readexactly(5))
    return command, await reader.readexactly(size - 1)


async def one_message(path: str) -> float:
    """One connection, one message, as Postfix sends it; seconds spent waiting on the milter."""
    reader, writer = await asyncio.open_unix_connection(path)
    started = time.perf_counter()
    writer.write(mp.optneg(6, EVERY_ACTION, EVERY_STEP))
    command, data = await _read(reader)
    assert command == mp.OPTNEG, chr(command)
    _, _, protocol, _ = mp.parse_optneg(data)
    waited = time.perf_counter() - started
    for packet in STEPS:
        flag = mp.NO_REPLY.get(packet[4])
        writer.write(packet)
        if flag is not None and protocol & flag:
            continue
        started = time.perf_counter()
        while True:
            command, data = await _read(reader)
            if command in mp.FINAL:
                break
        waited += time.perf_counter() - started
    writer.write(mp.packet(mp.QUIT))
    writer.close()
    return waited


async def paced(path: str, rate: float, n: int) -> list[float]:
    return await at_rate(rate, n, lambda: one_message(path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    guard = Guard({"log_level": "warning"}, {"policy.yaml": shadow_default_policy()})
    path = guard.dir / "milter.sock"
    guard.settings["milter"] = {"enabled": True, "listen": f"unix:{path}"}
    guard.settings_path.write_text(json.dumps(guard.settings))  # YAML is a superset of JSON
    rounds = []
    with guard:
        deadline = time.monotonic() + 20
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        asyncio.run(paced(str(path), 50, 100))  # warm-up
        for r in range(args.rounds):
            waits = asyncio.run(paced(str(path), args.rate, args.messages))
            row = {q: round(1000 * pct(waits, p), 2) for q, p in (("p50", .5), ("p90", .9), ("p99", .99))}
            row["max"] = round(1000 * max(waits), 2)
            rounds.append(row)
            print(f"round {r + 1} at {args.rate:g} msg/s: wait on the milter per message (ms) {row}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rate": args.rate, "messages": args.messages, "rounds": rounds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
