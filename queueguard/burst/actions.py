"""How a matched burst or pattern rule answers: one mapping, shared by both rule kinds.

Reply texts name the rule, so the sender's bounce and our log line agree.
"""

from __future__ import annotations

from queueguard.model import RuleHit
from queueguard.stage import StageResult
from queueguard.verdict import Verdict, quarantine, reject, tempfail


def rule_verdict(kind: str, rule: str, action: str) -> Verdict | None:
    """The verdict for an enforced hit; None for `tag` (a header, not a verdict)."""
    if action == "quarantine":
        return quarantine(f"Ok: held by {kind} rule {rule}", reason=kind, rule=rule)
    if action == "tempfail":
        why = "Too many similar messages" if kind == "burst" else "Message deferred by policy"
        return tempfail("4.7.1", f"{why}, try again later ({kind} rule {rule})", reason=kind, rule=rule)
    if action == "reject":
        return reject("5.7.1", f"Message refused by {kind} rule {rule}", reason=kind, rule=rule)
    return None


def apply_hit(result: StageResult, hit: RuleHit, header: str) -> None:
    """Record `hit` in `result`: shadow hits only count; the first enforced verdict wins; tags add a header."""
    result.hits.append(hit)
    if hit.shadow:
        return
    if hit.action == "tag":
        result.headers.append((header, hit.rule))
        return
    if result.verdict is None:
        result.verdict = rule_verdict(hit.kind, hit.rule, hit.action)
