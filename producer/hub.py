"""The asyncio client's waits: one background reader serves every concurrent wait.

``EventHub`` keeps a reader per hash-slot group of events streams (one group
off a cluster), blocked in ``XREAD`` on its own connection; a wait that joins
a blocked read ends it through the reader's *wake stream* (``Keys.wake``).
What to read and what a reply resolves is ``waits.WaitSet``'s pure logic,
shared with the sync client.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from typing import Any

import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import ClusterError, RedisError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from toolq.schemas import Keys, Result

from .ops import UnknownTrajectory, WaitTimeout, result_of, s
from .waits import (
    LINGER_S,
    LOOK_EVERY_MS,
    WAKE_TTL_MS,
    Call,
    WaitSet,
    entry_key,
    event_field,
    fetch_cmds,
    inline_result,
    look_cmds,
    looked,
    traj_of_stream,
    xread_args,
    xread_route,
)


async def xread(redis: Any, streams: dict[str, str], block_ms: int | None) -> Any:
    """XREAD, routed by ``xread_route``."""
    args = xread_args(streams, block_ms)
    return await redis.execute_command(*args, **xread_route(redis, streams))


class EventHub:
    """Every wait of one asyncio client: a reader per hash-slot group of streams
    (one group off a cluster), woken through its wake stream when a wait joins."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, cluster: bool = False, mux: Any = None
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.cluster = cluster
        self.mux = mux  # the client's MuxConnection on one Redis: wakes go through it
        self.reader_id = uuid.uuid4().hex[:12]
        self._waiters: dict[Call, list[asyncio.Future[Result]]] = {}
        self._groups: dict[int, _HubGroup] = {}
        # Per trajectory, the last event read: a new call's events come after it.
        self._seen: OrderedDict[str, str] = OrderedDict()
        # Results whose event was read before their wait joined (None: in the hash).
        self._early: OrderedDict[Call, Result | None] = OrderedDict()
        #: Blocked reads this hub ended to cover a new wait (a command and a read each).
        self.wakes = 0

    async def wait(self, traj_id: str, call_id: str, cursor: str, timeout_s: float) -> Result:
        """The call's result, once its event (or its hash) shows it.

        The read starts after the last event this hub read of the trajectory
        when that is later than ``cursor`` (an entry's millisecond holds the
        previous call's result event as often as not: reading it again was a
        wasted round trip). Results read before their wait joined are kept
        (``_early``), so that start skips nothing."""
        call = (traj_id, call_id)
        if call in self._early:
            early = self._early.pop(call)
            if early is not None:
                return early
        else:
            seen = self._seen.get(traj_id)
            if seen is not None and entry_key(seen) > entry_key(cursor):
                cursor = seen
        loop = asyncio.get_running_loop()
        # A future per waiter, timed out by a timer of its own: the result wakes
        # the caller in one turn of the loop (wait_for and shield take three).
        waiter: asyncio.Future[Result] = loop.create_future()
        self._waiters.setdefault(call, []).append(waiter)
        timer = loop.call_later(timeout_s, _time_out, waiter, call)
        group = self._group_of(traj_id)
        group.waits.add(traj_id, call_id, cursor)
        group.joined(traj_id, cursor)
        try:
            return await waiter
        finally:
            timer.cancel()
            left = self._waiters.get(call, [])
            if waiter in left:
                left.remove(waiter)
            if not left:
                self._waiters.pop(call, None)
                group.waits.discard(call)

    def _group_of(self, traj_id: str) -> _HubGroup:
        slot = key_slot(self.keys.events(traj_id).encode()) if self.cluster else 0
        if slot not in self._groups:
            tag = traj_id if self.cluster else ""
            self._groups[slot] = _HubGroup(self, self.keys.wake(self.reader_id, tag))
        return self._groups[slot]

    def resolve(self, found: dict[Call, Result]) -> None:
        for call, result in found.items():
            for waiter in self._waiters.get(call, ()):
                if not waiter.done():
                    waiter.set_result(result)

    def read(self, events: list[Any], waits: WaitSet) -> None:
        """Note what a read saw: each stream's last event, and results nobody waits for yet."""
        for stream, entries in events:
            if not entries:
                continue
            traj_id = traj_of_stream(s(stream))
            _remember(self._seen, traj_id, s(entries[-1][0]))
            for _entry_id, fields in entries:
                call = (traj_id, event_field(fields, "call_id"))
                if event_field(fields, "type") == "result" and call not in waits.pending:
                    _remember(self._early, call, inline_result(fields.get(b"result")))

    def fail(self, lost: dict[Call, UnknownTrajectory]) -> None:
        for call, exc in lost.items():
            for waiter in self._waiters.get(call, ()):
                if not waiter.done():
                    waiter.set_exception(exc)

    async def close(self) -> None:
        for group in self._groups.values():
            await group.close()


#: Entries kept in EventHub's per-trajectory memory (least recently used go first).
HUB_MEMORY = 4096


