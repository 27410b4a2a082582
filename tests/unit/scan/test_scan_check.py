"""ScanCheck decisions that need no running clamd: pressure levels (injected sensor),
size limits, and the breaker against a clamd socket that does not exist (a real
connect failure, not a mock). Scanning with real clamd: tests/integration/test_scan_clamd.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from queueguard.mime import parse_message
from queueguard.model import Connection, RuleHit, Transaction, parse_ip
from queueguard.policy.schema import Policy
from queueguard.scan.check import HEADER, ScanCheck
from queueguard.scan.governor import Level
from queueguard.scan.health import BreakerState
from queueguard.settings import ClamdSettings
from queueguard.stage import MessageContext, RcptContext, StageResult
from queueguard.verdict import Action
from tests.unit.scan.test_scan_governor import Clock, FakeSensor


def policy(**scan: Any) -> Policy:
    base: dict[str, Any] = {"pressure": {"psi_memory_some_avg10": {"soften": 10, "shed": 40}, "hold": "10s"}}
    base.update(scan)
    return Policy.model_validate({"scan": base})


def txn(*hits: RuleHit) -> Transaction:
    t = Transaction(Connection(parse_ip("192.0.2.1")), "a@sender.example")
    t.hits.extend(hits)
    return t


def make(tmp_path: Path, **settings: Any) -> tuple[ScanCheck, FakeSensor, Clock]:
    psi = FakeSensor("psi_memory", "psi_memory_some_avg10", 0.0)
    clock = Clock()
    cfg = ClamdSettings(enabled=True, address=str(tmp_path / "no-clamd.sock"), **settings)
    return ScanCheck(cfg, sensors=[psi], clock=clock, pressure_interval=0), psi, clock


def msg(t: Transaction, raw: bytes, p: Policy) -> MessageContext:
    return MessageContext(t, raw, p, parse_message)


RATE_HIT = RuleHit("flood-to-one-address", "ratelimit", "tempfail")


async def test_rcpt_levels(tmp_path: Path) -> None:
    check, psi, _ = make(tmp_path)
    p = policy()
    assert (await check.on_rcpt(RcptContext(txn(RATE_HIT), "b@x", p))).verdict is None
    psi.value = 15  # soften
    assert (await check.on_rcpt(RcptContext(txn(), "b@x", p))).verdict is None
    shadow = RuleHit("r", "ratelimit", "tempfail", shadow=True)
    assert (await check.on_rcpt(RcptContext(txn(shadow), "b@x", p))).verdict is None
    v = (await check.on_rcpt(RcptContext(txn(RATE_HIT), "b@x", p))).verdict
    assert v is not None and v.reply().startswith("451 4.3.2") and "memory pressure" in v.text
    soft_p = policy(soften={"defer_rate_limited": False})
    assert (await check.on_rcpt(RcptContext(txn(RATE_HIT), "b@x", soft_p))).verdict is None
    psi.value = 45  # shed
    v = (await check.on_rcpt(RcptContext(txn(), "b@x", p))).verdict
    assert v is not None and v.action is Action.TEMPFAIL and v.code == 451 and v.status == "4.3.2"
    assert "memory pressure" in v.text and v.reason == "shed"
    await check.commit(txn(), p)


async def test_disabled_does_nothing(tmp_path: Path) -> None:
    check, psi, _ = make(tmp_path)
    psi.value = 99
    off = policy(clamav={"enabled": False})
    assert (await check.on_rcpt(RcptContext(txn(), "b@x", off))).verdict is None
    assert (await check.on_message(msg(txn(), b"Subject: x\r\n\r\nx\r\n", off))).verdict is None
    plain = ScanCheck(ClamdSettings(enabled=False), sensors=[psi])
    assert (await plain.on_rcpt(RcptContext(txn(), "b@x", policy()))).verdict is None


async def test_message_shed_and_soften_never_reach_clamd(tmp_path: Path) -> None:
    check, psi, clock = make(tmp_path)
    p = policy(soften={"defer_larger_than": "1KiB"})
    psi.value = 45
    r = await check.on_message(msg(txn(), b"Subject: x\r\n\r\nsmall\r\n", p))
    assert r.verdict is not None and r.verdict.reason == "shed"
    psi.value = 15
    clock.now += 10  # past the hold time at shed
    r = await check.on_message(msg(txn(), b"Subject: x\r\n\r\n" + b"y" * 2000, p))
    assert r.verdict is not None and r.verdict.reason == "soften_size" and r.verdict.code == 451
    r = await check.on_message(msg(txn(RATE_HIT), b"Subject: x\r\n\r\nsmall\r\n", p))
    assert r.verdict is not None and r.verdict.reason == "soften_rate_limited"
    assert check.breaker.failures == 0  # none of these tried to connect
    r = await check.on_message(msg(txn(), b"Subject: x\r\n\r\nsmall\r\n", p))
    assert r.verdict is not None and r.verdict.reason == "clamd_connect"  # small: scanned (clamd absent)
    assert check.gate.limit == 1  # soften.max_concurrent


async def test_too_large_to_scan(tmp_path: Path) -> None:
    check, _, _ = make(tmp_path, stream_max_length=1000)
    r = await check.on_message(msg(txn(), b"x" * 1001, policy()))
    assert r.verdict is not None and r.verdict.reply().startswith("552 5.3.4 Message too large to scan")
    assert check.breaker.failures == 0
    r = await check.on_message(msg(txn(), b"x" * 1001, policy(clamav={"on_error": "accept"})))
    assert r.verdict is None and r.headers == [(HEADER, "unscanned (clamd error: too_large)")]


async def test_breaker_answers_fast_after_failures(tmp_path: Path) -> None:
    check, _, clock = make(tmp_path, breaker_failures=2, breaker_reset=5)
    p = policy()
    raw = b"Subject: x\r\n\r\nhello\r\n"
    reasons = [(await check.on_message(msg(txn(), raw, p))).verdict for _ in range(4)]
    assert [v.reason if v else None for v in reasons] == ["clamd_connect", "clamd_connect", "clamd_down",
                                                         "clamd_down"]
    assert all(v is not None and v.reply().startswith("451 4.3.2") for v in reasons)
    assert check.breaker.state is BreakerState.OPEN and check.breaker.failures == 2
    assert check.status()["clamd_up"] is False and check.status()["breaker"] == "open"
    clock.now += 5  # half-open: this message is the probe, and clamd is still gone
    v = (await check.on_message(msg(txn(), raw, p))).verdict
    assert v is not None and v.reason == "clamd_connect" and check.breaker.state is BreakerState.OPEN


async def test_on_error_accept_marks_the_message(tmp_path: Path) -> None:
    check, _, _ = make(tmp_path, breaker_failures=1)
    p = policy(clamav={"on_error": "accept"})
    for _ in range(2):  # connect error, then breaker open: both pass, both marked
        r: StageResult = await check.on_message(msg(txn(), b"Subject: x\r\n\r\nhello\r\n", p))
        assert r.verdict is None and len(r.headers) == 1 and r.headers[0][0] == HEADER
        assert r.headers[0][1].startswith("unscanned (clamd error: ")
        assert r.hits and r.hits[0].detail.startswith("unscanned")


async def test_run_polls_without_psi_trigger(tmp_path: Path) -> None:
    """A host whose kernel refuses PSI triggers (this one: EINVAL) falls back to polling."""
    from queueguard.scan.sensors import PsiTrigger

    psi = FakeSensor("psi_memory", "psi_memory_some_avg10", 50.0)
    check = ScanCheck(ClamdSettings(enabled=True, address=str(tmp_path / "none.sock")), sensors=[psi],
                      trigger=PsiTrigger(tmp_path / "no-pressure-file"), pressure_interval=0.01)
    task = asyncio.create_task(check.run())
    try:
        async with asyncio.timeout(5):
            while check.governor.level is not Level.SHED or check.health.up is not False:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    status = check.status()
    assert status["level"] == "shed" and status["sensors"] == {"psi_memory": 50.0}
