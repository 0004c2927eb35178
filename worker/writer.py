"""The writer: the one path by which a worker writes for a trajectory.

Results, events, acknowledgements, ends, hand-backs, slot records and
background-task state are all *ops*: a fenced Lua script (``toolq.schemas.lua``)
with its keys and arguments. The writer flushes every op that is ready in one
pipelined round trip, in the order they were sent, so a trajectory's results
reach Redis before its end. It retries through Redis outages (nothing is
dropped), replays the last seconds of writes after one (a Redis restarted from
an AOF may have lost them; every op is idempotent), and reports an op that
Redis fenced off to ``on_fenced``: another worker owns that trajectory now.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import (
    BusyLoadingError,
    ClusterError,
    MasterDownError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from toolq.schemas import GROUP, ErrorCode, Keys, Result, lua, stream_call_id

from .lanes import LaneOp, Lanes
from .lease import CatchUp, RedisHealth, retrying
from .settings import WorkerSettings
from .state import Item, Traj, now_ms

log = logging.getLogger("toolq.worker.writer")

# After Redis errors, writes of this many recent seconds are replayed...
REPLAY_WINDOW_S = 10.0
# ...at most this many bytes of their arguments (the oldest go first): a flood of
# large results must not hold the worker's memory (a Redis that lost more than
# this had lost more than its last second of writes anyway).
REPLAY_MAX_BYTES = 64 * 1024 * 1024
# Results up to this size (as UTF-8 JSON) are copied into their result event, so
# that a waiting client needs no HGETALL; larger ones are only in the result hash.
# An output larger than this is staged beside the script, not given to it (see
# lua.FINISH: a script's arguments cost Redis ~1.3 ms a MiB).
INLINE_RESULT_MAX_BYTES = 4096
# How long a staged output outlives a FINISH that never ran (the worker died
# between the two commands of one pipeline): long enough for a replay after a
# Redis outage (REPLAY_WINDOW_S) to find it.
STAGED_OUTPUT_TTL_MS = 600_000
# Entries END answers per run (it runs again until the stream is empty).
END_BATCH = 500


@dataclass(frozen=True)
class LuaScript:
    """A script and its SHA1, for EVALSHA in pipelines (loaded on NOSCRIPT)."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


FINISH = LuaScript(lua.FINISH)
ACK = LuaScript(lua.ACK)
END = LuaScript(lua.END)
RELEASE = LuaScript(lua.RELEASE)
SET_FIELDS = LuaScript(lua.SET_FIELDS)
BG_WRITE = LuaScript(lua.BG_WRITE)
BG_LOST = LuaScript(lua.BG_LOST)
CLAIM = LuaScript(lua.CLAIM)
DECLARE_DEAD = LuaScript(lua.DECLARE_DEAD)
FORGET_DEAD = LuaScript(lua.FORGET_DEAD)


async def run_script(
    redis: aioredis.Redis, script: LuaScript, keys: list[str], args: list[Any]
) -> Any:
    """One script call outside the writer's batches: EVALSHA, the source if needed."""
    client: Any = redis  # a Redis or a RedisCluster
    try:
        return await client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
    except NoScriptError:
        return await client.execute_command("EVAL", script.source, len(keys), *keys, *args)


@dataclass
class Op:
    """One fenced write: ``script`` with ``keys`` and ``args``, for trajectory ``traj_id``."""

    script: LuaScript
    keys: list[str]
    args: list[Any]
    traj_id: str
    done: Callable[[Any], None] | None = None  # called with the reply, once written
    fallback: Callable[[Exception], Op] | None = None  # what to write if Redis refuses it
    ours: bool = True  # False: written for another owner (a dead worker's hand-back)
    # Plain commands sent just before the script, in the same batch (a large output
    # staged for FINISH); an error reply of one is the op's reply.
    before: tuple[tuple[Any, ...], ...] = ()
    replayed: bool = False  # a journal copy sent again after Redis errors: no callbacks
    future: asyncio.Future[Any] | None = field(default=None, repr=False)


