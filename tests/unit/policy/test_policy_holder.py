"""Reload: validate fully, swap atomically, keep the last good policy on errors."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from queueguard import metrics
from queueguard.model import Connection, Transaction, parse_ip
from queueguard.policy.holder import PolicyHolder
from queueguard.ratelimit.check import RateLimitCheck
from queueguard.ratelimit.store import MemoryStore
from queueguard.stage import RcptContext

GOOD = "ratelimits:\n  - name: r1\n    key: recipient\n    rate: 100/1m\n"
STRICT = "ratelimits:\n  - name: r1\n    key: recipient\n    rate: 1/1m\n"
BROKEN = "ratelimits:\n  - name: r1\n    key: recipient\n    rate: 1/1x\n"


def value(metric: object) -> float:
    return float(metric._value.get())  # type: ignore[attr-defined]


def test_first_load_and_current(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    holder = PolicyHolder(tmp_path, clock=lambda: 1234.0)
    with pytest.raises(RuntimeError):
        holder.current()
    assert holder.reload() == []
    assert holder.current().ratelimits[0].rate.count == 100
    assert value(metrics.policy_last_success) == 1234.0
    assert holder.summary()["rules"] == "0 lists, 1 ratelimit, 0 bursts, 0 patterns"


def test_broken_reload_keeps_the_last_good_policy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    holder = PolicyHolder(tmp_path)
    holder.reload()
    before = holder.current()
    failures = value(metrics.policy_reload_failures)
    (tmp_path / "a.yaml").write_text(BROKEN)
    with caplog.at_level(logging.ERROR, "queueguard.policy"):
        issues = holder.reload()
    assert [i.line for i in issues] == [4]
    assert holder.current() is before
    assert value(metrics.policy_reload_failures) == failures + 1
    assert f"policy error: {tmp_path / 'a.yaml'}:4: ratelimits[0].rate: bad rate '1/1x'" in caplog.text
    assert "keeping the last good policy" in caplog.text
    assert holder.summary()["errors"] == [str(issues[0])]


async def test_good_reload_changes_behaviour_for_new_transactions_only(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    holder = PolicyHolder(tmp_path)
    holder.reload()
    check = RateLimitCheck(MemoryStore(), clock=lambda: 1000.0)

    async def send(policy: object) -> str:
        t = Transaction(Connection(parse_ip("192.0.2.1")), "a@example.org", policy=policy)
        r = await check.on_rcpt(RcptContext(t, "info@example.org", t.policy))  # type: ignore[arg-type]
        if r.verdict is None:
            t.recipients.append("info@example.org")
            await check.on_end(t, True)
            return "250"
        return r.verdict.reply()

    in_flight = Transaction(Connection(parse_ip("192.0.2.1")), "a@example.org", policy=holder.current())
    assert [await send(holder.current()) for _ in range(3)] == ["250"] * 3
    (tmp_path / "a.yaml").write_text(STRICT)
    assert holder.reload() == []
    assert (await send(holder.current())).startswith("451 4.7.1")
    # A transaction that pinned the old policy is still judged by it.
    r = await check.on_rcpt(RcptContext(in_flight, "info@example.org", in_flight.policy))  # type: ignore[arg-type]
    assert r.verdict is None


async def test_watch_reloads_when_a_file_changes(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    holder = PolicyHolder(tmp_path)
    holder.reload()
    task = asyncio.create_task(holder.watch(interval=0.02))
    try:
        (tmp_path / "b.yaml").write_text("patterns:\n  - name: p\n    subject: x\n")
        for _ in range(500):
            if holder.current().patterns:
                break
            await asyncio.sleep(0.01)
        assert [p.name for p in holder.current().patterns] == ["p"]
        (tmp_path / "b.yaml").write_text("patterns: [")
        for _ in range(500):
            if holder.summary()["errors"]:
                break
            await asyncio.sleep(0.01)
        assert holder.summary()["errors"] and holder.current().patterns
    finally:
        task.cancel()


async def test_a_file_nested_too_deep_is_an_error_and_the_watcher_lives_on(tmp_path: Path) -> None:
    """Thousands of `[` escaped the loader as RecursionError: the watcher task died silently, so
    no later save was ever loaded, and the status page showed no error. Now it is a policy error
    (the last good policy kept) and the next good save is loaded."""
    (tmp_path / "a.yaml").write_text(GOOD)
    holder = PolicyHolder(tmp_path)
    holder.reload()
    task = asyncio.create_task(holder.watch(interval=0.02))
    try:
        for deep in ("lists: {a: " + "[" * 3000 + "]" * 3000 + "}\n",
                     "lists:\n  a:\n" + "".join("  " * (i + 2) + "-\n" for i in range(60)) + "  " * 62 + "- x\n"):
            (tmp_path / "b.yaml").write_text(deep)
            for _ in range(500):
                if holder.summary()["errors"]:
                    break
                await asyncio.sleep(0.01)
            assert "nested deeper than 32 levels" in str(holder.summary()["errors"]), holder.summary()
            assert not task.done()
            (tmp_path / "b.yaml").write_text("patterns:\n  - name: p\n    subject: x\n")
            for _ in range(500):
                if holder.current().patterns:
                    break
                await asyncio.sleep(0.01)
            assert [p.name for p in holder.current().patterns] == ["p"] and not holder.summary()["errors"]
            (tmp_path / "b.yaml").unlink()
            for _ in range(500):
                if not holder.current().patterns:
                    break
                await asyncio.sleep(0.01)
    finally:
        task.cancel()


async def test_a_file_saved_in_two_steps_is_loaded_once_it_settles(tmp_path: Path) -> None:
    """Editors that truncate a file and then write it leave it empty for a moment: loaded then,
    the policy ran without the file's rules until the next poll. The watcher waits for the
    directory to stay unchanged for one interval before it loads (polls at 0.2 s steps here: the
    empty moment spans the one at 0.4 s, the new text those from 0.6 s)."""
    (tmp_path / "a.yaml").write_text(GOOD)
    holder = PolicyHolder(tmp_path)
    holder.reload()
    loaded: list[int] = []
    task = asyncio.create_task(holder.watch(interval=0.2, on_change=lambda p: loaded.append(len(p.ratelimits))))
    try:
        await asyncio.sleep(0.3)
        (tmp_path / "a.yaml").write_text("")
        await asyncio.sleep(0.2)
        (tmp_path / "a.yaml").write_text(GOOD + "  - name: r2\n    key: recipient\n    rate: 5/1m\n")
        for _ in range(300):
            if loaded:
                break
            await asyncio.sleep(0.01)
        assert loaded == [2], loaded
    finally:
        task.cancel()


def test_a_policy_without_rules_is_loaded_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An empty file, or only lists: valid, but nothing is limited or held. Said, not silent."""
    (tmp_path / "a.yaml").write_text("# nothing yet\n")
    (tmp_path / "b.yaml").write_text("lists:\n  ours: [example.org]\n")
    holder = PolicyHolder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="queueguard.policy"):
        assert holder.reload() == []
    assert "has no ratelimits, bursts or patterns" in caplog.text
    caplog.clear()
    (tmp_path / "c.yaml").write_text(GOOD)
    with caplog.at_level(logging.WARNING, logger="queueguard.policy"):
        assert holder.reload() == []
    assert "no ratelimits" not in caplog.text
