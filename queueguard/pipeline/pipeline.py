"""What every transaction of one front end shares: its checks, quarantine, relay and header policy.

The app builds one Pipeline per front end (its `frontend` label) over the
same check objects; a front end opens a Session per connection and drives
the transaction through it (queueguard/pipeline/session.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from queueguard.mime import ParsedMessage, parse_message
from queueguard.model import Connection
from queueguard.pipeline.session import Session
from queueguard.policy.schema import Policy
from queueguard.quarantine.protocol import Quarantine
from queueguard.relay import Relay
from queueguard.stage import ConnectCheck, MessageCheck, RcptCheck

RouteFor = Callable[[str], str]


@dataclass
class Pipeline:
    frontend: str
    policy: Callable[[], Policy]
    connect_checks: list[ConnectCheck] = field(default_factory=list)
    rcpt_checks: list[RcptCheck] = field(default_factory=list)
    message_checks: list[MessageCheck] = field(default_factory=list)
    quarantine: Quarantine | None = None
    """Where quarantined mail is stored before 250; None with `hold_in_mta`."""
    hold_in_mta: bool = False
    """Quarantine means the MTA's hold queue (milter `quarantine: hold`, the policy socket's `hold`)."""
    relay: Relay | None = None
    """The downstreams we mirror each transaction onto (SMTP proxy); None where an MTA delivers."""
    route_for: RouteFor = lambda _rcpt: "default"
    parser: Callable[[bytes], ParsedMessage] = parse_message
    header_prefix: str = "X-Queueguard"
    add_headers: bool = True

    def open(self, conn: Connection) -> Session:
        """A new client connection's Session (front ends count their connections themselves:
        only they know what one is; a policy socket request is a Session of its own)."""
        conn.frontend = self.frontend
        return Session(self, conn)
