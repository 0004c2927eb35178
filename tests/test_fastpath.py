"""The per-call fast path: inline results, bare EVALSHA with NOSCRIPT recovery, many waits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from toolq.producer import AsyncClient, Client
from toolq.schemas import Result
from toolq.worker.writer import INLINE_RESULT_MAX_BYTES


def _last_result_event(client: Client, traj: str) -> dict[bytes, bytes]:
    entries = client.redis.xrevrange(client.keys.events(traj), count=1)
    return dict(entries[0][1])


def test_small_results_ride_in_their_event(start_worker, client: Client):
    start_worker("local")
    client.open("t")
    r = client.call("t", "bash", {"command": "echo hi"})
    event = _last_result_event(client, "t")
    assert event[b"type"] == b"result" and event[b"call_id"].decode() == r.call_id
    inline = Result.from_fields(json.loads(event[b"result"]))
    stored = Result.from_fields(client.redis.hgetall(client.keys.result("t", r.call_id)))
    assert inline == stored == r


def test_large_results_are_only_in_the_hash(start_worker, client: Client):
    start_worker("local")
    client.open("t")
    size = INLINE_RESULT_MAX_BYTES * 2
    r = client.call("t", "bash", {"command": f"head -c {size} /dev/zero | tr '\\0' x"})
    assert r.ok and len(r.output) == size  # read with HGETALL after the event
    assert b"result" not in _last_result_event(client, "t")


def test_calls_survive_a_script_flush(start_worker, client: Client, aclient_factory):
    """A restarted Redis forgets scripts: client and worker load them again."""
    start_worker("local")
    client.open("t")
    assert client.call("t", "bash", {"command": "echo 1"}).output == "1\n"
    client.redis.script_flush()
    assert client.call("t", "bash", {"command": "echo 2"}).output == "2\n"
    client.redis.script_flush()
    assert client.call("t", "bash", {"command": "echo 3"}, call_id="c3").output == "3\n"

    async def main() -> str:
        async with aclient_factory() as aclient:
            await aclient.redis.script_flush()
            return (await aclient.call("t", "bash", {"command": "echo 4"})).output

    assert asyncio.run(main()) == "4\n"


def test_one_async_client_waits_for_many_trajectories(
    start_worker, client: Client, aclient_factory: Callable[[], AsyncClient]
):
    """More concurrent waits than redis-py's default pool size (100)."""
    start_worker("local", slots=1)
    client.open("t")
    n = 150

    async def main() -> list[Result]:
        async with aclient_factory() as aclient:
            return await asyncio.gather(
                *(aclient.call("t", "bash", {"command": f"echo {i}"}) for i in range(n))
            )

    results = asyncio.run(main())
    assert [r.output for r in results] == [f"{i}\n" for i in range(n)]
