"""Fuzz the SMTP front end: a real `queueguard serve` relaying to a real recording sink.

Hypothesis writes SMTP sessions: random command streams (valid, malformed, over-long, out of
order), sent one by one or pipelined up to DATA (RFC 2920), with random DATA bodies (dots to
unstuff, 8-bit, NULs, bare CR/LF, long lines); and real-shaped messages mutated byte by byte
(tests/fuzzcases.py) through a guard whose shadow rules parse and fingerprint every message.
Invariants, checked against the sink, not the guard:

- a DATA we answered 250 for is at the sink exactly once, byte for byte what the client sent
  (after dot-unstuffing), with the envelope the client got 250s for;
- a DATA answered anything else is not at the sink, and its reply is a well-formed 4xx or 5xx;
- every reply is a well-formed SMTP reply, the guard never stalls a reply, and it never dies.

Headers the guard adds are switched off (smtp.add_headers) so the bytes compare exactly. Input
counts are bounded (~40 s together) and recorded in docs/reliability.md; QG_FUZZ_SESSIONS and
QG_FUZZ_MESSAGES raise them for a longer local run.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from queueguard.harness.guard import Guard
from queueguard.harness.sink import Received, RecordingSink
from tests.fuzzcases import mutated

pytestmark = pytest.mark.integration

SESSIONS = int(os.environ.get("QG_FUZZ_SESSIONS", "600"))
MESSAGES = int(os.environ.get("QG_FUZZ_MESSAGES", "400"))
REPLY_TIMEOUT = 15.0
SHADOW_RULES = """\
# Shadow rules: every message is parsed and fingerprinted, nothing is held or refused.
bursts:
  - {name: fuzz-body, mode: shadow, fingerprint: body, threshold: 3 in 10m, action: quarantine}
  - {name: fuzz-urls, mode: shadow, fingerprint: url_hosts, threshold: 3 in 10m, action: quarantine}
  - {name: fuzz-attachments, mode: shadow, fingerprint: attachment, threshold: 3 in 10m, action: quarantine}
patterns:
  - {name: fuzz-words, mode: shadow, subject: '(?i)rechnung|offer', body: '(?i)click|here', action: quarantine}
"""
_REPLY = re.compile(rb"^[2-5][0-9][0-9]([ -].*)?$")
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def rig() -> Iterator[tuple[Guard, RecordingSink]]:
    with RecordingSink() as sink, Guard({
        "smtp": {"add_headers": False, "max_message_size": 200_000, "max_recipients": 5, "data_timeout": 10},
        "downstreams": [{"address": f"127.0.0.1:{sink.port}"}],
    }, {"shadow.yaml": SHADOW_RULES}) as guard:
        yield guard, sink
        assert guard.proc is not None and guard.proc.poll() is None, "the guard died:\n" + guard.log()[-3000:]


# --- a small SMTP client that keeps every byte and every reply ------------------------------------

class Closed(Exception):
    """The guard closed the connection (after a 421, a 502 for too many unknown commands, or QUIT)."""


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT)
        self.buf = b""
        self.replies: list[bytes] = []

    def reply(self) -> tuple[int, bytes]:
        """One whole reply (all its lines); each line must be well-formed."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                try:
                    part = self.sock.recv(65536)
                except TimeoutError:
                    raise AssertionError(f"no reply within {REPLY_TIMEOUT}s; so far {self.replies[-5:]}") from None
                except ConnectionResetError:  # closed (502 after five unknown commands) while we sent
                    part = b""
                if not part:
                    raise Closed(b"".join(lines))
                self.buf += part
            line, self.buf = self.buf.split(b"\r\n", 1)
            assert _REPLY.match(line), f"malformed reply line {line!r} after {self.replies[-5:]}"
            lines.append(line)
            if len(line) == 3 or line[3:4] == b" ":
                assert all(x[:3] == line[:3] for x in lines), lines
                self.replies.append(b"\n".join(lines))
                return int(line[:3]), b"\n".join(lines)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise Closed(repr(e).encode()) from e

    def close(self) -> None:
        self.sock.close()


