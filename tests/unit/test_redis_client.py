"""The Redis URL forms of settings `state` (docs/settings.md): plain URLs pass through, Sentinel URLs
are taken apart, and mistakes are refused when the settings are read."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from queueguard.redis_client import SentinelMaster, SentinelTarget, connect, parse
from queueguard.settings import Settings


def test_plain_urls_pass_through() -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://:pw@127.0.0.1:6380/1", "unix:///run/redis.sock?db=2"):
        assert parse(url) == url


def test_sentinel_url() -> None:
    assert parse("redis+sentinel://127.0.0.1:26379,127.0.0.2:26380/mymaster") == SentinelTarget(
        [("127.0.0.1", 26379), ("127.0.0.2", 26380)], "mymaster")
    assert parse("redis+sentinel://u:p%40ss@[::1]:26379/qg/3?sentinel_password=s") == SentinelTarget(
        [("::1", 26379)], "qg", 3, "u", "p@ss", "s")
    assert parse("redis+sentinel://:secret@127.0.0.1:26379/qg") == SentinelTarget(
        [("127.0.0.1", 26379)], "qg", password="secret")


@pytest.mark.parametrize(("url", "says"), [
    ("redis+sentinel://127.0.0.1/qg", "host:port"),
    ("redis+sentinel://127.0.0.1:26379", "service name"),
    ("redis+sentinel://127.0.0.1:26379/qg/x", "service name"),
    ("redis+sentinel://127.0.0.1:26379/qg?timeout=1", "no option timeout"),
    ("sentinel://127.0.0.1:26379/qg", "redis+sentinel://"),
    ("mongodb://x", "redis://"),
])
def test_bad_urls_say_why(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        parse(url)
    with pytest.raises(ValidationError, match=re.escape(says)):
        Settings.model_validate({"state": url})


async def test_a_sentinel_url_opens_a_sentinel_managed_master() -> None:
    client = connect("redis+sentinel://127.0.0.1:1,127.0.0.1:2/qg/2")  # nothing is contacted until used
    assert isinstance(client, SentinelMaster) and client.sentinels is not None
    assert len(client.sentinels.sentinels) == 2
    assert client.connection_pool.connection_kwargs["db"] == 2
    await client.aclose()
