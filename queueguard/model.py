"""Transport-neutral facts about a connection, a transaction and a message.

Front ends translate their protocol (SMTP, milter, policy delegation) into
these types; everything behind the pipeline sees only these. Nothing here
imports from the rest of the project.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import random
import re
import time
import unicodedata
from dataclasses import dataclass, field
from typing import TypeVar, cast

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
T = TypeVar("T")


_random = random.Random()  # seeded from os.urandom; a syscall per id costs 2 % of the proxy's CPU
# A forked worker would otherwise draw the parent's sequence: two workers, the same ids in the same
# millisecond, one quarantine directory (only the module-level `random` reseeds itself at fork).
os.register_at_fork(after_in_child=_random.seed)


def new_id() -> str:
    """A short, sortable, path-safe id: 11 hex digits of milliseconds, 8 random."""
    return f"{int(time.time() * 1000):011x}{_random.getrandbits(32):08x}"


@dataclass
class Connection:
    """What we know about the SMTP client, filled in as the session goes."""

    client_ip: IPAddress | None
    client_port: int = 0
    client_name: str = ""
    helo: str = ""
    tls: bool = False
    authenticated: str | None = None
    frontend: str = "smtp"
    trusted: bool = False
    """The client is one the policy never limits at the door (`connections.unless`: our own
    networks): no connection limit, and no cap on its share of a downstream's connections."""
    id: str = field(default_factory=new_id)


