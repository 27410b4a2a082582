"""A real Postfix using the queueguard milter (contrib/postfix/main.cf.milter, master.cf verbatim).

Postfix relays to smtp-sink; `queueguard serve` runs the milter. Shown: mail
reaches the sink with queueguard's headers, a flood to one recipient is
tempfailed at RCPT (451 4.7.1) while other recipients go on, quarantined mail
is kept by queueguard (store) or on Postfix's hold queue (hold), and with
queueguard stopped Postfix tempfails rather than passing mail.
"""

from __future__ import annotations

import grp
import shutil
import smtplib
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from queueguard.harness.guard import Guard
from queueguard.harness.ports import free_port
from queueguard.harness.sink import SmtpSink
from tests.components.flood import rcpt_as_written
from tests.components.postfix import Postfix, send

pytestmark = pytest.mark.integration

POLICY = """
addresses:
  recipient_delimiter: "+"
ratelimits:
  - name: flood-to-one
    key: recipient
    rate: 3/1h
    burst: 3
    action: tempfail
    only: {recipient_in: ["flood@test.example"]}
  - name: spelled-many-ways
    key: recipient
    rate: 3/1h
    burst: 3
    action: tempfail
    only: {recipient_in: ["spelled@test.example"]}
  - name: extensions
    key: recipient
    rate: 3/1h
    burst: 3
    action: tempfail
    only: {recipient_in: ["ext@test.example"]}
  - name: keep-second
    key: recipient
    rate: 1/1h
    burst: 1
    action: quarantine
    only: {recipient_in: ["kept@test.example"]}
  - name: watch-one
    key: recipient
    rate: 1/1h
    burst: 1
    mode: shadow
    only: {recipient_in: ["watched@test.example"]}
"""


def milter_guard(quarantine: str = "store") -> Guard:
    listen = f"inet:{free_port()}@127.0.0.1"
    return Guard({"milter": {"enabled": True, "listen": listen, "quarantine": quarantine}}, {"policy.yaml": POLICY})


def postfix_milter(guard: Guard) -> str:
    """libmilter's inet:PORT@HOST as Postfix writes it, inet:HOST:PORT."""
    port, _, host = str(guard.settings["milter"]["listen"]).removeprefix("inet:").partition("@")
    return f"inet:{host}:{port}"


@pytest.fixture(scope="module")
def sink() -> Iterator[SmtpSink]:
    with SmtpSink(dump=True) as s:
        yield s


@pytest.fixture(scope="module")
def guard() -> Iterator[Guard]:
    with milter_guard() as g:
        yield g


@pytest.fixture(scope="module")
def postfix(sink: SmtpSink, guard: Guard) -> Iterator[Postfix]:
    with Postfix(relay_port=sink.port, milter=postfix_milter(guard)) as pf:
        yield pf


def test_mail_reaches_the_sink_with_queueguard_headers(postfix: Postfix, sink: SmtpSink, guard: Guard) -> None:
    before = sink.count()
    assert send(postfix.port, ["watched@test.example"], "first") == {}
    assert send(postfix.port, ["watched@test.example"], "second") == {}
    assert sink.wait_count(before + 2) == before + 2
    second = next(m for m in reversed(sink.messages()) if b"Subject: second" in m)
    assert b"X-Queueguard-Hits: ratelimit:watch-one(shadow)" in second
    assert guard.metric("queueguard_connections_total", frontend="milter") >= 2


def test_flood_is_deferred_per_recipient(postfix: Postfix, sink: SmtpSink) -> None:
    before = sink.count()
    for i in range(3):
        assert send(postfix.port, ["flood@test.example"], f"wave {i}") == {}
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(postfix.port, ["flood@test.example"], "wave 3")
    code, text = refused.value.recipients["flood@test.example"]
    assert code == 451 and text.startswith(b"4.7.1 Rate limit exceeded (rule flood-to-one)")
    # Other recipients of the same message still go through.
    partly = send(postfix.port, ["flood@test.example", "other@test.example"], "wave 4")
    assert list(partly) == ["flood@test.example"] and partly["flood@test.example"][0] == 451
    assert sink.wait_count(before + 4) == before + 4
    assert postfix.wait_queue_empty()["deferred"] == 0


