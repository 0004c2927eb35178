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
  that size: writes beyond it fail with "No space left on device". A tmpfs is
  memory: its pages are charged to the container's memory cgroup, so the
  container's memory limit is ``memory_mb + disk_mb`` and processes keep their
  ``memory_mb``. Without it the workspace lives in the container's writable
  layer, bounded only by the host's disk (overlay2 has no per-container quota
  unless its backing filesystem is xfs with pquota).
- ``warm_pool`` containers of the default image and limits are kept started.
- Containers are labelled ``toolq.managed``, ``toolq.ns``, ``toolq.worker`` and
  ``toolq.traj`` (empty for warm and packed ones).

Hand-over: ``release(keep=True)`` (a worker stopping while another is alive, or
one that lost its trajectory to another) leaves a trajectory's container
running and only ends its agent (stdin EOF: it kills its processes and exits);
a SIGKILLed worker's containers keep running the same way. The next owner's
``acquire`` finds the running container labelled with the trajectory and
*adopts* it: a fresh agent, the same ``/workspace``, so files survive (running
processes, shell sessions and background tasks do not). Warm and packed
containers carry no trajectory label and are not kept.

Sweeps (at start and every ``sweep_s``) remove this namespace's containers
that nobody will use again: those of dead workers without a trajectory label,
stopped ones, and kept ones whose trajectory has ended, lost its record, went
idle past its ``idle_timeout_s`` while pending, or runs in another container
now. A kept container of a pending or running trajectory waits for adoption.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from dataclasses import replace
from typing import Any

from toolq.schemas import TrajectorySpec

from ..channel import AgentChannel, ChannelClosedError
from ..settings import WorkerSettings
from .base import Backend, SandboxError, Slot, TrajState
from .docker_box import (
    DROP_TIMEOUT_S,
    FAILED_REFILL_PAUSE_S,
    INIT_TIMEOUT_S,
    LABEL_MANAGED,
    LABEL_NS,
    LABEL_POOL,
    LABEL_TRAJ,
    LABEL_WORKER,
    READY_TIMEOUT_S,
    WORKSPACE,
    Box,
    BoxConfig,
    awaits_adoption,
    box_config,
    labels_of,
    no_python_message,
    safe_name,
)
from .docker_engine import Engine
from .docker_stream import ExecStream

log = logging.getLogger("toolq.worker.docker")


