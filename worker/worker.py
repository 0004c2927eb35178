"""The toolq worker: wires the stages together and owns startup and shutdown.

One asyncio process; each stage is a module (docs/architecture.md):

    intake  (claims from <ns>:open)  ─┐
    reader  (reads <ns>:{T}:calls)   ─┼─▶ runner (a task per trajectory) ─▶ writer ─▶ Redis
    fleet   (heartbeats, takeover, reaping, lease)                            (fenced)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from toolq.schemas import GROUP, ErrorCode, Keys

from .backends.base import Backend
from .bgtasks import BgRecorder
from .external_runner import ExternalRunner
from .fleet import Fleet
from .images import ImageAware
from .intake import Intake
from .lease import Lease, RedisHealth, retrying
from .metrics import Observer, WorkerMetrics
from .reader import CallReader
from .registry import load_registry, publish_registry
from .runner import Runner
from .settings import WorkerSettings
from .snapshots import Snapshots
from .state import Traj
from .tools import Registry
from .writer import Writer

log = logging.getLogger("toolq.worker")


class Worker:
    """Runs tool calls from Redis in backend slots."""

    def __init__(
        self,
        settings: WorkerSettings,
        redis: aioredis.Redis,
        backend: Backend,
        registry: Registry | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.settings, self.redis, self.backend = settings, redis, backend
        self.id = settings.worker_id
        self.keys = Keys(settings.namespace)
        self.registry = registry or load_registry(settings.tools_modules)
        self.observer = observer or WorkerMetrics(settings, self.registry)
        self.owned: dict[str, Traj] = {}
        self.ready = asyncio.Event()  # set once the worker serves
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._drops: set[asyncio.Task[None]] = set()
        shared: dict[str, Any] = {"lease": Lease(settings.dead_after_s), "health": RedisHealth()}
        self.lease, self.health = shared["lease"], shared["health"]
        self.writer = Writer(
            settings, redis, self.health, self._fenced, self.observer.call_finished
        )
        self.external = ExternalRunner(settings, redis, self.registry, self.id)
        self.bg = BgRecorder(
            self.writer, lambda name: self.runner.traj_for_slot(name), self.observer
        )
        self.snapshots = Snapshots(settings, redis, shared["health"], self.observer)
        self.runner = Runner(
            settings, redis, self.owned, **shared, writer=self.writer, backend=backend,
            registry=self.registry, external=self.external, bg=self.bg, observer=self.observer,
            snapshots=self.snapshots,
            forget=self._forget, queue_shrunk=lambda traj: self.reader.queue_shrunk(traj),
        )  # fmt: skip
        self.reader = CallReader(
            settings, redis, self.owned, **shared, observer=self.observer,
            cancel=self.runner.cancel, answer=self.runner.answer, rerunnable=self.runner.rerunnable,
            cluster=isinstance(redis, aioredis.RedisCluster),
        )  # fmt: skip
        self.intake = Intake(
            settings, redis, self.owned, **shared, writer=self.writer, reader=self.reader,
            bg=self.bg, observer=self.observer, serve=self.runner.start, drop=self.runner.drop,
        )  # fmt: skip
        self.fleet = Fleet(
            settings, redis, self.owned, **shared, writer=self.writer, observer=self.observer,
            backend_name=backend.name, lost=self.runner.drop, reclaim=self.reader.reclaim,
            cancel=self.runner.cancel,
        )  # fmt: skip
        self.images = None if backend.images is None else ImageAware(
            settings, redis, backend.images, self.health, lambda: self.intake.free_slots,
            self.observer,
        )  # fmt: skip
        self.intake.images = self.images
        backend.on_event = self._on_agent_event
        backend.worker_heartbeats = self.fleet.heartbeats
        backend.trajectory_states = self.fleet.trajectory_states
        backend.observer = self.observer

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Serve until ``stop()`` is called, then shut down gracefully."""
        await self.startup()
        self._tasks += [
            asyncio.create_task(self.intake.run(), name="intake"),
            asyncio.create_task(self.reader.run(), name="reader"),
            asyncio.create_task(self.fleet.heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self.fleet.reap_loop(), name="reaper"),
            asyncio.create_task(self.snapshots.sample_loop(), name="snapshots"),
        ]
        if self.images is not None:
            self._tasks.append(asyncio.create_task(self.images.run(), name="images"))
        self.ready.set()
        await self._stopping.wait()
        await self.shutdown()

    def stop(self) -> None:
        """Ask the worker to stop claiming and shut down (signal-safe)."""
        self._stopping.set()

    async def startup(self) -> None:
        if any(t.external for t in self.registry.tools.values()):
            self.external.rq_url()  # fails early and clearly on a cluster without an RQ Redis
        await self.observer.worker_started(self.id, self.backend.name, self.redis)
        self._tasks.append(asyncio.create_task(self.writer.run(), name="writer"))
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists already
            await self.redis.xgroup_create(self.keys.open, GROUP, id="0", mkstream=True)
        await self.backend.start()
        # Tools first: a worker that shows up as registered has published them.
        await publish_registry(self.redis, self.keys, self.registry)
        await self.fleet.register()
        log.info(
            "worker %s up: backend=%s slots=%d", self.id, self.backend.name, self.settings.slots
        )

    async def shutdown(self) -> None:
        """Stop reading, let running calls finish, hand back what is owned."""
        log.info("worker %s shutting down", self.id)
        # (images: a worker that claims no more must not draw opens to its inbox)
        await _cancel([t for t in self._tasks if t.get_name() in ("intake", "reader", "images")])
        self.runner.draining = True  # calls already queued run on the next owner, not here
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while any(t.busy for t in self.owned.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        try:
            keep = await self.fleet.successor_alive() if self.owned else False
            for traj in list(self.owned.values()):
                try:
                    await self._hand_back(traj, keep)
                except Exception:  # one failure must not keep the others' sandboxes alive
                    log.exception("handing back %s failed", traj.traj_id)
            await self.writer.drain(10)
            await self.snapshots.drain(self.settings.snapshot_timeout_s)
        finally:
            await _cancel(self._tasks + list(self._drops))
            await self.external.close()
            await self.backend.shutdown()
            await self.fleet.unregister()
            await self.observer.worker_stopped()
            await self.writer.aclose()

    async def _hand_back(self, traj: Traj, keep: bool) -> None:
        """Give a trajectory back to the pool; its unanswered calls stay in its stream.

        A call still running after the grace period gets ``worker_lost`` (or
        stays to run again elsewhere, when idempotent; an external call's job
        is adopted by the next owner). With ``keep`` the
        backend leaves the sandbox for the next owner to adopt.
        """
        running = traj.current
        if running is not None and not self.runner.rerunnable(running):
            message = "the worker shut down while the call ran"
            self.runner.answer(traj, running, ErrorCode.WORKER_LOST, message)
        if traj.ending is not None and traj.task is not None:
            # It is ending anyway: let its task finish that (cancelling it midway
            # could leave its sandbox behind).
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(traj.task), 30)
            if traj.task.done():
                return
        await _cancel([traj.task] if traj.task else [])
        if traj.ending is not None:  # it was ending anyway: finish that
            await self.runner.end(traj)
            return
        await self.runner.drop_slot(traj, keep=keep)
        # The worker_lost result is in Redis before the next owner can see the entry.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(traj.flushed.wait(), 10)
        await self.fleet.requeue(traj.traj_id, self.id, graceful=True)
        await self._forget(traj)

    # ------------------------------------------------------------- plumbing
    async def _forget(self, traj: Traj) -> None:
        """``traj`` is over here (ended, handed back or lost to another worker)."""
        if self.owned.get(traj.traj_id) is traj:
            del self.owned[traj.traj_id]
        self.intake.slot_freed()
        self.reader.wake(traj)
        index = self.keys.worker_trajs(self.id)
        await retrying(self.health, lambda: self.redis.srem(index, traj.traj_id), "unindexing")

    def _fenced(self, traj_id: str) -> None:
        """Redis refused a write for ``traj_id``: another worker owns it now."""
        traj = self.owned.get(traj_id)
        if traj is not None and not traj.dropped:
            task = asyncio.create_task(self.runner.drop(traj), name=f"drop-{traj_id}")
            self._drops.add(task)
            task.add_done_callback(self._drops.discard)

    def _on_agent_event(self, msg: dict[str, Any]) -> None:
        """Unsolicited agent news (background tasks); ``msg["slot"]`` names the slot."""
        if msg.get("event") == "bg":
            self.bg.on_event(msg)
        else:
            log.debug("agent event: %s", msg.get("event"))


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
