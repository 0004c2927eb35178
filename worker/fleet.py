"""The fleet: this worker among the others.

- Heartbeats (on Redis's clock, so workers on other hosts compare fairly)
  renew the worker's lease; after a lapse (a stall) the worker first checks
  which trajectories are still its own and drops the others.
- Takeover: trajectories of workers whose heartbeat stopped are re-queued
  (their open request goes back on ``<ns>:open`` with ``previous_owner``).
- Reaping: trajectories idle past their ``idle_timeout_s`` or past their
  ``deadline_s`` end with ``timeout``.
- Housekeeping: acknowledged open requests are trimmed; entries stuck in
  other consumers' pending lists are reclaimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, RedisError

from toolq.schemas import (
    GROUP,
    Keys,
    OpenRequest,
    TrajectorySpec,
    TrajStatus,
    WorkerInfo,
    __version__,
    lua,
)

from .backends.base import TrajState
from .lease import Lease, RedisHealth
from .memory import Trimmer
from .metrics import Observer
from .settings import WorkerSettings
from .state import Traj, entry_key, now_ms
from .writer import DECLARE_DEAD, FORGET_DEAD, Writer, run_script

log = logging.getLogger("toolq.worker.fleet")

HOUSEKEEPING_S = 30.0  # trim the open stream, reclaim stuck entries
CONFIRM_EVERY_S = 5.0  # ownership of trajectories that wrote nothing lately is looked up


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int:
    try:
        return int(_s(value or b"0"))
    except ValueError:
        return 0


class Fleet:
    """See the module docstring."""

    def __init__(
        self,
        settings: WorkerSettings,
        redis: aioredis.Redis,
        owned: dict[str, Traj],
        *,
        lease: Lease,
        health: RedisHealth,
        writer: Writer,
        observer: Observer,
        backend_name: str,
        lost: Callable[[Traj], Awaitable[None]],
        reclaim: Callable[[], Awaitable[int]],
        cancel: Callable[[Traj], None],
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.namespace)
        self.worker_id = settings.worker_id
        self.owned = owned
        self.lease = lease
        self.health = health
        self.writer = writer
        self.observer = observer
        self.backend_name = backend_name
        self.lost = lost  # another worker owns it now: drop it
        self.reclaim = reclaim
        self.cancel = cancel  # a cancel requested while its entry waits unread
        self.started_ms = now_ms()
        self._clock_offset_ms = 0  # Redis server time - our time
        self._redis_slow_at = time.monotonic()  # a heartbeat last took long (or start)
        self._trimmer = Trimmer()  # memory a flood left is given back (see memory.py)

    # ---------------------------------------------------------- heartbeat
    async def register(self) -> None:
        """First heartbeat; what "we" owned before a restart under this id is re-queued."""
        await self.beat(force=True)
        self.lease.renew(time.monotonic())
        await self._record()
        for traj_id in await self.redis.smembers(self.keys.worker_trajs(self.worker_id)):
            await self.requeue(_s(traj_id), self.worker_id, graceful=False)

    async def heartbeat_loop(self) -> None:
        """Beat every ``heartbeat_s``; the upkeep runs beside it, in a loop of its own:
        on a cluster its look-ups may wait for a node that fails over, and that must
        not delay a beat (the lease would lapse and every trajectory would stall)."""
        upkeep = asyncio.create_task(self._upkeep_loop(), name="upkeep")
        try:
            while True:
                await asyncio.sleep(self.settings.heartbeat_s)
                self._trimmer.freed_bytes(self.writer.trim_journal())
                try:
                    await self._beat_and_confirm()
                except (RedisError, RedisClusterException, OSError) as exc:
                    self.health.failed()
                    log.warning("heartbeat failed: %s", exc)
                except Exception:  # a bug must not end the beats (the lease with them)
                    log.exception("heartbeat failed")
        finally:
            upkeep.cancel()

    async def _upkeep_loop(self) -> None:
        """After each beat: the worker's record, ownership look-ups, cancels, takeovers,
        and every ``HOUSEKEEPING_S`` the housekeeping."""
        every = max(1, int(HOUSEKEEPING_S / self.settings.heartbeat_s))
        rounds = 0
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            rounds += 1
            if not self.lease.valid():  # the beat confirms what we own first
                continue
            started = time.monotonic()
            try:
                await self._record()
                await self.confirm_ownership()
                await self._cancels_behind_full_queues()
                if time.monotonic() - started > max(3 * self.settings.heartbeat_s, 1.0):
                    # Redis stalled under these look-ups (the beat may not have told
                    # yet): others' heartbeats look stale for the same reason.
                    self._redis_slow_at = time.monotonic()
                await self.take_over_dead()
                if rounds % every == 0:
                    await self.trim_open()
                    await self.prune_pending()
                    await self.prune_runs()
                    await self.reclaim()
            except (RedisError, RedisClusterException, OSError) as exc:
                self.health.failed()
                log.warning("heartbeat upkeep failed: %s", exc)
            except Exception:  # a bug here must not end takeovers and look-ups for good
                log.exception("heartbeat upkeep failed")

    async def _beat_and_confirm(self) -> None:
        """Beat; after our lease lapsed, confirm what we own before acting again."""
        lapsed = not self.lease.valid()
        sent_at = time.monotonic()
        if not await self.beat():
            await self._declared_dead()
        took_s = time.monotonic() - sent_at
        if took_s > max(3 * self.settings.heartbeat_s, 1.0):
            # Redis itself stalled: nobody could beat, so others' heartbeats look stale.
            self._redis_slow_at = time.monotonic()
        if not lapsed:  # nobody can have taken us for dead: what we own is ours
            self.lease.renew(sent_at)
            return
        log.warning("lease lapsed (%.1fs since the last heartbeat)", self.lease.age_s())
        for traj in self.owned.values():  # time stood still for them too: no idle reaping
            traj.last_activity = time.monotonic()
        await self.confirm_ownership(everything=True)
        self.lease.renew(sent_at)

    async def _declared_dead(self) -> None:
        """The fleet took us for dead (we stalled; our lease lapsed, so nothing
        started since). Hand back what is still ours (that ownership only; the
        fleet may have re-queued it already), drop it all, then beat again.
        An error part way leaves the declaration in place: the next heartbeat
        goes on with what is left."""
        log.error(
            "this worker was declared dead (it stalled): dropping %d trajectories", len(self.owned)
        )
        for traj in list(self.owned.values()):
            await self.requeue(traj.traj_id, self.worker_id, graceful=False)
            await self.lost(traj)
        await self.register()

    def _info(self) -> WorkerInfo:
        return WorkerInfo(
            worker=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            backend=self.backend_name,
            version=__version__,
            slots_total=self.settings.slots,
            slots_used=len(self.owned),
            started_ms=self.started_ms,
            heartbeat_ms=self.redis_now_ms(),
            dead_after_s=self.settings.dead_after_s,
        )

    async def beat(self, force: bool = False) -> bool:
        """Send a heartbeat; False when the fleet had declared us dead (see ``lua.BEAT``)."""
        # The beat itself: Redis's clock and the heartbeat, both on the node of the
        # heartbeats (one clock on a cluster). It alone renews the lease: the keys
        # below may live on other cluster nodes, and one of those failing over must
        # not stop this worker serving the trajectories the others hold.
        pipe = self.redis.pipeline(transaction=False)
        pipe.execute_command("EVAL", "return redis.call('TIME')", 1, self.keys.workers)
        beat = [self.worker_id, self.redis_now_ms(), "1" if force else "0"]
        pipe.execute_command("EVAL", lua.BEAT, 1, self.keys.workers, *beat)
        sent_ms = now_ms()
        (seconds, micros), alive = await pipe.execute()
        self._clock_offset_ms = int(seconds) * 1000 + int(micros) // 1000 - sent_ms
        return bool(alive)

    async def _record(self) -> None:
        """The worker's record (``toolq status``), the backlog sample, the metrics' counts."""
        self._sample_slots()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.worker(self.worker_id), mapping=self._info().to_fields())
        pipe.pexpire(self.keys.worker(self.worker_id), int(self.settings.dead_after_s * 4000))
        pipe.zcard(self.keys.pending)
        pipe.zrange(self.keys.pending, 0, 0, withscores=True)
        self.observer.heartbeat(pipe)
        replies = await pipe.execute()
        backlog, oldest = replies[2], replies[3]
        oldest_age_s = (self.redis_now_ms() - oldest[0][1]) / 1000 if oldest else 0.0
        self.observer.backlog_sampled(int(backlog), max(0.0, oldest_age_s))

    def _sample_slots(self) -> None:
        trajs = list(self.owned.values())
        starting = sum(1 for t in trajs if t.slot is None)
        busy = sum(1 for t in trajs if t.slot is not None and t.busy)
        idle = len(trajs) - starting - busy
        free = max(0, self.settings.slots - len(trajs))
        self.observer.slots_sampled(busy=busy, idle=idle, starting=starting, free=free)

    async def _cancels_behind_full_queues(self) -> None:
        """A trajectory whose read-ahead is full reads no entries, so its cancel
        entry may wait unread: the cancel script also marks the record."""
        full = [
            t
            for t in self.owned.values()
            if len(t.items) >= self.settings.read_ahead and t.ending is None and not t.dropped
        ]
        if not full:
            return
        pipe = self.redis.pipeline(transaction=False)
        for traj in full:
            pipe.hget(self.keys.traj(traj.traj_id), "cancel_requested_ms")
        for traj, requested in zip(full, await pipe.execute(), strict=True):
            if requested and traj.ending is None:
                self.cancel(traj)

    def redis_now_ms(self) -> int:
        """Now, by Redis's clock."""
        return now_ms() + self._clock_offset_ms

    async def confirm_ownership(self, everything: bool = False) -> None:
        """Drop the trajectories another worker owns now (we were taken for dead).

        A trajectory whose last result write went through is confirmed by it
        (the write is fenced); the others are looked up every few seconds.
        """
        due = time.monotonic() - CONFIRM_EVERY_S
        trajs = [
            t for t in self.owned.values() if not t.dropped and (everything or t.confirmed_at < due)
        ]
        if not trajs:
            return
        pipe = self.redis.pipeline(transaction=False)
        for traj in trajs:
            pipe.hmget(self.keys.traj(traj.traj_id), ["owner", "epoch"])
        for traj, (owner, epoch) in zip(trajs, await pipe.execute(), strict=True):
            traj.confirmed_at = time.monotonic()
            if owner is None:
                continue  # no record (a Redis that lost its data): keep serving
            if (_s(owner), _s(epoch or b"")) != (self.worker_id, traj.epoch):
                log.error("trajectory %s is owned by %s now: dropping it", traj.traj_id, _s(owner))
                await self.lost(traj)

    # ----------------------------------------------------------- takeover
    async def take_over_dead(self) -> None:
        """Re-queue the trajectories of workers whose heartbeat stopped.

        Safe on every worker at once: only the first release of a trajectory
        (its owner and epoch unchanged) re-queues it. Skipped right after a
        Redis outage or stall: the others' heartbeats may be stale too.
        """
        quiet_s = time.monotonic() - max(self._redis_slow_at, self.health.failed_at)
        if quiet_s < self.settings.dead_after_s:
            return
        dead_after_ms = int(self.settings.dead_after_s * 1000)
        cutoff = self.redis_now_ms() - dead_after_ms
        for raw in await self.redis.zrangebyscore(self.keys.workers, "-inf", cutoff):
            dead = _s(raw)
            if dead == self.worker_id:
                continue
            # Judged again inside Redis: a worker that beat since our read stays alive.
            args = [dead, dead_after_ms]
            declared_ms = int(await run_script(self.redis, DECLARE_DEAD, [self.keys.workers], args))
            if declared_ms:
                await self._take_over(dead, declared_ms)

    async def _take_over(self, dead: str, declared_ms: int) -> None:
        """Re-queue what ``dead`` held when it was declared dead at ``declared_ms``.

        Its next heartbeat tells it, and it drops everything before acting
        again; what it claimed after that (it came back) is its own and stays.
        """
        back = False
        for raw in await self.redis.smembers(self.keys.worker_trajs(dead)):
            traj_id = _s(raw)
            if await self.requeue(traj_id, dead, graceful=False, claimed_before_ms=declared_ms):
                await self.redis.srem(self.keys.worker_trajs(dead), traj_id)
            else:
                back = True
        if back:
            log.warning("worker %s came back: it keeps what it claimed since", dead)
            return
        await self.release_open_entries(dead)
        if await run_script(self.redis, FORGET_DEAD, [self.keys.workers], [dead]):
            await self.redis.delete(self.keys.worker(dead))
        log.warning("worker %s is dead: its trajectories were re-queued", dead)

    async def requeue(
        self, traj_id: str, owner: str, graceful: bool, claimed_before_ms: int | None = None
    ) -> bool:
        """Give ``owner``'s trajectory back to the pool (any worker may claim it).

        The open request goes first: a crash between the two steps leaves a
        request that can still displace ``owner`` (that ownership epoch only),
        never a trajectory nobody will claim. Repeating it (several workers at
        once) is harmless. Returns False when ``owner`` claimed it at or after
        ``claimed_before_ms`` (it is alive): then nothing is done.
        """
        owner_now, spec, epoch, claimed_ms = await self.redis.hmget(
            self.keys.traj(traj_id), ["owner", "spec", "epoch", "claimed_ms"]
        )
        if _s(owner_now or b"") != owner:
            return True  # ended, gone, or already re-queued and claimed
        if claimed_before_ms is not None and _int(claimed_ms) >= claimed_before_ms:
            return False
        req = OpenRequest(
            traj=traj_id,
            spec=_s(spec or "{}"),
            previous_owner=owner,
            previous_epoch=_int(epoch) if epoch else None,
            graceful=graceful,
        )
        # Backlog first: the claim that the request below leads to removes it.
        await self.redis.zadd(self.keys.pending, {traj_id: now_ms()}, nx=True)
        await self.redis.xadd(self.keys.open, req.to_fields())
        if await self.writer.release(traj_id, owner, _s(epoch or b"")) != 1:
            await self.redis.zrem(self.keys.pending, traj_id)  # ended, or claimed already
        return True

    async def prune_runs(self) -> int:
        """Drop the oldest ``<ns>:runs`` members whose record has expired (the
        index would otherwise grow by one per trajectory forever)."""
        members = [_s(m) for m in await self.redis.zrange(self.keys.runs, 0, 499)]
        if not members:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for traj_id in members:
            pipe.exists(self.keys.traj(traj_id))
        gone = [t for t, n in zip(members, await pipe.execute(), strict=True) if not n]
        if gone:
            await self.redis.zrem(self.keys.runs, *gone)
        return len(gone)

    async def prune_pending(self) -> int:
        """Drop backlog members whose trajectory is not pending any more (a
        producer or worker that died between two steps)."""
        members = [_s(m) for m in await self.redis.zrange(self.keys.pending, 0, 499)]
        if not members:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for traj_id in members:
            pipe.hget(self.keys.traj(traj_id), "status")
        stale = [t for t, st in zip(members, await pipe.execute(), strict=True) if st != b"pending"]
        if stale:
            await self.redis.zrem(self.keys.pending, *stale)
        return len(stale)

    async def release_open_entries(self, consumer: str) -> None:
        """Open requests ``consumer`` had read but not acted on go back to the stream;
        then the consumer leaves the group."""
        pending: Any = await self.redis.xpending_range(
            self.keys.open, GROUP, min="-", max="+", count=1000, consumername=consumer
        )
        for p in pending:
            entry_id = _s(p["message_id"])
            found: Any = await self.redis.xrange(self.keys.open, entry_id, entry_id)
            for _id, fields in found or []:
                await self.redis.xadd(self.keys.open, fields)
            await self.redis.xack(self.keys.open, GROUP, entry_id)
        await self.redis.xgroup_delconsumer(self.keys.open, GROUP, consumer)

    async def trim_open(self) -> None:
        """Drop open requests every worker has read and acknowledged."""
        groups: Any = await self.redis.xinfo_groups(self.keys.open)
        group = next((g for g in groups if _s(g["name"]) == GROUP), None)
        if group is None:
            return
        floor = _s(group["last-delivered-id"])
        pending: Any = await self.redis.xpending(self.keys.open, GROUP)
        if pending and pending.get("pending"):
            floor = min(floor, _s(pending["min"]), key=entry_key)
        # MINID keeps `floor` itself: entries older than it are read and acknowledged.
        await self.redis.xtrim(self.keys.open, minid=floor, approximate=True)

    async def heartbeats(self) -> dict[str, int]:
        """Every registered worker id -> its last heartbeat (unix ms, Redis's clock)."""
        pairs: Any = await self.redis.zrange(self.keys.workers, 0, -1, withscores=True)
        return {_s(worker): int(score) for worker, score in pairs}

    async def trajectory_states(self, traj_ids: list[str]) -> dict[str, TrajState]:
        """What the records of ``traj_ids`` say (for a backend judging left-over sandboxes)."""
        pipe = self.redis.pipeline(transaction=False)
        fields = ("status", "owner", "slot", "last_activity_ms", "spec")
        for traj_id in traj_ids:
            pipe.hmget(self.keys.traj(traj_id), fields)
        states = {}
        for traj_id, (status, owner, slot, activity_ms, spec) in zip(
            traj_ids, await pipe.execute(), strict=True
        ):
            if status is None:
                continue
            try:
                limits = TrajectorySpec.model_validate_json(spec or b"{}").limits
            except ValueError:
                limits = TrajectorySpec().limits
            states[traj_id] = TrajState(
                status=_s(status),
                owner=_s(owner or ""),
                slot=_s(slot or ""),
                last_activity_ms=_int(activity_ms),
                idle_timeout_s=limits.idle_timeout_s,
            )
        return states

    async def successor_alive(self) -> bool:
        """Is another worker alive to take over (and adopt kept sandboxes)?"""
        try:
            pairs: Any = await self.redis.zrange(self.keys.workers, 0, -1, withscores=True)
        except (RedisError, OSError):
            return False
        cutoff = self.redis_now_ms() - int(self.settings.dead_after_s * 1000)
        return any(_s(w) != self.worker_id and score >= cutoff for w, score in pairs)

    async def unregister(self) -> None:
        """Leave the fleet: no heartbeat record, no consumer left in the open group."""
        with contextlib.suppress(RedisError, OSError):
            await self.release_open_entries(self.worker_id)
        with contextlib.suppress(RedisError, OSError):
            await self.redis.zrem(self.keys.workers, self.worker_id)
            await self.redis.delete(self.keys.worker(self.worker_id))

    # ------------------------------------------------------------- reaping
    async def reap_loop(self) -> None:
        """End trajectories that went idle (abandoned rollouts) or passed their deadline."""
        while True:
            await asyncio.sleep(0.5)
            if not self.lease.valid():
                continue
            now = time.monotonic()
            for traj in list(self.owned.values()):
                limits = traj.spec.limits
                if traj.busy or traj.items or traj.ending is not None or traj.dropped:
                    continue
                if now - traj.last_activity > limits.idle_timeout_s:
                    traj.request_end(
                        TrajStatus.TIMEOUT,
                        f"idle_timeout_s limit ({limits.idle_timeout_s}s) passed",
                    )
                elif limits.deadline_s is not None and now - traj.started > limits.deadline_s:
                    traj.request_end(
                        TrajStatus.TIMEOUT, f"deadline_s limit ({limits.deadline_s}s) passed"
                    )