class DockerBackend(Backend):
    """Slots in Docker containers, each served by one attached agent process."""

    name = "docker"

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.ns = settings.namespace
        self.engine = Engine(settings)
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

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Remove containers nobody will use again, then fill the warm pool and keep sweeping."""
        try:
            await self.sweep()
        except Exception as exc:  # an engine hiccup must not stop the worker starting
            log.warning("could not sweep left-over containers: %s", exc)
        self._refill_soon()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="docker-sweep")

    async def shutdown(self) -> None:
        """Remove every container this backend started (waits for starts in flight).

        Containers handed over with ``release(keep=True)`` are not its own any more.
        """
        self._closing = True
        for task in (self._refill_task, self._sweeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await asyncio.gather(*self._boots, return_exceptions=True)
        await asyncio.sleep(0)  # let discarded boxes' done-callbacks schedule their removal
        channels = [b.channel for b in self._boxes if b.channel is not None]
        for box in list(self._boxes):
            self._discard(box)
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
        with contextlib.suppress(Exception):
            self.api.close()

    # -------------------------------------------------------------- sweeps
    async def _sweep_loop(self) -> None:
        """Sweep every ``sweep_s``: hand-overs nobody adopted must not leak forever."""
        while not self._closing:
            await asyncio.sleep(self.settings.sweep_s)
            try:
                await self.sweep()
            except Exception as exc:  # Redis or the engine away: try again next time
                log.warning("sweeping left-over containers failed: %s", exc)

    async def sweep(self) -> int:
        """Remove this namespace's containers nobody will use again; return how many.

        A container is looked at when its worker is dead (or it is one this
        worker handed over); it stays while its trajectory may still adopt it.
        """
        if self.worker_heartbeats is None:
            return 0
        beats = await self.worker_heartbeats()
        found = await asyncio.to_thread(
            self.api.containers,
            all=True,
            filters={"label": [f"{LABEL_MANAGED}=1", f"{LABEL_NS}={self.ns}"]},
        )
        now_s = time.time()
        mine = {b.cid for b in self._boxes}
        left = [c for c in found if c["Id"] not in mine and self._unattended(c, beats, now_s)]
        traj_ids = sorted({t for c in left if (t := labels_of(c).get(LABEL_TRAJ))})
        states: dict[str, TrajState] | None = None
        if traj_ids and self.trajectory_states is not None:
            states = await self.trajectory_states(traj_ids)
        stale = [c for c in left if not awaits_adoption(c, states, now_s)]
        for c in stale:
            labels = labels_of(c)
            log.info(
                "removing left-over container %s (worker %s, trajectory %s, %s)",
                c["Id"][:12],
                labels.get(LABEL_WORKER) or "-",
                labels.get(LABEL_TRAJ) or "-",
                c.get("State") or "?",
            )
        await asyncio.gather(*(self._remove(c["Id"]) for c in stale))
        return len(stale)

    def _unattended(self, container: dict[str, Any], beats: dict[str, int], now_s: float) -> bool:
        """Not this worker's to serve and not a live worker's: a container to judge.

        Dead means a stale heartbeat, or none at all and older than
        ``dead_after_s`` (which spares containers a starting worker made before
        its first heartbeat). Our own are judged only once handed over.
        """
        owner = labels_of(container).get(LABEL_WORKER, "")
        dead_after_s = self.settings.dead_after_s
        if owner == self.settings.worker_id:
            return container["Id"] in self._kept
        if owner in beats:
            return now_s - beats[owner] / 1000.0 > dead_after_s
        return now_s - float(container.get("Created") or now_s) > dead_after_s

    # ---------------------------------------------------------------- slots
    async def acquire(self, traj_id: str, spec: TrajectorySpec) -> Slot:
        """The trajectory's left-over container (adopted), else a packable, warm or new one."""
        config = box_config(spec, self.settings)
        if self.settings.slots_per_container == 1:
            adopted = await self._adopt(traj_id, config)
            if adopted is not None:
                try:
                    return await self._open_slot(adopted, spec)
                except SandboxError as exc:
                    log.warning("adopted container %s failed (%s): starting one", adopted.name, exc)
        box = self._pick(config) or self._new_box(config, traj_id)
        return await self._open_slot(box, spec)

    async def _open_slot(self, box: Box, spec: TrajectorySpec) -> Slot:
        """Create a workspace in ``box`` (booted or booting) and return its slot."""
        name = f"s{next(self._seq)}"
        box.slots.add(name)
        box.used = True
        self._refill_soon()
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
            self._discard(box)
        elif box.channel is not None and box.channel.alive:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(box.channel.request("drop", slot=slot.name), DROP_TIMEOUT_S)

    async def _hand_over(self, box: Box) -> None:
        """Forget a container but leave it running; its agent ends on stdin EOF."""
        box.closing = True
        with contextlib.suppress(ValueError):
            self._boxes.remove(box)
        self._kept.add(box.cid)
        if box.channel is not None:
            await box.channel.close()
        if box.stream is not None:
            box.stream.close()
        log.info(
            "container %s (%s) kept for the next owner of %s", box.name, box.cid[:12], box.traj
        )

    def _release_name(self, box: Box, name: str) -> None:
        box.slots.discard(name)
        if not box.slots and box.used:
            self._discard(box)

    async def _may_have_left_over(self, traj_id: str) -> bool:
        """False for a trajectory that never had a slot: spares new ones an engine query."""
        if self.trajectory_states is None:
            return True
        try:
            state = (await self.trajectory_states([traj_id])).get(traj_id)
        except Exception:  # Redis hiccup: look anyway
            return True
        return state is None or bool(state.slot)

    async def _adopt(self, traj_id: str, config: BoxConfig) -> Box | None:
        """The running container a previous owner left for ``traj_id``, with a fresh agent."""
        if self._closing or not await self._may_have_left_over(traj_id):
            return None
        try:
            found = await asyncio.to_thread(
                self.api.containers,
                filters={
                    "label": [
                        f"{LABEL_MANAGED}=1",
                        f"{LABEL_NS}={self.ns}",
                        f"{LABEL_TRAJ}={traj_id}",
                    ],
                    "status": "running",
                },
            )
        except Exception as exc:  # the engine will answer the fresh start, or explain
            log.warning("could not look for %s's container: %s", traj_id, exc)
            return None
        taken = {b.cid for b in self._boxes} | self._removing
        found = [c for c in found if c["Id"] not in taken and not labels_of(c).get(LABEL_POOL)]
        if not found:
            return None
        left = max(found, key=lambda c: float(c.get("Created") or 0))  # the newest
        names = left.get("Names") or [left["Id"][:12]]
        box = Box(
            name=str(names[0]).lstrip("/"),
            config=replace(config, image=str(left.get("Image") or config.image)),
            traj=traj_id,
            cid=left["Id"],
            used=True,
            adopted=True,
        )
        self._launch(box)
        try:
            await self._wait_booted(box)  # a failed boot removes the container
        except SandboxError as exc:
            log.warning("could not adopt container %s of %s: %s", box.name, traj_id, exc)
            return None
        self._kept.discard(box.cid)
        log.info("adopted container %s (%s) of %s", box.name, box.cid[:12], traj_id)
        return box

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
    def _refill_soon(self) -> None:
        """Top the warm pool up in the background (one refill at a time)."""
        if self.settings.warm_pool <= 0 or self._closing:
            return
        if self._refill_task is not None and not self._refill_task.done():
            return
        if time.monotonic() - self._refill_failed_at < FAILED_REFILL_PAUSE_S:
            return
        self._refill_task = asyncio.create_task(self._refill(), name="docker-warm-pool")

    async def _refill(self) -> None:
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
                async with self._start_sem:  # start storms slow the engine down for everyone
                    got = await asyncio.to_thread(self.engine.start_container, box)
            box.cid = got.cid
            box.stream = await ExecStream.open(got.sock, got.leftover, box.name)
            box.channel = AgentChannel(box.stream.reader, box.stream.write, self.on_event, box.name)
            try:
                await asyncio.wait_for(asyncio.shield(box.channel.ready), READY_TIMEOUT_S)
            except (ChannelClosedError, asyncio.TimeoutError) as exc:
                raise SandboxError(
                    await self._explain_agent_failure(box, got.exec_id, exc)
                ) from exc
        except BaseException as exc:
            self._discard(box)
            if isinstance(exc, SandboxError | asyncio.CancelledError):
                raise
            raise SandboxError(f"cannot start a container of {box.config.image}: {exc}") from exc
        if not box.adopted:
            self.observer.container_started(time.monotonic() - started_s)
            log.info("container %s (%s) ready", box.name, box.cid[:12])

    async def _explain_agent_failure(self, box: Box, exec_id: str, exc: BaseException) -> str:
        assert box.stream is not None
        said = box.stream.diagnostics()
        image = box.config.image
        if "executable file not found" in said or "no such file" in said.lower():
            return no_python_message(image, said)
        exit_code = None
        with contextlib.suppress(Exception):
            exit_code = (await asyncio.to_thread(self.api.exec_inspect, exec_id)).get("ExitCode")
        if isinstance(exc, asyncio.TimeoutError):
            return f"the toolq agent in image {image} did not start within {READY_TIMEOUT_S:g}s"
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
        self.observer.container_removed()
