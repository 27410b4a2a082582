"""Rate limits end to end: real `queueguard serve` processes, real SMTP clients from many
loopback source addresses, a real Exim as the retrying sender, a real redis-server shared
by two guards, and a recording SMTP sink downstream.

Windows are short (a 1 s interval) so the tests can wait them out; replies are checked,
not timings: the number of 250s is bounded by the burst plus what the elapsed time allows.
"""

from __future__ import annotations

import contextlib
import math
import smtplib
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from queueguard.harness.exim import Exim
from queueguard.harness.guard import Guard
from queueguard.harness.sink import RecordingSink
from tests.components.flood import rcpt_as_written, wait_for
from tests.components.redis import RedisServer

pytestmark = pytest.mark.integration

BURST = 6
POLICY = f"""\
ratelimits:
  - name: flood-to-one-address
    key: recipient
    rate: {BURST}/{BURST}s
    action: tempfail
"""


def body(n: int) -> bytes:
    return f"From: s{n}@flood.example\r\nSubject: wave {n}\r\n\r\nmessage {n}\r\n".encode()


def send(port: int, rcpts: list[str], n: int, source: str = "127.0.0.1") -> dict[str, int | str]:
    """One transaction from `source`; the reply code per recipient, and 'DATA' -> final reply."""
    replies: dict[str, int | str] = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as c:
        c.ehlo("client.example")
        c.mail(f"s{n}@flood.example")
        for r in rcpts:
            code, _ = c.rcpt(r)
            replies[r] = code
        if any(v == 250 for v in replies.values()):
            code, msg = c.data(body(n))
            replies["DATA"] = f"{code} {msg.decode()}"
        else:
            c.rset()
    return replies


def delivered_to(sink: RecordingSink, rcpt: str) -> list[bytes]:
    return [m.data for m in sink.messages if rcpt in [r.lower() for r in m.rcpt_tos]]


@pytest.fixture
def sink() -> Iterator[RecordingSink]:
    with RecordingSink() as s:
        yield s


def test_flood_from_many_clients_is_deferred_and_the_retry_gets_through(sink: RecordingSink) -> None:
    guard = Guard({"downstreams": [{"address": f"127.0.0.1:{sink.port}"}]}, {"limits.yaml": POLICY})
    sender = Exim(relay_from_hosts=["127.0.0.1"], smarthost=("127.0.0.1", guard.port))
    with guard, sender:
        start = time.monotonic()
        codes = [send(guard.port, ["info@dest.example"], i, source=f"127.0.3.{i + 1}")["info@dest.example"]
                 for i in range(30)]
        elapsed = time.monotonic() - start
        accepted = codes.count(250)
        assert set(codes) <= {250, 451}, codes  # never a 5xx
        assert BURST <= accepted <= BURST + math.ceil(elapsed) + 1, (accepted, elapsed)
        assert codes[:BURST] == [250] * BURST

        # In the same transaction: info@ deferred, bob@ still accepted and delivered.
        mixed = send(guard.port, ["info@dest.example", "bob@dest.example"], 99, source="127.0.4.1")
        assert mixed["info@dest.example"] == 451 and mixed["bob@dest.example"] == 250
        assert str(mixed["DATA"]).startswith("250")
        assert sink.wait_count(accepted + 1) == accepted + 1
        assert len(delivered_to(sink, "info@dest.example")) == accepted  # each 250 delivered once
        assert len(delivered_to(sink, "bob@dest.example")) == 1
        assert "ratelimit flood-to-one-address: tempfail rcpt=info@dest.example" in guard.log()
        assert guard.metric("queueguard_ratelimit_hits_total", rule="flood-to-one-address") >= 30 - accepted

        # A real MTA sends one more: deferred (451 4.7.1), kept in its queue, delivered on retry.
        with smtplib.SMTP("127.0.0.1", sender.port, timeout=30) as c:
            c.sendmail("retry@sender.example", ["info@dest.example"], body(1000))
        sender.wait_log(r"== info@dest\.example .*451 4\.7\.1", timeout=20)
        assert sender.queue_count() == 1
        time.sleep(BURST + 1)  # the window passes
        sender.run_queue()
        assert sender.queue_count() == 0
        assert sink.wait_count(accepted + 2) == accepted + 2
        assert any(b"message 1000" in m for m in delivered_to(sink, "info@dest.example"))


def test_two_guards_share_one_limit_in_redis_and_survive_its_crash(sink: RecordingSink, tmp_path: Path) -> None:
    settings: dict[str, object] = {"downstreams": [{"address": f"127.0.0.1:{sink.port}"}]}
    policy = POLICY.replace(f"rate: {BURST}/{BURST}s", "rate: 6/1h")
    with RedisServer(tmp_path / "redis") as redis:
        settings["state"] = redis.url
        with Guard(settings, {"limits.yaml": policy}) as a, Guard(settings, {"limits.yaml": policy}) as b:
            codes = [send((a if i % 2 else b).port, ["info@dest.example"], i, source=f"127.0.5.{i + 1}")
                     ["info@dest.example"] for i in range(12)]
            assert codes == [250] * 6 + [451] * 6  # 6 in total across both guards, not 6 each

            redis.kill()
            after = [send((a if i % 2 else b).port, ["info@dest.example", f"u{i}@dest.example"], 100 + i,
                          source=f"127.0.6.{i + 1}") for i in range(8)]
            for r in after:
                # each guard goes on from what Redis had told it (the limit is used up), not from scratch
                assert r["info@dest.example"] == 451 and r[next(k for k in r if k.startswith("u"))] == 250
                assert str(r["DATA"]).startswith("250"), r  # the message itself is never refused
            total_250 = 6 + len(after)
            assert sink.wait_count(6 + len(after)) == 6 + len(after)
            delivered_rcpts = sum(len(m.rcpt_tos) for m in sink.messages)
            assert delivered_rcpts == total_250  # every accepted recipient arrived; nothing lost
            for g in (a, b):
                assert g.metric("queueguard_state_fallback_active", component="ratelimit") == 1
                assert g.metric("queueguard_state_errors_total", component="ratelimit") >= 1
                assert "using in-process state" in g.log()


