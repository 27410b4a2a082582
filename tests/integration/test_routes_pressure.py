"""Backpressure from the ticket host: two real `queueguard serve` processes and a real Redis.

The ticket host runs contrib/routes/ticket.yaml (in front of a real Exim that queues, scanning
with a real clamd, publishing its pressure and Exim queue size); the MX runs contrib/routes/
mx.yaml (its tickets route points at the ticket host's queueguard). Only addresses, ports,
paths and URLs are changed, plus shorter intervals where a test says so. The pressure is
injected through the shipped `level_file` (what an admin uses to drain the host), and the
ticket host's policy turns its kernel sensors off so that nothing else moves the level.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from queueguard.harness.clamd import Clamd
from queueguard.harness.exim import Exim
from queueguard.harness.guard import Guard
from tests.components.redis import RedisServer
from tests.integration.test_routes_proxy import MX_POLICY, contrib, mx_settings, send

pytestmark = pytest.mark.integration

TICKET_POLICY = {"quiet.yaml": "pressure:\n  psi_memory_some_avg10: null\n"}
BOUND = 12.0  # seconds: publish every 2 s + read every 2 s (shipped), with room for a loaded box


def ticket_settings(exim: Exim, level_file: Path, *, redis_url: str | None, clamd: Clamd | None) -> dict[str, Any]:
    doc = contrib("ticket.yaml")
    doc["downstreams"][0]["address"] = f"127.0.0.1:{exim.port}"
    doc["queuewatch"]["exim_spool"] = str(exim.dir / "spool")
    doc["queuewatch"]["interval"] = "1s"  # shortened: the queue size is checked below
    doc["publish_pressure"]["level_file"] = str(level_file)
    token_file = level_file.parent / "status-token"  # the shipped status.token_file, here
    token_file.write_text(secrets.token_hex(32) + "\n")
    doc["status"]["token_file"] = str(token_file)
    if redis_url is None:
        doc["state"] = "memory"  # no Redis: the report is only in /status.json
    else:
        doc["state"] = redis_url
    if clamd is None:
        doc["clamd"] = {"enabled": False}
    else:
        doc["clamd"].update(address=str(clamd.socket), pid_file=str(clamd.pid_file))
    return doc


def status(guard: Guard) -> dict[str, Any]:
    """/status.json, with the guard's bearer token when its settings have one (the ticket host's do)."""
    token_file = guard.settings.get("status", {}).get("token_file")
    headers = {"Authorization": f"Bearer {Path(token_file).read_text().strip()}"} if token_file else {}
    request = urllib.request.Request(f"http://127.0.0.1:{guard.metrics_port}/status.json", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as r:
        doc: dict[str, Any] = json.loads(r.read())
    return doc


def route(guard: Guard, name: str = "tickets") -> dict[str, Any]:
    found: dict[str, Any] = next(r for r in status(guard)["routes"] if r["route"] == name)
    return found


def wait_for(what: str, check: Any, timeout: float = BOUND) -> float:
    """Poll `check()` until true; returns the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def info_reply(mx: Guard, n: int | str) -> tuple[int, str]:
    return send(mx.port, ["info@test.example"], n)["info@test.example"]


def send_until(mx: Guard, code: int, what: str) -> tuple[tuple[int, str], int]:
    """Send to info@ every 0.2 s until the RCPT reply has `code`, as retrying MTAs would;
    returns that reply and how many messages were accepted on the way (the last one included)."""
    start, accepted = time.monotonic(), 0
    while (reply := info_reply(mx, f"{what}-{accepted}"))[0] != code:
        accepted += reply[0] == 250
        if time.monotonic() - start > BOUND:
            raise AssertionError(f"not within {BOUND}s: {what} (last reply {reply})")
        time.sleep(0.2)
    return reply, accepted + (code == 250)


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as r:
        yield r


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    with Clamd(tmp_path_factory.mktemp("clamd")) as c:
        yield c


@pytest.fixture
def ticket_exim() -> Iterator[Exim]:
    with Exim(queue_only=True) as e:  # the ticket system takes mail from this queue
        yield e


@pytest.fixture
def mx_exim() -> Iterator[Exim]:
    with Exim(proxy=True) as e:
        yield e


