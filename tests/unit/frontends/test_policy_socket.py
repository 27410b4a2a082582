"""The policy socket: protocol parsing (pure) and the server over real sockets.

The server tests run the real pipeline with the real rate-limit check on its
in-memory store; only the internal-error and timeout cases use stand-in
checks, as fault injection (a check that raises or hangs is how such a bug
looks to the front end).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from queueguard.frontends.policy_socket import (
    MAX_ATTRIBUTES,
    MAX_LINE,
    BadRequest,
    PolicySocket,
    action_for,
    format_reply,
    parse_attribute,
    parse_attributes,
    parse_request,
)
from queueguard.pipeline import Pipeline
from queueguard.policy.schema import Policy
from queueguard.ratelimit.check import RateLimitCheck
from queueguard.ratelimit.store import MemoryStore
from queueguard.settings import PolicySocketSettings
from queueguard.stage import RcptContext, StageResult
from queueguard.verdict import ACCEPT, Action, Verdict, quarantine, reject, tempfail

POSTFIX_RCPT = (
    "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address=192.0.2.7\n"
    "client_name=mail.example.net\nreverse_client_name=mail.example.net\nhelo_name=mail.example.net\n"
    "sender=alice@example.net\nrecipient={rcpt}\nrecipient_count=0\nqueue_id=\ninstance=1a2b.5f3e.1\n"
    "size=0\netrn_domain=\nstress=\nsasl_method=\nsasl_username=\nsasl_sender=\nccert_subject=\n"
    "ccert_issuer=\nccert_fingerprint=\nencryption_protocol=\nencryption_cipher=\nencryption_keysize=0\n"
    "policy_context=\nserver_address=127.0.0.1\nserver_port=25\ncompatibility_level=3.6\n"
    "mail_version=3.7.11\n\n"
)


def lines(text: str) -> list[bytes]:
    return [line.encode() for line in text.strip("\n").split("\n")]


# --- parsing -------------------------------------------------------------------------------


def test_parse_postfix_rcpt_request() -> None:
    req = parse_request(parse_attributes(lines(POSTFIX_RCPT.format(rcpt="bob@test.example"))))
    assert req.state == "RCPT"
    assert req.client_ip == ipaddress.ip_address("192.0.2.7")
    assert (req.client_name, req.helo, req.sender, req.recipient) == (
        "mail.example.net", "mail.example.net", "alice@example.net", "bob@test.example")
    assert req.size is None and req.sasl_username == "" and req.instance == "1a2b.5f3e.1"
    conn = req.connection()
    assert conn.authenticated is None


def test_value_may_contain_equals_and_unknown_attributes_are_ignored() -> None:
    attrs = parse_attributes([b"ccert_subject=CN=a=b", b"future_attribute=x"])
    assert attrs == {"ccert_subject": "CN=a=b", "future_attribute": "x"}


def test_minimal_exim_style_request_infers_state() -> None:
    rcpt = parse_request({"client_address": "2001:db8::1", "sender": "", "recipient": "bob@test.example",
                          "sasl_username": "carol", "size": "1234", "client_name": "unknown"})
    assert rcpt.state == "RCPT" and rcpt.sender == "" and rcpt.size == 1234 and rcpt.client_name == ""
    assert rcpt.connection().authenticated == "carol"
    assert parse_request({"sender": "a@b.example"}).state == "MAIL"


@pytest.mark.parametrize(("raw", "why"), [
    (b"no equals sign", "without '='"),
    (b"=value", "bad attribute name"),
    (b"bad name=x", "bad attribute name"),
    (b"recipient=a\x00b@example", "control character"),
    (b"sender=\xff\xfe@example", "not UTF-8"),
    (b"x=" + b"a" * MAX_LINE, "longer than"),
])
def test_bad_lines(raw: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        parse_attribute(raw)


@pytest.mark.parametrize(("attrs", "why"), [
    ({"request": "junk_policy", "recipient": "a@b"}, "unknown request type"),
    ({"protocol_state": "WHATEVER", "recipient": "a@b"}, "unknown protocol_state"),
    ({"client_address": "1.2.3.4"}, "no protocol_state"),
    ({"protocol_state": "RCPT", "sender": "a@b"}, "without recipient"),
    ({"protocol_state": "RCPT", "recipient": "a@b", "client_address": "999.1.1.1"}, "bad client_address"),
    ({"protocol_state": "RCPT", "recipient": "a@b", "size": "-5"}, "bad size"),
])
def test_bad_requests(attrs: dict[str, str], why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        parse_request(attrs)


def test_duplicate_and_too_many_attributes() -> None:
    with pytest.raises(BadRequest, match="given twice"):
        parse_attributes([b"recipient=a@b", b"recipient=c@d"])
    with pytest.raises(BadRequest, match="more than"):
        parse_attributes([f"a{i}=x".encode() for i in range(MAX_ATTRIBUTES + 1)])


def test_actions_for_verdicts() -> None:
    assert action_for(ACCEPT) == "dunno"
    limited = tempfail("4.7.1", "Rate limit exceeded (rule r), try again in 60s", reason="ratelimit")
    assert action_for(limited) == "defer_if_permit 4.7.1 Rate limit exceeded (rule r), try again in 60s"
    assert action_for(reject("5.7.1", "Listed\r\nsender", reason="list")) == "550 5.7.1 Listed sender"
    assert action_for(quarantine("Ok", reason="ratelimit", rule="q")) == "hold Ok"
    assert action_for(Verdict(Action.DISCARD, text="gone")) == "discard gone"
    assert format_reply("dunno") == b"action=dunno\n\n"


# --- the server over real sockets ------------------------------------------------------------

POLICY = Policy.model_validate({
    "lists": {"blocked": ["*@blocked.example"]},
    "ratelimits": [
        {"name": "per-rcpt", "key": "recipient", "rate": "2/1h", "burst": 2, "action": "tempfail"},
        {"name": "no-blocked", "key": "sender", "rate": "1/1h", "burst": 1, "action": "reject",
         "only": {"sender_in": "blocked"}},
        {"name": "hold-q", "key": "recipient", "rate": "1/1h", "burst": 1, "action": "quarantine",
         "only": {"recipient_in": ["q@test.example"]}},
    ],
})


class Raises:
    """Fault injection: a check with a bug."""

    name = "raises"

    async def on_rcpt(self, ctx: RcptContext) -> StageResult:
        raise RuntimeError("bug")

    async def commit(self, txn: object, policy: Policy) -> None:
        return None


class Hangs(Raises):
    """Fault injection: a check stuck on a dead backend."""

    name = "hangs"

    async def on_rcpt(self, ctx: RcptContext) -> StageResult:
        await asyncio.sleep(3600)
        return StageResult()


def pipeline(*checks: object) -> Pipeline:
    rcpt_checks = list(checks) or [RateLimitCheck(MemoryStore(10_000))]
    return Pipeline(frontend="policy", policy=lambda: POLICY, rcpt_checks=rcpt_checks)  # type: ignore[arg-type]


@pytest.fixture
async def server() -> AsyncIterator[PolicySocket]:
    s = PolicySocket(pipeline(), PolicySocketSettings(enabled=True, listen="127.0.0.1:0"))
    await s.start()
    yield s
    await s.stop()


async def ask(port: int, *requests: str, raw: bytes | None = None, half_close: bool = False) -> list[str]:
    """Send requests on one connection; return the action lines answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw if raw is not None else "".join(requests).encode())
    if half_close:
        writer.write_eof()
    await writer.drain()
    answers: list[str] = []
    want = len(requests) or 1
    while len(answers) < want:
        line = await asyncio.wait_for(reader.readline(), 10)
        if not line:
            break
        if line.strip():
            answers.append(line.decode().strip())
    writer.close()
    return answers


