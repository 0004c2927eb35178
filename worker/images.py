"""Task images: which worker holds which, claims that prefer holders, prefetch, budget.

Every worker with a Docker engine publishes, in ``Keys.worker_images``, the
images its engine holds (``held``) and is pulling (``pulling``), and its free
slots; it rewrites the hash when that changes and at least every
``image_refresh_s`` (the hash expires when the worker stops doing so).

- **Claims.** A worker that reads an open whose image its engine neither holds
  nor pulls looks for a live worker that does and has a free slot (its free
  slots less the opens in its inbox). If there is one, it puts the request in
  that worker's inbox (``Keys.worker_inbox``, which the holder reads at once)
  and leaves the entry pending for
  ``image_claim_delay_s``; then it claims it itself, and the claim script
  refuses if the holder was first. With no holder, or only full ones, it
  claims at once, so load still spreads. Either way one claim wins
  (``lua.CLAIM``), and the entry stays in a pending list until acknowledged, so
  nothing is lost when a worker dies meanwhile.
- **Prefetch.** The images of opens waiting in ``Keys.pending`` that no live
  worker holds or pulls are pulled ahead, each by one worker of the fleet (the
  one that ranks first for the image by rendezvous hashing), while a pull
  permit of its engine is free (``image_pulls``); an engine never pulls one
  image twice at once (``docker_images.EngineImages``).
- **Budget.** With ``image_budget_bytes``, the least recently used task images
  are removed while the engine's image layers take more (``image_budget.py``
  says which may go). Last use is kept per engine in ``Keys.engine_images``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from toolq.schemas import Keys, OpenRequest

from .backends.docker_images import image_ref
from .image_budget import victims
from .lease import RedisHealth, wait_event
from .metrics import Observer
from .settings import WorkerSettings

if TYPE_CHECKING:
    from .backends.docker_images import EngineImages

log = logging.getLogger("toolq.worker.images")

#: Field of ``Keys.worker_images`` holding the worker's free slots.
FREE_FIELD = "free"
#: Prefix of the fields naming images in ``Keys.worker_images``.
IMAGE_FIELD = "image:"
#: Inbox entries expire unread after this long (the open stream entry stays).
INBOX_TTL_S = 60
#: The prefetch pass looks at this many of the oldest waiting opens.
PREFETCH_WINDOW = 256
#: How often the prefetch pass and the free-slot count run, at most this far apart.
TICK_S = 1.0


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def rank(image: str, worker: str) -> bytes:
    """A worker's rendezvous rank for an image: the highest prefetches it."""
    return hashlib.sha1(f"{image}\0{worker}".encode()).digest()


