"""Containers started ahead of a fork's copies (issue 31).

A fork's snapshot entry says how many copies open next (``SnapshotArgs.copies``):
while the source's workspace is packed, the worker that holds it starts their
containers (through the same start limit as every start), so the copies' opens
find them booted, like warm ones. A container no copy took within
``PRESTART_IDLE_S`` is removed (the copies went elsewhere, or asked for another
image or limits), unless the warm pool wants it.
"""

from __future__ import annotations

import abc
import asyncio
import logging

from toolq.schemas import TrajectorySpec

from ..settings import WorkerSettings
from .base import Backend, SandboxError
from .docker_box import Box, BoxConfig, box_config

log = logging.getLogger("toolq.worker.docker")

#: How long a container started for a fork's copy waits for it before it is removed.
PRESTART_IDLE_S = 60.0


class Prestart(Backend):
    """``prestart``: containers for trajectories known to open soon."""

    settings: WorkerSettings
    default_config: BoxConfig
    _boxes: list[Box]
    _closing: bool

    @abc.abstractmethod
    def _new_box(self, config: BoxConfig, traj_id: str = "", warm: bool = False) -> Box: ...

    @abc.abstractmethod
    def _discard(self, box: Box) -> None: ...

    def prestart(self, spec: TrajectorySpec, count: int) -> int:
        """Start containers of ``spec``'s config for ``count`` more slots, less the
        room idle or partly used ones of that config have; returns how many."""
        if self._closing or count <= 0:
            return 0
        try:
            config = box_config(spec, self.settings)
        except SandboxError:
            return 0  # its opens will say why
        per = self.settings.slots_per_container
        room = sum(
            per - len(b.slots)
            for b in self._boxes
            if b.config == config and not b.closing and not b.adopted and not b.dead
        )
        needed = -(-max(0, count - room) // per)
        for _ in range(needed):
            box = self._new_box(config, warm=True)
            asyncio.get_running_loop().call_later(PRESTART_IDLE_S, self._unused, box)
        if needed:
            log.info("starting %d container(s) for a fork's copies", needed)
        return needed

    def _unused(self, box: Box) -> None:
        """Remove a container started for a copy that never came (the warm pool
        keeps what it would start anyway)."""
        if box.used or box.closing:
            return
        if box.config == self.default_config:
            idle = [b for b in self._boxes if b.config == box.config and not b.used]
            if len([b for b in idle if not b.closing]) <= self.settings.warm_pool:
                return
        self._discard(box)
