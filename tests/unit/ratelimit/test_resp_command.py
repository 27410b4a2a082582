"""The rate-limit store packs its EVALSHA itself (redis_store.resp_command): the bytes must be the
ones redis-py's own packer sends, for any text a key can hold."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from queueguard.ratelimit.redis_store import resp_command

# Keys hold addresses and networks: any text that encodes as UTF-8 (no lone surrogates).
args = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(args, max_size=8))
def test_resp_command_is_what_redis_py_sends(rest: list[str]) -> None:
    # The command name is always one word (redis-py splits a first argument at its spaces).
    assert resp_command("EVALSHA", *rest) == b"".join(Connection().pack_command("EVALSHA", *rest))


def test_an_evalsha_call_as_the_store_makes_it() -> None:
    command = ("EVALSHA", "0" * 40, "2", "qg:rl:rcpt:bob@test.example", "qg:rl:rcpt:é@test.example",
               "r 1700000000000000 2 1000000 2000000 1 0 1000000 2000000 1 0")
    assert resp_command(*command) == b"".join(Connection().pack_command(*command))
