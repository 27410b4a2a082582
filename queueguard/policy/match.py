"""Matching rules' `only`/`unless` conditions against a transaction.

Matchers are compiled once per loaded Policy (lists become sets, CIDR
tables and one combined glob regex) and cached against the policy object,
so a message costs set look-ups, not list scans. The cache entry goes away
with the policy (weakref.finalize), so a reload does not leak.

Entry forms, in address lists (`sender_in`, `recipient_in`):
  `info@example.org`      exact address (case-insensitive)
  `*@example.org`, `a?@*` glob over the whole address
  `@example.org`          every address at exactly that domain
  `example.org`           that domain and all its subdomains
In `helo_in`: globs over the HELO name, or bare domains (domain + subdomains).
In `client_in`: IPs and CIDRs, v4 and v6 (IPv4-mapped v6 clients match v4 entries).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

from queueguard.model import IPAddress, Transaction, ascii_domain, canonical_address, without_extension
from queueguard.policy.schema import Condition, ListRef, Policy, RuleBase

_GLOB_CHARS = frozenset("*?[")


def normalize_address(address: str) -> str:
    """'<Info@Example.ORG>' -> 'info@example.org'; the null sender -> ''. Quoting and source
    routes are taken off too (model.canonical_address): one mailbox, one spelling."""
    return canonical_address(address)


def normalize_ip(ip: IPAddress) -> IPAddress:
    """IPv4-mapped v6 clients (dual-stack sockets) are treated as their v4 address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _domain_suffixes(domain: str) -> Iterable[str]:
    """'a.b.example.org' -> 'a.b.example.org', 'b.example.org', 'example.org', 'org'."""
    while domain:
        yield domain
        domain = domain.partition(".")[2]


def _glob_regex(globs: list[str]) -> re.Pattern[str] | None:
    # fnmatch.translate emits atomic groups, so many '*' do not backtrack badly.
    if not globs:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))


@dataclass(frozen=True)
class AddressMatcher:
    exact: frozenset[str] = frozenset()
    at_domains: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    globs: re.Pattern[str] | None = None
    delimiters: str = ""
    """Address extension delimiters (policy `addresses`): `info+x@` also matches as `info@`."""

    @classmethod
    def build(cls, entries: Iterable[str], delimiters: str = "") -> AddressMatcher:
        exact, at_domains, domains, globs = set(), set(), set(), []
        for raw in entries:
            e = raw.strip().lower()
            if _GLOB_CHARS & set(e):
                globs.append(e)
            elif e.startswith("@"):
                at_domains.add(ascii_domain(e[1:]))
            elif "@" in e:
                exact.add(canonical_address(e))  # spelled as the addresses it is compared with
            else:
                domains.add(ascii_domain(e.lstrip(".")))
        return cls(frozenset(exact), frozenset(at_domains), frozenset(domains), _glob_regex(globs), delimiters)

    def __call__(self, address: str) -> bool:
        a = normalize_address(address)
        return self._matches(a) or (bool(self.delimiters) and (b := without_extension(a, self.delimiters)) != a
                                    and self._matches(b))

    def _matches(self, a: str) -> bool:
        if a in self.exact:
            return True
        domain = a.rpartition("@")[2] if "@" in a else ""
        if domain and (domain in self.at_domains or any(d in self.domains for d in _domain_suffixes(domain))):
            return True
        return self.globs is not None and self.globs.match(a) is not None


@dataclass(frozen=True)
class HostMatcher:
    """HELO names: globs, or bare domains matching themselves and subdomains."""

    domains: frozenset[str] = frozenset()
    globs: re.Pattern[str] | None = None

    @classmethod
    def build(cls, entries: Iterable[str]) -> HostMatcher:
        domains, globs = set(), []
        for raw in entries:
            e = raw.strip().lower()
            if _GLOB_CHARS & set(e):
                globs.append(e)
            else:
                domains.add(e.lstrip(".").rstrip("."))
        return cls(frozenset(domains), _glob_regex(globs))

    def __call__(self, host: str) -> bool:
        h = host.strip().lower().rstrip(".")
        if not h:
            return False
        if any(d in self.domains for d in _domain_suffixes(h)):
            return True
        return self.globs is not None and self.globs.match(h) is not None