@dataclass
class Transaction:
    """One MAIL FROM ... DATA exchange, owned by the pipeline's Session from MAIL to its end.

    `recipients` holds only the recipients we accepted (`rcpt_options` their
    ESMTP parameters, kept for release from quarantine); `policy` is pinned at
    MAIL FROM so a reload mid-transaction does not change the rules it is
    judged by.
    """

    connection: Connection
    sender: str
    mail_options: tuple[str, ...] = ()
    recipients: list[str] = field(default_factory=list)
    rcpt_options: dict[str, tuple[str, ...]] = field(default_factory=dict)
    id: str = field(default_factory=new_id)
    started: float = field(default_factory=time.monotonic)
    route: str | None = None
    policy: object | None = None
    hits: list[RuleHit] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent in `scan` (clamd) and `relay` (downstream DATA), for the log line."""
    size: int = 0
    downstream: str = ""
    _data: dict[type, object] = field(default_factory=dict, repr=False)

    @property
    def null_sender(self) -> bool:
        return self.sender in ("", "<>")

    def check_data(self, kind: type[T]) -> T:
        """Per-transaction data a check keeps (rspamd's per-task data): one `kind()` made on
        first use, gone with the transaction, so no check needs a side table keyed by id."""
        found = self._data.get(kind)
        if found is None:
            found = self._data[kind] = kind()
        return cast(T, found)

    def quarantine_hit(self) -> RuleHit | None:
        """The enforced hit of a RCPT-time rule with action quarantine for a recipient we accepted:
        the message is kept at DATA (proxy, milter) or held by the MTA (policy socket)."""
        return next((h for h in self.hits if h.action == "quarantine" and not h.shadow
                     and h.recipient in self.recipients), None)


@dataclass(frozen=True)
class RuleHit:
    """A rule that matched, recorded whether or not it changed the outcome."""

    rule: str
    kind: str
    action: str
    shadow: bool = False
    detail: str = ""
    recipient: str | None = None
    retry_after: float | None = None
    """Seconds until the rule would let this through (rate limits), for the reply text."""

    def label(self) -> str:
        return f"{self.kind}:{self.rule}{'(shadow)' if self.shadow else ''}"


_ROUTE = re.compile(r"@(?:\[[^\]]*\]|[^,:\[\]])*(?:,@(?:\[[^\]]*\]|[^,:\[\]])*)*:")
_PLAIN = frozenset('"()\\ \t%![')


def _unquote(text: str) -> str | None:
    """RFC 5322 lexing of an address: comments `(..)` (nested) and whitespace outside quotes
    dropped, quoted strings and backslash pairs reduced to what they quote; None when a quote
    or a comment is left open (there is no telling what it meant)."""
    out: list[str] = []
    depth, quoted, i = 0, False, 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            if not depth:
                out.append(text[i + 1])
            i += 2
            continue
        if quoted:
            if c == '"':
                quoted = False
            else:
                out.append(c)
        elif depth:
            depth += (c == "(") - (c == ")")
        elif c == '"':
            quoted = True
        elif c == "(":
            depth = 1
        elif c not in " \t":
            out.append(c)
        i += 1
    return None if quoted or depth else "".join(out)


def canonical_address(address: str) -> str:
    """The mailbox an envelope address names, spelled one way: `<@relay:"In\\fo"(x)@Example.ORG.>`
    -> `info@example.org`; the null sender -> ''.

    RFC 5321 has a source route ignored and a quoted local part mean its content, and Exim and
    Postfix deliver `info@`, `"info"@`, `"in\\fo"@`, `in\\fo@`, `info(x)@`, `INFO@` and
    `@any.relay:info@` to one mailbox (Postfix hands a milter the address as the client wrote
    it): a rate-limit key or a list entry that told them apart would give a flood as many budgets
    as its sender can spell the address. Postfix, by default, also routes `info%example.org@mx`
    and `example.org!info@mx` to info@example.org (Exim refuses both), and `"info@example.org"@mx`
    (nested as deep as the line allows: each level would be a new budget) to info@example.org
    once mx is its own domain (Exim refuses `@` in a local part). A trailing dot in the domain is
    stripped as Postfix does.
    """
    a = address.strip().strip("<>").strip()
    if _PLAIN.isdisjoint(a) and a[:1] != "@" and a[-1:] != "." and a.isascii():
        return a.lower()  # the common case, without the lexing
    route = _ROUTE.match(a)  # before unquoting: `"@x:victim"@example.org` is not victim's
    if route:
        a = a[route.end():]
    a = _unquote(a) or a
    local, at, domain = a.rpartition("@")
    if not at:
        return a.lower()
    while "@" in local:  # `"info@example.org"@mx`: Postfix strips its own domain and resolves again
        inner, _, inner_domain = local.rpartition("@")
        if not inner or not inner_domain:
            break
        local, domain = inner, inner_domain
    if "!" in local:  # UUCP bang path, host!user: Postfix's swap_bangpath (on by default)
        *_, domain, local = local.split("!")
    if "%" in local:  # user%domain: Postfix's allow_percent_hack (on by default)
        local, domain = local.split("%")[:2]
    return f"{local.lower()}@{address_literal(domain) or ascii_domain(domain)}"


def address_literal(domain: str) -> str | None:
    """A domain literal spelled one way: `[127.000.000.001]` -> `[127.0.0.1]` (Postfix takes the
    leading zeros, 27 spellings of one address), `[IPv6:0:0::1]` -> `[IPv6:::1]`; None if the
    domain is no address literal we can read."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1].strip()
    try:
        if inner[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        octets = inner.split(".")
        if len(octets) == 4 and all(o.isdigit() and o.isascii() and int(o) < 256 for o in octets):
            return "[" + ".".join(str(int(o)) for o in octets) + "]"
    except ValueError:
        return None
    return None


_DOTS = str.maketrans({"\u3002": ".", "\uff61": "."})


def ascii_domain(domain: str) -> str:
    """A domain as DNS knows it: `BÜCHER.example.` -> `xn--bcher-kva.example`. SMTPUTF8 lets a
    client write an internationalised domain as Unicode (in any case, composed or not, in
    fullwidth letters) or as its A-label, and Postfix's UTS #46 conversion resolves them all to
    one domain: keys and list entries must not tell them apart either. Unicode labels are mapped
    roughly as UTS #46 does (NFKC, lower case, ideographic full stops as dots; ß kept, as
    IDNA2008 has it) and Punycode-encoded."""
    d = domain.rstrip(".").lower()
    if d.isascii():
        return d
    d = unicodedata.normalize("NFKC", d).lower().translate(_DOTS).rstrip(".")
    return ".".join(label if label.isascii() else "xn--" + label.encode("punycode").decode("ascii")
                    for label in d.split("."))


def without_extension(mailbox: str, delimiters: str) -> str:
    """`info+tag@example.org` -> `info@example.org` for the delimiter `+`: the mailbox an MTA that
    splits address extensions (Postfix's recipient_delimiter, Exim's local_part_suffix) delivers
    to. Cut at the first delimiter after the first character, as Postfix does."""
    if not delimiters:
        return mailbox
    local, at, domain = mailbox.rpartition("@")
    if not at:
        local, domain = mailbox, ""
    cut = min((i for i in (local.find(d, 1) for d in delimiters) if i > 0), default=-1)
    return mailbox if cut < 0 else local[:cut] + at + domain


def domain_of(address: str) -> str:
    """The domain part of an address, lower-cased (canonical_address); '' for the null sender."""
    mailbox = canonical_address(address)
    return mailbox.rpartition("@")[2] if "@" in mailbox else ""


@functools.lru_cache(maxsize=4096)
def parse_ip(text: str | None) -> IPAddress | None:
    """An address as written by a socket, an MTA or a PROXY header; an IPv4-mapped IPv6 address
    (a dual-stack listener's `::ffff:192.0.2.1`) is the IPv4 address it maps, so IPv4 networks
    in the settings and policies (load balancers, client networks, rate-limit keys) match it.
    Remembered: clients come back, and parsing is ~3 µs of every connection (addresses are
    immutable values)."""
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text.strip("[]").removeprefix("IPv6:"))
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip
