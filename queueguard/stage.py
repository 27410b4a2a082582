"""The contract between the pipeline and the checks it runs.

A check is a small object with `on_rcpt` and/or `on_message`; it looks at a
context and answers a StageResult: an optional final verdict plus the rule
hits it saw (shadow hits included). Checks raise nothing on purpose: the
pipeline turns any exception into the policy's error verdict (451 4.3.0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

from queueguard.model import RuleHit, Transaction
from queueguard.verdict import Verdict

if TYPE_CHECKING:
    from queueguard.mime import ParsedMessage
    from queueguard.policy.schema import Policy


@dataclass
class StageResult:
    verdict: Verdict | None = None
    hits: list[RuleHit] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)


NOTHING = StageResult()


@dataclass
class RcptContext:
    txn: Transaction
    recipient: str
    policy: Policy


@dataclass
class MessageContext:
    """A received message. `parsed` decodes MIME once, on first use, bounded."""

    txn: Transaction
    raw: bytes
    policy: Policy
    parser: Callable[[bytes], ParsedMessage]
    fingerprints: dict[str, str] = field(default_factory=dict)
    """Checks that compute fingerprints put them here; the quarantine stores them."""

    @cached_property
    def parsed(self) -> ParsedMessage:
        return self.parser(self.raw)


class RcptCheck(Protocol):
    """Runs at RCPT TO, before the recipient is accepted."""

    name: str

    async def on_rcpt(self, ctx: RcptContext) -> StageResult: ...

    async def commit(self, txn: Transaction, policy: Policy) -> None:
        """Called once the message's final verdict let it through (delivered or
        quarantined), so refused mail does not use up budget twice."""
        ...


class MessageCheck(Protocol):
    """Runs at end of DATA, on the whole message."""

    name: str

    async def on_message(self, ctx: MessageContext) -> StageResult: ...
