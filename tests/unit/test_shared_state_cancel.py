"""A cancellation that redis-py swallows or turns into an error of its own still ends the task.

Stand-in for redis-py, and why: a command cancelled while in flight comes back from redis-py as
one of its connection errors in some code paths (seen for real: a worker stopping right after
start-up waited forever for its membership loop, about one start in six). The timing that
produces it against a real Redis cannot be forced, so this client does exactly that, always.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from queueguard.shared_state import Membership, SharedState


class SwallowsCancellation:
    """A Redis client whose calls turn a cancellation into ConnectionError, or (`silent`) into a
    normal answer, as redis-py may."""

    def __init__(self, silent: bool = False) -> None:
        self.calls = 0
        self.silent = silent

    async def _call(self) -> Any:
        self.calls += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if self.silent:
                return [1, 0, 1, 1]
            raise ConnectionError("Connection closed by server.") from None

    def pipeline(self, transaction: bool = True) -> SwallowsCancellation:
        return self

    def zadd(self, *args: Any) -> None: ...

    def zremrangebyscore(self, *args: Any) -> None: ...

    def zcard(self, *args: Any) -> None: ...

    def pexpire(self, *args: Any) -> None: ...

    async def execute(self) -> Any:
        return await self._call()


@pytest.mark.parametrize("silent", [False, True])
async def test_membership_loop_ends_when_cancelled_mid_call(silent: bool) -> None:
    client = SwallowsCancellation(silent)
    task = asyncio.create_task(Membership(client, "mx1", every=0.01).run())  # type: ignore[arg-type]
    while client.calls == 0:
        await asyncio.sleep(0.001)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)
    assert task in done and task.cancelled(), "the loop went on after its cancellation"
    assert client.calls == 1


async def test_a_cancelled_caller_does_not_mark_the_shared_state_down() -> None:
    """A client leaving mid-command cancels its task; that is not Redis failing."""
    client = SwallowsCancellation()
    state: SharedState[object] = SharedState("ratelimit", client, object(), backend="redis")

    async def op(store: object) -> None:
        if store is client:
            await client._call()

    task = asyncio.create_task(state.run("fallback", op))
    while client.calls == 0:
        await asyncio.sleep(0.001)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)
    assert task in done and task.cancelled()
    assert not state.down
