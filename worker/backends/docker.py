"""Docker backend: sticky slots in long-lived containers, one agent process each.

A container runs ``sleep infinity`` (under docker-init, which reaps orphans) and
one agent process started by a single ``docker exec`` whose stdin/stdout stay
attached: every tool call is a JSON line over that stream (~2 ms), never a new
``docker exec`` (~70 ms).

- The spec picks image, env, workdir and limits; the worker's ``max_*``
  settings cap them. Containers get no network unless the spec asks for it
  (and ``allow_network`` permits), a memory limit without swap, a pids limit,
  no capabilities, ``no-new-privileges``, and run the agent as the image's
  non-root user (the image's ``USER``, else ``sandbox``, else uid 1000, else root).
- ``slots_per_container > 1`` packs trajectories of the same image and limits
  into one container (workspaces ``/workspace/<slot>``; the container's limits
  are the per-trajectory limits times the slots it holds). Packed slots share
  a uid and a kernel: they are separated by workspace path, not by a security
  boundary. With one slot per container the workspace is ``/workspace``.
- ``disk_mb`` (or the worker's ``max_disk_mb``) makes ``/workspace`` a tmpfs of
  that size, and ``/tmp`` and ``/var/tmp`` too (the sandbox user's home stays
  in the writable layer): writes beyond it fail with "No space left on device". A tmpfs is
  memory: its pages are charged to the container's memory cgroup, so the
  container's memory limit is ``memory_mb + disk_mb`` and processes keep their
  ``memory_mb``. Without it the workspace lives in the container's writable
  layer, bounded only by the host's disk (overlay2 has no per-container quota
  unless its backing filesystem is xfs with pquota).
- ``warm_pool`` containers of the default image and limits are kept started
  (topped up ``REFILL_DELAY_S`` after an open takes one);
  a fork's copies get containers started while its snapshot is packed
  (``docker_prestart.py``) and their files through a read-only directory of
  their own (``docker_exchange.py``).
- ``recycle_containers``: a container of the default image and limits whose
  last slot ended goes back to the pool after a reset verified from the
  engine's side (``docker_recycle.py``), instead of being removed.
- Containers are labelled ``toolq.managed``, ``toolq.ns``, ``toolq.worker`` and
  ``toolq.traj`` (empty for warm and packed ones).

Containers that outlive their worker (hand-over to the next owner, adoption,
sweeps) are ``docker_handover.py``'s; recycling is ``docker_recycle.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from typing import Any

from toolq.schemas import TrajectorySpec

from ..channel import AgentChannel, ChannelClosedError
from ..settings import WorkerSettings
from .base import SandboxError, Slot
from .docker_box import (
    DROP_TIMEOUT_S,
    FAILED_REFILL_PAUSE_S,
    INIT_TIMEOUT_S,
    READY_TIMEOUT_S,
    REFILL_DELAY_S,
    SEED_BYTES_PER_S,
    WORKSPACE,
    Box,
    BoxConfig,
    Started,
    box_config,
    no_python_message,
    safe_name,
)
from .docker_engine import Engine
from .docker_exchange import Staging, detect
from .docker_handover import HandOver
from .docker_images import EngineImages
from .docker_prestart import Prestart
from .docker_recycle import Recycler, Rejected
from .docker_runtime import NO_RECYCLING, check_network, is_gvisor, unregistered
from .docker_stream import ExecStream
from .docker_warm import ImageWarm

#: What a failed --seed-home says first (``toolq.worker.agent.start.SEED_FAILED``,
#: which the agent's stdlib-only package keeps to itself).
SEED_FAILED = "toolq agent: copying the image's home in failed"

log = logging.getLogger("toolq.worker.docker")


class DockerBackend(HandOver, Prestart, Staging):
    """Slots in Docker containers, each served by one attached agent process."""

    name = "docker"

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.ns = settings.namespace
        self.engine: Engine = Engine(settings)
        self.api: Any = self.engine.api
        self._start_sem = asyncio.Semaphore(max(1, settings.start_concurrency))
        self._boxes: list[Box] = []
        self._by_slot: dict[str, Box] = {}
        self._seq = itertools.count(1)
        self._tag = uuid.uuid4().hex[:6]
        self._removals: set[asyncio.Task[None]] = set()
        self._boots: set[asyncio.Task[None]] = set()
        self._refill_task: asyncio.Task[None] | None = None
        self._refill_failed_at = 0.0
        self._closing = False
        self._kept: set[str] = set()  # ids of containers this worker left for a next owner
        self._removing: set[str] = set()  # ids being removed: never adopted
        self._sweeper: asyncio.Task[None] | None = None
        self.default_config = box_config(TrajectorySpec(), settings)
        self.recycler = Recycler(self.engine, settings, self._connect)
        self._recycles: dict[asyncio.Task[float], Box] = {}  # containers being reset
        self._awaited: set[asyncio.Task[float]] = set()  # resets an open waits for
        self.registered: dict[str, tuple[str, ...]] = {}  # the engine's runtimes, their args
        self.images = EngineImages(self.api, settings, self._images_in_use)
        self.image_warm = ImageWarm(self, lambda config: self._new_box(config, warm=True))

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Check the engine knows every allowed runtime (SandboxError if not), remove
        containers nobody will use again, then fill the warm pool and keep sweeping."""
        await self._check_runtimes()
        self.images.observer = self.observer
        try:
            await self.sweep()
        except Exception as exc:  # an engine hiccup must not stop the worker starting
            log.warning("could not sweep left-over containers: %s", exc)
        tag = safe_name(f"{self.ns}-{self.settings.worker_id}")
        self.engine.exchange = await asyncio.to_thread(
            detect, self.api, self.settings.exchange_dir, tag
        )
        if self.engine.exchange is not None:
            await self._prune_exchange(self.engine.exchange)
        self._refill_soon()
        self.image_warm.start()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="docker-sweep")

    def _images_in_use(self) -> set[str]:
        """Images of this backend's containers, those still starting included."""
        boxes = [*self._boxes, *self._recycles.values()]
        return {b.config.image for b in boxes}

    async def _check_runtimes(self) -> None:
        """A worker allowing a runtime its engine does not have would fail every open
        asking for it: it does not start."""
        self.registered = await asyncio.to_thread(self.engine.load_runtimes)
        missing = unregistered(self.settings, self.registered)
        if missing:
            raise SandboxError(
                f"runtime(s) {', '.join(missing)} not registered with the Docker engine "
                f"(it has: {', '.join(sorted(self.registered)) or 'none'}); see the README's "
                "gVisor section"
            )
        if self.settings.recycle_containers and is_gvisor(self.settings.runtime, self.registered):
            log.warning("recycle_containers: %s", NO_RECYCLING)

    async def shutdown(self) -> None:
        """Remove every container this backend started (waits for starts in flight).

        Containers handed over with ``release(keep=True)`` are not its own any more.
        """
        self._closing = True
        await self.image_warm.stop()
        for task in (self._refill_task, self._sweeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for recycling in self._recycles:
            recycling.cancel()  # their containers are removed, not reused
        await asyncio.gather(*self._boots, *self._recycles, return_exceptions=True)
        await asyncio.sleep(0)  # let discarded boxes' done-callbacks schedule their removal
        channels = [b.channel for b in self._boxes if b.channel is not None]
        for box in list(self._boxes):
            self._discard(box)
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
        if self.engine.exchange is not None:
            self.engine.exchange.close()
        with contextlib.suppress(Exception):
            self.api.close()

    # ---------------------------------------------------------------- slots
    async def acquire(self, traj_id: str, spec: TrajectorySpec) -> Slot:
        """The trajectory's left-over container (adopted), else a packable, warm or new one."""
        config = box_config(spec, self.settings)
        check_network(config.runtime, config.network, self.registered)
        if self.settings.slots_per_container == 1:
            adopted = await self._adopt(traj_id, config)
            if adopted is not None:
                try:
                    return await self._open_slot(adopted, spec)
                except SandboxError as exc:
                    log.warning("adopted container %s failed (%s): starting one", adopted.name, exc)
        box = self._pick(config) or await self._await_reset(config)
        self.image_warm.opened(config, box)
        return await self._open_slot(box or self._new_box(config, traj_id), spec)

    async def _open_slot(self, box: Box, spec: TrajectorySpec) -> Slot:
        """Create a workspace in ``box`` (booted or booting) and return its slot."""
        name = f"s{next(self._seq)}"
        box.slots.add(name)
        box.used = True
        self._refill_soon(REFILL_DELAY_S)
        try:
            channel = await self._wait_booted(box)
            root = WORKSPACE if self.settings.slots_per_container == 1 else f"{WORKSPACE}/{name}"
            reply = await asyncio.wait_for(
                channel.request("init", slot=name, root=root, env=spec.env, workdir=spec.workdir),
                INIT_TIMEOUT_S,
            )
            if not reply.get("ok"):
                raise SandboxError(f"workspace init failed: {reply.get('error')}")
        except (ChannelClosedError, asyncio.TimeoutError) as exc:
            self._release_name(box, name)
            raise SandboxError(f"container {box.name} did not answer init: {exc}") from exc
        except BaseException:
            self._release_name(box, name)
            raise
        slot = Slot(
            slot_id=f"{box.cid[:12]}:{name}",
            name=name,
            root=str(reply.get("root") or root),
            channel=channel,
            sandbox_id=box.cid,
            adopted=box.adopted,
        )
        self._by_slot[slot.slot_id] = box
        return slot

    async def release(self, slot: Slot, *, keep: bool = False) -> None:
        """Free a slot; the container goes with its last slot.

        ``keep=True`` leaves a trajectory's own container running for the next
        owner to adopt (warm and packed ones carry no trajectory label: removed).
        """
        box = self._by_slot.pop(slot.slot_id, None)
        if box is None:
            return
        box.slots.discard(slot.name)
        if keep and not box.slots and box.traj and not box.pool and box.ready and not box.dead:
            await self._hand_over(box)
        elif not box.slots:
            if keep or not self._recycle(box):
                self._discard(box)
        elif box.channel is not None and box.channel.alive:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(box.channel.request("drop", slot=slot.name), DROP_TIMEOUT_S)

    def _release_name(self, box: Box, name: str) -> None:
        box.slots.discard(name)
        if not box.slots and box.used:
            self._discard(box)

    def _pick(self, config: BoxConfig) -> Box | None:
        """A live container of this config with room: partly used first, then warm.

        Adopted ones hold one trajectory's workspace: never another's.
        """
        room = self.settings.slots_per_container
        candidates = []
        for box in list(self._boxes):
            if box.dead:
                self._discard(box)
            elif box.adopted:
                continue
            elif box.config == config and not box.closing and len(box.slots) < room:
                candidates.append(box)
        candidates.sort(key=lambda b: (not b.used, not b.ready))
        return candidates[0] if candidates else None

    # ----------------------------------------------------------- warm pool
    def _refill_soon(self, delay_s: float = 0.0) -> None:
        """Top the warm pool up in the background, ``delay_s`` from now (one refill
        at a time: opens meanwhile join the one waiting)."""
        if self.settings.warm_pool <= 0 or self._closing:
            return
        if self._refill_task is not None and not self._refill_task.done():
            return
        if time.monotonic() - self._refill_failed_at < FAILED_REFILL_PAUSE_S:
            return
        refill = self._refill(delay_s)
        self._refill_task = asyncio.create_task(refill, name="docker-warm-pool")

    async def _refill(self, delay_s: float) -> None:
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        while not self._closing:
            idle = [
                b
                for b in self._boxes
                if not b.used and not b.closing and b.config == self.default_config
            ]
            missing = self.settings.warm_pool - len(idle)
            if missing <= 0:
                return
            boxes = [self._new_box(self.default_config, warm=True) for _ in range(missing)]
            results = await asyncio.gather(
                *(self._wait_booted(b) for b in boxes), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                self._refill_failed_at = time.monotonic()
                log.warning(
                    "warm pool: %d container(s) failed to start: %s", len(errors), errors[0]
                )
                return

    # ----------------------------------------------------------- recycling
    def _recycle(self, box: Box) -> bool:
        """Reset ``box`` for the pool in the background; False: remove it instead."""
        if self._closing or not self.recycler.wants(box, self.default_config):
            return False
        if not self._pool_has_room():
            return False
        with contextlib.suppress(ValueError):
            self._boxes.remove(box)  # nobody picks it while it is reset
        box.traj = ""  # its label's trajectory is not its own any more: never handed over
        task = asyncio.create_task(self.recycler.recycle(box), name=f"recycle-{box.name}")
        self._recycles[task] = box
        task.add_done_callback(lambda done: self._recycled(box, done))
        return True

    def _recycled(self, box: Box, task: asyncio.Task[float]) -> None:
        """Put a verified container back in the pool; remove a rejected one."""
        self._recycles.pop(task, None)
        error = None if task.cancelled() else task.exception()
        if task.cancelled() or error is not None or self._closing:
            if isinstance(error, Rejected):
                self.observer.container_recycle_rejected(error.reason)
                log.warning("container %s not reused: %s", box.name, error)
            elif error is not None:
                log.error("recycling container %s failed: %r", box.name, error)
            box.channel = None  # ended on purpose: not a lost container
            self._finish_discard(box)
            self._refill_soon()
            return
        self.observer.container_recycled(task.result())
        box.used = False
        self._boxes.append(box)
        log.info("container %s (%s) recycled", box.name, box.cid[:12])

    async def _await_reset(self, config: BoxConfig) -> Box | None:
        """The container of ``config`` being reset that no other open waits for, once
        reset (the rest of a reset is shorter than a start, and saves the engine one);
        None when there is none, or it was rejected."""
        task = next(
            (t for t, b in self._recycles.items() if b.config == config and t not in self._awaited),
            None,
        )
        if task is None:
            return None
        self._awaited.add(task)
        try:
            await asyncio.wait([task])  # neither raises nor cancels the reset
        finally:
            self._awaited.discard(task)
        return self._pick(config)  # it, unless it was rejected (or another open was quicker)

    def _pool_has_room(self) -> bool:
        """Is one more idle container worth keeping? As many as the warm pool holds, or
        as the worker's free slots could use, whichever is more."""
        per = self.settings.slots_per_container
        in_use = sum(1 for b in self._boxes if b.slots)
        idle = sum(1 for b in self._boxes if not b.used and not b.closing) + len(self._recycles)
        wanted = max(self.settings.warm_pool, -(-self.settings.slots // per) - in_use)
        return idle < wanted

    # ------------------------------------------------------------- booting
    def _new_box(self, config: BoxConfig, traj_id: str = "", warm: bool = False) -> Box:
        if self._closing:
            raise SandboxError("the worker is shutting down")
        name = f"toolq-{safe_name(self.ns)}-{self._tag}-{next(self._seq)}"
        packed = self.settings.slots_per_container > 1
        pool = "warm" if warm else "packed" if packed else ""
        box = Box(name=name, config=config, traj="" if warm or packed else traj_id, pool=pool)
        self._launch(box)
        return box

    def _launch(self, box: Box) -> None:
        """Boot a box in the background (start it, or attach to an adopted one)."""
        box.boot = asyncio.create_task(self._boot(box), name=f"boot-{box.name}")
        self._boots.add(box.boot)
        box.boot.add_done_callback(self._boots.discard)
        self._boxes.append(box)

    async def _wait_booted(self, box: Box) -> AgentChannel:
        assert box.boot is not None
        await asyncio.shield(box.boot)  # one boot, many waiters: none may cancel it
        assert box.channel is not None
        return box.channel

    async def _boot(self, box: Box) -> None:
        """Start the container (unless adopted) and its agent; on failure remove it and
        raise SandboxError."""
        started_s = time.monotonic()
        try:
            if box.adopted:
                got = await asyncio.to_thread(self.engine.attach_agent, box)
            else:
                waited_s = await self.images.ensure(box.config.image)  # one pull per image
                if waited_s > 0:
                    self.observer.open_waited_for_pull(waited_s)
                async with self._start_sem:  # start storms slow the engine down for everyone
                    got = await asyncio.to_thread(self.engine.start_container, box)
            await self._connect(box, got)
        except BaseException as exc:
            self._discard(box)
            if isinstance(exc, SandboxError | asyncio.CancelledError):
                raise
            raise SandboxError(f"cannot start a container of {box.config.image}: {exc}") from exc
        if not box.adopted:
            self.observer.container_started(time.monotonic() - started_s)
            log.info("container %s (%s) ready", box.name, box.cid[:12])

    async def _connect(self, box: Box, got: Started) -> None:
        """Attach to a started agent's exec; wait until it says ready (SandboxError if not)."""
        box.cid = got.cid
        box.stream = await ExecStream.open(got.sock, got.leftover, box.name)
        box.channel = AgentChannel(box.stream.reader, box.stream.write, self.on_event, box.name)
        # The agent copies the image's home in first (--seed-home): time for that too.
        ready_s = READY_TIMEOUT_S + got.seed_bytes / SEED_BYTES_PER_S
        try:
            await asyncio.wait_for(asyncio.shield(box.channel.ready), ready_s)
        except (ChannelClosedError, asyncio.TimeoutError) as exc:
            explained = await self._explain_agent_failure(box, got, exc, ready_s)
            raise SandboxError(explained) from exc

    async def _explain_agent_failure(
        self, box: Box, got: Started, exc: BaseException, ready_s: float
    ) -> str:
        assert box.stream is not None
        said = box.stream.diagnostics()
        image = box.config.image
        if SEED_FAILED in said:  # Python ran: the home did not fit, or could not be written
            return (
                f"the toolq agent could not copy the image's home into its tmpfs in image "
                f"{image} (a home larger than disk_mb?): {said}"
            )
        if "executable file not found" in said or "no such file" in said.lower():
            return no_python_message(image, said)
        exit_code = None
        with contextlib.suppress(Exception):
            exit_code = (await asyncio.to_thread(self.api.exec_inspect, got.exec_id)).get(
                "ExitCode"
            )
        if isinstance(exc, asyncio.TimeoutError):
            seeded = " (copying the image's home in first)" if got.seed_bytes else ""
            return f"the toolq agent in image {image} did not start within {ready_s:.0f}s{seeded}"
        return f"the toolq agent failed to start in image {image} (exit code {exit_code}): {said}"

    # ------------------------------------------------------------- removal
    def _discard(self, box: Box) -> None:
        """Forget a container and remove it in the background (shutdown waits)."""
        if box.closing:
            return
        box.closing = True
        with contextlib.suppress(ValueError):
            self._boxes.remove(box)
        if box.boot is not None and not box.boot.done():
            # Still starting (its acquire failed or was cancelled): remove it once started.
            box.boot.add_done_callback(lambda _: self._finish_discard(box))
        else:
            self._finish_discard(box)

    def _finish_discard(self, box: Box) -> None:
        lost = box.dead
        if box.stream is not None:
            box.stream.close()
        if lost:
            self.observer.container_lost()
        if box.cid:
            self._removing.add(box.cid)
            task = asyncio.create_task(self._remove(box.cid, box.name if lost else ""))
            self._removals.add(task)
            task.add_done_callback(self._removals.discard)

    async def _remove(self, cid: str, lost_name: str = "") -> None:
        self._removing.add(cid)
        try:
            if lost_name:
                await asyncio.to_thread(self.engine.log_loss, cid, lost_name)
            await asyncio.to_thread(self.engine.remove_now, cid)
        finally:
            self._removing.discard(cid)
            self._kept.discard(cid)
            if self.engine.exchange is not None:
                self.engine.exchange.removed(cid)
        self.observer.container_removed()
