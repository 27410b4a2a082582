"""Real Exim (`exim -bh`) running the shipped contrib/exim/readsocket-acl.conf against a real
`queueguard serve` policy socket, over TCP and over a unix socket.

Shown: a flood to one recipient is deferred (451 4.7.1, rule named) while
other recipients are accepted; Exim's own refusals come first and do not use
up the budget; with queueguard stopped Exim defers (the snippet's default)
or accepts (QG_POLICY_IF_DOWN_ACCEPT), as the snippet documents.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from queueguard.harness.exim import EXIM_USER, Exim
from queueguard.harness.guard import Guard
from queueguard.harness.ports import free_port
from queueguard.shipped import EXIM_SNIPPETS

pytestmark = pytest.mark.integration

POLICY = """
ratelimits:
  - name: flood-to-one
    key: recipient
    rate: 3/1h
    burst: 3
    action: tempfail
  - name: keep-for-review
    key: sender
    rate: 1/1h
    burst: 1
    action: quarantine
    only: {sender_in: ["suspect@remote.example"]}
"""
READSOCKET_ACL = f".include {EXIM_SNIPPETS / 'readsocket-acl.conf'}"


def exim_for(socket_spec: str, *, fail_open: bool = False) -> Exim:
    macros = {"QG_POLICY_SOCKET": socket_spec}
    if fail_open:
        macros["QG_POLICY_IF_DOWN_ACCEPT"] = "yes"
    return Exim(macros=macros, acl_definitions=READSOCKET_ACL, rcpt_acl="  require acl = acl_queueguard_rcpt")


def replies(bh_output: str) -> list[str]:
    return [line for line in bh_output.splitlines() if re.match(r"^\d{3}[ -]", line)]


def transactions(*rcpts: str) -> str:
    """One SMTP session with one MAIL/RCPT/RSET transaction per recipient."""
    body = "".join(f"mail from:<sender@remote.example>\nrcpt to:<{r}>\nrset\n" for r in rcpts)
    return f"ehlo client.example\n{body}quit\n"


def rcpt_replies(out: str) -> list[str]:
    """Replies to the RCPT commands (EHLO, MAIL, RSET and QUIT replies dropped)."""
    return [r for r in replies(out) if r.startswith(("250 Accepted", "451", "550"))]


@pytest.fixture
def guard() -> Iterator[Guard]:
    with Guard({"policy_socket": {"enabled": True, "listen": f"127.0.0.1:{free_port()}"}},
               {"policy.yaml": POLICY}) as g:
        yield g


def tcp(guard: Guard) -> str:
    return f"inet:{guard.settings['policy_socket']['listen']}"


def test_flood_is_deferred_and_other_recipients_accepted(guard: Guard) -> None:
    e = exim_for(tcp(guard))
    try:
        out = e.bh("192.0.2.1", transactions(*["bob@test.example"] * 5, "carol@test.example"))
        got = rcpt_replies(out)
        assert got[:3] == ["250 Accepted"] * 3
        for reply in got[3:5]:
            assert reply.startswith("451 4.7.1 Rate limit exceeded (rule flood-to-one), try again in ")
        assert got[5] == "250 Accepted"
    finally:
        e.close()
    lines = guard.message_lines()
    assert sum("verdict=accept" in line and "rcpts=bob@test.example" in line for line in lines) == 3
    assert "client=unknown[192.0.2.1]" in lines[-1]


def test_exim_refusals_come_first_and_use_no_budget(guard: Guard) -> None:
    e = exim_for(tcp(guard))
    try:
        out = e.bh("192.0.2.1", transactions(*["nosuchuser@test.example"] * 5))
        assert rcpt_replies(out) == ["550 Unrouteable address"] * 5
        assert guard.message_lines() == []
    finally:
        e.close()


def test_unix_socket() -> None:
    # Not pytest's tmp_path: Exim (Debian-exim) must traverse the directory.
    workdir = Path(tempfile.mkdtemp(prefix="qg-psock-"))
    workdir.chmod(0o755)
    path = workdir / "policy.sock"
    try:
        with Guard({"policy_socket": {"enabled": True, "listen": str(path)}}, {"policy.yaml": POLICY}) as g:
            # The socket is 0660; deployment puts Exim's user in queueguard's group, here: the socket's group.
            assert path.stat().st_mode & 0o777 == 0o660
            os.chown(path, -1, grp.getgrnam(EXIM_USER).gr_gid)
            e = exim_for(str(path))
            try:
                got = rcpt_replies(e.bh("192.0.2.1", transactions(*["dave@test.example"] * 4)))
                assert got[:3] == ["250 Accepted"] * 3
                assert got[3].startswith("451 4.7.1 Rate limit exceeded (rule flood-to-one)")
            finally:
                e.close()
            assert len(g.message_lines()) == 4
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize(("fail_open", "expected"), [
    (False, "451 4.3.0 Policy service unavailable, please try again later"),
    (True, "250 Accepted"),
])
def test_policy_socket_down(guard: Guard, fail_open: bool, expected: str) -> None:
    e = exim_for(tcp(guard), fail_open=fail_open)
    try:
        assert rcpt_replies(e.bh("192.0.2.1", transactions("bob@test.example"))) == ["250 Accepted"]
        guard.stop()
        out = e.bh("192.0.2.1", transactions("bob@test.example"))
        assert rcpt_replies(out) == [expected]
        assert "queueguard policy service unavailable" in out
    finally:
        e.close()


def test_quarantine_hit_freezes_the_message_in_exims_queue(guard: Guard) -> None:
    """`action=hold` → accepted and frozen (Exim's own hold queue), so quarantine rules work via Exim too."""
    e = exim_for(tcp(guard))
    try:
        dialogue = ("ehlo client.example\n" + "".join(
            "mail from:<suspect@remote.example>\nrcpt to:<bob@test.example>\ndata\nSubject: x\n\nbody\n.\n"
            for _ in range(2)) + "quit\n")
        out = e.bh("192.0.2.1", dialogue)
        assert "queueguard: hold" in out, out
        assert "frozen" in out.lower() or "freeze" in out.lower(), out
        assert [r for r in replies(out) if r.startswith("550")] == []
    finally:
        e.close()
