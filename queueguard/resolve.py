"""The one place where a rule's action becomes a verdict: reply code, enhanced status, text, header.

Checks only report what they found: a RuleHit names the rule, its kind, the
action it asks for and whether it is enforced or shadow (Mailman's rules
return hits, its chains act). Every reply a sender can get for a policy
decision is written here, so the texts agree across the SMTP proxy, the
milter and the policy socket, and every text names its rule as `(kind:rule)`
or `(kind rule name)` so the bounce and our log line agree.

Kinds: `ratelimit`, `burst`, `pattern` (admin-written rules), `pressure`
(admission under memory pressure, rule = the reason), `connection` (limits
per client at the door, rule = the reason), `scan` (clamd: rule = the
reason, `clamav` for a virus), `route` (per-route caps, rule = the route,
detail = the reason).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from queueguard.model import RuleHit
from queueguard.verdict import Action, Verdict, quarantine, reject, tempfail

RULE_KINDS = ("ratelimit", "burst", "pattern")
TAG = "tag"
"""The action that marks a message with a header and changes nothing else."""

PRESSURE_TEXTS = {
    "shed": "Temporarily deferred: this host is under memory pressure, try again later",
    "soften_size": "Temporarily deferred: large message while this host is under memory pressure",
    "soften_rate_limited": "Temporarily deferred: rate-limited flow while this host is under memory pressure",
}
SCAN_TEXTS = {
    "busy": "Temporarily deferred: scanner busy, try again later",
    "clamd": "Temporarily deferred: virus scanner unavailable, try again later",
}
CONNECTION_TEXTS = {
    "per_ip": "Too many connections from your address",
    "per_network": "Too many connections from your network",
    "rate": "Too many new connections from your address",
}
ROUTE_TEXTS = {
    "shed": "the host behind route {route} is under memory pressure",
    "concurrency": "route {route} is at its limit of {limit}",
    "rate": "route {route} is at its limit of {limit}",
}
"""Keyed by the reason a route hit's detail starts with (`reason` or `reason: limit`)."""
WORDS_MAX = 200
"""Most characters of someone else's words (clamd's virus name or error) in one of our replies."""
_UNPRINTABLE = re.compile(r"[^ -~]")


def printable(text: str, limit: int = WORDS_MAX) -> str:
    """Printable ASCII only, at most `limit` characters: text from clamd goes into SMTP replies and
    log lines, where a CR or LF would end the line (and a 100 KB name made a 100 KB reply)."""
    text = _UNPRINTABLE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def verdict_for(hit: RuleHit) -> Verdict | None:
    """The verdict an enforced hit asks for; None for shadow hits and tags (a header, not a verdict)."""
    if hit.shadow or hit.action in (TAG, Action.ACCEPT.value):
        return None
    kind, rule, action = hit.kind, hit.rule, hit.action
    if kind == "scan":
        return _scan(hit)
    if kind == "pressure":
        return tempfail("4.3.2", f"{PRESSURE_TEXTS[rule]} (pressure:{rule})", reason=rule, rule="pressure")
    if kind == "route":
        return _route(hit)
    if kind == "connection":  # before the greeting SMTP allows only 421 (RFC 5321 3.1)
        return tempfail("4.7.0", f"{CONNECTION_TEXTS[rule]}, try again later (connection:{rule})",
                        reason=f"connection_{rule}", rule="connection", code=421)
    if action == "quarantine":
        return quarantine(f"Ok: held by {kind} rule {rule}", reason=kind, rule=rule)
    if kind == "ratelimit":
        if action == "reject":
            return reject("5.7.1", f"Rate limit exceeded (rule {rule})", reason=kind, rule=rule)
        wait = max(1, round(hit.retry_after or 0))
        return tempfail("4.7.1", f"Rate limit exceeded (rule {rule}), try again in {wait}s", reason=kind, rule=rule)
    if action == "reject":
        return reject("5.7.1", f"Message refused by {kind} rule {rule}", reason=kind, rule=rule)
    why = "Too many similar messages" if kind == "burst" else "Message deferred by policy"
    return tempfail("4.7.1", f"{why}, try again later ({kind} rule {rule})", reason=kind, rule=rule)


def _scan(hit: RuleHit) -> Verdict:
    if hit.rule == "clamav":
        text = f"virus found: {printable(hit.detail)}"
        if hit.action == "quarantine":
            return quarantine(text, reason="virus", rule="clamav")
        return reject("5.7.1", f"{text} (scan:clamav)", reason="virus", rule="clamav")
    if hit.action == "reject":  # too large for clamd's StreamMaxLength: it will never scan
        return reject("5.3.4", f"Message too large to scan ({printable(hit.detail)}) (scan:clamd)",
                      reason="too_large_to_scan", rule="scan", code=552)
    text = SCAN_TEXTS[hit.rule.partition("_")[0]]
    return tempfail("4.3.2", f"{text} (scan:{hit.rule})", reason=hit.rule, rule="scan")


def _route(hit: RuleHit) -> Verdict:
    route = hit.rule
    why, _, limit = hit.detail.partition(": ")
    if why == "split":
        # RFC 5321 4.5.3.1.10: "too many recipients" makes the client retry this one separately.
        return tempfail("4.5.3", f"Please send mail for <{hit.recipient}> in a separate transaction: "
                        f"it goes to another route (route:{route})", reason="route_split", rule=route, code=452)
    status = "4.7.1" if why == "rate" else "4.3.2"
    text = ROUTE_TEXTS[why].format(route=route, limit=limit)
    return tempfail(status, f"Temporarily deferred: {text}, try again later (route:{route})", reason=f"route_{why}",
                    rule=route)


def header_for(hit: RuleHit, prefix: str) -> tuple[str, str] | None:
    """The header an enforced tag adds: `<prefix>-Burst: rule`, or the unscanned mark."""
    if hit.shadow or hit.action != TAG:
        return None
    if hit.kind == "scan":
        return f"{prefix}-Scan", f"unscanned (clamd error: {hit.detail})"
    return f"{prefix}-{hit.kind.capitalize()}", hit.rule


def refusal(verdict: Verdict | None) -> bool:
    return verdict is not None and verdict.action in (Action.TEMPFAIL, Action.REJECT)


@dataclass
class Resolution:
    verdict: Verdict | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


def resolve(hits: Iterable[RuleHit], prefix: str = "X-Queueguard") -> Resolution:
    """What a stage's hits add up to. Shadow hits change nothing; a refusal (tempfail, reject)
    wins over a quarantine (deferring loses nothing; quarantining would keep mail that another
    enforced rule wanted refused); otherwise the first enforced verdict in check order; tags add
    headers."""
    out = Resolution()
    for hit in hits:
        verdict = verdict_for(hit)
        if verdict is None:
            if (header := header_for(hit, prefix)) is not None:
                out.headers.append(header)
        elif out.verdict is None or (refusal(verdict) and not refusal(out.verdict)):
            out.verdict = verdict
    return out