def rcpt(recipient: str, sender: str = "alice@example.net") -> str:
    return POSTFIX_RCPT.format(rcpt=recipient).replace("sender=alice@example.net", f"sender={sender}")


async def test_flood_is_deferred_per_recipient_and_others_pass(server: PolicySocket) -> None:
    answers = await ask(server.port, *(rcpt("bob@test.example") for _ in range(3)), rcpt("carol@test.example"))
    assert answers[:2] == ["action=dunno", "action=dunno"]
    assert answers[2].startswith("action=defer_if_permit 4.7.1 Rate limit exceeded (rule per-rcpt)")
    assert answers[3] == "action=dunno"


async def test_reject_rule_and_quarantine_rule(server: PolicySocket) -> None:
    answers = await ask(server.port, rcpt("bob@test.example", "spam@blocked.example"),
                        rcpt("carol@test.example", "spam@blocked.example"),
                        rcpt("q@test.example"), rcpt("q@test.example"))
    assert answers[0] == "action=dunno"
    assert answers[1] == "action=550 5.7.1 Rate limit exceeded (rule no-blocked)"
    assert answers[2] == "action=dunno"
    assert answers[3].startswith("action=hold ")


async def test_mail_and_other_states_answer_dunno(server: PolicySocket) -> None:
    mail = "request=smtpd_access_policy\nprotocol_state=MAIL\nclient_address=192.0.2.7\nsender=a@b.example\n\n"
    data = "request=smtpd_access_policy\nprotocol_state=END-OF-MESSAGE\nclient_address=192.0.2.7\n\n"
    assert await ask(server.port, mail, data) == ["action=dunno", "action=dunno"]


