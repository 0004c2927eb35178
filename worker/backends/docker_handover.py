"""Containers that outlive their worker: hand-over, adoption, sweeps.

``HandOver`` is the part of ``DockerBackend`` that deals with them; the backend
owns the state it uses (declared below) and boots and removes containers.

Hand-over: ``release(keep=True)`` (a worker stopping while another is alive, or
one that lost its trajectory to another) leaves a trajectory's container
running and only ends its agent (stdin EOF: it kills its processes and exits);
a SIGKILLed worker's containers keep running the same way. The next owner's
``acquire`` finds the running container labelled with the trajectory and
*adopts* it: a fresh agent, the same ``/workspace``, so files survive (running
processes, shell sessions and background tasks do not). Warm, packed and
recycled containers are not kept, and never adopted.

Sweeps (at start and every ``sweep_s``) remove this namespace's containers
that nobody will use again: those of dead workers without a trajectory label,
stopped ones, and kept ones whose trajectory has ended, lost its record, went
idle past its ``idle_timeout_s`` while pending, or runs in another container
now. A kept container of a pending or running trajectory waits for adoption.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from typing import Any

from ..channel import AgentChannel
from ..settings import WorkerSettings
from .base import Backend, SandboxError, TrajState
from .docker_box import (
    LABEL_MANAGED,
    LABEL_NS,
    LABEL_POOL,
    LABEL_RUNTIME,
    LABEL_TRAJ,
    LABEL_WORKER,
    Box,
    BoxConfig,
    awaits_adoption,
    is_recycled,
    labels_of,
)

log = logging.getLogger("toolq.worker.docker")


class HandOver(Backend):
    """Hand-over, adoption and sweeps of the Docker backend's containers."""

    settings: WorkerSettings
    ns: str
    api: Any
    _boxes: list[Box]  # the containers this worker serves or keeps warm
    _kept: set[str]  # ids of containers this worker left for a next owner
    _removing: set[str]  # ids being removed: never adopted
    _closing: bool

    @abc.abstractmethod
    def _launch(self, box: Box) -> None:
        """Boot ``box`` in the background (for an adopted one: attach a fresh agent)."""

    @abc.abstractmethod
    async def _wait_booted(self, box: Box) -> AgentChannel:
        """Wait for ``box``'s boot; SandboxError (and the container removed) if it failed."""

    @abc.abstractmethod
    async def _remove(self, cid: str, lost_name: str = "") -> None:
        """Remove a container now."""

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
        found = [
            c
            for c in found
            if c["Id"] not in taken
            and not labels_of(c).get(LABEL_POOL)
            and not is_recycled(c)
            # Never across runtimes (a worker defaulting to runsc adopts no runc container);
            # containers from before the label ran under runc.
            and labels_of(c).get(LABEL_RUNTIME, "runc") == config.runtime
        ]
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
