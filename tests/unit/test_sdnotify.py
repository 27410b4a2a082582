"""sd_notify client and watchdog against a fake NOTIFY_SOCKET (a real AF_UNIX datagram socket)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator

import pytest

from queueguard import sdnotify
from queueguard.sdnotify import (
    Notifier,
    Watchdog,
    format_message,
    socket_address,
    status_loop,
    watchdog_interval,
)


class Receiver:
    """The systemd side: a bound SOCK_DGRAM socket that collects datagrams."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def drain(self) -> list[dict[str, str]]:
        """Every datagram queued now, without waiting."""
        out: list[dict[str, str]] = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return out
            out.append(parse(data))

    async def next(self) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(10):
            return parse(await loop.sock_recv(self.sock, 4096))


def parse(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().split("\n"))


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    # A short directory: AF_UNIX paths are limited to 107 bytes.
    d = tempfile.mkdtemp(prefix="qg-notify-", dir="/tmp")
    path = os.path.join(d, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield Receiver(sock, path)
    finally:
        sock.close()
        shutil.rmtree(d)


def test_socket_address_forms() -> None:
    assert socket_address(None) is None
    assert socket_address("") is None
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abstract/name") == b"\0abstract/name"
    assert socket_address("vsock:2:1234") is None
    assert socket_address("relative/path") is None


def test_format_message_joins_fields_and_keeps_one_assignment_per_line() -> None:
    assert format_message({"READY": 1, "STATUS": "up"}) == b"READY=1\nSTATUS=up"
    assert format_message({"STATUS": "a\nFAKE=1\rb"}) == b"STATUS=a FAKE=1 b"
    assert format_message({"WATCHDOG": True}) == b"WATCHDOG=1"
    assert format_message({"STATUS": "délai"}) == "STATUS=délai".encode()


@pytest.mark.parametrize("key", ["ready", "", "READY=1", "1X", "A B", "É"])
def test_format_message_refuses_bad_field_names(key: str) -> None:
    with pytest.raises(ValueError, match="bad sd_notify field name"):
        format_message({key: 1})


def test_no_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier.from_env().enabled
    assert sdnotify.notify(READY=1) is False
    assert sdnotify.ready() is False


def test_notify_ready_status_reloading_stopping(receiver: Receiver) -> None:
    assert sdnotify.ready("listening on 127.0.0.1:2525")
    assert sdnotify.notify(STATUS="3 messages")
    before = time.monotonic_ns() // 1000
    assert sdnotify.reloading()
    assert sdnotify.ready()
    assert sdnotify.stopping("draining")
    got = receiver.drain()
    assert got[0] == {"READY": "1", "STATUS": "listening on 127.0.0.1:2525"}
    assert got[1] == {"STATUS": "3 messages"}
    assert got[2]["RELOADING"] == "1"
    # MONOTONIC_USEC is CLOCK_MONOTONIC in microseconds, as Type=notify-reload expects.
    assert int(got[2]["MONOTONIC_USEC"]) >= before
    assert got[3] == {"READY": "1"}
    assert got[4] == {"STOPPING": "1", "STATUS": "draining"}
    assert len(got) == 5


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"queueguard-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify(READY=1)
        assert sock.recv(100) == b"READY=1"


def test_send_failure_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/queueguard/notify.sock")
    with caplog.at_level(logging.WARNING, logger="queueguard.sdnotify"):
        assert sdnotify.notify(READY=1) is False
    assert "sd_notify" in caplog.text


def test_send_never_blocks_when_systemd_does_not_read(receiver: Receiver) -> None:
    # Nobody reads the receiver: the kernel queue fills and a blocking sendto
    # would hang the event loop (the pytest timeout would catch that).
    notifier = Notifier.from_env()
    assert notifier.send(STATUS="x" * 1000) is True
    sent = 1
    while notifier.send(STATUS="x" * 1000):
        sent += 1
        assert sent < 100_000, "the queue never filled"
    assert receiver.drain()[0] == {"STATUS": "x" * 1000}


@pytest.mark.parametrize(
    ("env", "pid", "expected"),
    [
        ({}, 10, None),
        ({"WATCHDOG_USEC": "30000000"}, 10, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "10"}, 10, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "11"}, 10, None),
        ({"WATCHDOG_USEC": "0"}, 10, None),
        ({"WATCHDOG_USEC": "-5"}, 10, None),
        ({"WATCHDOG_USEC": "soon"}, 10, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], pid: int, expected: float | None) -> None:
    assert watchdog_interval(env, pid) == expected


class Stop(Exception):
    pass


def counting_sleep(calls: list[float], limit: int) -> sdnotify.Sleep:
    async def sleep(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) >= limit:
            raise Stop

    return sleep


async def test_watchdog_pings_every_half_period(receiver: Receiver) -> None:
    calls: list[float] = []
    dog = Watchdog(environ={"NOTIFY_SOCKET": receiver.env_value, "WATCHDOG_USEC": "4000000"},
                   pid=123, sleep=counting_sleep(calls, 3))
    assert dog.enabled
    with pytest.raises(Stop):
        await dog.run()
    assert calls == [2.0, 2.0, 2.0]
    assert receiver.drain() == [{"WATCHDOG": "1"}] * 3


@pytest.mark.parametrize(
    "env",
    [
        {"WATCHDOG_USEC": "4000000"},  # no NOTIFY_SOCKET
        {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "999"},  # someone else's watchdog
        {"NOTIFY_SOCKET": "/x"},  # no watchdog asked for
    ],
)
async def test_watchdog_off_returns_at_once(env: dict[str, str]) -> None:
    calls: list[float] = []
    dog = Watchdog(environ=env, pid=123, sleep=counting_sleep(calls, 1))
    assert not dog.enabled
    await dog.run()
    assert calls == []


async def test_watchdog_pings_stop_while_the_event_loop_is_blocked(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    usec = 100_000  # systemd would kill us after 0.1 s without a ping
    monkeypatch.setenv("WATCHDOG_USEC", str(usec))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    dog = Watchdog()
    assert dog.interval == 0.05
    task = asyncio.create_task(dog.run())
    try:
        assert await receiver.next() == {"WATCHDOG": "1"}
        assert await receiver.next() == {"WATCHDOG": "1"}
        receiver.drain()
        last_ping = time.monotonic()
        time.sleep(0.4)  # noqa: ASYNC251 -- the point: a stuck loop, eight ping periods without yielding
        assert receiver.drain() == [], "a ping arrived while the loop was blocked"
        assert await receiver.next() == {"WATCHDOG": "1"}  # pings resume once the loop runs
        gap = time.monotonic() - last_ping
        assert gap * 1_000_000 > usec, "systemd would have seen the gap and restarted us"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_status_loop_sends_live_counters_and_survives_a_failing_callback(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    counter = iter(range(10))

    def status() -> str:
        n = next(counter)
        if n == 1:
            raise RuntimeError("counter unavailable")
        return f"messages={n}"

    calls: list[float] = []
    with caplog.at_level(logging.ERROR, logger="queueguard.sdnotify"), pytest.raises(Stop):
        await status_loop(status, 5.0, sleep=counting_sleep(calls, 3))
    assert calls == [5.0, 5.0, 5.0]
    assert receiver.drain() == [{"STATUS": "messages=0"}, {"STATUS": "messages=2"}]
    assert "status callback failed" in caplog.text


async def test_status_loop_without_systemd_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    calls: list[float] = []
    await status_loop(lambda: "x", 1.0, sleep=counting_sleep(calls, 1))
    assert calls == []
