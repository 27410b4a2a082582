"""The component harnesses themselves: real Exim 4.96, smtp-sink and the recording sink.

These pin down what other integration tests rely on: Exim delivers to
maildirs, refuses unknown users and relaying, takes the client address from a
PROXY v2 header, runs caller ACL text and the shipped contrib/exim snippets;
the sinks accept, count, record and misbehave on request.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from queueguard.harness.exim import DIRECT_SOURCE, Exim
from queueguard.harness.ports import free_port, wait_port
from queueguard.harness.sink import RecordingSink, SmtpSink
from queueguard.shipped import EXIM_SNIPPETS

pytestmark = pytest.mark.integration

READSOCKET_ACL = f".include {EXIM_SNIPPETS / 'readsocket-acl.conf'}"
DIALOGUE = "ehlo client.example\nmail from:<a@client.example>\nrcpt to:<{rcpt}>\nquit\n"


def swaks(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("swaks")
    assert exe, "swaks is not installed: run ./setup.sh --no-run"
    cmd = [exe, "--server", "127.0.0.1", "--port", str(port), "--helo", "client.example", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def proxy_v2(port: int, source: str) -> list[str]:
    """swaks options for a PROXY v2 header (v2 needs the AF_* family name)."""
    return ["--proxy-version", "2", "--proxy-family", "AF_INET", "--proxy-source", source,
            "--proxy-source-port", "40000", "--proxy-dest", "127.0.0.1", "--proxy-dest-port", str(port)]


def replies(bh_output: str) -> list[str]:
    """The SMTP replies in `exim -bh` output (commentary lines start with >>> or LOG:)."""
    return [line for line in bh_output.splitlines() if re.match(r"^\d{3}[ -]", line)]


@pytest.fixture
def exim() -> Iterator[Exim]:
    with Exim() as e:
        yield e


@pytest.fixture
def proxied_exim() -> Iterator[Exim]:
    with Exim(proxy=True, relay_from_hosts=["192.0.2.0/24"]) as e:
        yield e


# -- Exim -------------------------------------------------------------------


def test_exim_delivers_to_maildir(exim: Exim) -> None:
    assert exim.pid is not None
    r = swaks(exim.port, "--from", "a@client.example", "--to", "bob@test.example", "--body", "marker-4711")
    assert r.returncode == 0, r.stdout
    [msg] = exim.wait_maildir("bob", 1)
    assert b"marker-4711" in msg
    assert b"Envelope-to: bob@test.example" in msg
    assert exim.maildir("alice") == []
    assert exim.queue_count() == 0


def test_exim_refuses_unknown_user_with_550(exim: Exim) -> None:
    r = swaks(exim.port, "--from", "a@client.example", "--to", "nobody@test.example")
    assert r.returncode != 0
    assert "550 Unrouteable address" in r.stdout
    assert "rejected RCPT <nobody@test.example>: Unrouteable address" in exim.mainlog()
    assert exim.queue_count() == 0


def test_exim_refuses_relay_from_non_relay_client(exim: Exim) -> None:
    r = swaks(exim.port, "--from", "a@client.example", "--to", "someone@other.example")
    assert "550 relay not permitted" in r.stdout
    assert exim.relayed() == [] and exim.queue_count() == 0


def test_proxy_v2_header_gives_exim_the_real_client_address(proxied_exim: Exim) -> None:
    port = proxied_exim.port
    r = swaks(port, "--from", "a@client.example", "--to", "carol@test.example",
              *proxy_v2(port, "198.51.100.9"))
    assert r.returncode == 0, r.stdout
    log = proxied_exim.mainlog()
    assert re.search(r"<= a@client\.example H=\(client\.example\) \[198\.51\.100\.9\]\S* .*PRX=127\.0\.0\.1", log), log
    [msg] = proxied_exim.wait_maildir("carol", 1)
    assert b"from [198.51.100.9]" in msg


def test_relay_control_uses_the_proxied_address(proxied_exim: Exim) -> None:
    """Only relay_from_hosts may relay, judged by the PROXY source, never by 127.0.0.1."""
    port = proxied_exim.port
    outsider = swaks(port, "--from", "a@client.example", "--to", "x@other.example",
                     *proxy_v2(port, "198.51.100.9"))
    assert "550 relay not permitted" in outsider.stdout
    insider = swaks(port, "--from", "a@client.example", "--to", "x@other.example", "--body", "relay-ok",
                    *proxy_v2(port, "192.0.2.5"))
    assert insider.returncode == 0, insider.stdout
    direct = swaks(port, "--local-interface", DIRECT_SOURCE, "--from", "a@client.example",
                   "--to", "y@other.example")
    assert "550 relay not permitted" in direct.stdout
    proxied_exim.wait_log(r"=> x <x@other\.example> R=relay")
    [relayed] = proxied_exim.relayed()
    assert b"relay-ok" in relayed


def test_client_from_proxy_address_without_header_is_refused(proxied_exim: Exim) -> None:
    r = swaks(proxied_exim.port, "--from", "a@client.example", "--to", "bob@test.example")
    assert r.returncode != 0
    assert "503 Command refused, required Proxy negotiation failed" in r.stdout
    assert proxied_exim.maildir("bob") == []


def test_proxy_deployment_snippet_is_what_exim_runs(proxied_exim: Exim) -> None:
    out = proxied_exim.run("-bP", "hosts_proxy", "daemon_smtp_ports", "local_interfaces", "proxy_protocol_timeout")
    assert "hosts_proxy = <; 127.0.0.1 ; ::1" in out
    assert f"daemon_smtp_ports = {proxied_exim.port}" in out
    assert "proxy_protocol_timeout = 3s" in out
    include = re.search(r"^\.include (\S+/proxy-deployment\.conf)$", proxied_exim.config_path.read_text(), re.M)
    assert include is not None
    assert Path(include[1]).read_bytes() == (EXIM_SNIPPETS / "proxy-deployment.conf").read_bytes()


def test_many_messages_on_one_connection_are_all_delivered_at_once(exim: Exim) -> None:
    """The proxy snippet lifts smtp_accept_queue_per_connection (default 10) for pooled connections."""
    with smtplib.SMTP("127.0.0.1", exim.port) as c:
        for i in range(12):
            c.sendmail("a@client.example", ["bob@test.example"], f"Subject: {i}\r\n\r\nbody\r\n".encode())
    assert len(exim.wait_maildir("bob", 12)) == 12
    assert "no immediate delivery" not in exim.mainlog()
    assert exim.queue_count() == 0


def test_queue_only_keeps_mail_until_a_queue_run() -> None:
    with Exim(queue_only=True) as e:
        r = swaks(e.port, "--from", "a@client.example", "--to", "dave@test.example")
        assert r.returncode == 0, r.stdout
        assert e.queue_count() == 1
        assert e.maildir("dave") == []
        e.run_queue()
        assert len(e.maildir("dave")) == 1
        assert e.queue_count() == 0


def _refuses(port: int, within: float = 5.0) -> bool:
    """True once a connect to the port is refused.

    Connects from 127.0.0.2 so the kernel can never self-connect (source == destination), and
    polls because a forked child of a dying daemon can hold the listening socket for a moment
    on a loaded machine.
    """
    deadline = time.monotonic() + within
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(DIRECT_SOURCE, 0)).close()
        except OSError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _listeners(port: int) -> str:
    """Who listens on the port, for the failure message."""
    if shutil.which("ss") is None:
        return "(ss not installed)"
    return subprocess.run(["ss", "-ltnp", f"sport = :{port}"], capture_output=True, text=True).stdout


def test_restart_keeps_port_and_refuses_while_stopped(exim: Exim) -> None:
    port = exim.port
    exim.stop()
    assert exim.pid is None
    assert _refuses(port), f"port {port} still accepts after stop:\n{_listeners(port)}"
    exim.start()
    assert exim.port == port
    assert swaks(port, "--from", "a@client.example", "--to", "bob@test.example").returncode == 0
    assert len(exim.wait_maildir("bob", 1)) == 1


def test_bh_runs_the_acls_without_a_daemon() -> None:
    e = Exim()
    try:
        assert e.pid is None
        assert replies(e.bh("192.0.2.1", DIALOGUE.format(rcpt="bob@test.example")))[-2] == "250 Accepted"
        assert "550 Unrouteable address" in replies(e.bh("192.0.2.1", DIALOGUE.format(rcpt="zz@test.example")))
        assert "550 relay not permitted" in replies(e.bh("192.0.2.1", DIALOGUE.format(rcpt="x@other.example")))
    finally:
        e.close()


def test_caller_rcpt_acl_is_spliced_in() -> None:
    acl = "  deny    local_parts = carol\n          message = 550 5.7.1 carol is away"
    e = Exim(rcpt_acl=acl)
    try:
        assert "550 5.7.1 carol is away" in replies(e.bh("192.0.2.1", DIALOGUE.format(rcpt="carol@test.example")))
        assert "250 Accepted" in replies(e.bh("192.0.2.1", DIALOGUE.format(rcpt="bob@test.example")))
    finally:
        e.close()


def test_ratelimit_state_is_cleared_on_request() -> None:
    acl = ("  defer   ratelimit = 2 / 1h / per_rcpt / strict / $sender_host_address\n"
           "          message = 451 4.7.1 too fast")
    e = Exim(rcpt_acl=acl)
    try:
        runs = [replies(e.bh("192.0.2.1", DIALOGUE.format(rcpt="bob@test.example"))) for _ in range(3)]
        assert "250 Accepted" in runs[0] and "451 4.7.1 too fast" in runs[2]
        e.reset_ratelimits()
        assert "250 Accepted" in replies(e.bh("192.0.2.1", DIALOGUE.format(rcpt="bob@test.example")))
    finally:
        e.close()


# -- contrib/exim/readsocket-acl.conf -----------------------------------------


def readsocket_exim(policy: str, *, fail_open: bool = False, timeout: str = "2s") -> Exim:
    macros = {"QG_POLICY_SOCKET": policy, "QG_POLICY_TIMEOUT": timeout}
    if fail_open:
        macros["QG_POLICY_IF_DOWN_ACCEPT"] = "yes"
    return Exim(macros=macros, acl_definitions=READSOCKET_ACL, rcpt_acl="  require acl = acl_queueguard_rcpt")


@pytest.mark.parametrize("fail_open", [False, True])
def test_readsocket_snippet_parses(fail_open: bool) -> None:
    e = readsocket_exim("inet:127.0.0.1:10031", fail_open=fail_open)
    try:
        assert "Exim version 4.96" in e.check_config()
    finally:
        e.close()


def test_readsocket_policy_down_defers_by_default() -> None:
    e = readsocket_exim(f"inet:127.0.0.1:{free_port()}")
    try:
        out = e.bh("192.0.2.1", DIALOGUE.format(rcpt="bob@test.example"))
        assert "451 4.3.0 Policy service unavailable, please try again later" in replies(out)
        assert "queueguard policy service unavailable" in out
    finally:
        e.close()


def test_readsocket_policy_down_accepts_when_configured_to() -> None:
    e = readsocket_exim(f"inet:127.0.0.1:{free_port()}", fail_open=True)
    try:
        out = e.bh("192.0.2.1", DIALOGUE.format(rcpt="bob@test.example"))
        assert "250 Accepted" in replies(out)
        assert "accepting without check" in out
        # Exim's own checks still apply when the policy service is down.
        assert "550 Unrouteable address" in replies(e.bh("192.0.2.1", DIALOGUE.format(rcpt="zz@test.example")))
    finally:
        e.close()


def test_readsocket_policy_silent_times_out_to_the_fallback() -> None:
    """A policy server that accepts the connection but never answers (listen, no accept)."""
    with socket.create_server(("127.0.0.1", 0)) as stalled:
        e = readsocket_exim(f"inet:127.0.0.1:{stalled.getsockname()[1]}", timeout="1s")
        try:
            out = e.bh("192.0.2.1", DIALOGUE.format(rcpt="bob@test.example"))
            assert "451 4.3.0 Policy service unavailable, please try again later" in replies(out)
        finally:
            e.close()


class CannedPolicyServer:
    """Stand-in for queueguard's policy socket that answers a fixed action per recipient.

    It exercises only the Exim side of the snippet (request format, answer
    mapping); the real policy socket is tested with this snippet in its own tests.
    """

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.requests: list[dict[str, str]] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\n\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                req = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
                self.requests.append(req)
                conn.sendall((self.answers.get(req.get("recipient", ""), "action=DUNNO") + "\n\n").encode())

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def test_readsocket_maps_policy_answers_to_smtp_replies() -> None:
    server = CannedPolicyServer({
        "bob@test.example": "action=DEFER_IF_PERMIT 4.7.1 rate limit exceeded (flood-to-one-address)",
        "carol@test.example": "action=REJECT spam wave",
        "dave@test.example": "action=450 4.2.0 mailbox busy",
        "info@test.example": "action=defer",
        "postmaster@test.example": "nonsense",
    })
    e = readsocket_exim(f"inet:127.0.0.1:{server.port}")
    try:
        rcpts = ["alice", "bob", "carol", "dave", "info", "postmaster"]
        dialogue = ("ehlo client.example\nmail from:<a@client.example> SIZE=1234\n"
                    + "".join(f"rcpt to:<{r}@test.example>\n" for r in rcpts) + "quit\n")
        got = replies(e.bh("192.0.2.1", dialogue))[-7:-1]
        assert got == [
            "250 Accepted",
            "451 4.7.1 rate limit exceeded (flood-to-one-address)",
            "550 5.7.1 spam wave",
            "450 4.2.0 mailbox busy",
            "451 4.7.1 Try again later",
            "451 4.3.0 Policy service unavailable, please try again later",
        ]
        first = server.requests[0]
        assert first["request"] == "smtpd_access_policy"
        assert first["protocol_state"] == "RCPT"
        assert first["client_address"] == "192.0.2.1"
        assert first["helo_name"] == "client.example"
        assert first["sender"] == "a@client.example"
        assert first["recipient"] == "alice@test.example"
        assert first["size"] == "1234"
        assert len({r["instance"] for r in server.requests}) == 1
    finally:
        e.close()
        server.close()


# -- sinks ------------------------------------------------------------------


def test_smtp_sink_accepts_counts_and_dumps() -> None:
    with SmtpSink(dump=True) as sink:
        assert sink.pid is not None
        for i in range(3):
            r = swaks(sink.port, "--from", "a@client.example", "--to", "b@test.example", "--body", f"sink-{i}")
            assert r.returncode == 0, r.stdout
        assert sink.wait_count(3) == 3
        dumped = sink.messages()
        assert len(dumped) == 3
        assert all(b"X-Mail-Args: <a@client.example>" in m for m in dumped)
        assert {f"sink-{i}".encode() for i in range(3)} <= {line for m in dumped for line in m.splitlines()}


def test_smtp_sink_fault_options_pass_through() -> None:
    with SmtpSink(extra_args=["-r", "RCPT"]) as sink:
        r = swaks(sink.port, "--from", "a@client.example", "--to", "b@test.example")
        assert re.search(r"<\*\* +4\d\d", r.stdout), r.stdout
        assert sink.count() == 0


def test_recording_sink_records_envelope_and_bytes() -> None:
    with RecordingSink() as sink, smtplib.SMTP("127.0.0.1", sink.port) as c:
        c.sendmail("a@client.example", ["b@test.example", "c@test.example"], b"Subject: one\r\n\r\nbody\r\n")
        c.sendmail("a@client.example", ["d@test.example"], b"Subject: two\r\n\r\nbody\r\n")
        assert sink.wait_count(2) == 2
        first, second = sink.received()
        assert first.mail_from == "a@client.example"
        assert first.rcpt_tos == ["b@test.example", "c@test.example"]
        assert first.data == b"Subject: one\r\n\r\nbody\r\n"
        assert second.rcpt_tos == ["d@test.example"]
        assert sink.sessions == 1


def test_recording_sink_per_recipient_and_data_replies() -> None:
    with RecordingSink() as sink, smtplib.SMTP("127.0.0.1", sink.port) as c:
        sink.behaviour.rcpt_replies["gone@test.example"] = "550 5.1.1 no such user"
        sink.behaviour.rcpt_replies["full@test.example"] = "452 4.2.2 mailbox full"
        refused = c.sendmail("a@client.example", ["b@test.example", "gone@test.example", "full@test.example"],
                             b"Subject: x\r\n\r\nbody\r\n")
        assert refused == {"gone@test.example": (550, b"5.1.1 no such user"),
                           "full@test.example": (452, b"4.2.2 mailbox full")}
        assert sink.received()[0].rcpt_tos == ["b@test.example"]
        sink.behaviour.data_reply = "451 4.3.0 try later"
        with pytest.raises(smtplib.SMTPDataError) as err:
            c.sendmail("a@client.example", ["b@test.example"], b"Subject: y\r\n\r\nbody\r\n")
        assert err.value.smtp_code == 451
        assert sink.count() == 1


def test_recording_sink_drops_connection_and_slows_down() -> None:
    with RecordingSink() as sink:
        sink.behaviour.drop_at = "DATA"
        with pytest.raises(smtplib.SMTPServerDisconnected), smtplib.SMTP("127.0.0.1", sink.port) as c:
            c.sendmail("a@client.example", ["b@test.example"], b"Subject: x\r\n\r\nbody\r\n")
        assert sink.drops == 1 and sink.count() == 0
        sink.behaviour.drop_at = None
        sink.behaviour.data_delay = 0.2
        with smtplib.SMTP("127.0.0.1", sink.port) as c:
            c.sendmail("a@client.example", ["b@test.example"], b"Subject: x\r\n\r\nbody\r\n")
        assert sink.count() == 1


def test_recording_sink_stop_frees_port_and_restart_reuses_it() -> None:
    sink = RecordingSink().start()
    try:
        port = sink.port
        sink.stop()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        sink.start()
        wait_port("127.0.0.1", port, 5)
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.sendmail("a@client.example", ["b@test.example"], b"Subject: x\r\n\r\nbody\r\n")
        assert sink.count() == 1
    finally:
        sink.stop()


def test_recording_sink_records_proxy_source() -> None:
    with RecordingSink(proxy_protocol=True) as sink:
        r = swaks(sink.port, "--from", "a@client.example", "--to", "b@test.example",
                  *proxy_v2(sink.port, "198.51.100.9"))
        assert r.returncode == 0, r.stdout
        assert sink.received()[0].proxy_source == ("198.51.100.9", 40000)
