"""Admission at the door under memory pressure, with or without a scanner (injected sensor)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from queueguard.mime import parse_message
from queueguard.model import Connection, RuleHit, Transaction, parse_ip
from queueguard.policy.schema import Policy
from queueguard.pressure.admission import Admission
from queueguard.pressure.governor import Governor, Level
from queueguard.pressure.sensors import PsiTrigger
from queueguard.stage import MessageContext, RcptContext
from queueguard.verdict import Action
from tests.unit.pressure.test_governor import Clock, FakeSensor

RATE_HIT = RuleHit("flood-to-one-address", "ratelimit", "tempfail")
CONN = Connection(parse_ip("192.0.2.1"))


def policy(**pressure: Any) -> Policy:
    base: dict[str, Any] = {"psi_memory_some_avg10": {"soften": 10, "shed": 40}, "hold": "10s"}
    base.update(pressure)
    return Policy.model_validate({"pressure": base})


def txn(*hits: RuleHit) -> Transaction:
    t = Transaction(CONN, "a@sender.example")
    t.hits.extend(hits)
    return t


def make() -> tuple[Admission, FakeSensor, Clock]:
    psi = FakeSensor("psi_memory", "psi_memory_some_avg10", 0.0)
    clock = Clock()
    return Admission(Governor([psi], clock=clock, interval=0)), psi, clock


def msg(t: Transaction, raw: bytes, p: Policy) -> MessageContext:
    return MessageContext(t, raw, p, parse_message)


async def test_connect_is_refused_only_at_shed() -> None:
    adm, psi, _ = make()
    p = policy()
    assert (await adm.on_connect(CONN, p)).verdict is None
    psi.value = 15
    assert (await adm.on_connect(CONN, p)).verdict is None
    psi.value = 45
    v = (await adm.on_connect(CONN, p)).verdict
    assert v is not None and (v.code, v.status, v.reason) == (451, "4.3.2", "shed") and "memory pressure" in v.text


async def test_rcpt_levels() -> None:
    adm, psi, _ = make()
    p = policy()
    assert (await adm.on_rcpt(RcptContext(txn(RATE_HIT), "b@x", p))).verdict is None
    psi.value = 15  # soften
    assert (await adm.on_rcpt(RcptContext(txn(), "b@x", p))).verdict is None
    shadow = RuleHit("r", "ratelimit", "tempfail", shadow=True)
    assert (await adm.on_rcpt(RcptContext(txn(shadow), "b@x", p))).verdict is None
    v = (await adm.on_rcpt(RcptContext(txn(RATE_HIT), "b@x", p))).verdict
    assert v is not None and v.reply().startswith("451 4.3.2") and v.reason == "soften_rate_limited"
    assert (await adm.on_rcpt(RcptContext(txn(RATE_HIT), "b@x", policy(soften={"defer_rate_limited": False})))
            ).verdict is None
    psi.value = 45  # shed
    v = (await adm.on_rcpt(RcptContext(txn(), "b@x", p))).verdict
    assert v is not None and v.action is Action.TEMPFAIL and v.code == 451 and v.reason == "shed"


async def test_message_shed_and_soften() -> None:
    adm, psi, clock = make()
    p = policy(soften={"defer_larger_than": "1KiB"})
    psi.value = 45
    r = await adm.on_message(msg(txn(), b"Subject: x\r\n\r\nsmall\r\n", p))
    assert r.verdict is not None and r.verdict.reason == "shed"
    psi.value = 15
    clock.now += 10  # past the hold time at shed
    r = await adm.on_message(msg(txn(), b"Subject: x\r\n\r\n" + b"y" * 2000, p))
    assert r.verdict is not None and r.verdict.reason == "soften_size" and r.verdict.code == 451
    r = await adm.on_message(msg(txn(RATE_HIT), b"Subject: x\r\n\r\nsmall\r\n", p))
    assert r.verdict is not None and r.verdict.reason == "soften_rate_limited"
    assert (await adm.on_message(msg(txn(), b"Subject: x\r\n\r\nsmall\r\n", p))).verdict is None


async def test_watch_polls_without_psi_trigger(tmp_path: Path) -> None:
    """A host whose kernel refuses PSI triggers (this one: EINVAL) falls back to polling."""
    psi = FakeSensor("psi_memory", "psi_memory_some_avg10", 50.0)
    governor = Governor([psi], clock=Clock(), interval=0.01)
    task = asyncio.create_task(governor.watch(lambda: policy().pressure, PsiTrigger(tmp_path / "no-pressure")))
    try:
        async with asyncio.timeout(5):
            while governor.level is not Level.SHED:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    status = Admission(governor).status()
    assert status["level"] == "shed" and status["sensors"] == {"psi_memory": 50.0}
