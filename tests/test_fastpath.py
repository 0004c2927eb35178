"""The per-call fast path: inline results, bare EVALSHA with NOSCRIPT recovery, many waits."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from redis.exceptions import ResponseError

from toolq.producer import AsyncClient, Client
from toolq.producer.waits import LINGER_MAX, WaitSet
from toolq.schemas import Keys, Result, lua
from toolq.worker.lease import RedisHealth
from toolq.worker.service import connect
from toolq.worker.settings import WorkerSettings
from toolq.worker.writer import INLINE_RESULT_MAX_BYTES, Writer


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


def _staged_keys(client: Client) -> list[bytes]:
    return [k for k in client.redis.keys(f"{client.keys.ns}:*") if b":staged:" in k]


def test_a_large_output_leaves_no_staged_copy(start_worker, client: Client):
    """Outputs over the inline size are staged beside the result script and renamed
    into the result (see lua.FINISH): the result holds them, nothing else does."""
    start_worker("local")
    client.open("t")
    size = INLINE_RESULT_MAX_BYTES * 8  # under the default max_output_bytes (64 KiB)
    cmd = f"head -c {size} /dev/zero | tr '\\0' y"
    results = [client.call("t", "bash", {"command": cmd}) for _ in range(3)]
    assert [len(r.output) for r in results] == [size] * 3 and results[0].output == "y" * size
    for r in results:
        stored = client.redis.hgetall(client.keys.result("t", r.call_id))
        assert (
            stored[b"output"] == b"y" * size
            and client.redis.pttl(client.keys.result("t", r.call_id)) > 0
        )
    assert _staged_keys(client) == []


def _writer(url: str, ns: str, worker_id: str) -> Writer:
    settings = WorkerSettings(redis_url=url, namespace=ns, worker_id=worker_id)
    return Writer(settings, connect(url), RedisHealth(), lambda _t: None, lambda _r: None)


@pytest.mark.redis_kinds("single", "cluster")
def test_a_staged_output_is_renamed_once_or_deleted(redis_url: str, ns: str):
    """The writer's FINISH with a staged output, through Redis: the owner's result
    takes it; a second result for the call, a fenced-off worker's, and a FINISH
    whose staged output is gone write nothing, and no staged key is left."""
    keys = Keys(ns)
    big = "z" * (INLINE_RESULT_MAX_BYTES + 1)

    def result(call_id: str, output: str) -> Result:
        return Result(call_id=call_id, traj="t", ok=True, output=output, finished_ms=1)

    async def main() -> None:
        owner, other = _writer(redis_url, ns, "w1"), _writer(redis_url, ns, "w2")
        redis: Any = owner.redis
        await redis.hset(keys.traj("t"), mapping={"traj": "t", "owner": "w1", "epoch": "3"})
        traj, item = SimpleNamespace(traj_id="t", epoch="3"), SimpleNamespace(entry_id="")
        try:
            op = owner._finish_op(traj, item, result("c1", big))  # type: ignore[arg-type]
            assert op.before and op.keys[-1] == keys.staged_output("t", "c1", "w1")
            small = owner._finish_op(traj, item, result("c0", "small"))  # type: ignore[arg-type]
            assert await owner._flush([small, op, small]) == [1, 1, 0]  # a reply per op
            again = owner._finish_op(traj, item, result("c1", "y" * len(big)))  # type: ignore[arg-type]
            fenced = other._finish_op(traj, item, result("c2", big))  # type: ignore[arg-type]
            assert await owner._flush([again]) == [0]
            assert await other._flush([fenced]) == [lua.FENCED]
            lost = owner._finish_op(traj, item, result("c3", big))  # type: ignore[arg-type]
            lost.before = ()  # the staging never happened
            (reply,) = await owner._flush([lost])
            assert isinstance(reply, ResponseError) and "staged output" in str(reply)
            stored = await redis.hgetall(keys.result("t", "c1"))
            assert stored[b"output"] == big.encode() and stored[b"call_id"] == b"c1"
            assert not await redis.exists(keys.result("t", "c2"), keys.result("t", "c3"))
            for call, worker in (("c1", "w1"), ("c2", "w2"), ("c3", "w1")):
                assert not await redis.exists(keys.staged_output("t", call, worker))
            assert await redis.hget(keys.traj("t"), "calls_total") == b"2"
        finally:
            for writer in (owner, other):
                await writer.aclose()
                await writer.redis.aclose()

    asyncio.run(main())


def test_a_trajectory_lingers_in_the_reads_after_its_wait():
    """WaitSet with linger_s: a trajectory whose last wait ended stays read from its
    cursor, until linger_s passed or LINGER_MAX others lingered after it."""
    keys = Keys("ns")
    plain, lingering = WaitSet(keys), WaitSet(keys, linger_s=60.0)
    for waits in (plain, lingering):
        waits.add("a", "c1", "5-0")
        waits.add("b", "c2", "6-0")
        waits.discard(("a", "c1"))
    assert list(plain.streams()) == [keys.events("b")]
    assert lingering.streams() == {keys.events("a"): "5-0", keys.events("b"): "6-0"}
    lingering.add("a", "c3", "7-0")  # a new wait: a cursor later than the read's is kept
    assert lingering.streams()[keys.events("a")] == "5-0" and "a" not in lingering.lingering
    for i in range(LINGER_MAX + 1):
        lingering.add(f"t{i}", "c", "1-0")
        lingering.discard((f"t{i}", "c"))
    assert keys.events("t0") not in lingering.streams()  # the oldest went first
    assert keys.events(f"t{LINGER_MAX}") in lingering.streams()
    timed = WaitSet(keys, linger_s=60.0)
    timed.add("a", "c1", "5-0")
    timed.add("b", "c2", "6-0")
    timed.discard(("a", "c1"))
    assert keys.events("a") in timed.streams()
    timed.lingering["a"] = time.monotonic() - 1  # (what time does: its until passed)
    assert list(timed.streams()) == [keys.events("b")]  # b is still awaited


def test_an_agent_loop_does_not_wake_the_read_for_each_call(
    start_worker, client: Client, aclient_factory: Callable[[], AsyncClient]
):
    """Several trajectories calling in loops through one asyncio client: a blocked
    read is ended (woken) for a trajectory's first wait at most, not for every call,
    and every call still gets its own result, in order."""
    start_worker("local", slots=4)
    trajs = [f"t{i}" for i in range(4)]
    for traj in trajs:
        client.open(traj)

    async def main() -> tuple[dict[str, list[str]], int]:
        async with aclient_factory() as aclient:

            async def loop(traj: str) -> list[str]:
                return [
                    (await aclient.call(traj, "bash", {"command": f"echo {traj}-{i}"})).output
                    for i in range(25)
                ]

            outputs = await asyncio.gather(*(loop(t) for t in trajs))
            return dict(zip(trajs, outputs, strict=True)), aclient._hub.wakes

    outputs, wakes = asyncio.run(main())
    assert outputs == {t: [f"{t}-{i}\n" for i in range(25)] for t in trajs}
    assert wakes <= len(trajs), f"{wakes} wakes for 100 calls on {len(trajs)} trajectories"


def test_a_wait_whose_event_was_read_early_wakes_the_read(redis_url: str, ns: str):
    """A large result's event read before its wait joined (kept without the result)
    needs a read from before that event: the blocked read that covers the same
    trajectory from a later cursor is woken, and the wait gets its result."""
    keys = Keys(ns)

    async def main() -> None:
        async with AsyncClient(redis_url, ns) as aclient:
            hub, redis = aclient._hub, aclient.redis
            await redis.hset(keys.traj("t"), mapping={"traj": "t", "status": "running"})
            first = await redis.xadd(keys.events("t"), {"v": "1", "type": "state"})
            cursor = first.decode()
            blocked = asyncio.ensure_future(hub.wait("t", "never", cursor, 60.0))
            group = hub._group_of("t")
            await _until(lambda: group.blocked and "t" in group._reading)
            # A worker's result, written while the read is blocked; its event has no result.
            big = "o" * (INLINE_RESULT_MAX_BYTES + 1)
            await redis.hset(keys.result("t", "c1"), mapping={"call_id": "c1", "traj": "t",
                             "ok": "1", "output": big})  # fmt: skip
            await redis.xadd(keys.events("t"), {"v": "1", "type": "result", "call_id": "c1"})
            await _until(lambda: ("t", "c1") in hub._early)
            await _until(lambda: group.blocked)  # again, from after c1's event
            wakes = hub.wakes
            got = await hub.wait("t", "c1", cursor, 60.0)  # from the call's own cursor
            assert got.output == big and hub.wakes == wakes + 1
            blocked.cancel()

    asyncio.run(main())


async def _until(ready: Callable[[], bool], deadline_s: float = 60.0) -> None:
    end = time.monotonic() + deadline_s
    while not ready():
        assert time.monotonic() < end, "the state did not come"
        await asyncio.sleep(0.01)