@dataclass(frozen=True)
class NetMatcher:
    """IPs and CIDRs, grouped by (version, prefix length) for set look-ups."""

    tables: tuple[tuple[int, int, frozenset[int]], ...] = ()

    @classmethod
    def build(cls, entries: Iterable[str]) -> NetMatcher:
        grouped: dict[tuple[int, int], set[int]] = {}
        for raw in entries:
            net = parse_network(raw)
            mapped = net.network_address.ipv4_mapped if isinstance(net, ipaddress.IPv6Network) else None
            if mapped is not None and net.prefixlen >= 96:
                net = ipaddress.IPv4Network((mapped, net.prefixlen - 96))
            grouped.setdefault((net.version, net.prefixlen), set()).add(int(net.network_address))
        return cls(tuple((v, p, frozenset(s)) for (v, p), s in sorted(grouped.items())))

    def __call__(self, ip: IPAddress | None) -> bool:
        if ip is None:
            return False
        ip = normalize_ip(ip)
        value, bits = int(ip), ip.max_prefixlen
        for version, prefix, nets in self.tables:
            if version == ip.version and (value >> (bits - prefix) << (bits - prefix)) in nets:
                return True
        return False


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """'192.0.2.0/24', '2001:db8::/32' or a bare IP; ValueError with an admin-readable message."""
    t = text.strip()
    try:
        return ipaddress.ip_network(t, strict=True)
    except ValueError as e:
        try:
            loose = ipaddress.ip_network(t, strict=False)
        except ValueError:
            raise ValueError(f"invalid IP or CIDR {text!r}") from e
        raise ValueError(f"invalid CIDR {text!r}: host bits set (did you mean {loose}?)") from e


@dataclass(frozen=True)
class CompiledCondition:
    sender: AddressMatcher | None = None
    recipient: AddressMatcher | None = None
    client: NetMatcher | None = None
    helo: HostMatcher | None = None
    list_id: HostMatcher | None = None
    authenticated: bool | None = None
    null_sender: bool | None = None
    list_traffic: bool | None = None
    reply: bool | None = None

    def matches(self, txn: Transaction, recipient: str | None, parsed: object | None) -> bool:
        """All given facts must match. `recipient_in` without a recipient (message
        stage) matches when any accepted recipient matches. `list_traffic`/`reply`
        need the parsed message: at RCPT time they never match."""
        if self.null_sender is not None and txn.null_sender != self.null_sender:
            return False
        if self.authenticated is not None and bool(txn.connection.authenticated) != self.authenticated:
            return False
        if self.sender is not None and (txn.null_sender or not self.sender(txn.sender)):
            return False
        if self.recipient is not None:
            rcpts = [recipient] if recipient is not None else txn.recipients
            if not any(self.recipient(r) for r in rcpts):
                return False
        if self.client is not None and not self.client(txn.connection.client_ip):
            return False
        if self.helo is not None and not self.helo(txn.connection.helo):
            return False
        if self.list_id is not None and not self.list_id(list_id_of(parsed)):
            return False
        if self.list_traffic is not None and (parsed is None or is_list_traffic(parsed) != self.list_traffic):
            return False
        return self.reply is None or (parsed is not None and is_reply(parsed) == self.reply)


def list_id_of(parsed: object | None) -> str:
    """The id of a List-Id header ('Name <announce.example.org>' -> 'announce.example.org'); '' if none.
    At RCPT time (no message yet) there is none."""
    value = str(getattr(parsed, "list_id", None) or "")
    inner = value[value.rfind("<") + 1:value.rfind(">")] if "<" in value and ">" in value else value
    return inner.strip().lower()


def is_list_traffic(parsed: object) -> bool:
    return bool(getattr(parsed, "list_id", None) or getattr(parsed, "list_unsubscribe", None))


