"""Intake: claims trajectories from the open stream, in a loop of its own.

The loop reads ``<ns>:open`` only while the worker has a free slot (so load
spreads over workers and overload shows as backlog), and never holds up the
reading of calls. A claim starts a new ownership epoch (``lua.CLAIM``);
entries a previous owner read and never answered are queued first
(``CallReader.adopt``), then the trajectory is served. An open request that
cannot be parsed is dead-lettered and its trajectory fails, its calls answered.

A fork's copies prefer the worker that took its snapshot (``OpenRequest.prefer``):
that worker also finds them in its inbox (``Keys.worker_inbox``) and claims them
at once while it has room; any other worker that reads one leaves it unacknowledged
until ``prefer_ms`` after it was enqueued, then claims it (the claim script refuses
it when the preferred worker was first), or puts it back for anyone when it has
no room itself. Nothing is lost when either worker dies: the entry stays in the
dead one's pending list until the fleet puts it back (``Fleet.release_open_entries``).

An open whose image this worker's engine lacks is left the same way to a worker
that holds it and has room (``images.ImageAware.defer_s`` puts it in that
worker's inbox), for ``image_claim_delay_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from toolq.schemas import (
    GROUP,
    InvalidIdError,
    Keys,
    OpenRequest,
    Policy,
    TrajectorySpec,
    TrajStatus,
    check_traj_id,
)

from .bgtasks import BgRecorder
from .images import ImageAware
from .lease import CatchUp, Lease, RedisHealth, retrying
from .metrics import Observer
from .parse import parse_open, preview, traj_field
from .plan import apply_policy
from .reader import CallReader
from .settings import WorkerSettings
from .state import Traj, now_ms
from .writer import CLAIM, Writer, run_script

log = logging.getLogger("toolq.worker.intake")

DEAD_MAXLEN = 10_000


def spec_in_force(spec: TrajectorySpec, policy_json: str) -> TrajectorySpec:
    """The spec with the policy a policy entry put in force (the record keeps it
    across owners); the spec as opened when there is none."""
    if not policy_json:
        return spec
    try:
        return apply_policy(spec, Policy.model_validate_json(policy_json))
    except ValueError:  # it was checked when applied: only a hand-edited record gets here
        log.warning("ignored an invalid policy in the record: %s", policy_json[:200])
        return spec


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _plain(fields: dict[Any, Any]) -> dict[Any, Any]:
    """An open request's fields to enqueue again, for any worker (no preference)."""
    return {_s(k): _s(v) for k, v in fields.items() if _s(k) not in ("prefer", "prefer_ms")}


