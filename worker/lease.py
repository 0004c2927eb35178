"""The worker's standing with Redis: its lease on what it owns, and its catch-ups.

``Lease``: other workers take a worker's trajectories over once its heartbeat
is older than ``dead_after_s`` (by Redis's clock). So a worker acts on its
trajectories (starts a call, reads their streams) only while its last
successful heartbeat is younger than half of that, by its own monotonic
clock, which keeps running while the process is stopped. After a stall it
waits until the fleet has renewed the lease *and* confirmed which
trajectories are still its own; writes are fenced in Redis regardless.

``RedisHealth``: every stage reports Redis errors here; after one, each stage
catches up once (the writer replays recent writes, the readers re-read what
was delivered to this worker and is not answered yet).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import RedisError

log = logging.getLogger("toolq.worker")
T = TypeVar("T")


class Lease:
    """Valid while the last confirmed heartbeat is younger than ``valid_for_s``."""

    def __init__(self, dead_after_s: float) -> None:
        self.valid_for_s = dead_after_s / 2
        self._renewed_at = time.monotonic()
        self._renewed = asyncio.Event()
        self._renewed.set()

    def age_s(self) -> float:
        """Seconds since the heartbeat that last renewed the lease was sent."""
        return time.monotonic() - self._renewed_at

    def valid(self) -> bool:
        return self.age_s() < self.valid_for_s

    def expires_ms(self) -> float:
        """When the lease runs out, as unix ms (what a sandbox can check on its own)."""
        return time.time() * 1000.0 + (self.valid_for_s - self.age_s()) * 1000.0

    def renew(self, sent_at: float) -> None:
        """A heartbeat sent at ``sent_at`` (monotonic) succeeded and ownership is confirmed."""
        self._renewed_at = max(self._renewed_at, sent_at)
        if self.valid():
            self._renewed.set()

    async def wait_valid(self) -> None:
        """Return once the lease is valid (at once, normally)."""
        while not self.valid():
            self._renewed.clear()
            await self._renewed.wait()


class RedisHealth:
    """Counts Redis failures; each stage catches up once per failure generation."""

    def __init__(self) -> None:
        self.generation = 0
        self.failed_at = time.monotonic()  # "since start" counts as a recent failure

    def failed(self) -> None:
        self.generation += 1
        self.failed_at = time.monotonic()

    def healthy_for_s(self) -> float:
        return time.monotonic() - self.failed_at


class CatchUp:
    """One stage's view of ``RedisHealth``: ``due()`` once after each failure."""

    def __init__(self, health: RedisHealth, initially: bool = True) -> None:
        self.health = health
        self._seen = -1 if initially else health.generation

    def due(self) -> bool:
        return self._seen != self.health.generation

    def done(self, generation: int) -> None:
        self._seen = generation


async def wait_event(event: asyncio.Event, timeout_s: float) -> None:
    """``event.wait()`` for at most ``timeout_s``. Not ``asyncio.wait_for``: on
    Python < 3.12 it can swallow a cancel that comes as the event is set, and a
    loop around it then never ends (a worker that cannot stop)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        waiter.cancel()


async def retrying(health: RedisHealth, fn: Callable[[], Awaitable[T]], what: str) -> T:
    """Run a Redis operation until it succeeds (reporting failures to ``health``)."""
    delay_s = 0.05
    while True:
        try:
            return await fn()
        except (RedisError, OSError) as exc:
            health.failed()
            log.warning("%s failed (%s); retrying in %.2fs", what, exc, delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 5.0)