def is_reply(parsed: object) -> bool:
    return bool(getattr(parsed, "in_reply_to", None) or getattr(parsed, "references", None))


@dataclass
class CompiledPolicy:
    """Matchers for one Policy. Holds the policy's lists, not the policy, so the
    cache entry cannot keep a replaced policy alive."""

    lists: dict[str, list[str]]
    delimiters: str = ""
    _addresses: dict[str, AddressMatcher] = field(default_factory=dict)
    _hosts: dict[str, HostMatcher] = field(default_factory=dict)
    _nets: dict[str, NetMatcher] = field(default_factory=dict)
    _conditions: dict[int, tuple[Condition, CompiledCondition]] = field(default_factory=dict)

    def entries(self, ref: ListRef) -> list[str]:
        """The entries a ListRef names; KeyError for an unknown list name."""
        return self.lists[ref] if isinstance(ref, str) else ref

    def addresses(self, ref: ListRef) -> AddressMatcher:
        if not isinstance(ref, str):
            return AddressMatcher.build(ref, self.delimiters)
        if ref not in self._addresses:
            self._addresses[ref] = AddressMatcher.build(self.entries(ref), self.delimiters)
        return self._addresses[ref]

    def hosts(self, ref: ListRef) -> HostMatcher:
        if not isinstance(ref, str):
            return HostMatcher.build(ref)
        if ref not in self._hosts:
            self._hosts[ref] = HostMatcher.build(self.entries(ref))
        return self._hosts[ref]

    def nets(self, ref: ListRef) -> NetMatcher:
        if not isinstance(ref, str):
            return NetMatcher.build(ref)
        if ref not in self._nets:
            self._nets[ref] = NetMatcher.build(self.entries(ref))
        return self._nets[ref]

    def condition(self, cond: Condition) -> CompiledCondition:
        # Keyed by id but holding the Condition too, so an id cannot be reused while cached.
        cached = self._conditions.get(id(cond))
        if cached is not None and cached[0] is cond:
            return cached[1]
        compiled = CompiledCondition(
            sender=None if cond.sender_in is None else self.addresses(cond.sender_in),
            recipient=None if cond.recipient_in is None else self.addresses(cond.recipient_in),
            client=None if cond.client_in is None else self.nets(cond.client_in),
            helo=None if cond.helo_in is None else self.hosts(cond.helo_in),
            list_id=None if cond.list_id_in is None else self.hosts(cond.list_id_in),
            authenticated=cond.authenticated, null_sender=cond.null_sender,
            list_traffic=cond.list_traffic, reply=cond.reply,
        )
        self._conditions[id(cond)] = (cond, compiled)
        return compiled

    def warm(self, policy: Policy) -> None:
        """Compile every rule's conditions now (the loader calls this, so errors surface at load)."""
        for rule in all_rules(policy):
            for cond in (rule.only, *rule.unless_conditions()):
                if cond is not None:
                    self.condition(cond)


def all_rules(policy: Policy) -> list[RuleBase]:
    return [*policy.ratelimits, *policy.bursts, *policy.patterns]


_cache: dict[int, CompiledPolicy] = {}


def compiled(policy: Policy) -> CompiledPolicy:
    """The compiled matchers of `policy`, built on first use and kept while the policy lives."""
    key = id(policy)
    cp = _cache.get(key)
    if cp is None:
        cp = CompiledPolicy(policy.lists, policy.addresses.recipient_delimiter)
        _cache[key] = cp
        # Dropped when the policy dies, before its id can be reused.
        weakref.finalize(policy, _cache.pop, key, None)
    return cp


def rule_applies(
    rule: RuleBase, policy: Policy, txn: Transaction, recipient: str | None, parsed: object | None = None
) -> bool:
    """True when `rule.only` (if any) matches and no condition of `rule.unless` does."""
    cp = compiled(policy)
    if rule.only is not None and not cp.condition(rule.only).matches(txn, recipient, parsed):
        return False
    return not any(cp.condition(c).matches(txn, recipient, parsed) for c in rule.unless_conditions())