async def test_half_closed_request_without_empty_line_is_answered(server: PolicySocket) -> None:
    answers = await ask(server.port, raw=b"protocol_state=RCPT\nclient_address=192.0.2.9\nrecipient=x@test.example",
                        half_close=True)
    assert answers == ["action=dunno"]


async def test_bad_request_is_deferred_and_connection_goes_on(server: PolicySocket) -> None:
    answers = await ask(server.port, "protocol_state=RCPT\nrecipient=a@b\nclient_address=nonsense\n\n",
                        "garbage line\n\n", "\n", rcpt("dave@test.example"))
    assert answers[0] == answers[1] == answers[2] == "action=defer 4.3.0 Bad policy request"
    assert answers[3] == "action=dunno"


async def test_overlong_line_is_deferred_and_closed(server: PolicySocket) -> None:
    answers = await ask(server.port, raw=b"recipient=" + b"a" * (MAX_LINE * 2) + b"\n\n" + rcpt("x@y").encode())
    assert answers == ["action=defer 4.3.0 Bad policy request"]


async def test_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "policy.sock"
    s = PolicySocket(pipeline(), PolicySocketSettings(enabled=True, listen=str(path)))
    await s.start()
    try:
        assert path.is_socket() and path.stat().st_mode & 0o777 == 0o660
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(rcpt("bob@test.example").encode())
        assert await asyncio.wait_for(reader.readuntil(b"\n\n"), 10) == b"action=dunno\n\n"
        writer.close()
    finally:
        await s.stop()
    assert not path.exists()


@pytest.mark.parametrize(("check", "expected"), [
    # A raising check becomes the pipeline's 451 4.3.0; a hung one hits our own deadline.
    (Raises(), "action=defer_if_permit 4.3.0 Temporary local problem, please try again later"),
    (Hangs(), "action=defer 4.3.0 Temporary local problem, please try again later"),
])
async def test_internal_error_and_timeout_defer(check: Raises, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("queueguard.frontends.policy_socket.REQUEST_TIMEOUT", 0.2)
    s = PolicySocket(pipeline(check), PolicySocketSettings(enabled=True, listen="127.0.0.1:0"))
    await s.start()
    try:
        assert await ask(s.port, rcpt("bob@test.example")) == [expected]
    finally:
        await s.stop()


def test_a_size_of_digits_str_isdigit_accepts_but_int_does_not_is_a_bad_request() -> None:
    from queueguard.frontends.policy_socket import BadRequest, parse_request

    with pytest.raises(BadRequest, match="bad size"):
        parse_request({"request": "smtpd_access_policy", "protocol_state": "RCPT", "size": "\u00b2",
                       "client_address": "192.0.2.1", "recipient": "a@example.org"})
