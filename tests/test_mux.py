"""The asyncio client's shared script connection (``producer/mux.py``), on a real Redis:
concurrent batches each get their own replies, and a killed connection fails what was
in flight and connects again."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from tests.helpers import redis_client
from toolq.producer.mux import MuxConnection

ECHO = "return ARGV[1]"


def test_concurrent_batches_get_their_own_replies(redis_url: str) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(redis_url)
        mux = MuxConnection(client.connection_pool)

        async def batch(i: int) -> list[object]:
            cmds = [("EVAL", ECHO, 0, f"{i}-{j}") for j in range(i % 4 + 1)]
            return await mux.execute(cmds)

        got = await asyncio.gather(*(batch(i) for i in range(300)))
        for i, replies in enumerate(got):
            assert replies == [f"{i}-{j}".encode() for j in range(i % 4 + 1)]
        # An error reply is that command's reply; the batch and the connection go on.
        bad = await mux.execute([("EVAL", "return redis.error_reply('no')", 0), ("PING",)])
        assert isinstance(bad[0], ResponseError) and bad[1] in (True, b"PONG")
        assert await mux.execute([("EVAL", ECHO, 0, "after")]) == [b"after"]
        assert await mux.execute([]) == []  # an empty batch: no reply to wait for
        assert await mux.execute([("EVAL", ECHO, 0, "last")]) == [b"last"]
        await mux.aclose()
        await client.aclose()

    asyncio.run(run())


def test_a_killed_connection_fails_the_next_batch_and_connects_again(redis_url: str) -> None:
    admin = redis_client(redis_url)

    async def run() -> None:
        client = aioredis.Redis.from_url(redis_url)
        mux = MuxConnection(client.connection_pool)
        (conn_id,) = await mux.execute([("CLIENT", "ID")])
        assert admin.client_kill_filter(_id=conn_id) == 1
        # The batch sent on the dead connection fails (never hangs, never answers wrongly)...
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(mux.execute([("EVAL", ECHO, 0, "lost")]), 30)
        # ...and the next one connects again.
        assert await mux.execute([("EVAL", ECHO, 0, "again")]) == [b"again"]
        (new_id,) = await mux.execute([("CLIENT", "ID")])
        assert new_id != conn_id
        await mux.aclose()
        await client.aclose()

    asyncio.run(run())


def test_closing_fails_what_is_in_flight_instead_of_hanging(redis_url: str) -> None:
    admin = redis_client(redis_url)

    def blocked() -> bool:
        return any(c.get("cmd") == "blpop" for c in admin.client_list())

    async def run() -> None:
        client = aioredis.Redis.from_url(redis_url)
        mux = MuxConnection(client.connection_pool)
        # Kept in flight by the server for 10 s (a blocking command, for the test only).
        pending = asyncio.ensure_future(mux.execute([("BLPOP", "toolq-mux-test:never", 10)]))
        deadline = time.monotonic() + 30
        while not blocked():
            assert time.monotonic() < deadline, "the BLPOP never reached Redis"
            await asyncio.sleep(0.01)
        assert not pending.done()
        await mux.aclose()
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(pending, 5)
        await client.aclose()

    asyncio.run(run())