class ImageAware:
    """See the module docstring. ``free_slots`` returns the worker's free slots now."""

    def __init__(
        self,
        settings: WorkerSettings,
        redis: aioredis.Redis,
        images: EngineImages,
        health: RedisHealth,
        free_slots: Callable[[], int],
        observer: Observer,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.images = images
        self.health = health
        self.free_slots = free_slots
        self.observer = observer
        self.worker_id = settings.worker_id
        self.keys = Keys(settings.namespace)
        self.key = self.keys.worker_images(self.worker_id)
        self.ttl_ms = int(max(3 * settings.image_refresh_s, settings.dead_after_s) * 1000)
        self._published: dict[str, str] | None = None

    def default_ref(self) -> str:
        return image_ref(self.settings.default_image)

    def holds(self, image: str) -> bool:
        """Does this worker's engine hold ``image``, or is it pulling it?"""
        ref = image_ref(image)
        return ref in self.images.held or ref in self.images.pulls

    def capacity_changed(self) -> None:
        """A slot was taken or freed: publish the free slots soon."""
        self.images.changed.set()

    # ----------------------------------------------------------- the loop
    async def run(self) -> None:
        """Publish, prefetch and keep to the budget until cancelled (then unpublish)."""
        refreshed_s: float | None = None
        backoff_s = 0.1
        try:
            while True:
                try:
                    due = (
                        refreshed_s is None
                        or time.monotonic() - refreshed_s >= self.settings.image_refresh_s
                    )
                    self.images.changed.clear()
                    if due:
                        await self.images.refresh()
                    await self.publish(force=due)
                    if self.settings.prefetch:
                        await self.prefetch()
                    if due and self.settings.image_budget_bytes is not None:
                        await self.keep_budget()
                    if due:
                        refreshed_s = time.monotonic()
                    backoff_s = 0.1
                except (RedisError, OSError) as exc:
                    self.health.failed()
                    log.warning("images: %s; retrying in %.1fs", exc, backoff_s)
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, 5.0)
                except Exception:  # an engine error or a bug must not stop the worker
                    log.exception("images: retrying in %.1fs", backoff_s)
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, 5.0)
                tick_s = min(TICK_S, self.settings.image_refresh_s)
                await wait_event(self.images.changed, tick_s)
        finally:
            # A stopped worker holds nothing any more: claims stop coming its way.
            # (bounded: a frozen node must not hold the worker's shutdown)
            with contextlib.suppress(
                RedisError, OSError, asyncio.CancelledError, asyncio.TimeoutError
            ):
                await asyncio.wait_for(asyncio.shield(self.redis.delete(self.key)), 2.0)

    async def publish(self, force: bool = False) -> None:
        """Rewrite this worker's images hash when it changed (``force``: in any case,
        which also renews its TTL)."""
        fields = {IMAGE_FIELD + ref: "held" for ref in self.images.held}
        fields.update({IMAGE_FIELD + ref: "pulling" for ref in self.images.pulls})
        fields[FREE_FIELD] = str(max(0, self.free_slots()))
        if not force and fields == self._published:
            return
        self.observer.images_sampled(held=len(self.images.held), pulling=len(self.images.pulls))
        pipe = self.redis.pipeline(transaction=True)  # one key: fine on a cluster
        pipe.delete(self.key)
        mapping: Any = fields  # (redis-py's stubs want a mapping of its value types)
        pipe.hset(self.key, mapping=mapping)
        pipe.pexpire(self.key, self.ttl_ms)
        await pipe.execute()
        self._published = fields

    # ------------------------------------------------------------- claims
    async def defer_s(self, req: OpenRequest, fields: dict[Any, Any]) -> float:
        """How long to leave an open to a worker that holds its image (0: claim now).

        When it is left, the request is in the holder's inbox already."""
        if not self.settings.image_aware or self.settings.image_claim_delay_s <= 0:
            return 0.0
        image = req.spec.image or self.settings.default_image
        if self.holds(image):
            return 0.0
        holder = await self._holder_with_room(image_ref(image))
        if holder is None:
            return 0.0
        plain = {_s(k): _s(v) for k, v in fields.items() if _s(k) not in ("prefer", "prefer_ms")}
        box = self.keys.worker_inbox(holder)
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(box, json.dumps(plain))
        pipe.expire(box, INBOX_TTL_S)
        await pipe.execute()
        self.observer.open_left_to_holder()
        log.debug("open %s left to %s, which holds %s", req.traj, holder, image)
        return self.settings.image_claim_delay_s

    async def live_workers(self) -> list[str]:
        """The other workers whose heartbeat is recent (by the freshest one's clock)."""
        beats: Any = await self.redis.zrange(self.keys.workers, 0, -1, withscores=True)
        if not beats:
            return []
        newest = max(score for _w, score in beats)
        dead_ms = self.settings.dead_after_s * 1000
        alive = [_s(w) for w, score in beats if score >= newest - dead_ms]
        return [w for w in alive if w != self.worker_id]

    async def _holder_with_room(self, ref: str) -> str | None:
        """A live worker that holds ``ref`` (else pulls it) and has a free slot for one
        more open: its published free slots less the opens waiting in its inbox (a wave
        of opens all read before it claims any must not all be left to it: those it
        has no room for would wait out ``image_claim_delay_s``)."""
        workers = await self.live_workers()
        if not workers:
            return None
        pipe = self.redis.pipeline(transaction=False)
        for worker in workers:
            pipe.hmget(self.keys.worker_images(worker), IMAGE_FIELD + ref, FREE_FIELD)
            pipe.llen(self.keys.worker_inbox(worker))
        replies = await pipe.execute()
        rows = zip(replies[::2], replies[1::2], strict=True)
        best: tuple[int, int, str] | None = None
        for worker, ((state, free), waiting) in zip(workers, rows, strict=True):
            room = int(_s(free)) - int(waiting or 0) if free is not None else 0
            if state is None or room <= 0:
                continue
            key = (1 if _s(state) == "held" else 0, room, worker)
            best = key if best is None or key > best else best
        return best[2] if best else None

    # ----------------------------------------------------------- prefetch
    async def prefetch(self) -> int:
        """Start pulls for waiting opens' images this worker ranks first for (and
        nobody holds); returns how many started."""
        waiting: Any = await self.redis.zrange(self.keys.pending, 0, PREFETCH_WINDOW - 1)
        if not waiting:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for traj_id in waiting:
            pipe.hget(self.keys.traj(_s(traj_id)), "spec")
        wanted: list[str] = []
        for spec in await pipe.execute():
            ref = image_ref(_image_of(spec) or self.settings.default_image)
            if ref not in wanted and not self.holds(ref):
                wanted.append(ref)
        if not wanted:
            return 0
        others = await self.live_workers()
        rows: list[Any] = []
        if others:
            pipe = self.redis.pipeline(transaction=False)
            for worker in others:
                pipe.hmget(self.keys.worker_images(worker), *(IMAGE_FIELD + r for r in wanted))
            rows = await pipe.execute()
        started = 0
        for i, ref in enumerate(wanted):
            if any(row[i] is not None for row in rows):
                continue  # some worker holds or pulls it: the open goes there
            mine = rank(ref, self.worker_id)
            if any(rank(ref, other) > mine for other in others):
                continue  # another worker ranks first for it
            if self.images.prefetch(ref):
                started += 1
                self.observer.image_prefetched()
        return started

    # ------------------------------------------------------------- budget
    async def keep_budget(self) -> list[str]:
        """Remove least recently used task images while over the budget; returns the
        names removed."""
        budget = self.settings.image_budget_bytes
        if budget is None:
            return []
        usage_key = self.keys.engine_images(self.images.engine_id)
        used, self.images.used_ms = self.images.used_ms, {}
        if used:
            await self.redis.hset(usage_key, mapping={k: str(v) for k, v in used.items()})
        total, facts = await asyncio.to_thread(self.images.facts)
        if total <= budget:
            return []
        last_used = {_s(k): int(_s(v)) for k, v in (await self.redis.hgetall(usage_key)).items()}
        protected = {self.default_ref(), *self.images.pulls}
        protected |= {image_ref(image) for image in self.images.in_use()}
        removed: list[str] = []
        for fact in victims(total, budget, facts, last_used, protected):
            if await asyncio.to_thread(self.images.remove, fact):
                removed += fact.refs
                self.images.held.difference_update(fact.refs)
                self.observer.image_removed(fact.unique_bytes)
                log.info("image budget: removed %s (%d bytes)", ", ".join(fact.refs),
                         fact.unique_bytes)  # fmt: skip
        if removed:
            await self.redis.hdel(usage_key, *removed)
            self.images.changed.set()
        return removed


def _image_of(spec_json: Any) -> str | None:
    """The image a waiting trajectory's record names (None: the default, or unreadable)."""
    if not spec_json:
        return None
    try:
        image = json.loads(_s(spec_json)).get("image")
    except (ValueError, AttributeError):
        return None
    return image if isinstance(image, str) and image else None