# --- sessions --------------------------------------------------------------------------------------

ADDRESSES = st.sampled_from([
    "a@fuzz.example", "B.Two@Fuzz.Example", "c+tag@sub.fuzz.example", "postmaster", "<>", "",
    "no-at-sign", "a@b@c.example", "sp ace@fuzz.example", '"quoted local"@fuzz.example', "ü@fuzz.example",
    "x" * 300 + "@fuzz.example", "a@[127.0.0.1]", "ctl\x01@fuzz.example",
])
PARAMS = st.sampled_from(["", " SIZE=100", " SIZE=999999999", " BODY=8BITMIME", " SMTPUTF8", " FOO=bar",
                          " NOTIFY=NEVER", " ORCPT=rfc822;a@fuzz.example", " SIZE=x"])
BODY_LINE = st.one_of(
    st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b"", b".", b"..", b".leading dot", b"Subject: hi", b"From: a@fuzz.example", b"\x00",
                     b"\xff\xfe\xfd", b"x" * 999, b"x" * 1001, b"bare\nlf", b"bare\rcr", b"\r.\r", b"\n.\n"]),
)


@dataclass
class Step:
    verb: str
    line: bytes = b""
    body: list[bytes] = field(default_factory=list)


def _command(verb: str, arg: str) -> bytes:
    return f"{verb}{arg}".encode("utf-8", "surrogateescape") + b"\r\n"


