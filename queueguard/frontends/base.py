"""What the app needs of a front end: start listening, stop gracefully, say what is in flight."""

from __future__ import annotations

from typing import Protocol


class Frontend(Protocol):
    async def start(self) -> None:
        """Listen; raises OSError when the address cannot be bound (the app says which)."""
        ...

    async def stop(self, grace: float) -> None:
        """Stop accepting; let what is in flight finish within `grace` seconds; close the rest
        with a temporary failure (never a silent drop)."""
        ...

    def in_flight(self) -> int:
        """Transactions or requests being decided now (what `stop` waits for)."""
        ...
