"""`queueguard quarantine` CLI against a real store and a real SMTP downstream (aiosmtpd RecordingSink)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from queueguard.harness.sink import RecordingSink
from queueguard.model import Connection, RuleHit, Transaction, parse_ip
from queueguard.quarantine import QuarantineStore
from queueguard.verdict import quarantine
from tests.components.lenient_smtp import LenientSmtp

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, settings: Path | None = None, qdir: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "queueguard.cli", "quarantine", args[0], "--quarantine", str(qdir)]
    if settings is not None:
        argv += ["--settings", str(settings)]
    return subprocess.run([*argv, *args[1:]], capture_output=True, text=True, cwd=REPO, timeout=60)


async def fill(qdir: Path) -> list[str]:
    store = QuarantineStore(qdir)
    ids = []
    for i, (rule, sender) in enumerate([("mini-cooper-wave", "promo@cars.example")] * 3 + [("other", "x@y.example")]):
        conn = Connection(parse_ip("198.51.100.7"), helo="cars.example")
        txn = Transaction(conn, sender, recipients=["info@example.org", "vrts@example.org"])
        raw = f"From: {sender}\r\nSubject: Win a mini cooper {i}\r\n\r\nbody {i}\r\n".encode()
        ids.append(
            await store.put(
                txn,
                raw,
                quarantine("Ok", reason="pattern", rule=rule),
                [RuleHit(rule, "pattern", "quarantine")],
                {"subject": f"s:{i:04d}abcd"},
            )
        )
    return ids


def cli_raw(qdir: Path, qid: str) -> bytes:
    argv = [sys.executable, "-m", "queueguard.cli", "quarantine", "show", "--quarantine", str(qdir), "--raw", qid]
    return subprocess.run(argv, capture_output=True, cwd=REPO, check=True, timeout=60).stdout


def settings_for(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "queueguard.yaml"
    path.write_text(yaml.safe_dump({"downstreams": [{"address": f"127.0.0.1:{port}"}]}))
    return path


async def test_list_show_and_json(tmp_path: Path) -> None:
    qdir = tmp_path / "q"
    ids = await fill(qdir)
    out = cli("list", qdir=qdir)
    assert out.returncode == 0, out.stderr
    assert all(i in out.stdout for i in ids) and "4 message(s)" in out.stdout
    out = cli("list", "--rule", "mini-cooper-wave", "--json", qdir=qdir)
    assert [m["id"] for m in json.loads(out.stdout)] == ids[:3]
    assert cli("list", "--sender", "*@y.example", qdir=qdir).stdout.count("\n") == 2
    assert "0 message(s)" in cli("list", "--since", "1h", "--recipient", "nobody@*", qdir=qdir).stdout
    out = cli("show", ids[0], qdir=qdir)
    assert "rule=mini-cooper-wave" in out.stdout and "Win a mini cooper 0" in out.stdout
    assert "recipients:   info@example.org, vrts@example.org" in out.stdout
    raw = cli_raw(qdir, ids[1])
    assert raw == QuarantineStore(qdir).raw(ids[1])
    shown = json.loads(cli("show", "--json", ids[0], qdir=qdir).stdout)
    assert shown["id"] == ids[0] and shown["rule"] == "mini-cooper-wave" and shown["status"] == "held"
    assert shown["envelope"]["recipients"] == ["info@example.org", "vrts@example.org"]
    assert shown["summary"]["headers"]["Subject"] == "Win a mini cooper 0"
    assert shown["summary"]["text"].strip() == "body 0"
    out = cli("show", "--json", "--raw", ids[0], qdir=qdir)
    assert out.returncode == 2 and "not allowed with" in out.stderr


async def test_bad_input_answers(tmp_path: Path) -> None:
    qdir = tmp_path / "q"
    ids = await fill(qdir)
    for args, needle in (
        (("show", "../../../etc/passwd"), "invalid quarantine id"),
        (("show", "0123456789abcdef"), "no quarantined message"),
        (("delete",), "name messages by id"),
        (("list", "--since", "yesterday-ish"), "bad time"),
        (("purge", "--older-than", "soon"), "bad duration"),
    ):
        out = cli(*args, qdir=qdir)
        assert out.returncode == 2 and needle in out.stderr, (args, out.stderr)
    out = cli("list", qdir=tmp_path / "missing")
    assert out.returncode == 2 and "does not exist" in out.stderr
    QuarantineStore(qdir).paths(ids[0])[0].unlink()  # the message file went (a purge racing `show`)
    for args in (("show", ids[0]), ("show", "--raw", ids[0])):
        out = cli(*args, qdir=qdir)
        assert out.returncode == 1 and "No such file or directory" in out.stderr and "Traceback" not in out.stderr


async def test_release_delivers_with_original_envelope_once(tmp_path: Path) -> None:
    qdir = tmp_path / "q"
    ids = await fill(qdir)
    with RecordingSink() as sink:
        settings = settings_for(tmp_path, sink.port)
        out = cli("release", ids[0], settings=settings, qdir=qdir)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "released 1 of 1" in out.stdout
        (got,) = sink.messages
        assert got.mail_from == "promo@cars.example"
        assert got.rcpt_tos == ["info@example.org", "vrts@example.org"]
        assert got.data.replace(b"\r\n", b"\n") == QuarantineStore(qdir).raw(ids[0]).replace(b"\r\n", b"\n")
        again = cli("release", ids[0], settings=settings, qdir=qdir)
        assert "already released" in again.stdout and len(sink.messages) == 1
        listed = cli("list", qdir=qdir).stdout
        assert f"{ids[0]}" in listed and "released" in listed


def test_two_release_commands_at_once_deliver_each_message_once(tmp_path: Path) -> None:
    """Two admins (or a cron job and an admin) releasing the same wave at once: each entry is
    claimed by one command, which delivers it; the other skips it. Before, both delivered all."""
    qdir = tmp_path / "q"
    ids = asyncio.run(fill(qdir))
    with RecordingSink() as sink:
        sink.behaviour.data_delay = 0.5  # both commands select the same three before either marks one
        settings = settings_for(tmp_path, sink.port)
        argv = [sys.executable, "-m", "queueguard.cli", "quarantine", "release", "--quarantine", str(qdir),
                "--settings", str(settings), "--rule", "mini-cooper-wave"]
        runs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
                for _ in range(2)]
        outs = [r.communicate(timeout=60)[0] for r in runs]
        assert sorted(m.data.split(b"body ")[1][:1] for m in sink.messages) == [b"0", b"1", b"2"], outs
        assert sum(o.count(": released via") for o in outs) == 3, outs
        assert all(r.returncode == 0 for r in runs), outs
    assert {e.id for e in QuarantineStore(qdir).list() if e.released is not None} == set(ids[:3])


async def test_a_release_the_index_missed_is_not_delivered_again(tmp_path: Path) -> None:
    """The metadata file says released but the index still says held (its update failed: a full
    disk): a release by filter must not deliver it a second time, and the index is re-synced."""
    qdir = tmp_path / "q"
    ids = await fill(qdir)
    store = QuarantineStore(qdir)
    store.mark_released(ids[0], "250 2.0.0 OK queued", "127.0.0.1:25")
    with store._db() as db:  # what the failed index update left behind (a full disk is not made here)
        db.execute("UPDATE entries SET released = NULL, meta = ? WHERE id = ?",
                   (json.dumps({**store.get(ids[0]).meta, "released": None}), ids[0]))  # type: ignore[union-attr]
    store.stale_path.touch()
    with RecordingSink() as sink:
        out = cli("release", "--rule", "mini-cooper-wave", settings=settings_for(tmp_path, sink.port), qdir=qdir)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "released 2 of 2" in out.stdout, out.stdout
        assert sorted(m.data.split(b"body ")[1][:1] for m in sink.messages) == [b"1", b"2"]
    held = [e.id for e in QuarantineStore(qdir).list() if e.released is None]
    assert held == [ids[3]] and not store.stale_path.exists()


def test_an_entry_deleted_during_its_release_does_not_stop_the_others(tmp_path: Path) -> None:
    """An admin deletes the entry being delivered: it is said plainly (delivered, not marked), and
    the command goes on with the rest (before: it stopped with a bare error, the rest untried)."""
    qdir = tmp_path / "q"
    ids = asyncio.run(fill(qdir))
    with RecordingSink() as sink:
        sink.behaviour.data_delay = 1.0
        argv = [sys.executable, "-m", "queueguard.cli", "quarantine", "release", "--quarantine", str(qdir),
                "--settings", str(settings_for(tmp_path, sink.port)), "--rule", "mini-cooper-wave"]
        run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        deadline = time.monotonic() + 30
        while sink.in_data == 0:  # the first message is in DATA at the sink
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.01)
        assert QuarantineStore(qdir).delete(ids[0])
        out, err = run.communicate(timeout=60)
        assert run.returncode == 1, out + err
        assert f"{ids[0]}: DELIVERED via" in out and "not marked released" in out, out
        assert f"{ids[1]}: released via" in out and f"{ids[2]}: released via" in out, out
        assert "released 2 of 3" in out and len(sink.messages) == 3


async def test_release_keeps_the_senders_smtputf8_and_body_parameters(tmp_path: Path) -> None:
    """A message from a UTF-8 address (SMTPUTF8 at MAIL) released without SMTPUTF8 is refused by a
    downstream that insists (RFC 6531): it could never leave the quarantine."""
    qdir = tmp_path / "q"
    conn = Connection(parse_ip("198.51.100.7"), helo="mx.example")
    txn = Transaction(conn, "jöe@exämple.org", recipients=["info@example.org"],
                      mail_options=("SMTPUTF8", "BODY=8BITMIME"), rcpt_options={"info@example.org": ()})
    qid = await QuarantineStore(qdir).put(txn, "Subject: grüße\r\n\r\nbody\r\n".encode(),
                                          quarantine("Ok", reason="pattern", rule="r"),
                                          [RuleHit("r", "pattern", "quarantine")], {})
    with RecordingSink() as sink:
        out = cli("release", qid, settings=settings_for(tmp_path, sink.port), qdir=qdir)
        assert "released 1 of 1" in out.stdout, out.stdout + out.stderr
        (got,) = sink.messages
        assert got.mail_from == "jöe@exämple.org" and got.rcpt_tos == ["info@example.org"]
        assert "SMTPUTF8" in got.mail_options and "BODY=8BITMIME" in got.mail_options, got.mail_options


async def test_release_never_smuggles_a_second_transaction(tmp_path: Path) -> None:
    """A milter's MTA may pass bare CRs, LFs and NULs that the proxy refuses; a message held from
    there and released must not end DATA early at a lenient downstream (the rest would run as a
    transaction of its own, from a sender nobody checked)."""
    qdir = tmp_path / "q"
    txn = Transaction(Connection(parse_ip("198.51.100.7")), "real@client.example", recipients=["info@example.org"])
    raw = (b"Subject: held\r\n\r\nfirst\r.\rMAIL FROM:<smuggled@evil.example>\rRCPT TO:<info@example.org>\r"
           b"DATA\rSubject: smuggled\r\r\n\x00.\r\nlast\n.\nend\r\n")
    qid = await QuarantineStore(qdir).put(txn, raw, quarantine("Ok", reason="pattern", rule="r"),
                                          [RuleHit("r", "pattern", "quarantine")], {})
    with LenientSmtp() as lenient:
        out = cli("release", qid, settings=settings_for(tmp_path, lenient.port), qdir=qdir)
        assert "released 1 of 1" in out.stdout, out.stdout + out.stderr
    assert lenient.senders == ["<real@client.example>"]
    (got,) = lenient.messages
    assert got.endswith(b"end") and b"smuggled@evil.example" in got


async def test_what_senders_wrote_cannot_drive_the_admins_terminal(tmp_path: Path) -> None:
    """Escape sequences, bidi overrides and line breaks in a subject, sender, file name or text
    reach the admin's screen as visible escapes: they cannot hide or fake a row, overwrite
    `status:`, retitle the window or fill the clipboard (OSC 52)."""
    qdir = tmp_path / "q"
    esc = "\x1b[2K\x1b[1A\x1b]0;owned\x07\x1b]52;c;cm0gLXJmIH4=\x07\u202e\r\x08"
    txn = Transaction(Connection(parse_ip("198.51.100.7"), helo=f"h{esc}.example"), f"a{esc}@evil.example",
                      recipients=["ceo@example.org"])
    raw = (f"Subject: QGTEST {esc}released <ceo@example.org>\r\nFrom: =?utf-8?q?x=1B[44G?= <a@evil.example>\r\n"
           "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
           f"Content-Type: text/plain\r\n\r\nbody {esc} text\r\n--B\r\nContent-Type: application/pdf\r\n"
           "Content-Disposition: attachment; filename*=utf-8''x%1B%5B2Jy.pdf\r\n\r\nJVBERi0xLjQK\r\n--B--\r\n")
    qid = await QuarantineStore(qdir).put(txn, raw.encode(), quarantine("Ok", reason="pattern", rule="r"),
                                          [RuleHit("r", "pattern", "quarantine")], {})
    await fill(qdir)
    for args in (("list",), ("show", qid), ("release", "--rule", "r", "--dry-run"),
                 ("delete", "--rule", "r", "--dry-run"), ("stats",)):
        out = cli(*args, qdir=qdir)
        assert out.returncode == 0, out.stderr
        shown = out.stdout
        assert not any(c in shown for c in "\x1b\x07\x08\r\u202e"), (args, shown)
        if args == ("list",):
            assert shown.count("\n") == 6 and "5 message(s)" in shown  # 5 rows and the count: none hidden
    assert "\\u001b[2K" in cli("show", qid, qdir=qdir).stdout


async def test_failed_release_keeps_message_and_says_why(tmp_path: Path) -> None:
    qdir = tmp_path / "q"
    ids = await fill(qdir)
    with RecordingSink() as sink:
        sink.behaviour.data_reply = "451 4.3.0 downstream busy"
        out = cli("release", "--rule", "other", settings=settings_for(tmp_path, sink.port), qdir=qdir)
    assert out.returncode == 1
    assert "NOT released, kept in quarantine" in out.stdout and "451" in out.stdout
    entry = QuarantineStore(qdir).get(ids[3])
    assert entry is not None and entry.released is None


async def test_purge_dry_run_changes_nothing_then_purge_and_delete_wave(tmp_path: Path) -> None:
    qdir = tmp_path / "q"
    ids = await fill(qdir)
    out = cli("purge", "--older-than", "0s", "--dry-run", qdir=qdir)
    assert "4 message(s) would be purged; nothing changed" in out.stdout
    assert len(QuarantineStore(qdir).list()) == 4
    assert "0 message(s) would be purged" in cli("purge", "--older-than", "1d", "--dry-run", qdir=qdir).stdout
    out = cli("delete", "--rule", "mini-cooper-wave", qdir=qdir)  # the wave, in one command
    assert "deleted 3 message(s)" in out.stdout and "deleted 3/3" in out.stderr
    assert [e.id for e in QuarantineStore(qdir).list()] == ids[3:]
    stats = json.loads(cli("stats", "--json", qdir=qdir).stdout)
    assert stats["messages"] == 1 and stats["by_rule"] == {"other": {"messages": 1, "bytes": stats["bytes"]}}
    assert stats["counters"]["deleted"] == 3 and stats["inodes"] > 2
    out = cli("purge", "--older-than", "0s", qdir=qdir)
    assert "purged 1 message(s)" in out.stdout
    assert QuarantineStore(qdir).list() == []


def test_purge_refuses_an_age_without_unit(tmp_path: Path) -> None:
    """`--older-than 30` would mean 30 seconds and purge nearly everything: refused, nothing removed."""
    (tmp_path / "msg").mkdir()
    r = cli("purge", "--older-than", "30", qdir=tmp_path)
    assert r.returncode == 2 and "give a unit" in r.stderr


def test_commands_refuse_a_directory_that_is_not_a_quarantine(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not mail")
    r = cli("stats", qdir=tmp_path)
    assert r.returncode == 2 and "is not a quarantine" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"], "a store was created in a foreign directory"


def test_release_without_settings_is_refused(tmp_path: Path) -> None:
    """Without --settings the release would go to the built-in default downstream, wherever that is."""
    (tmp_path / "msg").mkdir()
    r = cli("release", "--rule", "x", qdir=tmp_path)
    assert r.returncode == 2 and "release needs --settings" in r.stderr


def test_an_index_it_cannot_read_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    """An index left by another version (or damaged) opens, then a query fails: every command
    says which file and what, exit 1, no Python traceback for the admin to decode."""
    import sqlite3

    (tmp_path / "msg").mkdir()
    db = sqlite3.connect(tmp_path / "index.sqlite")
    db.execute("CREATE TABLE entries (something_else TEXT)")
    db.commit()
    db.close()
    for command in (["list"], ["stats"], ["purge", "--older-than", "1d"]):
        r = cli(*command, qdir=tmp_path)
        assert r.returncode == 1, (command, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        assert f"quarantine index {tmp_path / 'index.sqlite'}:" in r.stderr, r.stderr
