"""systemd service notification (sd_notify) without libsystemd.

The guard sits on port 25: when its event loop hangs, nothing else notices, so
systemd must (a runner that crashed and stayed down for two days is why this
exists). `Type=notify` plus `WatchdogSec=` does that if the pings come from the
event loop itself: a loop stuck in a blocking call stops pinging and systemd
kills and restarts the service. A thread that pinged on its own would hide the
hang, so there is none here.

Protocol: newline-separated `KEY=VALUE` lines in one datagram to the AF_UNIX
SOCK_DGRAM socket named by $NOTIFY_SOCKET ('@' = abstract namespace). Without
$NOTIFY_SOCKET (not started by systemd) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


def socket_address(value: str | None) -> str | bytes | None:
    """$NOTIFY_SOCKET -> an address for sendto, or None when we cannot use it.

    A leading '@' names the Linux abstract namespace (a NUL byte on the wire);
    other schemes (vsock:, used by VMs) are not for us and disable notification.
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def format_message(fields: Mapping[str, object]) -> bytes:
    """{'READY': 1, 'STATUS': 'x'} -> b'READY=1\\nSTATUS=x'.

    A newline in a value would start a new assignment, so it becomes a space.
    """
    lines = []
    for key, value in fields.items():
        if not _FIELD_NAME.fullmatch(key):
            raise ValueError(f"bad sd_notify field name {key!r}")
        text = "1" if value is True else str(value)
        lines.append(f"{key}={text.replace(chr(10), ' ').replace(chr(13), ' ')}")
    return "\n".join(lines).encode("utf-8", "backslashreplace")


class Notifier:
    """Sends notifications to one socket; inert when the address is None."""

    def __init__(self, address: str | bytes | None) -> None:
        self.address = address

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(socket_address(env.get("NOTIFY_SOCKET")))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> bool:
        """Send one datagram; True when it was handed to the socket.

        Non-blocking, so a slow or absent systemd can never stall the event
        loop; a lost notification is logged, never raised.
        """
        if self.address is None or not fields:
            return False
        data = format_message(fields)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(data, self.address)
        except OSError as e:
            log.warning("sd_notify to %r failed: %s", self.address, e)
            return False
        return True


def notify(**fields: object) -> bool:
    """Send `fields` to $NOTIFY_SOCKET (READY=1, STATUS=..., STOPPING=1, ...)."""
    return Notifier.from_env().send(**fields)


def ready(status: str = "") -> bool:
    """Tell systemd start-up is complete (listeners are bound)."""
    return notify(READY=1, **({"STATUS": status} if status else {}))


def reloading() -> bool:
    """Announce a reload; MONOTONIC_USEC lets Type=notify-reload (systemd 253+) match it."""
    return notify(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)


def stopping(status: str = "") -> bool:
    """Announce a clean shutdown so systemd does not treat the exit as a crash."""
    return notify(STOPPING=1, **({"STATUS": status} if status else {}))


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings (half of WATCHDOG_USEC), or None if no watchdog is asked for us.

    WATCHDOG_PID names the process systemd watches; if it names another one
    (we are a child that inherited the environment) we must not ping.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


class Watchdog:
    """Pings WATCHDOG=1 from the event loop every WATCHDOG_USEC/2."""

    def __init__(
        self,
        notifier: Notifier | None = None,
        environ: Mapping[str, str] | None = None,
        pid: int | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        env = os.environ if environ is None else environ
        self.notifier = notifier if notifier is not None else Notifier.from_env(env)
        self.interval = watchdog_interval(env, os.getpid() if pid is None else pid)
        self._sleep = sleep

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled and self.interval is not None

    async def run(self) -> None:
        """Ping until cancelled; returns at once when there is no watchdog."""
        if not self.enabled or self.interval is None:
            return
        while True:
            self.notifier.send(WATCHDOG=1)
            await self._sleep(self.interval)


async def status_loop(
    get_status: Callable[[], str],
    interval: float,
    notifier: Notifier | None = None,
    sleep: Sleep = asyncio.sleep,
) -> None:
    """Send STATUS=get_status() every `interval` seconds (shown by `systemctl status`).

    A failing `get_status` is logged and retried next time: status text is a
    convenience and must never take the daemon down.
    """
    target = notifier if notifier is not None else Notifier.from_env()
    if not target.enabled:
        return
    while True:
        try:
            text = get_status()
        except Exception:
            log.exception("status callback failed")
        else:
            target.send(STATUS=text)
        await sleep(interval)
