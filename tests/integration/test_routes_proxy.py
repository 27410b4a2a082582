"""Routes through the real proxy: `queueguard serve` with contrib/routes/mx.yaml (addresses, ports
and the Redis URL changed), a real Exim as the MX's own downstream (PROXY v2, as shipped) and a
recording SMTP sink standing for the ticket host.

Shows: ticket addresses land at the ticket downstream and the rest at Exim; a mixed-recipient
message is split by the sender's retries (smtplib re-sending the refused recipients, and a real
Exim as the sending MTA) with every recipient delivered exactly once; a wave to info@ never has
more transactions open at the ticket downstream than the route's cap (counted by the sink, in
DATA), and every deferred message arrives on retry; the per-minute cap answers 451 4.7.1.
"""

from __future__ import annotations

import re
import smtplib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from queueguard.harness.exim import Exim
from queueguard.harness.guard import Guard
from queueguard.harness.sink import RecordingSink
from tests.components.redis import RedisServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MX_POLICY = {"lists.yaml": "lists:\n  ticket_addresses: [info@test.example, '*@tickets.test.example']\n"}
SHIPPED = yaml.safe_load((REPO / "contrib" / "routes" / "mx.yaml").read_text())
CAP = SHIPPED["routes"]["tickets"]["max_concurrent"]
PER_MINUTE = SHIPPED["routes"]["tickets"]["max_per_minute"]


def contrib(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "contrib" / "routes" / name).read_text())
    for key in ("metrics", "policies"):  # the Guard harness picks these
        doc.pop(key)
    doc["smtp"].pop("listen")
    return doc


def mx_settings(exim_port: int, ticket_port: int, redis_url: str) -> dict[str, Any]:
    """contrib/routes/mx.yaml pointed at this test's Exim, ticket downstream and Redis."""
    doc = contrib("mx.yaml")
    doc["downstreams"][0]["address"] = f"127.0.0.1:{exim_port}"
    doc["routes"]["tickets"]["downstreams"][0]["address"] = f"127.0.0.1:{ticket_port}"
    doc["state"] = redis_url
    return doc


def body(n: int | str) -> bytes:
    head = f"From: s@sender.example\r\nSubject: message {n}\r\nMessage-ID: <{n}@sender.example>\r\n"
    return f"{head}\r\nbody {n}\r\n".encode()


def send(port: int, rcpts: list[str], n: int | str) -> dict[str, tuple[int, str]]:
    """One transaction; the reply per recipient, and 'DATA' when any was accepted."""
    replies: dict[str, tuple[int, str]] = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.example")
        c.mail("s@sender.example")
        for r in rcpts:
            code, text = c.rcpt(r)
            replies[r] = (code, text.decode())
        if any(code == 250 for code, _ in replies.values()):
            code, text = c.data(body(n))
            replies["DATA"] = (code, text.decode())
        else:
            c.rset()
    return replies


def delivered(sink: RecordingSink, rcpt: str) -> list[bytes]:
    return [m.data for m in sink.received() if rcpt in [r.lower() for r in m.rcpt_tos]]


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as r:
        yield r


@pytest.fixture
def mx_exim() -> Iterator[Exim]:
    with Exim(proxy=True, relay_from_hosts=["127.0.0.1"]) as e:  # relays dest.example into e.relayed()
        yield e


@pytest.fixture
def ticket_sink() -> Iterator[RecordingSink]:
    with RecordingSink() as s:
        yield s


@pytest.fixture
def mx(mx_exim: Exim, ticket_sink: RecordingSink, redis: RedisServer) -> Iterator[Guard]:
    with Guard(mx_settings(mx_exim.port, ticket_sink.port, redis.url), MX_POLICY) as g:
        yield g


def test_ticket_addresses_go_to_the_ticket_host_the_rest_to_exim(mx: Guard, mx_exim: Exim,
                                                                   ticket_sink: RecordingSink) -> None:
    for n, rcpt in enumerate(["info@test.example", "anyone@tickets.test.example", "alice@test.example"]):
        assert send(mx.port, [rcpt], n)["DATA"][0] == 250
    assert ticket_sink.wait_count(2) == 2
    assert [m.rcpt_tos for m in ticket_sink.received()] == [["info@test.example"], ["anyone@tickets.test.example"]]
    assert len(mx_exim.wait_maildir("alice")) == 1
    assert mx_exim.maildir("info") == []  # Exim has an info user too: it must not get the ticket mail
    lines = mx.message_lines()
    assert sum(f"downstream=127.0.0.1:{ticket_sink.port}" in ln for ln in lines) == 2
    assert sum(f"downstream=127.0.0.1:{mx_exim.port}" in ln for ln in lines) == 1