def _remember(memory: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > HUB_MEMORY:
        memory.popitem(last=False)


def _time_out(waiter: asyncio.Future[Result], call: Call) -> None:
    if not waiter.done():
        waiter.set_exception(WaitTimeout(f"no result for call {call[1]} of {call[0]} yet"))


class _HubGroup:
    """One blocking XREAD over the events streams of one slot, plus its wake stream."""

    def __init__(self, hub: EventHub, wake_key: str) -> None:
        self.hub = hub
        self.redis = hub.redis
        # On one Redis the group's blocking read has a connection of its own
        # (no pool checkout per read); a cluster client routes each read.
        pool = None if hub.cluster else getattr(hub.redis, "connection_pool", None)
        self._conn: Any = pool.make_connection() if pool is not None else None
        self.wake_key = wake_key
        self.waits = WaitSet(hub.keys, linger_s=LINGER_S)
        self.wake_cursor = "$"
        self.blocked = False
        self._reading: dict[str, str] = {}  # trajectory -> cursor, of the blocked read
        self._waking = False
        self._has_waits = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def joined(self, traj_id: str, cursor: str) -> None:
        """A wait joined: start the reader, or end its blocked read to cover the wait,
        unless that read covers it already: it reads the wait's trajectory from a
        cursor no later than the wait's (an agent loop's next call). A wait from an
        earlier cursor (its event was read before it joined, without its result)
        needs a read from there."""
        self._has_waits.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._read_loop(), name="toolq-events")
        elif self.blocked and not self._waking and not self._covers(traj_id, cursor):
            self._waking = True
            self.hub.wakes += 1
            asyncio.get_running_loop().create_task(self._wake())

    def _covers(self, traj_id: str, cursor: str) -> bool:
        reading = self._reading.get(traj_id)
        return reading is not None and entry_key(reading) <= entry_key(cursor)

    async def _wake(self) -> None:
        try:
            if self.hub.mux is not None:  # one Redis: behind the submits, no pool checkout
                await self.hub.mux.execute(
                    [
                        ("XADD", self.wake_key, "MAXLEN", 16, "*", "w", "1"),
                        ("PEXPIRE", self.wake_key, WAKE_TTL_MS),
                    ]
                )
            else:
                pipe = self.redis.pipeline(transaction=False)
                pipe.xadd(self.wake_key, {"w": "1"}, maxlen=16)
                pipe.pexpire(self.wake_key, WAKE_TTL_MS)
                await pipe.execute()
        except (RedisError, OSError):
            pass  # the read ends by itself within LOOK_EVERY_MS
        finally:
            self._waking = False

    async def _read_loop(self) -> None:
        errors = 0
        look_at = time.monotonic() + LOOK_EVERY_MS / 1000
        while True:
            if not self.waits.pending:
                self._has_waits.clear()
                await self._has_waits.wait()
                continue
            try:
                if self.wake_cursor == "$":  # the wake stream's end, before the first read
                    last: Any = await self.redis.xrevrange(self.wake_key, count=1)
                    self.wake_cursor = s(last[0][0]) if last else "0-0"
                look_at = await self._read_once(look_at)
                errors = 0
            except (RedisConnectionError, RedisTimeoutError, ClusterError, TryAgainError, OSError):
                await asyncio.sleep(min(0.05 * 2**errors, 2.0))
                errors += 1

    async def _read_once(self, look_at: float) -> float:
        streams = {**self.waits.streams(), self.wake_key: self.wake_cursor}
        self._reading = dict(self.waits.cursors)  # what streams() just read from
        self.blocked = True
        try:
            if self._conn is not None:
                reply: Any = await self._xread_own(streams)
            else:
                reply = await xread(self.redis, streams, LOOK_EVERY_MS)
        finally:
            self.blocked = False
        events = [(st, es) for st, es in reply or [] if s(st) != self.wake_key]
        for st, es in reply or []:
            if s(st) == self.wake_key and es:
                self.wake_cursor = s(es[-1][0])
        self.hub.read(events, self.waits)
        found, fetch = self.waits.scan(events)
        if time.monotonic() >= look_at:  # an event may have been trimmed: look at the hashes
            look_at = time.monotonic() + LOOK_EVERY_MS / 1000
            calls = list(self.waits.pending)
            cmds, trajs = look_cmds(self.hub.keys, calls)
            pipe = self.redis.pipeline(transaction=False)
            for cmd in cmds:
                getattr(pipe, cmd.name)(*cmd.args)
            got, lost = looked(calls, trajs, await pipe.execute())
            found.update(got)
            self.hub.fail(lost)
            for call in lost:
                self.waits.discard(call)
            fetch = []
        if fetch:
            pipe = self.redis.pipeline(transaction=False)
            for cmd in fetch_cmds(self.hub.keys, fetch):
                getattr(pipe, cmd.name)(*cmd.args)
            for call, fields in zip(fetch, await pipe.execute(), strict=True):
                result = result_of(fields)
                if result is not None:
                    found[call] = result
        self.hub.resolve(found)
        for call in found:
            self.waits.discard(call)
        return look_at

    async def _xread_own(self, streams: dict[str, str]) -> Any:
        """The blocking XREAD on the group's own connection, parsed as redis-py would."""
        conn = self._conn
        try:
            await conn.send_packed_command(conn.pack_command(*xread_args(streams, LOOK_EVERY_MS)))
            raw = await conn.read_response()
        except ResponseError:
            raise  # a whole reply: the connection is fine
        except BaseException:
            await conn.disconnect(nowait=True)  # half read: the next read connects anew
            raise
        parse = self.redis.response_callbacks.get("XREAD")
        return parse(raw) if parse is not None and raw is not None else raw

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._conn is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._conn.disconnect()
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(self.wake_key)
