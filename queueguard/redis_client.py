"""The one way queueguard opens Redis: fail fast and never retry inside a mail transaction.

Rate limits and burst counts are asked at RCPT/DATA time; a slow or dead Redis must turn into
the policy's `state.on_error` within half a second, not hold the sender. Background readers and
publishers (route pressure) may wait longer.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

IN_TRANSACTION = 0.5
BACKGROUND = 2.0


def connect(url: str, timeout: float = IN_TRANSACTION) -> Redis:
    return Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                          retry=Retry(NoBackoff(), 0), health_check_interval=30)