def test_mixed_recipients_are_split_by_retries_and_delivered_once(mx: Guard, mx_exim: Exim,
                                                                    ticket_sink: RecordingSink) -> None:
    rcpts = ["alice@test.example", "info@test.example", "bob@test.example", "x@tickets.test.example"]
    with smtplib.SMTP("127.0.0.1", mx.port, timeout=30) as c:
        refused = c.sendmail("s@sender.example", rcpts, body("mixed"))
        assert set(refused) == {"info@test.example", "x@tickets.test.example"}
        for code, text in refused.values():
            assert code == 452 and text.startswith(b"4.5.3 ") and b"separate transaction" in text
        # what an MTA does with 452: send the message again, in a new transaction, to those only
        assert c.sendmail("s@sender.example", list(refused), body("mixed")) == {}
    assert len(mx_exim.wait_maildir("alice")) == 1 and len(mx_exim.wait_maildir("bob")) == 1
    assert ticket_sink.wait_count(1) == 1
    assert ticket_sink.received()[0].rcpt_tos == ["info@test.example", "x@tickets.test.example"]
    assert mx_exim.maildir("info") == []
    assert mx.metric("queueguard_route_deferrals_total", route="tickets", reason="split") == 2


def envelope_to(messages: list[bytes]) -> list[str]:
    out: list[str] = []
    for m in messages:
        found = re.search(rb"^Envelope-to: (.+?)\r?$", m, re.M)
        assert found, m[:300]
        out.extend(a.strip().decode() for a in found.group(1).split(b","))
    return sorted(out)


def test_a_real_exim_sender_splits_the_message_itself(mx: Guard, mx_exim: Exim,
                                                      ticket_sink: RecordingSink) -> None:
    """Exim as the sending MTA (smarthost: the guard) handles the 452 4.5.3 on its own.

    The sending Exim delivers @test.example itself, so this message goes to other domains:
    dest.example (default route; the MX's Exim relays it into its `relayed` maildir) and
    tickets.test.example (the ticket route)."""
    rcpts = ["alice@dest.example", "x@tickets.test.example", "bob@dest.example", "y@tickets.test.example"]
    with Exim(relay_from_hosts=["127.0.0.1"], smarthost=("127.0.0.1", mx.port)) as sender:
        with smtplib.SMTP("127.0.0.1", sender.port, timeout=30) as c:
            assert c.sendmail("s@sender.example", rcpts, body("via-exim")) == {}
        # The default-route recipients go in the first transaction; the ticket ones get 452 4.5.3
        # ("too many recipients"), which Exim 4.96 sends in a new transaction. The guard offers
        # PIPELINING, so Exim does that at once on the same connection (without it, Exim kept them
        # for its next queue run).
        sender.wait_log(r"-> bob@dest\.example", timeout=20)
        sender.wait_log(r"-> y@tickets\.test\.example .*250 2\.0\.0", timeout=20)
        assert sender.queue_count() == 0
    assert ticket_sink.wait_count(1) == 1
    assert [m.rcpt_tos for m in ticket_sink.received()] == [["x@tickets.test.example", "y@tickets.test.example"]]
    deadline = time.monotonic() + 10
    while len(mx_exim.relayed()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert envelope_to(mx_exim.relayed()) == ["alice@dest.example", "bob@dest.example"]  # each once
    assert mx.metric("queueguard_route_deferrals_total", route="tickets", reason="split") == 2


def test_a_wave_to_info_never_exceeds_the_route_cap_at_the_ticket_host(mx: Guard,
                                                                      ticket_sink: RecordingSink) -> None:
    ticket_sink.behaviour.data_delay = 0.5  # the ticket system is slow to take each message
    wave = 3 * CAP
    deferred: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        """A sending MTA: retries a deferred RCPT until the message is taken."""
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                r = send(mx.port, ["info@test.example"], n)
                code, text = r["info@test.example"]
                if code == 250:
                    assert r["DATA"][0] == 250, r
                    return
                with lock:
                    deferred.append(f"{code} {text}")
                time.sleep(0.1)
            raise AssertionError(f"message {n} never accepted")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(wave)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert ticket_sink.wait_count(wave) == wave
    assert ticket_sink.max_in_data <= CAP  # the ticket host never saw more than the cap at once
    assert ticket_sink.max_in_data == CAP  # ... and the wave did press against it
    assert deferred and all(d.startswith("451 4.3.2 ") and f"limit of {CAP} concurrent" in d for d in deferred)
    bodies = sorted(m.data for m in ticket_sink.received())
    assert len(set(bodies)) == wave  # every message once, none twice
    assert mx.metric("queueguard_route_deferrals_total", route="tickets", reason="concurrency") == len(deferred)
    assert mx.metric("queueguard_route_active_transactions", route="tickets") == 0


def test_the_per_minute_cap_defers_with_4_7_1(mx: Guard, ticket_sink: RecordingSink) -> None:
    with smtplib.SMTP("127.0.0.1", mx.port, timeout=30) as c:
        for n in range(PER_MINUTE):
            assert c.sendmail("s@sender.example", ["info@test.example"], body(n)) == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            c.sendmail("s@sender.example", ["info@test.example"], body("one too many"))
        code, text = e.value.recipients["info@test.example"]
        assert code == 451 and text.startswith(b"4.7.1 ") and f"{PER_MINUTE} messages per minute".encode() in text
        assert c.sendmail("s@sender.example", ["alice@test.example"], body("other route")) == {}
    assert ticket_sink.count() == PER_MINUTE
    assert mx.metric("queueguard_route_deferrals_total", route="tickets", reason="rate") == 1
