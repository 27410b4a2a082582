"""Fake clamd servers on unix sockets, for faults a real clamd cannot be made to produce."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Start a fake clamd with a connection handler; its socket path. Stopped after the test."""
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        path = str(tmp_path / f"fake{len(servers)}.sock")
        servers.append(await asyncio.start_unix_server(handler, path))
        return path

    yield start
    for s in servers:
        s.close()
        await s.wait_closed()