class Intake:
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
        reader: CallReader,
        bg: BgRecorder,
        observer: Observer,
        serve: Callable[[Traj], None],
        drop: Callable[[Traj], Any],
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.namespace)
        self.worker_id = settings.worker_id
        self.owned = owned
        self.lease = lease
        self.health = health
        self.writer = writer
        self.reader = reader
        self.bg = bg
        self.observer = observer
        self.serve = serve
        self.drop = drop
        self._room = asyncio.Event()
        self._claiming: set[str] = set()  # claims in flight: a duplicate waits for none
        self._deferred: set[asyncio.Task[None]] = set()  # copies left to their worker
        self.images: ImageAware | None = None  # set by the worker: claims prefer holders

    @property
    def free_slots(self) -> int:
        # Claims in flight count: the inbox and the open stream claim concurrently.
        return self.settings.slots - len(self.owned) - len(self._claiming)

    def slot_freed(self) -> None:
        """A trajectory left: the loop may claim again."""
        self._room.set()
        if self.images is not None:
            self.images.capacity_changed()

    # ---------------------------------------------------------------- loop
    async def run(self) -> None:
        """Claim while there is room, until cancelled (the inbox too)."""
        inbox = asyncio.create_task(self.inbox_loop(), name="intake-inbox")
        try:
            await self._run_open()
        finally:
            tasks = [inbox, *self._deferred]
            for task in tasks:  # a deferred entry stays unacknowledged: put back on leaving
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _run_open(self) -> None:
        catch_up = CatchUp(self.health)
        backoff_s = 0.1
        while True:
            try:
                while self.free_slots <= 0:
                    self._room.clear()
                    await self._room.wait()
                await self.lease.wait_valid()
                if catch_up.due():  # re-read requests delivered to us but not acted on
                    generation = self.health.generation
                    with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                        await self.redis.xgroup_create(self.keys.open, GROUP, id="0", mkstream=True)
                    await self._read("0")
                    catch_up.done(generation)
                await self._read(">")
                backoff_s = 0.1
            except (RedisError, OSError) as exc:
                self.health.failed()
                log.warning("reading open requests failed (%s); retrying in %.1fs", exc, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
            except Exception:  # a bug here must not stop the worker serving
                log.exception("intake error; retrying in %.1fs", backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)

    async def _read(self, cursor: str) -> None:
        resp: Any = await self.redis.xreadgroup(
            GROUP,
            self.worker_id,
            {self.keys.open: cursor},
            count=max(1, self.free_slots),
            block=self.settings.block_ms if cursor == ">" else None,
        )
        for _stream, entries in resp or []:
            for entry_id, fields in entries:
                await self._on_open(_s(entry_id), fields)

    async def _on_open(self, entry_id: str, fields: dict[Any, Any]) -> None:
        try:
            req = parse_open(fields)
        except ValueError as exc:
            reason = f"bad open request: {exc}"
            await self._dead(entry_id, fields, reason)
            await self._fail_unopenable(traj_field(fields), reason)
        else:
            wait_s = self._left_to_other_s(entry_id, req)
            if wait_s <= 0 and self.images is not None:  # left to a holder of its image?
                wait_s = await self.images.defer_s(req, fields)
            if wait_s > 0:  # acknowledged when it is claimed or put back
                task = asyncio.create_task(self._claim_later(entry_id, fields, req, wait_s))
                self._deferred.add(task)
                task.add_done_callback(self._deferred.discard)
                return
            if self.free_slots > 0 or req.traj in self.owned:
                await self.claim(req)
            else:  # the inbox took the room meanwhile: for another worker (or us, later)
                await self.redis.xadd(self.keys.open, _plain(fields))
        await self.redis.xack(self.keys.open, GROUP, entry_id)

    # --------------------------------------------------------- fork copies
    def _left_to_other_s(self, entry_id: str, req: OpenRequest) -> float:
        """How much longer a request preferring another worker is left to it (0: claim)."""
        if not req.prefer or req.prefer == self.worker_id or not req.prefer_ms:
            return 0.0
        try:
            enqueued_ms = int(entry_id.split("-")[0])
        except ValueError:
            enqueued_ms = 0
        until_ms = enqueued_ms + req.prefer_ms  # by Redis's clock: ours may be skewed, so
        return min(req.prefer_ms, max(0.0, until_ms - now_ms())) / 1000.0  # never longer

    async def _claim_later(
        self, entry_id: str, fields: dict[Any, Any], req: OpenRequest, wait_s: float
    ) -> None:
        """Claim a copy its preferred worker did not take in time, or put it back."""
        await asyncio.sleep(wait_s)
        await self.lease.wait_valid()
        try:
            if self.free_slots > 0:
                await self.claim(req)
            else:  # no room here: anyone may take it now
                await self.redis.xadd(self.keys.open, _plain(fields))
            await self.redis.xack(self.keys.open, GROUP, entry_id)
        except (RedisError, OSError) as exc:  # left in our pending list: re-read on catch-up
            self.health.failed()
            log.warning("claiming fork copy %s failed: %s", req.traj, exc)
        except Exception:  # a bug: the entry stays in our pending list (put back on leaving)
            log.exception("claiming fork copy %s failed", req.traj)

    async def inbox_loop(self) -> None:
        """Claim the fork copies meant for this worker while it has room (a full worker
        drops them: their entries on the open stream go to another worker)."""
        key = self.keys.worker_inbox(self.worker_id)
        timeout_s = max(1, self.settings.block_ms // 1000)
        backoff_s = 0.1
        while True:
            try:
                await self.lease.wait_valid()
                got: Any = await self.redis.blpop([key], timeout=timeout_s)
                backoff_s = 0.1
                if not got or self.free_slots <= 0:
                    continue
                try:
                    req = parse_open(json.loads(got[1]))
                except ValueError as exc:  # its open stream entry gets the clear error
                    log.warning("ignored a bad inbox entry: %s", exc)
                    continue
                await self.claim(req)
            except (RedisError, OSError) as exc:
                self.health.failed()
                log.warning("reading the inbox failed (%s); retrying in %.1fs", exc, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
            except Exception:  # a bug here must not end the inbox: the stream still works
                log.exception("inbox error; retrying in %.1fs", backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)

    # --------------------------------------------------------------- claim
    async def claim(self, req: OpenRequest) -> bool:
        """Take ownership of a trajectory and start serving it."""
        traj_id = req.traj
        if traj_id in self._claiming:
            return False  # a duplicate (a fork copy read from the inbox and the stream)
        self._claiming.add(traj_id)
        try:
            return await self._claim(req)
        finally:
            self._claiming.discard(traj_id)

    async def _claim(self, req: OpenRequest) -> bool:
        traj_id = req.traj
        stale = self.owned.get(traj_id)
        if stale is not None:
            owner = _s(await self.redis.hget(self.keys.traj(traj_id), "owner") or b"")
            if owner in (self.worker_id,):
                return False  # a duplicate open request
            await self.drop(stale)  # we were taken for dead meanwhile
        # Indexed before the claim: a crash right after it leaves nothing unfindable.
        pipe = self.redis.pipeline(transaction=False)
        pipe.sadd(self.keys.worker_trajs(self.worker_id), traj_id)
        pipe.zrem(self.keys.pending, traj_id)  # owned or ended: not waiting
        await pipe.execute()
        got = await run_script(
            self.redis,
            CLAIM,
            [self.keys.traj(traj_id), self.keys.calls(traj_id)],
            [
                self.worker_id,
                now_ms(),
                req.spec.model_dump_json(exclude_none=True),
                traj_id,
                GROUP,
                req.previous_owner or "",
                "" if req.previous_epoch is None else str(req.previous_epoch),
            ],
        )
        outcome, value = _s(got[0]), _s(got[1])
        if outcome != "ok":
            log.info("not claiming %s: %s %s", traj_id, outcome, value)
            await self.redis.srem(self.keys.worker_trajs(self.worker_id), traj_id)
            return False
        traj = Traj(traj_id, req.spec, epoch=value, previous_owner=req.previous_owner)
        traj.claimed_ms = int(_s(got[2]))
        traj.spec = spec_in_force(req.spec, _s(got[3]) if len(got) > 3 else "")
        if req.previous_owner:  # taken over or handed back: its leftovers first
            await self.reader.adopt(traj, crashed=not req.graceful)
            self.bg.tasks_lost(traj)  # its tasks died with the previous owner's agent
        self.owned[traj_id] = traj
        self.observer.traj_claimed()
        if self.images is not None:
            self.images.capacity_changed()
        self.serve(traj)
        self.reader.wake(traj)
        return True

    async def _fail_unopenable(self, traj_id: str, reason: str) -> None:
        """A trajectory whose open request is invalid fails; its calls are answered."""
        try:
            check_traj_id(traj_id)
        except InvalidIdError:
            return  # no keys can be named after it: the dead letter is all there is
        await self.writer.end(traj_id, "", TrajStatus.FAILED.value, reason)
        await retrying(
            self.health, lambda: self.redis.zrem(self.keys.pending, traj_id), "unqueueing"
        )

    async def _dead(self, entry_id: str, fields: dict[Any, Any], reason: str) -> None:
        await self.redis.xadd(
            self.keys.dead,
            {
                "stream": self.keys.open,
                "entry_id": entry_id,
                "reason": reason[:2000],
                "worker": self.worker_id,
                "fields": preview(fields),
            },
            maxlen=DEAD_MAXLEN,
        )
