"""SMTP clients for flood tests: one transaction per call, the reply to every command kept.

`send` runs one transaction from a loopback source address (`rcpt_as_written` one with the
recipient as spelled, byte for byte); `flood` runs many of them at once
from threads, spread over several guards, as clients of several MX hosts would; `wait_for` polls
for the event a test waits on (never a bare sleep).
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


@dataclass
class Sent:
    """One transaction: the port it went to, each recipient's reply (code, text) and DATA's, if sent."""

    port: int
    n: int
    rcpt: dict[str, tuple[int, str]] = field(default_factory=dict)
    data: tuple[int, str] | None = None

    def code(self, rcpt: str) -> int:
        return self.rcpt[rcpt][0]

    @property
    def accepted(self) -> list[str]:
        return [r for r, (code, _) in self.rcpt.items() if code == 250]


def body(n: int) -> bytes:
    return (f"From: s{n}@flood.example\r\nSubject: wave {n}\r\nMessage-ID: <{n}@flood.example>\r\n\r\n"
            f"message {n}\r\n").encode()


def rcpt_as_written(port: int, rcpt: str, n: int) -> int:
    """One transaction to `rcpt` exactly as written (raw commands: smtplib would unquote the
    address itself); the RCPT reply's code, the message sent when it was 250."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.example")
        assert c.docmd(f"MAIL FROM:<s{n}@flood.example>")[0] == 250
        code, _ = c.docmd(f"RCPT TO:<{rcpt}>")
        if code == 250:
            assert c.data(body(n))[0] == 250
        return code


def send(port: int, rcpts: Sequence[str], n: int, source: str = "127.0.0.1",
         message: Callable[[int], bytes] = body) -> Sent:
    """One transaction; DATA only when a recipient was accepted (else RSET)."""
    sent = Sent(port, n)
    with smtplib.SMTP("127.0.0.1", port, timeout=60, source_address=(source, 0)) as c:
        c.ehlo("client.example")
        c.mail(f"s{n}@flood.example")
        for r in rcpts:
            code, text = c.rcpt(r)
            sent.rcpt[r] = (code, text.decode(errors="replace"))
        if sent.accepted:
            code, text = c.data(message(n))
            sent.data = (code, text.decode(errors="replace"))
        else:
            c.rset()
    return sent


def flood(ports: Sequence[int], count: int, rcpts: Callable[[int], Sequence[str]], *, threads: int = 16,
          first: int = 0, message: Callable[[int], bytes] = body) -> list[Sent]:
    """`count` transactions at once over `threads` clients, transaction i to ports[i % len(ports)]
    from its own source address 127.1.x.y."""

    def one(i: int) -> Sent:
        n = first + i
        return send(ports[i % len(ports)], rcpts(n), n, source=f"127.1.{n // 250 % 250}.{n % 250 + 1}",
                    message=message)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(count)))


def wait_for(what: str, ok: Callable[[], bool], timeout: float = 30.0) -> None:
    """Until `ok()` is true (polled), else fail naming `what`."""
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
