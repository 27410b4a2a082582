"""A counting relay between an MTA and a milter: packets, bytes and round trips per message.

Postfix connects to the relay's unix socket; the relay connects to the milter
(unix or TCP) and copies bytes both ways unchanged, decoding each direction
with queueguard's milter codec to count. A round trip is a command the MTA
had to wait for: every final reply (accept, continue, reject, ...) and the
OPTNEG answer. Used by bench/milter_peers.py (`--trace`, and `--latency` for
the time the MTA waited on the milter per message: from the last packet the
MTA sent to the milter's answer, summed over the answers of one message,
OPTNEG included; the relay's own two hops are in it, so it over-states).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from queueguard.frontends import milter_protocol as mp


@dataclass
class Counts:
    mta_packets: Counter[str] = field(default_factory=Counter)
    mta_bytes: int = 0
    milter_packets: Counter[str] = field(default_factory=Counter)
    milter_bytes: int = 0
    round_trips: int = 0
    connections: int = 0
    waits: list[float] = field(default_factory=list)
    """Seconds the MTA waited on the milter, one entry per message (at its end-of-message answer)."""

    def per_message(self) -> dict[str, object]:
        n = max(1, self.mta_packets["E"])
        return {
            "messages": self.mta_packets["E"], "connections": self.connections,
            "round_trips": round(self.round_trips / n, 2),
            "mta_packets": round(sum(self.mta_packets.values()) / n, 2), "mta_bytes": round(self.mta_bytes / n),
            "milter_packets": round(sum(self.milter_packets.values()) / n, 2),
            "milter_bytes": round(self.milter_bytes / n),
            "mta_by_command": {k: round(v / n, 2) for k, v in sorted(self.mta_packets.items())},
            **({"wait_p50_ms": round(1000 * _pct(self.waits, .5), 2),
                "wait_p99_ms": round(1000 * _pct(self.waits, .99), 2)} if self.waits else {}),
        }


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class _Waiting:
    """One MTA connection: when the MTA last sent a packet, and its wait so far this message."""

    last_sent: float = 0.0
    last_command: int = 0
    pending: float = 0.0


class Relay:
    """Runs in a process of its own (spawned), so the load generator in the caller's process
    never holds the GIL while a packet waits to be copied (a thread waited up to the 5 ms
    switch interval, which showed up as milter latency). `with Relay(path, upstream) as r: r.counts`."""

    def __init__(self, listen: Path, upstream: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(listen, upstream, child), daemon=True)

    def __enter__(self) -> Relay:
        self._proc.start()
        if not self._conn.poll(30) or self._conn.recv() != "ready":
            self._proc.kill()
            raise RuntimeError("the milter relay did not start")
        return self

    @property
    def counts(self) -> Counts:
        self._conn.send("counts")
        counts: Counts = self._conn.recv()
        return counts

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()


def _serve(listen: Path, upstream: str, conn: Connection) -> None:
    asyncio.run(_Copier(listen, upstream).serve(conn))


class _Copier:
    """The relay's loop: accept the MTA, connect the milter, copy and count both ways."""

    def __init__(self, listen: Path, upstream: str) -> None:
        self.listen = listen
        self.upstream = upstream
        self.counts = Counts()

    async def serve(self, conn: Connection) -> None:
        server = await asyncio.start_unix_server(self._client, path=str(self.listen))
        self.listen.chmod(0o666)
        conn.send("ready")
        loop = asyncio.get_running_loop()
        while (await loop.run_in_executor(None, conn.recv)) == "counts":
            conn.send(self.counts)
        server.close()

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        kind, _, rest = self.upstream.partition(":")
        if kind == "unix":
            return await asyncio.open_unix_connection(rest)
        host, _, port = rest.rpartition(":")  # inet:HOST:PORT as Postfix writes it
        return await asyncio.open_connection(host, int(port))

    async def _client(self, mta_r: asyncio.StreamReader, mta_w: asyncio.StreamWriter) -> None:
        self.counts.connections += 1
        try:
            up_r, up_w = await self._open_upstream()
        except OSError:
            mta_w.close()
            return
        waiting = _Waiting()
        await asyncio.gather(self._copy(mta_r, up_w, waiting, from_mta=True),
                             self._copy(up_r, mta_w, waiting, from_mta=False))

    async def _copy(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, waiting: _Waiting, *,
                    from_mta: bool) -> None:
        reader = mp.PacketReader(1 << 26)
        c = self.counts
        try:
            while data := await src.read(65536):
                now = time.perf_counter()
                dst.write(data)
                reader.feed(data)
                while (packet := reader.next()) is not None:
                    command = packet[0]
                    if from_mta:
                        c.mta_packets[chr(command)] += 1
                        c.mta_bytes += 5 + len(packet[1])
                        waiting.last_sent, waiting.last_command = now, command
                    else:
                        c.milter_packets[chr(command)] += 1
                        c.milter_bytes += 5 + len(packet[1])
                        if command in mp.FINAL or command == mp.OPTNEG:
                            c.round_trips += 1
                            waiting.pending += now - waiting.last_sent
                            if waiting.last_command == mp.EOM:
                                c.waits.append(waiting.pending)
                                waiting.pending = 0.0
                await dst.drain()
        except (ConnectionError, mp.ProtocolError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()
