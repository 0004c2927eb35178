"""The call reader: reads owned trajectories' calls streams and hands out their entries.

Trajectories are read in groups, one blocking ``XREADGROUP`` per group
(``read_group.ReadGroup``): one group on a single Redis, one per hash slot on
Redis Cluster, where a command may not span slots. A trajectory's stream is
read while its read-ahead has room. Entries become ``Item``s
(``parse.parse_call``) queued on their trajectory; a cancel acts at once.
Reads stop while the worker's lease has lapsed, so a stalled worker that comes
back takes no entry off a stream another worker serves now.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import ResponseError

from toolq.schemas import GROUP, ErrorCode, Keys

from .lease import CatchUp, Lease, RedisHealth
from .metrics import Observer
from .parse import parse_call
from .read_group import ReadGroup, run_loop
from .settings import WorkerSettings
from .state import Item, Traj, entry_key, wall_ms

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
        cluster: bool = False,
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
        self.cluster = cluster
        self._groups: dict[str, tuple[ReadGroup, asyncio.Task[None]]] = {}
        self._members: dict[str, set[str]] = {}
        # Per read group: after Redis errors each group catches up its own members,
        # so a cluster node that is down stalls only the groups it serves.
        self._catch_ups: dict[str, CatchUp] = {}
        self._backoff_s: dict[str, float] = {}

    # ------------------------------------------------------------- reading
    async def run(self) -> None:
        """Serve the read groups until cancelled."""
        try:
            await asyncio.Event().wait()
        finally:
            for _group, task in self._groups.values():
                task.cancel()
            for group, task in self._groups.values():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                await group.forget()  # its wake stream goes with the worker

    def group_of(self, traj_id: str) -> str:
        """The read group of a trajectory: its hash slot on a cluster, else the one group."""
        return str(key_slot(self.keys.calls(traj_id).encode())) if self.cluster else ""

    def wake(self, traj: Traj | None = None) -> None:
        """What to read changed (for ``traj``, or for everyone): its group reads anew."""
        if traj is None:
            for group, _task in self._groups.values():
                group.changed()
            return
        key = self.group_of(traj.traj_id)
        members = self._members.setdefault(key, set())
        if self.owned.get(traj.traj_id) is traj and not traj.dropped:
            members.add(traj.traj_id)
        else:
            members.discard(traj.traj_id)
        if members and key not in self._groups:
            self._start_group(key, traj.traj_id)
        elif not members and key in self._groups:
            self._stop_group(key)
        elif key in self._groups:
            self._groups[key][0].changed()

    def _start_group(self, key: str, tag_traj: str) -> None:
        wake_key = self.keys.wake(self.worker_id, tag_traj if self.cluster else "")
        group = ReadGroup(
            self.redis,
            self.worker_id,
            wake_key,
            streams=lambda: self._wanted(key),
            deliver=self._deliver,
            block_ms=self.settings.block_ms,
            count=self.settings.read_ahead,
        )
        self._catch_ups[key] = CatchUp(self.health)
        task = asyncio.create_task(
            run_loop(
                group,
                ready=functools.partial(self._ready, key),
                failed=functools.partial(self._failed, key),
            ),
            name=f"reader-{key or 'all'}",
        )
        self._groups[key] = (group, task)

    def _stop_group(self, key: str) -> None:
        group, task = self._groups.pop(key)
        self._members.pop(key, None)
        self._catch_ups.pop(key, None)
        self._backoff_s.pop(key, None)
        task.cancel()
        asyncio.get_running_loop().create_task(group.forget())

    def _wanted(self, key: str) -> dict[str, str]:
        """The group's streams to read now: live members with read-ahead room."""
        if sum(t.queued_bytes for t in self.owned.values()) >= self.settings.read_ahead_bytes:
            return {}
        found = {}
        for traj_id in self._members.get(key, ()):
            t = self.owned.get(traj_id)
            if t and not t.dropped and t.ending is None and len(t.items) < self.settings.read_ahead:
                found[self.keys.calls(traj_id)] = ">"
        return found

    def _deliver(self, stream: str, entries: list[Any]) -> None:
        self.observer.batch_read(len(entries))
        traj = self.owned.get(traj_of_stream(stream))
        if traj is not None:
            self.dispatch(traj, entries)

    async def _ready(self, key: str) -> None:
        """Before each read of group ``key``: a valid lease, and the group's catch-up
        after Redis errors done."""
        await self.lease.wait_valid()
        catch_up = self._catch_ups.get(key)
        if catch_up is not None and catch_up.due():
            generation = self.health.generation
            await self._catch_up_reads(list(self._members.get(key, ())))
            catch_up.done(generation)
        self._backoff_s[key] = 0.1

    async def _failed(self, key: str, exc: BaseException) -> None:
        self.health.failed()
        backoff_s = self._backoff_s.get(key, 0.1)
        log.warning("reading calls failed (%s); retrying in %.1fs", exc, backoff_s)
        await asyncio.sleep(backoff_s)
        self._backoff_s[key] = min(backoff_s * 2, 5.0)

    def queue_shrunk(self, traj: Traj) -> None:
        """The runner took an entry: a queue that was full has room again."""
        if len(traj.items) == self.settings.read_ahead - 1:
            self.wake(traj)

    # ------------------------------------------------------------ dispatch
    def dispatch(self, traj: Traj, entries: Iterable[Any], reclaimed: bool = False) -> None:
        """Queue a trajectory's entries in order; a cancel acts at once.

        Entries delivered again (after a failover, or re-read after Redis
        errors) are skipped when they were dispatched already; ``reclaimed``
        ones (taken from another consumer's pending list) are skipped only
        when they are still queued or running here.
        """
        in_flight = traj.in_flight() if reclaimed else set()
        read_at_ms = wall_ms()
        for entry_id, fields in entries:
            item = parse_call(_s(entry_id), fields, self.settings.max_entry_bytes)
            item.read_at_ms = read_at_ms
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
        if traj.previous_owner and traj.previous_owner != self.worker_id:
            with contextlib.suppress(ResponseError):  # its pending list is ours now: empty
                await self.redis.xgroup_delconsumer(
                    self.keys.calls(traj.traj_id), GROUP, traj.previous_owner
                )
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

    async def _catch_up_reads(self, traj_ids: list[str]) -> None:
        """After Redis errors: recreate groups a Redis without persistence forgot,
        and re-read entries delivered to this worker whose reply never arrived
        (for ``traj_ids``: one read group's members)."""
        for traj_id in traj_ids:
            with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                await self.redis.xgroup_create(
                    self.keys.calls(traj_id), GROUP, id="0", mkstream=True
                )
            resp: Any = await self.redis.xreadgroup(
                GROUP, self.worker_id, {self.keys.calls(traj_id): "0"}, count=1000
            )
            traj = self.owned.get(traj_id)
            for _stream, entries in resp or []:
                if traj is not None:
                    self.dispatch(traj, entries)
