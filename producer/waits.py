"""Waiting for results: one blocking read over the events streams of every wait.

A worker appends ``{type: result, call_id, result?}`` to ``<ns>:{T}:events``
when it writes a call's result; small results ride inline. ``WaitSet`` is the
pure part: which streams to read from which cursors, and what an ``XREAD``
reply resolves. ``wait_op`` drives it for the sync client (one ``XREAD`` over
all the streams a caller waits on); ``EventHub`` drives it for the asyncio
client: one background reader, on one connection, serves every concurrent
wait of the client, woken with ``CLIENT UNBLOCK`` when a wait joins.

Streams are read from the submit's entry id onwards, so no event of the call
can be missed; when a read times out (or an event was trimmed away) the
result hashes themselves are looked at.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from toolq.schemas import Keys, Result

from .ops import Cmd, Op, WaitTimeout, result_of, s

Call = tuple[str, str]  # (trajectory id, call id)
#: Longest single blocking read: then result hashes are looked at directly.
LOOK_EVERY_MS = 2000
MAX_U64 = 2**64 - 1


def cursor_before(entry_id: str) -> str:
    """An events cursor that sees every event written after entry ``entry_id``.

    Event ids of the same millisecond may sort before the entry's own, so the
    cursor is the end of the previous millisecond (a few older events may be
    read; they are ignored).
    """
    ms = int(entry_id.split("-", 1)[0] or 0)
    return f"{max(ms - 1, 0)}-{MAX_U64}"


def _field(fields: dict[Any, Any], name: str) -> str:
    return s(fields.get(name.encode(), fields.get(name, b"")))


def inline_result(raw: Any) -> Result | None:
    """The result carried by a result event, if it carries one this client can read."""
    if not raw:
        return None
    try:
        import json

        return Result.from_fields(json.loads(raw))
    except ValueError:  # not what this client understands: read the hash instead
        return None


@dataclass
class WaitSet:
    """Calls being waited for, the events cursor of each of their trajectories."""

    keys: Keys
    cursors: dict[str, str] = field(default_factory=dict)  # trajectory -> events cursor
    pending: dict[Call, bool] = field(default_factory=dict)

    def add(self, traj_id: str, call_id: str, cursor: str) -> None:
        self.pending[(traj_id, call_id)] = True
        known = self.cursors.get(traj_id)
        if known is None or _key(cursor) < _key(known):
            self.cursors[traj_id] = cursor

    def discard(self, call: Call) -> None:
        self.pending.pop(call, None)
        if not any(t == call[0] for t, _ in self.pending):
            self.cursors.pop(call[0], None)

    def streams(self) -> dict[str, str]:
        return {self.keys.events(t): c for t, c in self.cursors.items()}

    def scan(self, reply: Any) -> tuple[dict[Call, Result], list[Call]]:
        """What an XREAD reply resolves: results carried inline, and calls whose
        event came without one (their hash is read)."""
        found: dict[Call, Result] = {}
        fetch: list[Call] = []
        for stream, entries in reply or []:
            traj_id = _traj_of(s(stream))
            for entry_id, fields in entries:
                self.cursors[traj_id] = s(entry_id)
                call = (traj_id, _field(fields, "call_id"))
                if _field(fields, "type") != "result" or call not in self.pending:
                    continue
                result = inline_result(fields.get(b"result"))
                if result is not None:
                    found[call] = result
                else:
                    fetch.append(call)
        return found, fetch


def _traj_of(stream: str) -> str:
    return stream[stream.index("{") + 1 : stream.rindex("}")]


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms or 0), int(seq or 0)


def fetch_cmds(keys: Keys, calls: Iterable[Call]) -> list[Cmd]:
    return [Cmd("hgetall", (keys.result(t, c),)) for t, c in calls]


def wait_op(waits: WaitSet, deadline: float) -> Op[dict[Call, Result]]:
    """Wait (blocking reads) until every call in ``waits`` has a result, or the
    deadline (monotonic) passes: raises WaitTimeout naming the first missing."""
    done: dict[Call, Result] = {}
    while waits.pending:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            traj_id, call_id = next(iter(waits.pending))
            raise WaitTimeout(f"no result for call {call_id} of {traj_id} yet")
        block_ms = min(left_ms, LOOK_EVERY_MS)
        reply = (yield [Cmd("xread", (waits.streams(),), {"count": 1000, "block": block_ms})])[0]
        found, fetch = waits.scan(reply)
        if not reply:  # quiet for a while: look at the hashes themselves
            fetch = list(waits.pending)
        if fetch:
            for call, fields in zip(fetch, (yield fetch_cmds(waits.keys, fetch)), strict=True):
                result = result_of(fields)
                if result is not None:
                    found[call] = result
        for call, result in found.items():
            done[call] = result
            waits.discard(call)
    return done


class EventHub:
    """Every wait of one asyncio client, served by one reader on one connection."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.waits = WaitSet(keys)
        self._futures: dict[Call, asyncio.Future[Result]] = {}
        self._waiters: dict[Call, int] = {}
        self._reader: asyncio.Task[None] | None = None
        self._conn: aioredis.Redis | None = None
        self._conn_id: int | None = None
        self._blocked = False
        self._unblocking = False
        self._woken = False  # the blocked read was ended by us, not by its timeout
        self._has_waits = asyncio.Event()

    async def wait(self, traj_id: str, call_id: str, cursor: str, timeout_s: float) -> Result:
        """The call's result, once its event (or its hash) shows it."""
        call = (traj_id, call_id)
        if call not in self._futures:
            self._futures[call] = asyncio.get_running_loop().create_future()
        self._waiters[call] = self._waiters.get(call, 0) + 1
        self.waits.add(traj_id, call_id, cursor)
        self._wake()
        try:
            return await asyncio.wait_for(asyncio.shield(self._futures[call]), timeout_s)
        except asyncio.TimeoutError:
            raise WaitTimeout(f"no result for call {call_id} of {traj_id} yet") from None
        finally:
            self._waiters[call] -= 1
            if not self._waiters[call]:
                del self._waiters[call]
                self._futures.pop(call, None)
                self.waits.discard(call)

    def _wake(self) -> None:
        """Start the reader, or restart its blocked read so that it covers the new wait."""
        self._has_waits.set()
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_loop(), name="toolq-events")
        elif self._blocked and self._conn_id is not None and not self._unblocking:
            self._unblocking = self._woken = True
            asyncio.get_running_loop().create_task(self._unblock(self._conn_id))

    async def _unblock(self, conn_id: int) -> None:
        try:
            await self.redis.client_unblock(conn_id)
        except (RedisError, OSError):
            pass  # the read ends by itself within LOOK_EVERY_MS
        finally:
            self._unblocking = False

    async def _read_loop(self) -> None:
        """Read while anything is waited for; sleep (holding its connection) otherwise."""
        self._conn = self.redis.client()
        errors = 0
        try:
            while True:
                if not self.waits.pending:
                    self._has_waits.clear()
                    await self._has_waits.wait()
                    continue
                try:
                    await self._read_once()
                    errors = 0
                except (RedisConnectionError, RedisTimeoutError, OSError):
                    self._conn_id = None  # it reconnects with another id
                    await asyncio.sleep(min(0.05 * 2**errors, 2.0))
                    errors += 1
        finally:
            with contextlib.suppress(Exception):
                await self._conn.aclose()

    async def _read_once(self) -> None:
        assert self._conn is not None
        if self._conn_id is None:
            self._conn_id = int(await self._conn.client_id())
        self._blocked = True
        try:
            streams: Any = self.waits.streams()
            reply = await self._conn.xread(streams, count=1000, block=LOOK_EVERY_MS)
        finally:
            self._blocked = False
        found, fetch = self.waits.scan(reply)
        woken, self._woken = self._woken, False
        if not reply and not woken:  # quiet for a while: look at the hashes themselves
            fetch = list(self.waits.pending)
        if fetch:
            pipe = self.redis.pipeline(transaction=False)
            for cmd in fetch_cmds(self.keys, fetch):
                getattr(pipe, cmd.name)(*cmd.args)
            for call, fields in zip(fetch, await pipe.execute(), strict=True):
                result = result_of(fields)
                if result is not None:
                    found[call] = result
        for call, result in found.items():
            fut = self._futures.get(call)
            if fut is not None and not fut.done():
                fut.set_result(result)
            self.waits.discard(call)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