def test_one_mailbox_spelled_many_ways_is_one_budget(postfix: Postfix) -> None:
    """Postfix hands the milter the address as the client spelled it (quoted, escaped, commented,
    source-routed, an address quoted inside the local part: Postfix resolves it again), but
    delivers every spelling to one mailbox: one budget for all of them."""
    spellings = ['"spelled"@test.example', '"sp\\elled"@test.example', "SPELLED@test.example",
                 "@relay.example:spelled@test.example", "spelled(1)@test.example", "spel\\led@test.example",
                 "spelled@(x)test.example", "spelled@test.example", '"spelled@test.example"@test.example',
                 '"spelled' + "@test.example" * 20 + '"@test.example']
    codes = [rcpt_as_written(postfix.port, rcpt, i) for i, rcpt in enumerate(spellings)]
    assert codes == [250] * 3 + [451] * 7, list(zip(spellings, codes, strict=True))


def test_address_extensions_are_one_budget_where_the_mta_splits_them(postfix: Postfix) -> None:
    """With `recipient_delimiter: "+"` in the policy (as Debian's Postfix sets it), ext+1@, ext+2@...
    are ext@: a flood writing a new extension into every message does not get a budget each."""
    codes = [rcpt_as_written(postfix.port, f"ext+{i}@test.example", i) for i in range(5)]
    assert codes == [250] * 3 + [451] * 2


def test_quarantine_in_store_is_discarded_by_postfix(postfix: Postfix, sink: SmtpSink, guard: Guard) -> None:
    before = sink.count()
    assert send(postfix.port, ["kept@test.example"], "keep one") == {}
    assert send(postfix.port, ["kept@test.example"], "keep two") == {}
    assert postfix.wait_log(r"milter-discard: END-OF-MESSAGE")
    assert sink.wait_count(before + 1) == before + 1
    stored = [p.read_bytes() for p in (guard.dir / "quarantine").rglob("*.eml")]
    assert any(b"Subject: keep two" in m for m in stored)
    assert postfix.wait_queue_empty() == dict.fromkeys(postfix.queue_counts(), 0)


def test_master_cf_variant_filters_the_smtp_service(sink: SmtpSink, guard: Guard) -> None:
    before = guard.metric("queueguard_connections_total", frontend="milter")
    with Postfix(relay_port=sink.port, milter=postfix_milter(guard), milter_in_master_cf=True) as pf:
        count = sink.count()
        assert send(pf.port, ["bob@test.example"], "via master.cf") == {}
        assert sink.wait_count(count + 1) == count + 1
    assert guard.metric("queueguard_connections_total", frontend="milter") > before


def test_quarantine_on_postfix_hold_queue(sink: SmtpSink) -> None:
    with milter_guard("hold") as g, Postfix(relay_port=sink.port, milter=postfix_milter(g)) as pf:
        before = sink.count()
        assert send(pf.port, ["kept@test.example"], "hold one") == {}
        assert send(pf.port, ["kept@test.example"], "hold two") == {}
        assert pf.wait_log(r"milter-hold: END-OF-MESSAGE .* to=<kept@test.example>")
        counts = pf.wait_queue_empty()
        assert counts["hold"] == 1
        held = next(p for p in (pf.queue / "hold").rglob("*") if p.is_file()).read_bytes()
        assert b"Subject: hold two" in held and b"X-Queueguard-Hits: ratelimit:keep-second" in held
        assert sink.wait_count(before + 1) == before + 1
        assert list((g.dir / "quarantine").rglob("*.eml")) == []