def test_one_mailbox_spelled_many_ways_is_one_budget() -> None:
    """A flood to info@ that spells the address another way in every message (a quoted local part,
    backslashes in it, a source route, capitals) is one recipient to the real Exim behind us, which
    delivers every spelling to info's mailbox; it must be one budget to the limit too. (The proxy's
    address parser already takes quotes and routes off; the milter test of the same name is where
    an MTA hands us the spellings as written.)"""
    spellings = ["info@test.example", '"info"@test.example', '"in\\fo"@test.example', '"\\info"@test.example',
                 "INFO@test.example", "@relay.example:info@test.example", "@a.example,@b.example:info@test.example"]
    with Exim() as final, Guard({"downstreams": [{"address": f"127.0.0.1:{final.port}"}]},
                                {"limits.yaml": POLICY.replace(f"{BURST}/{BURST}s", f"{BURST}/10m")}) as guard:
        codes = [rcpt_as_written(guard.port, spellings[i % len(spellings)], i) for i in range(3 * len(spellings))]
        assert codes == [250] * BURST + [451] * (len(codes) - BURST), list(zip(codes, spellings * 3, strict=True))
        assert len(final.wait_maildir("info", BURST)) == BURST


TWO_AN_HOUR = "ratelimits:\n  - name: flood\n    key: recipient\n    rate: 2/1h\n    action: tempfail\n"


@contextlib.contextmanager
def past_ehlo(port: int) -> Iterator[tuple[socket.socket, BinaryIO]]:
    """A raw connection, greeted and past EHLO: for clients that leave at a chosen byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s, s.makefile("rb") as f:
        f.readline()
        s.sendall(b"EHLO c.example\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        yield s, f


def test_a_client_that_leaves_right_after_its_final_dot_is_still_charged(sink: RecordingSink) -> None:
    """The downstream has the message once the final dot is relayed: a client that closes its
    connection right after sending it (without waiting for our reply) must not get the delivery
    free. It did: aiosmtpd cancelled the session, the transaction ended as `client_disconnected`
    and its budget was given back while the downstream delivered (red team: 21 of 150 such
    messages delivered past a limit of 2). The transaction now runs to its end."""
    sink.behaviour.data_delay = 0.5  # the downstream takes its time over the message
    with Guard({"downstreams": [{"address": f"127.0.0.1:{sink.port}"}]}, {"limits.yaml": TWO_AN_HOUR}) as guard:
        with past_ehlo(guard.port) as (s, f):
            s.sendall(b"MAIL FROM:<a@client.example>\r\nRCPT TO:<info@dest.example>\r\nDATA\r\n")
            assert [f.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
            s.sendall(b"Subject: hit and run\r\n\r\nbody\r\n.\r\n")
            s.shutdown(socket.SHUT_WR)
        assert sink.wait_count(1) == 1
        wait_for("the transaction's end in the log", lambda: "reason=" in "".join(guard.message_lines()))
        assert "reason=ok" in guard.log() and "reason=client_disconnected" not in guard.log()
        codes = [send(guard.port, ["info@dest.example"], n)["info@dest.example"] for n in range(2)]
        assert codes == [250, 451]  # the first message took one of the two


def test_a_client_that_leaves_while_its_transaction_is_reset_gets_its_budget_back(sink: RecordingSink) -> None:
    """RSET (or a new EHLO) ends the open transaction: the downstream is reset, then the
    recipients' reservations are given back. A client that closed its connection while the
    downstream's RSET was still pending had that end cancelled half-way, and its budget was never
    given back (found in review): stricter than the MTA behind us. The end now runs to its end."""
    sink.behaviour.rset_delay = 0.5  # the downstream takes its time over the reset
    with Guard({"downstreams": [{"address": f"127.0.0.1:{sink.port}"}]}, {"limits.yaml": TWO_AN_HOUR}) as guard:
        with past_ehlo(guard.port) as (s, f):
            s.sendall(b"MAIL FROM:<a@client.example>\r\nRCPT TO:<info@dest.example>\r\n")
            assert [f.readline()[:3] for _ in range(2)] == [b"250", b"250"]
            s.sendall(b"RSET\r\n")
            wait_for("the downstream's RSET pending", lambda: sink.rsets == 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # then a reset
            f.close()  # (the socket closes only once its file is closed too)
        wait_for("the abandoned transaction's end in the log", lambda: "reason=rset" in guard.log())
        sink.behaviour.rset_delay = 0.0
        codes = [send(guard.port, ["info@dest.example"], n)["info@dest.example"] for n in range(3)]
        assert codes == [250, 250, 451]  # both of the two are there: the reset one took none