def test_ticket_host_shed_defers_its_route_on_the_mx_and_clears(
        tmp_path: Path, redis: RedisServer, clamd: Clamd, ticket_exim: Exim, mx_exim: Exim) -> None:
    level_file = tmp_path / "force-pressure"
    ticket = Guard(ticket_settings(ticket_exim, level_file, redis_url=redis.url, clamd=clamd), TICKET_POLICY)
    with ticket, Guard(mx_settings(mx_exim.port, ticket.port, redis.url), MX_POLICY) as mx:
        wait_for("the MX reads the ticket host's report", lambda: route(mx)["reported_queue"] is not None)
        assert route(mx)["pressure"] == "normal"
        assert info_reply(mx, "before")[0] == 250
        assert ticket_exim.queue_count() == 1
        wait_for("the ticket host's Exim queue size reaches the MX", lambda: route(mx)["reported_queue"] == 1)

        level_file.write_text("shed\n")
        (code, text), on_the_way = send_until(mx, 451, "until-shed")  # within BOUND seconds
        accepted = 1 + on_the_way
        assert code == 451 and text.startswith("4.3.2 ") and "under memory pressure" in text
        assert "(route:tickets)" in text
        published = status(ticket)["published_pressure"]
        assert (published["level"], published["governor"], published["forced"]) == ("shed", "normal", "shed")
        assert published["node"] == "ticket1001" and "forced by" in published["reason"]
        assert mx.metric("queueguard_route_pressure_level", route="tickets") == 2
        assert mx.metric("queueguard_route_pressure_level", route="default") == 0
        # other routes are unaffected
        assert send(mx.port, ["alice@test.example"], "alice")["DATA"][0] == 250
        assert len(mx_exim.wait_maildir("alice")) == 1
        # what was deferred stays deferred while the host sheds (the sender keeps it)
        assert info_reply(mx, "deferred")[0] == 451

        level_file.write_text("normal\n")
        _, resumed = send_until(mx, 250, "until-normal")  # within BOUND seconds
        accepted += resumed
        assert mx.metric("queueguard_route_pressure_level", route="tickets") == 0
        assert mx.metric("queueguard_route_deferrals_total", route="tickets", reason="shed") >= 2
        assert ticket_exim.queue_count() == accepted  # every accepted message once at the ticket host
        assert "route=tickets pressure normal -> shed" in mx.log()
        assert "route=tickets pressure shed -> normal" in mx.log()

        level_file.write_text("soften\n")  # soften: the shipped soften_concurrent (1) replaces max_concurrent (4)
        wait_for("the MX lowers the cap", lambda: route(mx)["cap"] == 1 and route(mx)["pressure"] == "soften")
        assert info_reply(mx, "soft")[0] == 250


def test_a_publisher_that_goes_away_is_treated_as_on_missing_keep_and_logged_once(
        tmp_path: Path, redis: RedisServer, clamd: Clamd, ticket_exim: Exim, mx_exim: Exim) -> None:
    level_file = tmp_path / "force-pressure"
    level_file.write_text("shed\n")
    ticket = Guard(ticket_settings(ticket_exim, level_file, redis_url=redis.url, clamd=clamd), TICKET_POLICY)
    mx_doc = mx_settings(mx_exim.port, ticket.port, redis.url)
    mx_doc["routes"]["tickets"]["pressure"]["stale_after"] = "1s"  # shortened from 30 s
    with Guard(mx_doc, MX_POLICY) as mx:
        ticket.start()
        try:
            wait_for("the MX sees the shed", lambda: route(mx)["pressure"] == "shed")
        finally:
            ticket.stop()
        # the report's TTL (6 s, shipped) runs out, then stale_after: back to the configured caps
        wait_for("the MX drops the stale shed", lambda: route(mx)["pressure"] == "normal", timeout=6 + 1 + BOUND)
        time.sleep(3)  # a few more reads of the missing key
        assert mx.log().count("pressure report missing or stale; applying on_missing=keep") == 1
        assert route(mx)["reported_queue"] is None
        code, text = info_reply(mx, "host down")  # no longer "memory pressure": the downstream itself is down
        assert code == 451 and "memory pressure" not in text


def test_without_redis_the_mx_reads_the_ticket_hosts_status_page(
        tmp_path: Path, ticket_exim: Exim, mx_exim: Exim) -> None:
    level_file = tmp_path / "force-pressure"
    ticket = Guard(ticket_settings(ticket_exim, level_file, redis_url=None, clamd=None), TICKET_POLICY)
    mx_doc = mx_settings(mx_exim.port, ticket.port, "memory")
    mx_doc["routes"]["tickets"]["pressure"] = {
        "source": "http", "url": f"http://127.0.0.1:{ticket.metrics_port}/status.json", "interval": "2s",
        "token_file": ticket.settings["status"]["token_file"]}  # the ticket host's token, as shipped
    with ticket, Guard(mx_doc, MX_POLICY) as mx:
        assert status(ticket)["pressure"]["level"] == "normal"  # its own governor, no clamd
        assert info_reply(mx, 1)[0] == 250
        level_file.write_text("shed")
        _, on_the_way = send_until(mx, 451, "until-shed")
        assert send(mx.port, ["alice@test.example"], "a")["DATA"][0] == 250
        level_file.unlink()  # no file: the governor alone decides again
        _, resumed = send_until(mx, 250, "until-normal")
        assert ticket_exim.queue_count() == 1 + on_the_way + resumed
        assert len(mx_exim.wait_maildir("alice")) == 1

