"""Pattern rules: admin-written regexes on subject, body text, headers, sender and recipients.

Regexes are RE2 (google-re2): matching is linear in the input, so a pattern
like `(a+)+$` in a policy file cannot hang the daemon on hostile mail, and
constructs RE2 refuses (backreferences, lookaround) are reported by
`queueguard check` through the loader. Each Policy object's patterns are
compiled once, on first use, and the cache entry dies with the policy.
All matchers given in a rule must match (search semantics, not anchored).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from queueguard.burst.fingerprint import fingerprint_dict
from queueguard.model import RuleHit, Transaction, canonical_address, without_extension
from queueguard.policy.loader import compile_regex
from queueguard.policy.match import rule_applies
from queueguard.policy.schema import Mode, PatternRule, Policy
from queueguard.stage import MessageContext, StageResult

if TYPE_CHECKING:
    import re2

    Regex = re2._Regexp[str]


@dataclass(frozen=True)
class CompiledPattern:
    rule: PatternRule
    subject: Regex | None
    body: Regex | None
    sender: Regex | None
    recipient: Regex | None
    headers: tuple[tuple[str, Regex], ...]

    @classmethod
    def build(cls, rule: PatternRule) -> CompiledPattern:
        def opt(p: str | None) -> Regex | None:
            return compile_regex(p) if p else None

        return cls(rule, opt(rule.subject), opt(rule.body), opt(rule.sender), opt(rule.recipient),
                   tuple((name.lower(), compile_regex(p)) for name, p in rule.headers.items()))

    def matches(self, txn: Transaction, ctx: MessageContext) -> str | None:
        """What matched (for the hit's detail), or None unless every given matcher matches."""
        parts = []
        parsed = ctx.parsed
        delimiters = ctx.policy.addresses.recipient_delimiter
        if self.sender is not None:
            if not _address_matches(self.sender, txn.sender, delimiters):
                return None
            parts.append("sender")
        if self.recipient is not None:
            rx = self.recipient
            if not any(_address_matches(rx, r, delimiters) for r in txn.recipients):
                return None
            parts.append("recipient")
        for name, rx in self.headers:
            if not any(rx.search(v) for n, v in parsed.headers if n.lower() == name):
                return None
            parts.append(name)
        if self.subject is not None:
            if not self.subject.search(parsed.subject):
                return None
            parts.append("subject")
        if self.body is not None:
            if not self.body.search(parsed.text):
                return None
            parts.append("body")
        return "+".join(parts)


def _address_matches(rx: Regex, address: str, delimiters: str) -> bool:
    """As the client spelled it, or as the mailbox it names: `^info@` must not be dodged by
    writing `"info"@`, `@relay:info@` or (with extension delimiters) `info+x@`, which the MTA
    delivers to info all the same."""
    if rx.search(address) is not None:
        return True
    mailbox = canonical_address(address)
    return rx.search(mailbox) is not None or (
        bool(delimiters) and rx.search(without_extension(mailbox, delimiters)) is not None)


_cache: dict[int, list[CompiledPattern]] = {}


def compiled_patterns(policy: Policy) -> list[CompiledPattern]:
    """The policy's pattern rules, compiled once per Policy object."""
    key = id(policy)
    patterns = _cache.get(key)
    if patterns is None:
        patterns = [CompiledPattern.build(rule) for rule in policy.patterns]
        _cache[key] = patterns
        weakref.finalize(policy, _cache.pop, key, None)
    return patterns


class PatternCheck:
    """MessageCheck for `patterns:` rules; same actions as bursts (quarantine, tempfail, reject, tag)."""

    name = "pattern"

    async def on_message(self, ctx: MessageContext) -> StageResult:
        result = StageResult()
        if not ctx.policy.patterns:
            return result
        for pattern in compiled_patterns(ctx.policy):
            rule = pattern.rule
            if not rule_applies(rule, ctx.policy, ctx.txn, None, parsed=ctx.parsed):
                continue
            matched = pattern.matches(ctx.txn, ctx)
            if matched is None:
                continue
            result.hits.append(RuleHit(rule.name, "pattern", rule.action, rule.mode is Mode.shadow, matched))
        if result.verdict is not None and not ctx.fingerprints:
            ctx.fingerprints.update(fingerprint_dict(ctx.parsed))
        return result
