"""The contract between the pipeline and the checks it runs.

A check is a small object with `on_rcpt` and/or `on_message`; it looks at a
context and answers a StageResult: the rule hits it saw, shadow hits
included. Checks never build verdicts: queueguard/resolve.py turns hits into
the reply, in one place. Checks raise nothing on purpose: the pipeline turns
StateUnavailable into its 451 4.3.0 (shared state down, `state.on_error:
tempfail`) and any other exception into 451 4.3.0 too, counted as an
internal error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

from queueguard.model import Connection, RuleHit, Transaction
from queueguard.resolve import resolve
from queueguard.verdict import Verdict

if TYPE_CHECKING:
    from queueguard.mime import ParsedMessage
    from queueguard.policy.schema import Policy


class StateUnavailable(Exception):
    """The shared state (Redis) failed and the policy's `state.on_error` is tempfail."""


@dataclass
class StageResult:
    hits: list[RuleHit] = field(default_factory=list)

    @property
    def verdict(self) -> Verdict | None:
        """What these hits ask for, as the pipeline will answer it."""
        return resolve(self.hits).verdict


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


class ConnectCheck(Protocol):
    """Runs when a client connects, before the greeting: admission at the door."""

    name: str

    async def on_connect(self, conn: Connection, policy: Policy) -> StageResult: ...

    def on_disconnect(self, conn: Connection) -> None:
        """The connection is gone (whether or not on_connect admitted it)."""
        ...


class RcptCheck(Protocol):
    """Runs at RCPT TO, before the recipient is accepted."""

    name: str

    async def on_rcpt(self, ctx: RcptContext) -> StageResult: ...

    async def on_end(self, txn: Transaction, passed: bool) -> None:
        """Called once when the transaction ends, however it ended. `passed`: the message went
        through (delivered or quarantined), so budgets are charged for it only then and refused
        mail does not use them up twice."""
        ...


class MessageCheck(Protocol):
    """Runs at end of DATA, on the whole message."""

    name: str

    async def on_message(self, ctx: MessageContext) -> StageResult: ...
