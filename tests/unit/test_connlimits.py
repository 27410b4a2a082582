"""Per-client connection limits: open per address and network, rate per address, exemptions."""

from __future__ import annotations

from queueguard.connlimits import ConnectionLimits
from queueguard.model import Connection, parse_ip
from queueguard.policy.schema import Policy


def policy(**connections: object) -> Policy:
    return Policy.model_validate({"lists": {"trusted": ["192.0.2.0/28"]}, "connections": connections})


def conn(ip: str) -> Connection:
    return Connection(parse_ip(ip))


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


async def test_open_connections_per_address_and_network_are_given_back_on_close() -> None:
    limits = ConnectionLimits()
    p = policy(max_per_ip=2, max_per_network=3)
    a1, a2, a3 = conn("198.51.100.7"), conn("198.51.100.7"), conn("198.51.100.7")
    assert (await limits.on_connect(a1, p)).verdict is None
    assert (await limits.on_connect(a2, p)).verdict is None
    v = (await limits.on_connect(a3, p)).verdict
    assert v is not None and v.reply() == ("421 4.7.0 Too many connections from your address, try again later "
                                           "(connection:per_ip)") and v.reason == "connection_per_ip"
    assert (await limits.on_connect(conn("198.51.100.8"), p)).verdict is None  # same /24: 3 of 3
    v = (await limits.on_connect(conn("198.51.100.9"), p)).verdict
    assert v is not None and v.reason == "connection_per_network"
    assert (await limits.on_connect(conn("203.0.113.1"), p)).verdict is None  # another network
    limits.on_disconnect(a3)  # refused: counted nothing, gives nothing back
    limits.on_disconnect(a1)
    assert (await limits.on_connect(conn("198.51.100.7"), p)).verdict is None
    assert limits.per_ip == {"198.51.100.7": 2, "198.51.100.8": 1, "203.0.113.1": 1}


async def test_ipv6_clients_count_by_their_64() -> None:
    limits = ConnectionLimits()
    p = policy(max_per_ip=10, max_per_network=2)
    assert (await limits.on_connect(conn("2001:db8:1:2::1"), p)).verdict is None
    assert (await limits.on_connect(conn("2001:db8:1:2::2"), p)).verdict is None
    assert (await limits.on_connect(conn("2001:db8:1:2:ffff::3"), p)).verdict is not None
    assert (await limits.on_connect(conn("2001:db8:1:3::1"), p)).verdict is None


async def test_rate_per_address() -> None:
    clock = Clock()
    limits = ConnectionLimits(clock=clock)
    p = policy(max_per_ip=None, max_per_network=None, rate_per_ip="3/1m")
    results = []
    for _ in range(4):
        c = conn("198.51.100.7")
        results.append((await limits.on_connect(c, p)).verdict)
        limits.on_disconnect(c)
    assert results[:3] == [None] * 3 and results[3] is not None and results[3].reason == "connection_rate"
    clock.t += 20  # one interval later: one more
    assert (await limits.on_connect(conn("198.51.100.7"), p)).verdict is None


async def test_exempt_clients_are_never_limited() -> None:
    limits = ConnectionLimits()
    p = policy(max_per_ip=1, unless={"client_in": "trusted"})
    for _ in range(5):
        assert (await limits.on_connect(conn("192.0.2.3"), p)).verdict is None
    assert limits.per_ip == {}
