"""Waiting for results: one blocking read over the events streams of many waits.

A worker appends ``{type: result, call_id, result?}`` to ``<ns>:{T}:events``
when it writes a call's result; small results ride inline. ``WaitSet`` is the
pure part: which streams to read from which cursors, and what an ``XREAD``
reply resolves. ``wait_op`` drives it for the sync client (one ``XREAD`` over
all the streams a caller waits on); ``EventHub`` drives it for the asyncio
client: one background reader serves every concurrent wait of the client. A
read may not span hash slots on Redis Cluster, so there the streams are read
in groups, one per slot. A wait that joins a blocked read ends it by adding
to the reader's *wake stream* (``Keys.wake``, in the group's slot), which the
read includes.

Streams are read from the submit's entry id onwards, so no event of the call
can be missed; and every ``LOOK_EVERY_MS`` the result hashes of what is still
awaited are looked at, in case an event was trimmed away.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import ClusterError, RedisError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from toolq.schemas import Keys, Result

from .ops import Cmd, Op, UnknownTrajectory, WaitTimeout, result_of, s

Call = tuple[str, str]  # (trajectory id, call id)
#: Longest single blocking read: then result hashes are looked at directly.
LOOK_EVERY_MS = 2000
MAX_U64 = 2**64 - 1
WAKE_TTL_MS = 3600 * 1000  # a gone client's wake streams expire


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
    cluster: bool = False
    cursors: dict[str, str] = field(default_factory=dict)  # trajectory -> events cursor
    pending: dict[Call, bool] = field(default_factory=dict)
    # When to look at the result hashes of what is still awaited (monotonic).
    look_at: float = field(default_factory=lambda: time.monotonic() + LOOK_EVERY_MS / 1000)

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

    def groups(self) -> list[dict[str, str]]:
        """The streams, in reads that never span a hash slot (one read off a cluster)."""
        if not self.cluster:
            return [self.streams()] if self.cursors else []
        by_slot: dict[int, dict[str, str]] = {}
        for traj_id, cursor in self.cursors.items():
            stream = self.keys.events(traj_id)
            by_slot.setdefault(key_slot(stream.encode()), {})[stream] = cursor
        return list(by_slot.values())

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


def look_cmds(keys: Keys, calls: list[Call]) -> tuple[list[Cmd], list[str]]:
    """The result hashes of ``calls`` and whether their trajectories' records still
    exist (commands, and the trajectories they ask about, in order)."""
    trajs = sorted({t for t, _ in calls})
    return fetch_cmds(keys, calls) + [Cmd("exists", (keys.traj(t),)) for t in trajs], trajs


def looked(
    calls: list[Call], trajs: list[str], replies: list[Any]
) -> tuple[dict[Call, Result], dict[Call, UnknownTrajectory]]:
    """What a look found: results, and calls that will never get one because
    their trajectory's record is gone (lost in a Redis crash, or expired)."""
    hashes, exists = replies[: len(calls)], replies[len(calls) :]
    gone = {t for t, there in zip(trajs, exists, strict=True) if not there}
    found: dict[Call, Result] = {}
    lost: dict[Call, UnknownTrajectory] = {}
    for call, fields in zip(calls, hashes, strict=True):
        result = result_of(fields)
        if result is not None:
            found[call] = result
        elif call[0] in gone:
            lost[call] = UnknownTrajectory(
                f"trajectory {call[0]} is gone (its record was lost, e.g. by a Redis crash "
                f"that lost its last writes, or expired): call {call[1]} will get no result"
            )
    return found, lost


def wait_op(waits: WaitSet, deadline: float) -> Op[dict[Call, Result]]:
    """Wait (blocking reads) until every call in ``waits`` has a result, or the
    deadline (monotonic) passes: raises WaitTimeout naming the first missing."""
    done: dict[Call, Result] = {}
    while waits.pending:
        done.update((yield from wait_some_op(waits, deadline)))
    return done


def wait_some_op(waits: WaitSet, deadline: float) -> Op[dict[Call, Result]]:
    """Wait until at least one call in ``waits`` has a result (or none is left);
    returns the results found, which leave ``waits``. Raises WaitTimeout after
    the deadline (monotonic).

    Reads spanning several hash slots (a cluster) are sent together without
    blocking, then the first one blocks briefly."""
    found: dict[Call, Result] = {}
    while waits.pending and not found:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            traj_id, call_id = next(iter(waits.pending))
            raise WaitTimeout(f"no result for call {call_id} of {traj_id} yet")
        groups = waits.groups()
        block_ms = max(1, min(left_ms, LOOK_EVERY_MS, 100 if len(groups) > 1 else LOOK_EVERY_MS))
        reads = [Cmd("xread", (g,), {"count": 1000}) for g in groups[1:]]
        reads.insert(0, Cmd("xread", (groups[0],), {"count": 1000, "block": block_ms}))
        replies = yield reads[::-1]  # the blocking read last: the others answer at once
        fetch: list[Call] = []
        for reply in replies:
            got, missing = waits.scan(reply)
            found.update(got)
            fetch += missing
        if time.monotonic() >= waits.look_at:  # an event may have been trimmed: look
            waits.look_at = time.monotonic() + LOOK_EVERY_MS / 1000
            calls = list(waits.pending)
            cmds, trajs = look_cmds(waits.keys, calls)
            got, lost = looked(calls, trajs, (yield cmds))
            if lost:
                raise next(iter(lost.values()))
            found.update(got)
            fetch = []
        if fetch:
            for call, fields in zip(fetch, (yield fetch_cmds(waits.keys, fetch)), strict=True):
                result = result_of(fields)
                if result is not None:
                    found[call] = result
        for call in found:
            waits.discard(call)
    return found


def xread_args(streams: dict[str, str], block_ms: int | None) -> list[Any]:
    """A raw XREAD of ``streams`` (COUNT 1000)."""
    head: list[Any] = ["XREAD", "COUNT", 1000]
    if block_ms is not None:
        head += ["BLOCK", block_ms]
    return [*head, "STREAMS", *streams, *streams.values()]


def xread_route(redis: Any, streams: dict[str, str]) -> dict[str, Any]:
    """On a cluster, the node of the streams' slot, named outright (else redis-py
    asks the server for the keys of every read, one more round trip)."""
    node_of = getattr(redis, "get_node_from_key", None)
    return {"target_nodes": node_of(next(iter(streams)))} if node_of else {}


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
            if seen is not None and _key(seen) > _key(cursor):
                cursor = seen
        loop = asyncio.get_running_loop()
        # A future per waiter, timed out by a timer of its own: the result wakes
        # the caller in one turn of the loop (wait_for and shield take three).
        waiter: asyncio.Future[Result] = loop.create_future()
        self._waiters.setdefault(call, []).append(waiter)
        timer = loop.call_later(timeout_s, _time_out, waiter, call)
        group = self._group_of(traj_id)
        group.waits.add(traj_id, call_id, cursor)
        group.joined()
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
            traj_id = _traj_of(s(stream))
            _remember(self._seen, traj_id, s(entries[-1][0]))
            for _entry_id, fields in entries:
                call = (traj_id, _field(fields, "call_id"))
                if _field(fields, "type") == "result" and call not in waits.pending:
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
        self.waits = WaitSet(hub.keys)
        self.wake_cursor = "$"
        self.blocked = False
        self._waking = False
        self._has_waits = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def joined(self) -> None:
        """A wait joined: start the reader, or end its blocked read to cover the wait."""
        self._has_waits.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._read_loop(), name="toolq-events")
        elif self.blocked and not self._waking:
            self._waking = True
            asyncio.get_running_loop().create_task(self._wake())

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
