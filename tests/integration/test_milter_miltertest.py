"""The milter driven by miltertest (OpenDKIM's real milter client) against a real `queueguard serve`.

Each case is a Lua script in tests/integration/milter/; the script fails (and
so the test) when a milter reply or end-of-message action is not what it
expects. Recipients differ per test because the guard and its rate-limit
state are shared by the module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from queueguard.harness.clamd import FOUND, Clamd, eicar
from queueguard.harness.guard import Guard
from queueguard.harness.ports import free_port
from tests.components import miltertest

pytestmark = pytest.mark.integration

POLICY = """
ratelimits:
  - name: per-rcpt
    key: recipient
    rate: 3/1h
    burst: 3
    action: tempfail
    only: {recipient_in: ["flood@test.example"]}
  - name: keep-second
    key: recipient
    rate: 1/1h
    burst: 1
    action: quarantine
    only: {recipient_in: ["q-store@test.example", "q-hold@test.example"]}
  - name: watch-one
    key: recipient
    rate: 1/1h
    burst: 1
    mode: shadow
    only: {recipient_in: ["shadow@test.example"]}
"""


MAX_SIZE = 20_000
"""Small enough that the oversized body still fits one miltertest chunk (libmilter takes 64 KiB)."""


def milter_guard(quarantine: str = "store", **settings: object) -> Guard:
    milter = {"enabled": True, "listen": f"inet:{free_port()}@127.0.0.1", "quarantine": quarantine}
    return Guard({"milter": milter, "smtp": {"max_message_size": MAX_SIZE}, **settings}, {"policy.yaml": POLICY})


@pytest.fixture(scope="module")
def guard() -> Iterator[Guard]:
    with milter_guard() as g:
        yield g


def sock(guard: Guard) -> str:
    spec: str = guard.settings["milter"]["listen"]
    return spec


def quarantined(guard: Guard) -> list[bytes]:
    """Message files in the guard's quarantine store (metadata is JSON beside them)."""
    root = guard.dir / "quarantine"
    return [p.read_bytes() for p in root.rglob("*") if p.is_file() and p.suffix == ".eml"]


def test_ordinary_message_is_accepted_with_minimal_negotiation(guard: Guard) -> None:
    out = miltertest.run("accept.lua", sock(guard), {"hold": 0})
    assert "accept: ok" in out
    assert "verdict=accept" in guard.message_lines()[-1]


def test_over_limit_recipient_is_tempfailed_alone(guard: Guard) -> None:
    out = miltertest.run("rcpt_tempfail.lua", sock(guard), {"limit": 3, "rcpt": "<flood@test.example>"})
    assert "rcpt_tempfail: ok" in out
    assert "ratelimit per-rcpt: tempfail rcpt=flood@test.example" in guard.log()


def test_quarantine_in_store_discards_at_the_mta(guard: Guard) -> None:
    before = len(quarantined(guard))
    out = miltertest.run("quarantine.lua", sock(guard), {"rcpt": "<q-store@test.example>", "mode": "store",
                                                         "marker": "store-marker", "header": "X-Queueguard-Hits"})
    assert "quarantine store: ok" in out
    stored = quarantined(guard)
    assert len(stored) == before + 1
    assert any(b"Subject: second store-marker\r\n" in m and m.endswith(b"second body\r\n") for m in stored)


def test_shadow_hit_is_recorded_in_a_header(guard: Guard) -> None:
    out = miltertest.run("header.lua", sock(guard), {"rcpt": "<shadow@test.example>", "header": "X-Queueguard-Hits",
                                                     "expected": "ratelimit:watch-one(shadow)"})
    assert "header: ratelimit:watch-one(shadow)" in out


def test_oversized_message_is_refused_without_buffering_it_all(guard: Guard, tmp_path: Path) -> None:
    body = tmp_path / "big.txt"
    body.write_bytes((b"y" * 998 + b"\r\n") * (2 * MAX_SIZE // 1000))
    assert "refused" in miltertest.run("refused_body.lua", sock(guard), {"body": body})
    line = guard.message_lines()[-1]
    assert "verdict=reject reason=oversize" in line
    assert "552 5.3.4 Message size exceeds fixed maximum message size" in line


def test_quarantine_in_the_mta_hold_queue() -> None:
    with milter_guard("hold") as g:
        out = miltertest.run("accept.lua", sock(g), {"hold": 1})
        assert "accept: ok" in out
        out = miltertest.run("quarantine.lua", sock(g), {"rcpt": "<q-hold@test.example>", "mode": "hold",
                                                         "marker": "hold-marker", "header": "X-Queueguard-Hits"})
        assert "quarantine hold: ok" in out
        assert quarantined(g) == []
        assert "verdict=quarantine" in g.message_lines()[-1]


def test_eicar_is_rejected_when_clamd_is_configured(tmp_path: Path) -> None:
    body = tmp_path / "eicar.txt"
    body.write_bytes(b"Here it comes:\r\n" + eicar() + b"\r\n")
    with Clamd(tmp_path / "clamd") as clamd:
        g = milter_guard(clamd={"enabled": True, "address": str(clamd.socket), "pid_file": str(clamd.pid_file)})
        with g:
            out = miltertest.run("refused_body.lua", sock(g), {"body": body})
            assert "refused" in out
            line = g.message_lines()[-1]
            assert "verdict=reject reason=virus" in line and "550 5.7.1 virus found" in line
            assert FOUND in g.log()
