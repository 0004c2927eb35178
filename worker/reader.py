"""The call reader: reads owned trajectories' calls streams and hands out their entries.

One blocking ``XREADGROUP`` over the streams of every owned trajectory whose
read-ahead has room, on a connection of its own; when the set of streams
changes (a claim, an end, a drop, a queue with room again), the blocked read
is interrupted with ``CLIENT UNBLOCK`` and issued again. Entries become
``Item``s (``parse.parse_call``) queued on their trajectory; a cancel acts at
once. Reads stop while the worker's lease has lapsed, so a stalled worker
that comes back takes no entry off a stream another worker serves now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from toolq.schemas import GROUP, ErrorCode, Keys

from .lease import CatchUp, Lease, RedisHealth
from .metrics import Observer
from .parse import parse_call
from .settings import WorkerSettings
from .state import Item, Traj, entry_key

log = logging.getLogger("toolq.worker.reader")

RECLAIM_PAGE = 500


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def traj_of_stream(stream: str) -> str:
    """``<ns>:{T}:calls`` -> ``T``."""
    return stream[stream.index("{") + 1 : stream.rindex("}")]


class CallReader:
    """See the module docstring."""

    def __init__(
        self,
        settings: WorkerSettings,
        redis: aioredis.Redis,
        owned: dict[str, Traj],
        *,
        lease: Lease,
        health: RedisHealth,
        observer: Observer,
        cancel: Callable[[Traj], None],
        answer: Callable[[Traj, Item, ErrorCode, str], None],
        rerunnable: Callable[[Item], bool],
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.namespace)
        self.worker_id = settings.worker_id
        self.owned = owned
        self.lease = lease
        self.health = health
        self.observer = observer
        self.cancel = cancel
        self.answer = answer
        self.rerunnable = rerunnable
        self._changed = asyncio.Event()
        self._conn: aioredis.Redis | None = None
        self._conn_id: int | None = None
        self._blocked = False
        self._unblocking: asyncio.Task[None] | None = None

    # ------------------------------------------------------------- reading
    async def run(self) -> None:
        """Read until cancelled; Redis errors are waited out and caught up on."""
        catch_up = CatchUp(self.health)
        backoff_s = 0.1
        self._conn = self.redis.client()
        try:
            while True:
                try:
                    await self.lease.wait_valid()
                    if catch_up.due():
                        generation = self.health.generation
                        await self._catch_up()
                        catch_up.done(generation)
                    await self._read_once()
                    backoff_s = 0.1
                except (RedisError, OSError) as exc:
                    if isinstance(exc, ResponseError) and str(exc).startswith("UNBLOCKED"):
                        continue  # an ended trajectory's stream was deleted under the read
                    self.health.failed()
                    self._conn_id = None
                    log.warning("reading calls failed (%s); retrying in %.1fs", exc, backoff_s)
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, 5.0)
                except Exception:  # a bug here must not stop the worker serving
                    log.exception("call reader error; retrying in %.1fs", backoff_s)
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, 5.0)
        finally:
            with contextlib.suppress(Exception):
                await self._conn.aclose()

    def _wanted(self) -> dict[str, str]:
        """The streams to read now: owned, live, with read-ahead room."""
        budget = self.settings.read_ahead_bytes - sum(t.queued_bytes for t in self.owned.values())
        if budget <= 0:
            return {}
        return {
            self.keys.calls(t.traj_id): ">"
            for t in self.owned.values()
            if not t.dropped and t.ending is None and len(t.items) < self.settings.read_ahead
        }

    async def _read_once(self) -> None:
        assert self._conn is not None
        self._changed.clear()
        streams = self._wanted()
        if not streams:
            await self._changed.wait()
            return
        if self._conn_id is None:
            self._conn_id = int(await self._conn.client_id())
        self._blocked = True
        try:
            resp: Any = await self._conn.xreadgroup(
                GROUP,
                self.worker_id,
                streams,  # type: ignore[arg-type]
                count=self.settings.read_ahead,
                block=self.settings.block_ms,
            )
        finally:
            self._blocked = False
        self.observer.batch_read(sum(len(entries) for _, entries in resp or []))
        for stream, entries in resp or []:
            traj = self.owned.get(traj_of_stream(_s(stream)))
            if traj is not None:
                self.dispatch(traj, entries)

    def wake(self) -> None:
        """The streams to read changed: interrupt a blocked read so the next one sees it."""
        self._changed.set()
        if self._blocked and self._conn_id is not None and self._unblocking is None:
            self._unblocking = asyncio.create_task(self._unblock(self._conn_id))

    async def _unblock(self, conn_id: int) -> None:
        try:
            await self.redis.client_unblock(conn_id)
        except (RedisError, OSError) as exc:  # the read ends by itself within block_ms
            log.debug("CLIENT UNBLOCK failed: %s", exc)
        finally:
            self._unblocking = None

    def queue_shrunk(self, traj: Traj) -> None:
        """The runner took an entry: a queue that was full has room again."""
        if len(traj.items) == self.settings.read_ahead - 1:
            self.wake()

    # ------------------------------------------------------------ dispatch
    def dispatch(self, traj: Traj, entries: Iterable[Any], reclaimed: bool = False) -> None:
        """Queue a trajectory's entries in order; a cancel acts at once.

        Entries delivered again (after a failover, or re-read after Redis
        errors) are skipped when they were dispatched already; ``reclaimed``
        ones (taken from another consumer's pending list) are skipped only
        when they are still queued or running here.
        """
        in_flight = traj.in_flight() if reclaimed else set()
        for entry_id, fields in entries:
            item = parse_call(_s(entry_id), fields, self.settings.max_entry_bytes)
            if reclaimed:
                if item.entry_id in in_flight:
                    continue
            elif entry_key(item.entry_id) <= entry_key(traj.last_entry_id):
                continue
            if traj.dropped or traj.ending is not None:
                return  # its end (or its new owner) answers what is left in the stream
            if item.kind == "cancel" and item.error is None:
                traj.last_entry_id = max(traj.last_entry_id, item.entry_id, key=entry_key)
                self.cancel(traj)
            else:
                traj.push(item)

    # ---------------------------------------------------- pending entries
    async def adopt(self, traj: Traj, crashed: bool) -> None:
        """Before serving a trajectory taken over: entries read by its previous
        owner and never answered are queued here first.

        After a crash the first of them may have been running when its owner
        died: it gets ``worker_lost`` unless it may start again (idempotent, or
        an external call, whose RQ job is adopted rather than run twice).
        Entries behind it never started (calls of one trajectory run one after
        the other), so they simply run here.
        """
        entries = await self._claim_pending(traj, min_idle_ms=0)
        if crashed:
            for index, (entry_id, fields) in enumerate(entries):
                item = parse_call(_s(entry_id), fields, self.settings.max_entry_bytes)
                if item.kind != "call":
                    continue
                if not self.rerunnable(item):
                    lost = f"the worker running this call ({traj.previous_owner}) died"
                    self.answer(traj, item, ErrorCode.WORKER_LOST, lost)
                    del entries[index]
                break
        self.dispatch(traj, entries)

    async def reclaim(self) -> int:
        """Take entries of owned streams that sit idle in other consumers' pending
        lists (a worker that read them while it was stale) and run them here."""
        found = 0
        min_idle_ms = int(self.settings.dead_after_s * 1000)
        for traj in list(self.owned.values()):
            if traj.dropped or traj.ending is not None:
                continue
            entries = await self._claim_pending(traj, min_idle_ms)
            if entries:
                before = len(traj.items)
                self.dispatch(traj, entries, reclaimed=True)
                if len(traj.items) > before:
                    found += len(traj.items) - before
                    log.warning("reclaimed %d stuck entries of %s", found, traj.traj_id)
        return found

    async def _claim_pending(self, traj: Traj, min_idle_ms: int) -> list[Any]:
        """Every pending entry of the trajectory's stream idle this long, now ours, in order."""
        stream = self.keys.calls(traj.traj_id)
        start, entries = "0-0", []
        while True:
            resp: Any = await self.redis.xautoclaim(
                stream, GROUP, self.worker_id, min_idle_ms, start, count=RECLAIM_PAGE
            )
            start = _s(resp[0])
            entries += [(e[0], e[1] or {}) for e in resp[1] if e]  # {}: deleted entry
            if start == "0-0" or not resp[1]:
                break
        entries.sort(key=lambda e: entry_key(_s(e[0])))
        return entries

    async def _catch_up(self) -> None:
        """After Redis errors: recreate groups a Redis without persistence forgot,
        and re-read entries delivered to this worker whose reply never arrived."""
        for traj_id in list(self.owned):
            with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                await self.redis.xgroup_create(
                    self.keys.calls(traj_id), GROUP, id="0", mkstream=True
                )
        streams = {self.keys.calls(t): "0" for t in self.owned}
        if not streams:
            return
        resp: Any = await self.redis.xreadgroup(GROUP, self.worker_id, streams, count=1000)  # type: ignore[arg-type]
        for stream, entries in resp or []:
            traj = self.owned.get(traj_of_stream(_s(stream)))
            if traj is not None:
                self.dispatch(traj, entries)
