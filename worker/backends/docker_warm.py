"""Warm pools per task image (issue 35), sized from recent demand.

The warm pool (``warm_pool``) keeps containers of the default image only. With
``image_warm_pool`` > 0, a Docker worker also keeps idle containers of the task
images (any config other than the default one) its trajectories opened in the
last ``image_warm_window_s``: the budget of ``image_warm_pool`` idle containers
is shared out over each config's opens in that window by the Sainte-Laguë rule
(proportional, leaning to giving every image in demand one before the most
asked-for gets many), and no config gets more idle containers than it had opens.
Only images the engine holds are kept warm (keeping warm never pulls).
When an open takes one, another is started in its place; when a config's
demand falls out of the window, its idle containers are removed. Containers of
fork copies (``docker_prestart``) are not this pool's: it neither counts nor
removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from ..lease import wait_event
from .base import SandboxError
from .docker_box import Box, BoxConfig
from .docker_images import image_ref

log = logging.getLogger("toolq.worker.docker")

#: How often the pools are checked against demand when no open wakes them.
TICK_S = 2.0
#: A config whose warm container failed to start is not started again for this long.
FAILED_PAUSE_S = 30.0

K = TypeVar("K")


def share(demand: dict[K, int], budget: int) -> dict[K, int]:
    """Share ``budget`` seats by ``demand`` (Sainte-Laguë: each seat goes to the largest
    ``demand / (2 * seats + 1)``, ties to the first), none getting more than its demand."""
    seats = dict.fromkeys(demand, 0)
    for _ in range(budget):
        wanting = [k for k in demand if seats[k] < demand[k]]
        if not wanting:
            break
        best = max(wanting, key=lambda k: demand[k] / (2 * seats[k] + 1))
        seats[best] += 1
    return {k: n for k, n in seats.items() if n}


class ImageWarm:
    """The task images' warm pools of one Docker backend (``backend.image_warm``)."""

    def __init__(self, backend: Any, new_box: Callable[[BoxConfig], Box]) -> None:
        self.backend = backend
        self.settings = backend.settings
        self.new_box = new_box
        self.demand: dict[BoxConfig, deque[float]] = {}
        self.mine: set[str] = set()  # names of the containers this pool started
        self.failed_at: dict[BoxConfig, float] = {}
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def on(self) -> bool:
        return int(self.settings.image_warm_pool or 0) > 0

    def start(self) -> None:
        if self.on and self.task is None:
            self.task = asyncio.create_task(self._run(), name="docker-image-warm")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task

    def opened(self, config: BoxConfig, box: Box | None) -> None:
        """An open of ``config`` takes ``box`` (None: a container starts for it)."""
        if not self.on or config == self.backend.default_config:
            return
        self.demand.setdefault(config, deque()).append(time.monotonic())
        if box is not None and box.name in self.mine and not box.used:
            self.backend.observer.image_warm_hit()
        self.wake.set()

    def targets(self, now: float) -> dict[BoxConfig, int]:
        """How many idle containers each config should have now."""
        since = now - float(self.settings.image_warm_window_s)
        counts = {}
        for config, times in list(self.demand.items()):
            while times and times[0] < since:
                times.popleft()
            if not times:
                del self.demand[config]
            elif image_ref(config.image) in self.backend.images.held:
                counts[config] = len(times)
        return share(counts, int(self.settings.image_warm_pool))

    def reconcile(self) -> None:
        """Start what the pools lack, remove what they no longer want."""
        now = time.monotonic()
        wanted = self.targets(now)
        idle: dict[BoxConfig, list[Box]] = {}
        for box in list(self.backend._boxes):
            if box.name in self.mine and not box.used and not box.closing and not box.dead:
                idle.setdefault(box.config, []).append(box)
        self.mine &= {b.name for b in self.backend._boxes}  # taken or gone: not the pool's
        for config, boxes in idle.items():
            for box in boxes[wanted.get(config, 0) :]:
                self.mine.discard(box.name)
                self.backend._discard(box)
        for config, count in wanted.items():
            if now - self.failed_at.get(config, -FAILED_PAUSE_S) < FAILED_PAUSE_S:
                continue
            for _ in range(count - len(idle.get(config, []))):
                box = self.new_box(config)
                self.mine.add(box.name)
                assert box.boot is not None
                box.boot.add_done_callback(self._booted(config))

    def _booted(self, config: BoxConfig) -> Callable[[asyncio.Task[None]], None]:
        """A boot's done-callback: a failed start pauses ``config``'s pool."""

        def done(boot: asyncio.Task[None]) -> None:
            if boot.cancelled() or boot.exception() is not None:
                self.failed_at[config] = time.monotonic()

        return done

    async def _run(self) -> None:
        while not self.backend._closing:
            await wait_event(self.wake, TICK_S)
            self.wake.clear()
            try:
                self.reconcile()
            except SandboxError:  # shutting down
                return
            except Exception as exc:  # an engine hiccup must not end the pools
                log.warning("image warm pools: %s", exc)
