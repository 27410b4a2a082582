"""run_eagerly: a coroutine that does not wait is done at once, one that waits goes on as a Task
that behaves as if it had been one from the start (results, errors, cancellation)."""

from __future__ import annotations

import asyncio

import pytest

from queueguard.frontends.eager import run_eagerly


async def test_a_coroutine_that_never_waits_is_done_without_a_task() -> None:
    steps: list[str] = []

    async def work() -> str:
        steps.append("ran")
        return "250 Ok"

    ran = run_eagerly(asyncio.get_running_loop(), work())
    assert steps == ["ran"]  # before the event loop ran again
    assert ran.done() and ran.result() == "250 Ok" and not isinstance(ran, asyncio.Task)


async def test_an_error_before_any_wait_is_the_futures_exception() -> None:
    async def work() -> str:
        raise ValueError("bad")

    ran = run_eagerly(asyncio.get_running_loop(), work())
    assert ran.done() and isinstance(ran.exception(), ValueError)


async def test_a_coroutine_that_waits_goes_on_in_a_task_with_what_it_waited_for() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[int] = loop.create_future()
    seen: list[object] = []

    async def work() -> int:
        seen.append(asyncio.current_task())  # the first step runs in its caller (here the test's task)
        value = await gate
        seen.append(asyncio.current_task())
        await asyncio.sleep(0)  # a bare yield to the loop is passed on too
        return value + 1

    ran = run_eagerly(loop, work())
    assert isinstance(ran, asyncio.Task) and not ran.done() and seen == [asyncio.current_task()]
    gate.set_result(41)
    assert await ran == 42
    assert seen[1] is ran


async def test_an_exception_after_the_first_wait_reaches_the_task() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()

    async def work() -> None:
        await gate
        raise KeyError("late")

    ran = run_eagerly(loop, work())
    gate.set_result(None)
    with pytest.raises(KeyError):
        await ran


async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()
    events: list[str] = []

    async def work() -> None:
        try:
            await gate
        except asyncio.CancelledError:
            events.append("cancelled inside")
            raise
        finally:
            events.append("finally")

    ran = run_eagerly(loop, work())
    await asyncio.sleep(0)  # the Task has taken its first step: it waits on `gate`
    ran.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ran
    assert events == ["cancelled inside", "finally"] and gate.cancelled()


async def test_a_task_cancelled_before_its_first_step_still_ends_the_coroutine() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()
    events: list[str] = []

    async def work() -> None:
        try:
            await gate
        finally:
            events.append("finally")

    ran = run_eagerly(loop, work())
    ran.cancel()  # before the loop ran the Task at all
    with pytest.raises(asyncio.CancelledError):
        await ran
    assert events == ["finally"]


async def test_a_coroutine_that_catches_a_cancellation_goes_on() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()

    async def work() -> str:
        try:
            await gate
        except asyncio.CancelledError:
            return "settled anyway"
        return "not cancelled"

    ran = run_eagerly(loop, work())
    await asyncio.sleep(0)
    ran.cancel()
    assert await ran == "settled anyway"


async def test_a_cancellation_raised_before_any_wait_is_an_error_not_a_cancelled_call() -> None:
    """No Task was cancelled: the front end must answer it (451), not take it for a client gone."""
    async def work() -> str:
        raise asyncio.CancelledError

    ran = run_eagerly(asyncio.get_running_loop(), work())
    assert ran.done() and not ran.cancelled() and isinstance(ran.exception(), asyncio.CancelledError)
