"""Run a coroutine's first step at once; make a Task of it only if it has to wait.

The Session calls behind the greeting, HELO/EHLO and MAIL almost never wait for anything, and a
Task for each cost ~8 µs of a worker's CPU and an extra turn of the event loop before the reply
went out. Python 3.12's eager task factory does this; 3.11 has none.

Only for coroutines whose first step needs no current task: asyncio.timeout() and
asyncio.current_task() see none until the coroutine first waits.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


def run_eagerly(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """`coro` run up to its first wait: a finished future when it never waited, else the Task that
    runs the rest (cancelling that Task cancels `coro` where it waits)."""
    try:
        first = coro.send(None)
    except StopIteration as done:
        finished: asyncio.Future[T] = loop.create_future()
        finished.set_result(done.value)
        return finished
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # a CancelledError too: no Task was cancelled, so it is an error
        failed: asyncio.Future[T] = loop.create_future()
        failed.set_exception(error)
        return failed
    task = loop.create_task(_rest(coro, first))
    # A Task cancelled before its first step never starts _rest, so `coro` would stay suspended
    # (its finally blocks unrun) until garbage collection: close it then. A no-op once it ended.
    task.add_done_callback(lambda _: coro.close())
    return task


@types.coroutine
def _rest(coro: Coroutine[Any, Any, T], first: Any) -> Generator[Any, Any, T]:
    """`yield from coro` after its first step had already been taken: each future it waits on
    goes to the Task, and what the Task sends or throws goes back into it."""
    waiting = first
    while True:
        try:
            sent = yield waiting
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as thrown:
            try:
                waiting = coro.throw(thrown)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
        else:
            try:
                waiting = coro.send(sent)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
