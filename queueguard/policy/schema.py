"""The policy file format, as typed models.

One model per section; pydantic validates types and refuses unknown keys,
and gives us the JSON Schema that `queueguard schema` prints. Cross-field
checks (list names exist, CIDRs parse, regexes compile) live in the loader,
which knows the line numbers.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, WithJsonSchema

from queueguard.policy.units import Rate, parse_duration, parse_rate, parse_size, parse_threshold


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _rate(v: object) -> Rate:
    return v if isinstance(v, Rate) else parse_rate(str(v))


def _threshold(v: object) -> Rate:
    return v if isinstance(v, Rate) else parse_threshold(str(v))


def _duration(v: object) -> float:
    if isinstance(v, int | float | str):
        return parse_duration(v)
    raise ValueError("expected a duration like '5s'")


def _size(v: object) -> int:
    if isinstance(v, int | str):
        return parse_size(v)
    raise ValueError("expected a size like '512MiB'")


# The JSON Schema describes what admins write (strings like '120/10m'), not the parsed objects.
_RATE_RE = r"^\s*\d+\s*/\s*(\d+(\.\d+)?)?\s*(ms|s|m|h|d)?\s*$"
_DURATION_SCHEMA = {"anyOf": [
    {"type": "number", "minimum": 0}, {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"},
], "examples": ["5s", "10m"]}
_SIZE_SCHEMA = {"anyOf": [
    {"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*[a-zA-Z]*\s*$"},
], "examples": ["25MiB", "512MiB"]}

RateSpec = Annotated[
    Rate, BeforeValidator(_rate), PlainSerializer(str),
    WithJsonSchema({"type": "string", "pattern": _RATE_RE, "examples": ["120/10m", "10/1m"]}),
]
ThresholdSpec = Annotated[
    Rate, BeforeValidator(_threshold), PlainSerializer(str),
    WithJsonSchema({"type": "string", "examples": ["40 in 10m", "40/10m"]}),
]
Duration = Annotated[float, BeforeValidator(_duration), WithJsonSchema(_DURATION_SCHEMA)]
Size = Annotated[int, BeforeValidator(_size), WithJsonSchema(_SIZE_SCHEMA)]

ListRef = str | list[str]
"""Either the name of a list under `lists:` or an inline list of entries."""


class Mode(StrEnum):
    enforce = "enforce"
    shadow = "shadow"


class Condition(Strict):
    """A rule applies when all given facts match (`only`) or is skipped when they do (`unless`).

    Address entries are globs (`*@example.org`, `info@*`) or bare domains
    (`example.org` matches that domain and its subdomains); client entries are
    IPs or CIDRs (v4 or v6).
    """

    sender_in: ListRef | None = None
    recipient_in: ListRef | None = None
    client_in: ListRef | None = None
    helo_in: ListRef | None = None
    list_id_in: ListRef | None = Field(
        None, description="the message's List-Id is one of these list ids or under one of these domains "
                          "(DATA stage only)")
    authenticated: bool | None = None
    null_sender: bool | None = None
    list_traffic: bool | None = Field(
        None, description="message carries List-Id/List-Unsubscribe (DATA stage only)")
    reply: bool | None = Field(
        None, description="message answers a thread: In-Reply-To/References (DATA stage only)")


class RuleBase(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    mode: Mode = Mode.enforce
    only: Condition | None = None
    unless: Condition | list[Condition] | None = Field(
        None, description="skip the rule when this condition (or any condition of a list) matches")
    description: str = ""

    def unless_conditions(self) -> list[Condition]:
        """`unless` as a list: one condition, several (any of them skips the rule), or none."""
        if self.unless is None:
            return []
        return list(self.unless) if isinstance(self.unless, list) else [self.unless]


class RateLimitRule(RuleBase):
    key: str = Field(
        description="recipient | sender | sender_domain | client_ip | client_net[/N[/M]] | helo, "
                    "or several joined by '+'",
        examples=["recipient", "sender+recipient", "client_net/24"],
    )
    rate: RateSpec
    burst: int | None = Field(
        None, ge=1, description="how many a quiet key may send at once (bucket size); default: the rate's count")
    action: Literal["tempfail", "reject", "quarantine"] = "tempfail"


class BurstRule(RuleBase):
    fingerprint: Literal["body", "subject", "url_hosts", "attachment"] = "body"
    threshold: ThresholdSpec
    action: Literal["quarantine", "tempfail", "reject", "tag"] = "quarantine"
    exempt_list_traffic: bool = Field(
        False, description="header-only exemption: any sender can add List-Id/List-Unsubscribe; "
                           "`queueguard check` warns. Exempt lists by list_id_in or sender_in instead")
    exempt_replies: bool = Field(
        False, description="header-only exemption: any sender can add In-Reply-To/References; "
                           "`queueguard check` warns")
    exempt_authenticated: bool = True


class PatternRule(RuleBase):
    """All of the given matchers must match (regexes, RE2 syntax, linear time)."""

    subject: str | None = None
    body: str | None = None
    sender: str | None = None
    recipient: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    action: Literal["quarantine", "tempfail", "reject", "tag"] = "quarantine"


class ClamavPolicy(Strict):
    enabled: bool = True
    on_infected: Literal["reject", "quarantine"] = "reject"
    on_error: Literal["tempfail", "accept"] = "tempfail"


class Levels(Strict):
    soften: float
    shed: float


class SizeLevels(Strict):
    soften: Size
    shed: Size


class SoftenPolicy(Strict):
    """What changes at the soften level (shed defers all new mail)."""

    scan_concurrency: int = Field(default=1, ge=1, description="clamd scans at once (when scanning)")
    defer_larger_than: Size = 1_000_000
    defer_rate_limited: bool = True


class PressurePolicy(Strict):
    """Thresholds per sensor; the worst sensor sets the level. Omit a sensor to ignore it.
    Applies whether or not clamd scanning is on: it protects the host."""

    psi_memory_some_avg10: Levels | None = Levels(soften=10, shed=40)
    mem_available_below: SizeLevels | None = None
    cgroup_usage_ratio: Levels | None = None
    clamd_rss_above: SizeLevels | None = None
    hysteresis: float = Field(
        default=0.8, gt=0, le=1, description="leave a level when below threshold x this")
    hold: Duration = Field(default=10.0, description="minimum time at a level before stepping down")
    soften: SoftenPolicy = SoftenPolicy()


class ScanCachePolicy(Strict):
    """Clean answers of recent scans, by the message's content without its per-copy fields
    (queueguard/scan/cache.py): a wave's copies after the first are not sent to clamd."""

    ttl: Duration = Field(default=600.0, description="how long an answer is reused; 0 turns the cache off")
    max_entries: int = Field(default=20_000, ge=0, description="answers kept per worker (about 400 bytes each)")


