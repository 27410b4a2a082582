"""A counting relay between an MTA and a milter: packets, bytes and round trips per message.

Postfix connects to the relay's unix socket; the relay connects to the milter
(unix or TCP) and copies bytes both ways unchanged, decoding each direction
with queueguard's milter codec to count. A round trip is a command the MTA
had to wait for: every final reply (accept, continue, reject, ...) and the
OPTNEG answer. Used by bench/milter_peers.py (`--trace`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from dataclasses import dataclass, field
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

    def per_message(self) -> dict[str, object]:
        n = max(1, self.mta_packets["E"])
        return {
            "messages": self.mta_packets["E"], "connections": self.connections,
            "round_trips": round(self.round_trips / n, 2),
            "mta_packets": round(sum(self.mta_packets.values()) / n, 2), "mta_bytes": round(self.mta_bytes / n),
            "milter_packets": round(sum(self.milter_packets.values()) / n, 2),
            "milter_bytes": round(self.milter_bytes / n),
            "mta_by_command": {k: round(v / n, 2) for k, v in sorted(self.mta_packets.items())},
        }


class Relay:
    """Runs on a thread of its own with its own loop; `with Relay(path, upstream) as r: r.counts`."""

    def __init__(self, listen: Path, upstream: str) -> None:
        self.listen = listen
        self.upstream = upstream
        self.counts = Counts()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> Relay:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_unix_server(self._client, path=str(self.listen))
        self.listen.chmod(0o666)

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
        await asyncio.gather(self._copy(mta_r, up_w, from_mta=True), self._copy(up_r, mta_w, from_mta=False))

    async def _copy(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, from_mta: bool) -> None:
        reader = mp.PacketReader(1 << 26)
        c = self.counts
        try:
            while data := await src.read(65536):
                dst.write(data)
                reader.feed(data)
                while (packet := reader.next()) is not None:
                    command = packet[0]
                    if from_mta:
                        c.mta_packets[chr(command)] += 1
                        c.mta_bytes += 5 + len(packet[1])
                    else:
                        c.milter_packets[chr(command)] += 1
                        c.milter_bytes += 5 + len(packet[1])
                        if command in mp.FINAL or command == mp.OPTNEG:
                            c.round_trips += 1
                await dst.drain()
        except (ConnectionError, mp.ProtocolError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()