STEP = st.one_of(
    st.builds(lambda v, h: Step(v, _command(v, " " + h)), st.sampled_from(["EHLO", "HELO"]),
              st.sampled_from(["client.example", "", "x" * 300, "bad\x00host", "[127.0.0.1]"])),
    st.builds(lambda a, p, case: Step("MAIL", _command("MAIL FROM:" if case else "mail from: ", f"<{a}>{p}")),
              ADDRESSES, PARAMS, st.booleans()),
    st.builds(lambda a, p: Step("RCPT", _command("RCPT TO:", f"<{a}>{p}")), ADDRESSES, PARAMS),
    st.builds(lambda lines: Step("DATA", b"DATA\r\n", lines), st.lists(BODY_LINE, max_size=12)),
    st.sampled_from([Step("RSET", b"RSET\r\n"), Step("NOOP", b"NOOP\r\n"), Step("VRFY", b"VRFY a\r\n"),
                     Step("HELP", b"HELP\r\n"), Step("BDAT", b"BDAT 3 LAST\r\n"), Step("STARTTLS", b"STARTTLS\r\n"),
                     Step("AUTH", b"AUTH PLAIN AGFAAGI=\r\n"), Step("LONG", b"NOOP " + b"y" * 1100 + b"\r\n"),
                     Step("EMPTY", b"\r\n")]),
    st.builds(lambda b: Step("JUNK", b.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n"), st.binary(max_size=40)),
)
VALID_TXN = st.builds(  # a plain transaction now and then, so 250s (and the byte check) are common
    lambda rcpts, body: [Step("MAIL", b"MAIL FROM:<s@fuzz.example>\r\n"),
                         *[Step("RCPT", _command("RCPT TO:", f"<{r}>")) for r in rcpts],
                         Step("DATA", b"DATA\r\n", body)],
    st.lists(st.sampled_from(["r1@fuzz.example", "R2@fuzz.example"]), min_size=1, max_size=3),
    st.lists(BODY_LINE, max_size=12),
)
SESSION = st.tuples(
    st.booleans(),  # pipelined
    st.builds(  # most sessions greet first, as clients do; the rest meet 503s
        lambda greet, groups: [Step("EHLO", b"EHLO client.example\r\n")] * greet + [s for g in groups for s in g],
        st.sampled_from([True, True, True, False]),
        st.lists(st.one_of(STEP.map(lambda s: [s]), VALID_TXN), max_size=8),
    ),
)


def _addr(line: bytes) -> str:
    """The address of a MAIL/RCPT line, normalised as `_same` compares it."""
    m = re.search(rb"<(.*?)>", line)
    return _same(m.group(1).decode("utf-8", "surrogateescape")) if m else ""


def _same(address: str) -> str:
    """An address compared case-blind and with a quoted local part unquoted: the guard passes
    `<sp ace@x>` on as `<"sp ace"@x>` (aiosmtpd's parser quotes it), the same mailbox. The
    sink records the null sender as `<>`."""
    if address == "<>":
        return ""
    m = re.fullmatch(r'"(.*)"(@.*)', address)
    return (m.group(1) + m.group(2) if m else address).lower()


def _groups(steps: list[Step], pipelined: bool) -> Iterator[list[Step]]:
    """Pipelining sends commands together up to and including DATA (RFC 2920: DATA ends a group)."""
    if not pipelined:
        yield from ([s] for s in steps)
        return
    group: list[Step] = []
    for s in steps:
        group.append(s)
        if s.verb in ("DATA", "BDAT", "STARTTLS", "AUTH", "EHLO", "HELO"):
            yield group
            group = []
    if group:
        yield group


@dataclass
class Outcome:
    fid: str
    content: bytes
    mail_from: str
    rcpts: list[str]
    code: int
    reply: bytes


@dataclass
class Tally:
    sessions: int = 0
    commands: int = 0
    accepted: int = 0
    refused: int = 0
    messages: int = 0
    codes: dict[int, int] = field(default_factory=dict)


def run_session(port: int, pipelined: bool, steps: list[Step], tally: Tally) -> list[Outcome]:
    """Speak the session; return each DATA that reached its final reply."""
    c = Client(port)
    outcomes: list[Outcome] = []
    txn: tuple[str, list[str]] | None = None
    try:
        code, _ = c.reply()
        assert code == 220
        for group in _groups(steps, pipelined):
            c.send(b"".join(s.line for s in group))
            for s in group:
                tally.commands += 1
                code, text = c.reply()
                tally.codes[code] = tally.codes.get(code, 0) + 1
                if s.verb == "MAIL" and code == 250:
                    txn = (_addr(s.line), [])
                elif s.verb == "RCPT" and code == 250 and txn is not None:
                    txn[1].append(_addr(s.line))
                elif s.verb in ("RSET", "EHLO", "HELO") and code == 250:
                    txn = None
                elif s.verb == "DATA" and code == 354:
                    fid = f"fuzz-{next(_ids)}"
                    lines = [f"X-Fuzz-Id: {fid}".encode(), *s.body]
                    wire = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
                    c.send(wire + b".\r\n")
                    code, text = c.reply()
                    assert code == 250 or 400 <= code < 600, text
                    content = b"".join(ln + b"\r\n" for ln in lines)
                    assert txn is not None, "354 without a transaction"
                    outcomes.append(Outcome(fid, content, txn[0], txn[1], code, text))
                    txn = None
    except Closed:
        pass
    finally:
        c.close()
    return outcomes


def _by_fid(sink: RecordingSink) -> dict[str, list[Received]]:
    out: dict[str, list[Received]] = {}
    for m in sink.received():
        head = re.match(rb"X-Fuzz-Id: (\S+)\r\n", m.data)
        if head:
            out.setdefault(head.group(1).decode(), []).append(m)
    return out


def check(sink: RecordingSink, outcomes: list[Outcome], tally: Tally) -> None:
    """250 ⇒ exactly once at the sink, same bytes and envelope; anything else ⇒ not there."""
    at_sink = _by_fid(sink)
    for o in outcomes:
        got = at_sink.get(o.fid, [])
        if o.code == 250:
            tally.accepted += 1
            assert len(got) == 1, f"{o.fid} answered 250 but at the sink {len(got)} times"
            m = got[0]
            assert m.data == o.content, f"{o.fid}: bytes differ\nsent {o.content!r}\ngot  {m.data!r}"
            assert _same(m.mail_from) == o.mail_from, (m.mail_from, o.mail_from)
            assert sorted(_same(r) for r in m.rcpt_tos) == sorted(o.rcpts), (m.rcpt_tos, o.rcpts)
        else:
            tally.refused += 1
            assert not got, f"{o.fid} answered {o.reply!r} but the sink has it"


FUZZ = settings(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_random_sessions_keep_the_250_promise(rig: tuple[Guard, RecordingSink]) -> None:
    guard, sink = rig
    tally = Tally()

    @settings(FUZZ, max_examples=SESSIONS)
    @given(session=SESSION)
    def one(session: tuple[bool, list[Step]]) -> None:
        tally.sessions += 1
        check(sink, run_session(guard.port, *session, tally), tally)
        assert guard.proc is not None and guard.proc.poll() is None, guard.log()[-3000:]

    one()
    print(f"\nfuzz sessions: {tally}")
    assert tally.sessions >= SESSIONS * 0.9, tally  # it ran its inputs ...
    assert tally.accepted > SESSIONS // 10 and tally.refused > SESSIONS // 20, tally  # ... both ways
    assert_still_relays(guard, sink)


def _stuffed(raw: bytes) -> bytes:
    """The message on the wire: CRLF lines, leading dots doubled, ended by CRLF.CRLF."""
    if not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in raw.split(b"\r\n")[:-1]) + b".\r\n"


def test_mutated_messages_are_relayed_whole_or_refused(rig: tuple[Guard, RecordingSink]) -> None:
    """Parsed and fingerprinted by the shadow rules on the way: 250 with the exact bytes at the
    sink, 451 (an exception inside becomes 451), or a 5xx naming its reason (bare CR/LF, size)."""
    guard, sink = rig
    tally = Tally()

    @settings(FUZZ, max_examples=MESSAGES)
    @given(raw=mutated())
    def one(raw: bytes) -> None:
        tally.messages += 1
        fid = f"fuzz-{next(_ids)}"
        raw = f"X-Fuzz-Id: {fid}\r\n".encode() + raw
        c = Client(guard.port)
        try:
            c.reply()
            for line in (b"EHLO fuzz.example\r\n", b"MAIL FROM:<s@fuzz.example>\r\n", b"RCPT TO:<r@fuzz.example>\r\n"):
                c.send(line)
                assert c.reply()[0] == 250
            c.send(b"DATA\r\n")
            assert c.reply()[0] == 354
            c.send(_stuffed(raw))
            code, text = c.reply()
        finally:
            c.close()
        tally.codes[code] = tally.codes.get(code, 0) + 1
        content = raw if raw.endswith(b"\r\n") else raw + b"\r\n"
        check(sink, [Outcome(fid, content, "s@fuzz.example", ["r@fuzz.example"], code, text)], tally)
        assert code in (250, 451, 500, 552, 554), text
        assert guard.proc is not None and guard.proc.poll() is None, guard.log()[-3000:]

    one()
    errors = guard.metric("queueguard_internal_errors_total")
    print(f"\nfuzz messages: {tally}; internal errors (451) so far: {errors:.0f}")
    assert tally.messages >= MESSAGES * 0.9 and tally.accepted > MESSAGES // 10, tally
    assert_still_relays(guard, sink)


def assert_still_relays(guard: Guard, sink: RecordingSink) -> None:
    """After the fuzzing the guard still relays a plain message, byte for byte."""
    steps = [Step("EHLO", b"EHLO ok.example\r\n"), Step("MAIL", b"MAIL FROM:<s@fuzz.example>\r\n"),
             Step("RCPT", b"RCPT TO:<r@fuzz.example>\r\n"), Step("DATA", b"DATA\r\n", [b"Subject: after", b"", b"ok"])]
    outcomes = run_session(guard.port, False, steps, Tally())
    assert [o.code for o in outcomes] == [250]
    check(sink, outcomes, Tally())