class Writer:
    """Flushes ops in batches; see the module docstring."""

    def __init__(
        self,
        settings: WorkerSettings,
        redis: aioredis.Redis,
        health: RedisHealth,
        on_fenced: Callable[[str], Awaitable[None] | None],
        on_result: Callable[[Result], None],
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.namespace)
        self.worker_id = settings.worker_id
        self.health = health
        self.on_fenced = on_fenced
        self.on_result = on_result
        self._queue: asyncio.Queue[Op | None] = asyncio.Queue()  # None: a lane finished
        self._journal: deque[tuple[float, Op, int]] = deque()  # (when, op, its bytes)
        self._journal_bytes = 0
        self._catch_up = CatchUp(health, initially=False)
        self._conn: Any = None  # on one Redis, the connection _send writes on
        self._cluster = not isinstance(redis, aioredis.Redis)
        self._lanes = Lanes(self._lane_of)  # on a cluster (see worker/lanes.py)
        self._lane_tasks: set[asyncio.Task[None]] = set()
        self._replays_out = 0  # replayed copies not yet written (see _run_lanes)

    # ------------------------------------------------------------ sending
    def send(self, op: Op) -> asyncio.Future[Any]:
        """Queue an op; the future resolves with Redis's reply once it is written."""
        op.future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(op)
        return op.future

    async def write(self, op: Op) -> Any:
        """Queue an op and wait until it is written; returns the reply."""
        return await self.send(op)

    async def drain(self, timeout_s: float) -> None:
        """Wait until everything sent so far is written (or ``timeout_s`` passed)."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("%d writes still queued at shutdown", self._queue.qsize())

    # -------------------------------------------------------------- ops
    def finish(self, traj: Traj, item: Item, result: Result) -> None:
        """Write a call's one result and release its entry (see ``lua.FINISH``).

        A result Redis refuses (too large, say) is replaced by an
        ``internal_error`` one: the call still gets exactly one result.
        """
        written = result

        def done(reply: Any) -> None:
            traj.result_written()
            if reply in (0, 1):  # the fenced write went through: we still own it
                traj.confirmed_at = time.monotonic()
            if reply == 1:
                self.on_result(written)

        def fallback(exc: Exception) -> Op:
            nonlocal written
            written = internal_error(result, str(exc))
            return self._finish_op(traj, item, written)

        traj.result_queued()
        op = self._finish_op(traj, item, result)
        op.done, op.fallback = done, fallback
        self.send(op)

    def _finish_op(self, traj: Traj, item: Item, result: Result) -> Op:
        # Bytes, not str: a lone surrogate in a tool's output must not fail the write.
        # A small result also goes as one JSON object, for its event (the client
        # needs no HGETALL); the script stores the fields as given (no JSON decode).
        compact = result.compact_fields()
        fields = {k: v.encode("utf-8", "replace") for k, v in compact.items()}
        t = traj.traj_id
        keys = [
            self.keys.traj(t),
            self.keys.result(t, result.call_id),
            self.keys.events(t),
            self.keys.calls(t),
        ]
        before: tuple[tuple[Any, ...], ...] = ()
        blob = b""
        if len(result.output) > INLINE_RESULT_MAX_BYTES:  # staged: see lua.FINISH
            staged = self.keys.staged_output(t, result.call_id, self.worker_id)
            keys.append(staged)
            before = (
                ("HSET", staged, "output", fields.pop("output")),
                ("PEXPIRE", staged, STAGED_OUTPUT_TTL_MS),
            )
        else:
            as_json = json.dumps(compact, separators=(",", ":"), ensure_ascii=False)
            blob = as_json.encode("utf-8", "replace")
            if len(blob) > INLINE_RESULT_MAX_BYTES:
                blob = b""
        args = [
            self.worker_id,
            traj.epoch,
            GROUP,
            item.entry_id,
            self.settings.result_ttl_s * 1000,
            self.settings.events_maxlen,
            "1" if result.ok else "0",
            result.error_code or "",
            result.call_id,
            result.finished_ms,
            "1" if result.infra else "0",
            blob,
            *(x for kv in fields.items() for x in kv),
        ]
        return Op(FINISH, keys, args, t, before=before)

    def ack(self, traj: Traj, entry_id: str) -> None:
        """Release an entry that gets no result (a control entry)."""
        t = traj.traj_id
        keys = [self.keys.traj(t), self.keys.calls(t)]
        self.send(Op(ACK, keys, [self.worker_id, traj.epoch, GROUP, entry_id], t))

    async def end(self, traj_id: str, epoch: str, status: str, reason: str, code: str = "") -> int:
        """Record the final state and answer what is left in the stream (with ``code``;
        '': ``trajectory_ended``).

        ``epoch`` '' ends a trajectory nobody owns (its open request was
        invalid). Returns the END reply of the last run: 0, or FENCED.
        """
        t = traj_id
        # The children key only gets the record's expiry (see lua.END).
        keys = [self.keys.traj(t), self.keys.events(t), self.keys.calls(t), self.keys.children(t)]
        args = [
            self.worker_id,
            epoch,
            status,
            now_ms(),
            reason,
            self.settings.retention_s * 1000,
            self.settings.events_maxlen,
            self.keys.result(t, ""),
            self.settings.result_ttl_s * 1000,
            END_BATCH,
            self.settings.events_after_end,
            code,
        ]
        stuck = 0
        while True:
            results = await self._result_keys(t, END_BATCH)
            left = int(await self.write(Op(END, [*keys, *results], args, t, ours=bool(epoch))))
            if left <= 0:
                return left
            stuck = stuck + 1 if not results else 0
            if stuck >= 3:  # nothing to declare, yet entries left: a bug, not a loop forever
                log.error("END of %s: %d entries left that it does not answer", t, left)
                return left

    async def _result_keys(self, traj_id: str, count: int) -> list[str]:
        """The result keys of the first ``count`` calls in the trajectory's stream
        (the keys END declares: see ``lua.END``)."""
        client: Any = self.redis
        entries = await retrying(
            self.health, lambda: client.xrange(self.keys.calls(traj_id), count=count), "xrange"
        )
        ids = (stream_call_id(fields, entry_id) for entry_id, fields in entries)
        return [self.keys.result(traj_id, c) for c in dict.fromkeys(ids) if c]

    async def release(self, traj_id: str, owner: str, epoch: str) -> int:
        """Hand ``owner``'s trajectory back to the pool (ours, or a dead worker's);
        1 when it did, 0 when it had ended, FENCED when ``owner`` had lost it."""
        args = [owner, epoch, now_ms()]
        op = Op(RELEASE, [self.keys.traj(traj_id)], args, traj_id, ours=owner == self.worker_id)
        return int(await self.write(op))

    def set_fields(self, traj: Traj, **values: str) -> asyncio.Future[Any]:
        """Record fields of an owned trajectory (where it runs)."""
        flat = [x for kv in values.items() for x in kv]
        t = traj.traj_id
        return self.send(
            Op(SET_FIELDS, [self.keys.traj(t)], [self.worker_id, traj.epoch, *flat], t)
        )

    def bg_write(
        self,
        traj_id: str,
        epoch: str,
        task_id: str,
        started_ms: int,
        status: str,
        fields: dict[str, str],
    ) -> asyncio.Future[Any]:
        """Record one background task's state (never over a final one)."""
        t = traj_id
        keys = [
            self.keys.traj(t),
            self.keys.bg(t, task_id),
            self.keys.bg_index(t),
            self.keys.events(t),
        ]
        args = [
            self.worker_id,
            epoch,
            self.settings.retention_s * 1000,
            self.settings.events_maxlen,
            task_id,
            started_ms,
            status,
            *(x for kv in fields.items() for x in kv),
        ]
        return self.send(Op(BG_WRITE, keys, args, t))

    def bg_lost(self, traj_id: str, epoch: str, tasks: set[str]) -> asyncio.Future[Any]:
        """Mark those of ``tasks`` still running lost (their agent is gone); only
        declared task hashes are touched (see ``lua.BG_LOST``)."""
        t = traj_id
        keys = [self.keys.traj(t), self.keys.bg_index(t), self.keys.events(t)]
        keys += [self.keys.bg(t, task) for task in sorted(tasks)]
        args = [self.worker_id, epoch, self.settings.events_maxlen, now_ms(), self.keys.bg(t, "")]
        return self.send(Op(BG_LOST, keys, args, t))

    async def bg_tasks(self, traj_id: str) -> set[str]:
        """The ids in the trajectory's background-task index."""
        client: Any = self.redis
        index = self.keys.bg_index(traj_id)
        ids = await retrying(self.health, lambda: client.zrange(index, 0, -1), "zrange")
        return {x.decode() if isinstance(x, bytes) else str(x) for x in ids}

    # -------------------------------------------------------------- loop
    async def run(self) -> None:
        """Flush whatever is queued, forever (a bad op never stops later ones)."""
        if self._cluster:
            await self._run_lanes()
            return
        while True:
            batch: list[Any] = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                replies = await self._flush_with_retry(batch)
            except Exception as exc:  # a bug, or an error Redis gives the whole batch
                log.exception("writing %d ops failed", len(batch))
                replies = [exc] * len(batch)
            self._remember(batch)
            for op, reply in zip(batch, replies, strict=True):
                try:
                    await self._settle(op, reply)
                except Exception:
                    log.exception("settling a write for %s failed", op.traj_id)
                self._queue.task_done()

    async def _run_lanes(self) -> None:
        """On a cluster: each node's ops flush as its own lane (see worker/lanes.py)."""
        try:
            while True:
                for op in [await self._queue.get(), *self._queue_now()]:
                    if op is None:  # a lane finished: what waited for it may go now
                        self._queue.task_done()
                    else:
                        self._lanes.add(op)
                # First, the journal again (see _replay): one replay at a time (errors
                # come many a second while a node is down; its copies wait in its lane).
                if self._catch_up.due() and not self._replays_out:
                    generation = self.health.generation
                    replay = self._lane_replay_ops()
                    self._replays_out = len(replay)
                    self._lanes.add_first(replay)
                    self._catch_up.done(generation)
                for lane, ops in self._lanes.take().items():
                    task = asyncio.create_task(self._write_lane(lane, ops))  # type: ignore[arg-type]
                    self._lane_tasks.add(task)
                    task.add_done_callback(self._lane_tasks.discard)
        finally:
            for task in list(self._lane_tasks):
                task.cancel()

    def _queue_now(self) -> list[Op | None]:
        got = []
        while not self._queue.empty():
            got.append(self._queue.get_nowait())
        return got

    async def _write_lane(self, lane: str, ops: list[Op]) -> None:
        try:
            try:
                replies = await self._flush_with_retry(ops, replay=False)
            except Exception as exc:  # a bug, or an error Redis gives the whole batch
                log.exception("writing %d ops failed", len(ops))
                replies = [exc] * len(ops)
            self._remember([op for op in ops if not op.replayed])
            for op, reply in zip(ops, replies, strict=True):
                if op.replayed:
                    self._replays_out -= 1
                    continue
                try:
                    await self._settle(op, reply)
                except Exception:
                    log.exception("settling a write for %s failed", op.traj_id)
                self._queue.task_done()
        finally:
            self._lanes.done(lane, ops)
            self._queue.put_nowait(None)

    def _lane_of(self, op: LaneOp) -> str:
        """The node that serves an op's keys (all in its trajectory's hash slot)."""
        assert isinstance(op, Op)
        try:
            slot = key_slot(op.keys[0].encode())
            return str(self.redis.nodes_manager.get_node_from_slot(slot).name)  # type: ignore[attr-defined]
        except Exception:  # no map yet (the cluster is reconfiguring): one lane for those
            return ""

    async def _flush_with_retry(self, batch: list[Op], replay: bool = True) -> list[Any]:
        """Flush, retrying through Redis outages; after one, replay recent writes first.

        An outage shows as an exception (a connection lost) or, on a cluster,
        as the reply of some ops (CLUSTERDOWN, TRYAGAIN while a master
        restarts): those ops are sent again until Redis takes them. Nothing is
        dropped: a result lost here could let a resubmitted call run twice.
        """
        delay_s = 0.05
        replies: list[Any] = [None] * len(batch)
        todo = list(range(len(batch)))
        while True:
            failure: Any
            try:
                if replay and self._catch_up.due():
                    await self._replay()
                got = await self._flush([batch[i] for i in todo])
            except (RedisError, OSError) as exc:
                if not _is_outage(exc):
                    raise
                failure = exc  # every op of the batch goes again (they are idempotent)
            else:
                for i, reply in zip(todo, got, strict=True):
                    replies[i] = reply
                todo = [i for i in todo if _is_outage(replies[i])]
                if not todo:
                    return replies
                failure = replies[todo[0]]
            self.health.failed()
            log.warning("redis write failed (%s); retrying in %.2fs", failure, delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 5.0)

    async def _flush(self, batch: list[Op]) -> list[Any]:
        """One pipelined round trip; a reply is Redis's answer or the op's own error."""
        replies = await self._pipeline(batch)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:  # a restarted Redis forgot the scripts: send their source (rerun is safe)
            again = await self._pipeline([batch[i] for i in missing], source=True)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(self, ops: list[Op], source: bool = False) -> list[Any]:
        # EVAL with the source caches the script on the node that ran it (on a
        # cluster, the one that holds the keys); EVALSHA as a plain command,
        # which a cluster pipeline routes by its keys.
        commands: list[tuple[Any, ...]] = []
        for op in ops:
            commands += op.before
            script = ("EVAL", op.script.source) if source else ("EVALSHA", op.script.sha)
            commands.append((*script, len(op.keys), *op.keys, *op.args))
        if isinstance(self.redis, aioredis.Redis):
            replies = await self._send(commands)
        else:
            pipe = self.redis.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            replies = list(await pipe.execute(raise_on_error=False))
        return _op_replies(ops, replies)

    async def _send(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """One Redis: the batch on the writer's own connection, one send and its replies.

        The same round trip as a pipeline without its per-batch layers (pool
        checkout, retry wrapper, response callbacks): the writer is the hot
        path, run once per batch of results. An error reply is that op's
        reply; a broken connection is closed and raised (the caller retries).
        """
        if self._conn is None:
            pool: Any = self.redis.connection_pool  # make_connection is untyped
            self._conn = pool.make_connection()
        conn = self._conn
        try:
            await conn.send_packed_command(conn.pack_commands(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            await conn.disconnect()  # replies may be half read: start clean
            raise

    async def aclose(self) -> None:
        """Close the writer's own connection (the client's pool is the caller's)."""
        if self._conn is not None:
            await self._conn.disconnect()
            self._conn = None

    async def _settle(self, op: Op, reply: Any) -> None:
        if isinstance(reply, Exception) and op.fallback is not None:
            log.error("write for %s failed (%s): writing its fallback", op.traj_id, reply)
            retry = op.fallback(reply)
            # (on a cluster the replay goes through the lanes, not from inside one)
            reply = (await self._flush_with_retry([retry], replay=not self._cluster))[0]
            op = retry if op.done is None else op
        if isinstance(reply, Exception):
            log.error("write for %s failed: %s", op.traj_id, reply)
        elif reply == lua.FENCED and op.ours:
            log.warning("trajectory %s belongs to another worker now: dropping it", op.traj_id)
            maybe = self.on_fenced(op.traj_id)
            if maybe is not None:
                await maybe
        if op.done is not None:
            op.done(reply)
        if op.future is not None and not op.future.done():
            op.future.set_result(reply)

    # ------------------------------------------------------------ replay
    def _remember(self, batch: list[Op]) -> None:
        now = time.monotonic()
        for op in batch:
            # The op alone: its callbacks hold the call's item and result, which
            # must not live on for the replay's sake.
            kept = replace(op, done=None, fallback=None, future=None)
            args = [*op.args, *(a for command in op.before for a in command)]
            size = sum(len(a) for a in args if isinstance(a, (bytes, str)))
            self._journal.append((now, kept, size))
            self._journal_bytes += size
        self.trim_journal(now)

    def trim_journal(self, now: float | None = None) -> int:
        """Forget writes past the replay window (or its byte cap); returns the bytes
        of their arguments freed. Runs on every batch, and on the heartbeat: an
        idle writer must not hold the last flood's writes."""
        now = time.monotonic() if now is None else now
        journal, before = self._journal, self._journal_bytes
        while journal and (
            journal[0][0] < now - REPLAY_WINDOW_S or self._journal_bytes > REPLAY_MAX_BYTES
        ):
            self._journal_bytes -= journal.popleft()[2]
        return before - self._journal_bytes

    def _lane_replay_ops(self) -> list[Op]:
        """The replay on a cluster. A trajectory with an op in flight or waiting has
        newer writes than the journal holds, and the copies would land after them:
        its fields and task states (the writes a later one supersedes) are left out."""
        busy = set(self._lanes.in_flight) | {op.traj_id for op in self._lanes.pending}
        return [
            op
            for op in self._replay_ops()
            if op.traj_id not in busy or op.script not in (SET_FIELDS, BG_WRITE)
        ]

    def _replay_ops(self) -> list[Op]:
        """Copies of the last seconds' ops, to write again (see ``_replay``)."""
        since = time.monotonic() - REPLAY_WINDOW_S
        return [
            replace(op, replayed=True, done=None, fallback=None, future=None)
            for at, op, _size in self._journal
            if at >= since
        ]

    async def _replay(self) -> None:
        """Write the last seconds' ops again: a restarted Redis may have lost them."""
        generation = self.health.generation
        ops = self._replay_ops()
        if ops:
            log.warning("replaying %d recent writes after Redis errors", len(ops))
            await self._flush(ops)  # raises on a connection error: the caller retries
        self._catch_up.done(generation)


def _op_replies(ops: list[Op], replies: list[Any]) -> list[Any]:
    """Each op's reply from a batch's replies: its script's, or the first error
    of the commands sent before it (a script that did not run as asked)."""
    out, at = [], 0
    for op in ops:
        mine = replies[at : at + len(op.before) + 1]
        at += len(mine)
        errors = [r for r in mine[:-1] if isinstance(r, Exception)]
        out.append(errors[0] if errors else mine[-1])
    return out


def internal_error(result: Result, why: str) -> Result:
    """What a result becomes when it cannot be stored as it is."""
    return Result(
        call_id=result.call_id,
        traj=result.traj,
        tool=result.tool,
        ok=False,
        error_code=ErrorCode.INTERNAL_ERROR.value,
        error=f"the result could not be stored: {why}",
        worker=result.worker,
        finished_ms=now_ms(),
    )


def _is_outage(value: Any) -> bool:
    """Redis is away or busy (not: this op is wrong): the write is sent again."""
    return isinstance(
        value,
        (
            RedisConnectionError,
            RedisTimeoutError,
            ClusterError,  # CLUSTERDOWN, and redirections that went on (TTL exhausted)
            RedisClusterException,  # no node reachable, a slot not covered (not RedisError)
            TryAgainError,
            MasterDownError,
            BusyLoadingError,
            OSError,
        ),
    )
