"""One blocking read over the calls streams of one hash slot, woken on demand.

On one Redis every owned trajectory is in a single group; on Redis Cluster a
command may not span hash slots, so each slot's trajectories have a group (in
practice, a trajectory each). A group's task blocks in ``XREADGROUP`` over its
members' streams and its own *wake stream* (``Keys.wake``, in the same slot):
when its members change (a claim, an end, a queue with room again), an
``XADD`` to the wake stream ends the blocked read, and the next read covers the
new set. No connection is pinned and no client id is needed, so the same code
runs on one Redis and on a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from toolq.schemas import GROUP

log = logging.getLogger("toolq.worker.reader")

WAKE_TTL_MS = 24 * 3600 * 1000  # a dead worker's wake streams expire
WAKE_MAXLEN = 16


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class ReadGroup:
    """The blocking read of one group of streams (see the module docstring)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        consumer: str,
        wake_key: str,
        *,
        streams: Callable[[], dict[str, str]],
        deliver: Callable[[str, list[Any]], None],
        block_ms: int,
        count: int,
    ) -> None:
        self.redis = redis
        self.consumer = consumer
        self.wake_key = wake_key
        self.streams = streams  # the member streams to read now, each from ">"
        self.deliver = deliver  # entries of one member stream
        self.block_ms = block_ms
        self.count = count
        self.blocked = False
        self._waking = False
        self._changed = asyncio.Event()
        self._ready = False  # the wake stream and its consumer group exist
        self._conn: Any = None  # on one Redis, the connection the reads block on

    async def read_once(self) -> int:
        """One read (blocking up to ``block_ms``); returns how many call entries came."""
        self._changed.clear()
        streams = self.streams()
        if not streams:
            await self._changed.wait()  # nothing to read until members change
            return 0
        if not self._ready:
            with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                await self.redis.xgroup_create(self.wake_key, GROUP, id="$", mkstream=True)
            await self.redis.pexpire(self.wake_key, WAKE_TTL_MS)
            self._ready = True
        names = [*streams, self.wake_key]
        args = ["XREADGROUP", "GROUP", GROUP, self.consumer, "COUNT", self.count]
        args += ["BLOCK", self.block_ms, "STREAMS", *names, *([">"] * len(names))]
        self.blocked = True
        try:
            if isinstance(self.redis, aioredis.Redis):
                resp: Any = await self._read_own(args)
            else:
                client: Any = self.redis
                resp = await client.execute_command(*args, **self._route())
        finally:
            self.blocked = False
        entries = 0
        for stream, got in resp or []:
            name = _s(stream)
            if name == self.wake_key:
                await self._acknowledge_wakes(got)
            else:
                entries += len(got)
                self.deliver(name, got)
        return entries

    async def _read_own(self, args: list[Any]) -> Any:
        """One Redis: the read on the group's own connection, parsed as redis-py
        would (no pool checkout per read: this runs once per batch of calls)."""
        if self._conn is None:
            pool: Any = self.redis.connection_pool  # make_connection is untyped
            self._conn = pool.make_connection()
        conn = self._conn
        try:
            await conn.send_packed_command(conn.pack_command(*args))
            raw = await conn.read_response()
        except ResponseError:
            raise  # a whole reply: the connection is fine
        except BaseException:
            await conn.disconnect(nowait=True)  # half read: the next read connects anew
            raise
        parse = self.redis.response_callbacks.get("XREADGROUP")
        return parse(raw) if parse is not None and raw is not None else raw

    async def _acknowledge_wakes(self, got: list[Any]) -> None:
        ids = [e[0] for e in got]
        if ids:
            await self.redis.xack(self.wake_key, GROUP, *ids)

    def _route(self) -> dict[str, Any]:
        """On a cluster, the node of the group's slot, named outright: a read's keys
        are otherwise looked up with COMMAND GETKEYS, a round trip per read."""
        node_of = getattr(self.redis, "get_node_from_key", None)
        return {"target_nodes": node_of(self.wake_key)} if node_of else {}

    def changed(self) -> None:
        """The members changed: end a blocked read (an idle group just looks again)."""
        self._changed.set()
        if self.blocked and not self._waking:
            self._waking = True
            asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xadd(self.wake_key, {"w": "1"}, maxlen=WAKE_MAXLEN)
            pipe.pexpire(self.wake_key, WAKE_TTL_MS)
            await pipe.execute()
        except (RedisError, OSError) as exc:  # the read ends by itself within block_ms
            log.debug("waking a read group failed: %s", exc)
        finally:
            self._waking = False

    async def forget(self) -> None:
        """The group has no members left: its wake stream and its connection go."""
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(self.wake_key)
        if self._conn is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._conn.disconnect()
            self._conn = None


#: Loop turns from entries delivered to their calls' frames written to the
#: sandboxes: the trajectory's task wakes in the next turn and queues its request,
#: the channel writes the turn's requests as one frame in the turn after.
TURNS_TO_START = 2


async def let_calls_start() -> None:
    """Let the calls just delivered leave for their sandboxes before the next read:
    its XREADGROUP would otherwise go out first, and on a busy host each send to a
    process that wakes costs about as much as the hop itself (bench/notes.md)."""
    for _ in range(TURNS_TO_START):
        await asyncio.sleep(0)


async def run_loop(
    group: ReadGroup,
    *,
    ready: Callable[[], Awaitable[None]],
    failed: Callable[[BaseException], Awaitable[None]],
) -> None:
    """Read forever: ``ready`` before each read (the lease, a catch-up), ``failed``
    after a Redis error (it waits and backs off). A deleted member stream
    (its trajectory ended under the read) just ends that read."""
    while True:
        try:
            await ready()
            if await group.read_once():
                await let_calls_start()
        except (RedisError, OSError) as exc:
            if isinstance(exc, ResponseError) and str(exc).startswith("UNBLOCKED"):
                continue
            if isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP"):
                group._ready = False  # a Redis that lost its data: the wake group again
            await failed(exc)
        except Exception:  # a bug here must not stop the worker serving
            log.exception("call reader error")
            await asyncio.sleep(1.0)
