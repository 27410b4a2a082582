"""What the pipeline decides, and the SMTP reply that carries it.

Each front end maps a Verdict to its own protocol (SMTP reply line, milter
setreply, policy-delegation action). Nothing here imports from the project.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Action(enum.Enum):
    ACCEPT = "accept"
    TEMPFAIL = "tempfail"
    REJECT = "reject"
    QUARANTINE = "quarantine"
    DISCARD = "discard"


@dataclass(frozen=True)
class Verdict:
    action: Action
    code: int = 250
    status: str = "2.0.0"
    text: str = "Ok"
    rule: str | None = None
    reason: str = ""

    @property
    def final(self) -> bool:
        """True when this verdict ends the stage (anything but accept)."""
        return self.action is not Action.ACCEPT

    def reply(self) -> str:
        return f"{self.code} {self.status} {self.text}" if self.status else f"{self.code} {self.text}"


ACCEPT = Verdict(Action.ACCEPT)


def tempfail(status: str, text: str, *, reason: str, rule: str | None = None, code: int = 451) -> Verdict:
    return Verdict(Action.TEMPFAIL, code, status, text, rule, reason)


def reject(status: str, text: str, *, reason: str, rule: str | None = None, code: int = 550) -> Verdict:
    return Verdict(Action.REJECT, code, status, text, rule, reason)


def quarantine(text: str, *, reason: str, rule: str | None = None) -> Verdict:
    """Placeholder until the store gives an id; the pipeline rewrites the text."""
    return Verdict(Action.QUARANTINE, 250, "2.0.0", text, rule, reason)


INTERNAL_ERROR = tempfail(
    "4.3.0", "Temporary local problem, please try again later", reason="internal_error"
)
STATE_UNAVAILABLE = tempfail(
    "4.3.0", "Temporary local problem (shared state unavailable), please try again later", reason="state_error"
)
