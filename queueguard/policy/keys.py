"""Rate-limit keys: what a rule counts by.

A key spec is one or more parts joined by '+': `recipient`, `sender`,
`sender_domain`, `client_ip`, `client_net` (the client's /24 for IPv4 and /64
for IPv6; `client_net/N` sets the IPv4 prefix, `client_net/N/M` both) and
`helo`. The key value of one recipient is the parts' values joined by '|'.

The null sender has no sender and no sender domain: a rule keyed on either
does not apply to bounces (they are still counted by recipient/client keys),
so one bounce storm cannot exhaust a budget shared by all `<>` mail.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

from queueguard.model import IPAddress, Transaction, domain_of, without_extension
from queueguard.policy.match import normalize_address, normalize_ip

KINDS = ("recipient", "sender", "sender_domain", "client_ip", "client_net", "helo")


@dataclass(frozen=True)
class KeyPart:
    kind: str
    v4_prefix: int = 24
    v6_prefix: int = 64


@lru_cache(maxsize=1024)
def parse_key(text: str) -> tuple[KeyPart, ...]:
    """'sender+client_net/16' -> (KeyPart('sender'), KeyPart('client_net', 16, 64)); ValueError if bad."""
    parts: list[KeyPart] = []
    for raw in str(text).split("+"):
        word = raw.strip()
        kind, _, prefixes = word.partition("/")
        if kind not in KINDS:
            raise ValueError(f"bad rate-limit key {text!r}: {word!r} is not one of {', '.join(KINDS)}")
        if prefixes and kind != "client_net":
            raise ValueError(f"bad rate-limit key {text!r}: only client_net takes a prefix length")
        part = KeyPart(kind)
        if prefixes:
            v4, _, v6 = prefixes.partition("/")
            if not v4.isdigit() or not 0 <= int(v4) <= 32 or (v6 and (not v6.isdigit() or int(v6) > 128)):
                raise ValueError(
                    f"bad rate-limit key {text!r}: expected client_net/N (N = IPv4 prefix 0-32) "
                    "or client_net/N/M (M = IPv6 prefix 0-128)"
                )
            part = KeyPart(kind, int(v4), int(v6) if v6 else 64)
        if part.kind in (p.kind for p in parts):
            raise ValueError(f"bad rate-limit key {text!r}: {kind!r} given twice")
        parts.append(part)
    return tuple(parts)


def _value(part: KeyPart, txn: Transaction, recipient: str, delimiters: str) -> str | None:
    conn = txn.connection
    if part.kind == "recipient":
        return without_extension(normalize_address(recipient), delimiters) or None
    if part.kind == "sender":
        return None if txn.null_sender else normalize_address(txn.sender) or None
    if part.kind == "sender_domain":
        return None if txn.null_sender else domain_of(txn.sender) or None
    if part.kind == "helo":
        return conn.helo.strip().lower().rstrip(".") or None
    if conn.client_ip is None:
        return None
    ip = normalize_ip(conn.client_ip)
    if part.kind == "client_ip":
        return str(ip)
    return _network(ip, part.v4_prefix if ip.version == 4 else part.v6_prefix)


@lru_cache(maxsize=4096)
def _network(ip: IPAddress, prefix: int) -> str:
    # Cached: one client asks for its network on every RCPT and again at commit.
    return str(ipaddress.ip_network((ip, prefix), strict=False))


def key_value(spec: str, txn: Transaction, recipient: str, delimiters: str = "") -> str | None:
    """The key this recipient counts against, or None when a part is unknown
    (no client address, empty HELO, null sender for sender keys): the rule is skipped.
    `delimiters`: the policy's address extension delimiters (a recipient's extension is cut off)."""
    values = []
    for part in parse_key(spec):
        v = _value(part, txn, recipient, delimiters)
        if v is None:
            return None
        values.append(v)
    return "|".join(values)
