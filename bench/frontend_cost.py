"""What receiving SMTP costs with aiosmtpd against a protocol-level receiver, in the same run.

    .venv/bin/python -m bench.frontend_cost [--messages 4000] [--sessions 20] [--rounds 3]

The scale-out target (2 workers >= 1.1 x the bare aiosmtpd sink) was out of reach while every
worker received with aiosmtpd (docs/benchmarks.md, "Workers"); this measured how much a front end
at the protocol level would leave, before the proxy got one: `protocol_sink` below is an
asyncio.Protocol that answers the commands smtp-source sends and finds the end of DATA in its
buffer (no coroutine or stream reader per command, no checks, not a server anyone should run),
against bench/aiosmtpd_sink.py, each as its own process fed by smtp-source, alternated round by
round. Reported: msg/s and the sink
process's CPU per message (user + system from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time

from queueguard.harness.ports import free_port

HZ = os.sysconf("SC_CLK_TCK")


class ProtocolSink(asyncio.Protocol):
    """Just enough SMTP for smtp-source: replies written once per read, DATA ended by CRLF.CRLF."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport, self.buffer, self.in_data = transport, bytearray(), False
        transport.write(b"220 sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out: list[bytes] = []
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    break
                del self.buffer[:end + 5]
                self.in_data = False
                out.append(b"250 2.0.0 Ok\r\n")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            verb = bytes(self.buffer[:4]).upper()
            del self.buffer[:end + 2]
            if verb == b"EHLO":
                out.append(b"250-sink\r\n250-8BITMIME\r\n250 SIZE 33554432\r\n")
            elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                out.append(b"250 2.0.0 Ok\r\n")
            elif verb == b"DATA":
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data = True
                self.buffer[:0] = b"\r\n"
            elif verb == b"QUIT":
                self.transport.write(b"".join(out) + b"221 2.0.0 Bye\r\n")
                self.transport.close()
                return
            else:
                out.append(b"500 5.5.2 Error: command not recognized\r\n")
        if out:
            self.transport.write(b"".join(out))


async def protocol_sink(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(ProtocolSink, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def one_round(kind: str, messages: int, sessions: int) -> tuple[float, float]:
    port = free_port()
    module = "bench.aiosmtpd_sink" if kind == "aiosmtpd" else "bench.frontend_cost"
    args = [sys.executable, "-m", module, str(port)] + ([] if kind == "aiosmtpd" else ["--serve"])
    sink = subprocess.Popen(args)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                subprocess.run([shutil.which("smtp-source") or "smtp-source", "-m", "1", f"127.0.0.1:{port}"],
                               check=True, capture_output=True, timeout=5)
                break
            except subprocess.CalledProcessError:
                time.sleep(0.1)
        ticks, started = cpu_ticks(sink.pid), time.monotonic()
        subprocess.run([shutil.which("smtp-source") or "smtp-source", "-s", str(sessions), "-m", str(messages),
                        "-l", "4096", "-f", "a@test.example", "-t", "bob@test.example", f"127.0.0.1:{port}"],
                       check=True, capture_output=True, timeout=600)
        elapsed, used = time.monotonic() - started, (cpu_ticks(sink.pid) - ticks) / HZ
    finally:
        sink.terminate()
        sink.wait()
    return messages / elapsed, 1000 * used / messages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("port", nargs="?", type=int)
    ap.add_argument("--serve", action="store_true", help="run the protocol-level sink on PORT (internal)")
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if args.serve:
        asyncio.run(protocol_sink(args.port))
        return 0
    got: dict[str, list[tuple[float, float]]] = {"aiosmtpd": [], "protocol": []}
    for r in range(args.rounds):
        for kind in ("aiosmtpd", "protocol") if r % 2 == 0 else ("protocol", "aiosmtpd"):
            rate, cpu = one_round(kind, args.messages, args.sessions)
            got[kind].append((rate, cpu))
            print(f"round {r + 1} {kind}: {rate:.0f} msg/s, {cpu:.3f} ms CPU per message", flush=True)
    for kind, rows in got.items():
        print(f"{kind}: median {statistics.median(x for x, _ in rows):.0f} msg/s, "
              f"{statistics.median(c for _, c in rows):.3f} ms CPU per message")
    return 0


if __name__ == "__main__":
    sys.exit(main())