def test_postfix_tempfails_while_queueguard_is_down(sink: SmtpSink) -> None:
    g = milter_guard()
    with g, Postfix(relay_port=sink.port, milter=postfix_milter(g)) as pf:
        assert send(pf.port, ["bob@test.example"], "while up") == {}
        g.stop()
        before = sink.count()
        with pytest.raises(smtplib.SMTPResponseException) as down:
            send(pf.port, ["bob@test.example"], "while down")
        error = down.value.smtp_error  # bytes at run time, typed str
        assert down.value.smtp_code == 451
        assert (error if isinstance(error, bytes) else error.encode()).startswith(b"4.7.1")
        assert pf.wait_queue_empty() == dict.fromkeys(pf.queue_counts(), 0)
        assert sink.wait_count(before, timeout=1) == before


def test_forged_verdict_headers_are_deleted_and_ours_added(postfix: Postfix, sink: SmtpSink) -> None:
    """A sender's own X-Queueguard-* headers never reach the mailbox (smfi_chgheader); ours do."""
    before = sink.count()
    msg = ("From: <a@remote.example>\r\nTo: <watched@test.example>\r\nSubject: forged\r\n"
           "X-Queueguard-Scan: clean\r\nX-Queueguard-Hits: none,\r\n\tall good\r\nx-queueguard-hits: again\r\n"
           "X-Queueguardian: not ours\r\n\r\nbody\r\n")
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as c:  # twice: the second is over watch-one
        assert c.sendmail("a@remote.example", ["watched@test.example"], msg) == {}
        assert c.sendmail("a@remote.example", ["watched@test.example"], msg) == {}
    assert sink.wait_count(before + 2) == before + 2
    ours = []
    for got in (m for m in sink.messages() if b"Subject: forged" in m):
        headers = got.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].replace(b"\n\t", b" ")
        ours += [line for line in headers.split(b"\n") if line.lower().startswith(b"x-queueguard-")]
        assert b"X-Queueguardian: not ours" in headers and b"all good" not in got
    # the second is over watch-one (so is the first when the module's other tests ran before)
    assert ours and set(ours) == {b"X-Queueguard-Hits: ratelimit:watch-one(shadow)"}, ours


@pytest.mark.parametrize("mode", ["default", "0600"])
def test_unix_socket_is_usable_by_smtpd_out_of_the_box(sink: SmtpSink, mode: str) -> None:
    """Postfix's smtpd runs as user postfix: the socket's defaults (group postfix, 0660) let it in
    with no chmod; a socket only its owner may use (0600) is what the MTA's default action is for."""
    d = Path(tempfile.mkdtemp(prefix="qg-milter-sock-"))
    d.chmod(0o755)  # the directory must be searchable by postfix too (contrib/postfix/README.md)
    sock = d / "milter.sock"
    milter: dict[str, object] = {"enabled": True, "listen": f"unix:{sock}"}
    if mode != "default":
        milter["socket_mode"] = mode
    try:
        with Guard({"milter": milter}, {"policy.yaml": POLICY}) as g, \
                Postfix(relay_port=sink.port, milter=f"unix:{sock}") as pf:
            st = sock.stat()
            before = sink.count()
            if mode == "default":
                assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, grp.getgrnam("postfix").gr_gid)
                assert send(pf.port, ["bob@test.example"], "over a unix socket") == {}
                assert sink.wait_count(before + 1) == before + 1
                assert g.metric("queueguard_connections_total", frontend="milter") >= 1
            else:
                with pytest.raises(smtplib.SMTPResponseException) as refused:
                    send(pf.port, ["bob@test.example"], "socket closed to postfix")
                assert refused.value.smtp_code == 451
                assert pf.wait_log(r"connect to Milter service unix:.*: Permission denied")
                assert sink.wait_count(before, timeout=1) == before
    finally:
        shutil.rmtree(d, ignore_errors=True)
