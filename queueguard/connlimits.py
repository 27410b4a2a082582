"""Connection limits per client address and network, at the door (Postfix's anvil, in process).

Without them one client can hold thousands of idle connections to the proxy
and starve everyone else of file descriptors and memory before a single
rate limit is ever asked. At connect time (before the greeting):
  open connections from the client's address  > connections.max_per_ip       -> 421 4.7.0
  open connections from its /24 (v4) or /64   > connections.max_per_network  -> 421 4.7.0
  new connections from its address too fast   > connections.rate_per_ip      -> 421 4.7.0
Clients matching `connections.unless` (e.g. the trusted networks) are never
limited. Open connections are counted for the host: with `workers: N` every
worker adds its own to one mapped table (host_counts.py), since the kernel
spreads one client's connections over all of them; the rate too (one GCRA
time per address, in the same file). Serving alone, a process keeps both in
dicts, the times dropped once idle. Memory stays bounded by what is connected.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from queueguard import metrics
from queueguard.host_counts import HostCounts
from queueguard.model import Connection, IPAddress, RuleHit
from queueguard.policy.match import compiled
from queueguard.policy.schema import ConnectionsPolicy, Policy
from queueguard.ratelimit.gcra import Limit, advance, decide
from queueguard.stage import NOTHING, StageResult


def network_of(ip: IPAddress, limits: ConnectionsPolicy) -> str:
    prefix = limits.ipv4_prefix if ip.version == 4 else limits.ipv6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


@dataclass
class _Open:
    """What one admitted connection counted against, so its close gives exactly that back."""

    ip: str
    network: str


@dataclass
class ConnectionLimits:
    """A ConnectCheck (queueguard/stage.py) with `on_disconnect` to give the place back."""

    clock: Callable[[], float] = time.monotonic
    host: HostCounts | None = None
    """The counts of every worker of this host; None when this process serves alone."""
    name: str = "connection"
    per_ip: dict[str, int] = field(default_factory=dict)
    per_network: dict[str, int] = field(default_factory=dict)
    _tats: dict[str, float] = field(default_factory=dict)
    _open: dict[str, _Open] = field(default_factory=dict)

    async def on_connect(self, conn: Connection, policy: Policy) -> StageResult:
        limits, ip = policy.connections, conn.client_ip
        conn.trusted = ip is not None and self._exempt(policy, conn)
        if ip is None or conn.trusted:
            return NOTHING
        address, network = str(ip), network_of(ip, limits)
        why = self._over(limits, address, network)
        if why is not None:
            metrics.connection_limits.labels(why).inc()
            return StageResult([RuleHit(why, "connection", "tempfail", detail=f"{address} ({network})")])
        self.per_ip[address] = self.per_ip.get(address, 0) + 1
        self.per_network[network] = self.per_network.get(network, 0) + 1
        if self.host is not None:
            self.host.add(f"ip:{address}", 1)
            self.host.add(f"net:{network}", 1)
        self._open[conn.id] = _Open(address, network)
        return NOTHING

    def on_disconnect(self, conn: Connection) -> None:
        counted = self._open.pop(conn.id, None)
        if counted is None:
            return
        if self.host is not None:
            self.host.add(f"ip:{counted.ip}", -1)
            self.host.add(f"net:{counted.network}", -1)
        for table, key in ((self.per_ip, counted.ip), (self.per_network, counted.network)):
            left = table[key] - 1
            if left:
                table[key] = left
            else:
                del table[key]

    def _exempt(self, policy: Policy, conn: Connection) -> bool:
        unless = policy.connections.unless
        if unless is None or unless.client_in is None:
            return False
        return compiled(policy).nets(unless.client_in)(conn.client_ip)

    def _open_now(self, table: dict[str, int], kind: str, key: str) -> int:
        return table.get(key, 0) if self.host is None else self.host.get(f"{kind}:{key}")

    def _over(self, limits: ConnectionsPolicy, address: str, network: str) -> str | None:
        if limits.max_per_ip is not None and self._open_now(self.per_ip, "ip", address) >= limits.max_per_ip:
            return "per_ip"
        if (limits.max_per_network is not None
                and self._open_now(self.per_network, "net", network) >= limits.max_per_network):
            return "per_network"
        if limits.rate_per_ip is not None:
            limit = Limit(limits.rate_per_ip.period / limits.rate_per_ip.count, limits.rate_per_ip.count)
            now = self.clock()
            if self.host is not None:
                def step(tat: float | None) -> float | None:
                    return advance(tat, now, limit) if decide(tat, now, limit).allowed else None

                return None if self.host.take(f"rate:{address}", step) else "rate"
            self._expire(now)
            tat = self._tats.get(address)
            if not decide(tat, now, limit).allowed:
                return "rate"
            self._tats[address] = advance(tat, now, limit)
        return None

    def _expire(self, now: float) -> None:
        """Forget addresses whose bucket is empty again (their time has passed): bounded memory."""
        if len(self._tats) > 4 * (len(self.per_ip) + 1024):
            self._tats = {k: t for k, t in self._tats.items() if t > now}

    def status(self) -> dict[str, object]:
        top = sorted(self.per_ip.items(), key=lambda kv: -kv[1])[:10]
        return {"open": sum(self.per_ip.values()), "clients": len(self.per_ip),
                "top": [{"client": ip, "open": n} for ip, n in top]}