class ScanPolicy(Strict):
    clamav: ClamavPolicy = ClamavPolicy()
    cache: ScanCachePolicy = ScanCachePolicy()
    max_concurrent: int = Field(default=4, ge=1)
    min_concurrent: int = Field(default=1, ge=1)
    adaptive: bool = True
    max_waiting: int = Field(default=32, ge=0)
    max_wait: Duration = 5.0


class ConnectionsPolicy(Strict):
    """Per-client limits at the door, like Postfix's anvil: over them, `421 4.7.0` and the
    connection closes, so one client cannot hold the proxy's connections (SMTP proxy)."""

    max_per_ip: int | None = Field(50, ge=1, description="connections open at once from one client address")
    max_per_network: int | None = Field(
        200, ge=1, description="connections open at once from one network (ipv4_prefix / ipv6_prefix)")
    rate_per_ip: RateSpec | None = Field(None, description="new connections from one client address, e.g. 120/1m")
    ipv4_prefix: int = Field(24, ge=8, le=32)
    ipv6_prefix: int = Field(64, ge=16, le=128)
    unless: Condition | None = Field(
        None, description="clients never limited; only client_in applies at connect time")


def _delimiters(value: object) -> object:
    if isinstance(value, str) and any(c.isalnum() or c.isspace() or c in '@"' for c in value):
        raise ValueError(f"{value!r}: punctuation characters only, like '+' or '+-'")
    return value


class AddressesPolicy(Strict):
    recipient_delimiter: Annotated[str, BeforeValidator(_delimiters)] = Field(
        default="",
        max_length=8,
        description="the MTA's address extension delimiters (Postfix recipient_delimiter, Exim "
                    "local_part_suffix): info+tag@ is info@ to keys, lists and patterns",
    )


class StatePolicy(Strict):
    on_error: Literal["fallback", "tempfail", "accept"] = Field(
        default="fallback",
        description="when the shared state (Redis) fails: in-process limiter, 451, or let mail pass",
    )


class Policy(Strict):
    """The whole policy: what all files under the policy directory add up to."""

    lists: dict[str, list[str]] = Field(default_factory=dict)
    ratelimits: list[RateLimitRule] = Field(default_factory=list)
    bursts: list[BurstRule] = Field(default_factory=list)
    patterns: list[PatternRule] = Field(default_factory=list)
    scan: ScanPolicy = ScanPolicy()
    pressure: PressurePolicy = PressurePolicy()
    connections: ConnectionsPolicy = ConnectionsPolicy()
    state: StatePolicy = StatePolicy()
    addresses: AddressesPolicy = AddressesPolicy()
