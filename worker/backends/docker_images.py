"""The images of one Docker engine: which it holds, pulling them, removing them.

``EngineImages`` is what the worker's image logic (``worker/images.py``) asks of
an engine. It pulls each image once however many opens wait for it (they share
the pull), at most ``image_pulls`` at once, and says which images it is pulling;
a pull that fails raises ``SandboxError`` naming the image and the engine's
reason. ``facts`` and ``remove`` serve the image budget: sizes come from the
engine's disk usage report (``docker system df``), and an image is removed by
untagging, never forced, so the engine itself refuses to remove one a container
uses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..metrics import Observer
from ..settings import WorkerSettings
from .base import SandboxError
from .docker_box import api_message, image_fix

log = logging.getLogger("toolq.worker.docker")

#: A prefetch does not try an image again within this long of its failed pull.
PREFETCH_RETRY_S = 60.0


def image_ref(name: str) -> str:
    """An image name as the engine lists it: ``ubuntu`` -> ``ubuntu:latest``,
    ``docker.io/library/ubuntu:22.04`` -> ``ubuntu:22.04``; digests kept as given."""
    ref = name.strip()
    for prefix in ("docker.io/", "index.docker.io/"):
        if ref.startswith(prefix):
            ref = ref[len(prefix) :]
            break
    if ref.startswith("library/") and ref.count("/") == 1:
        ref = ref[len("library/") :]
    if "@" not in ref and ":" not in ref.rsplit("/", 1)[-1]:
        ref += ":latest"
    return ref


@dataclass(frozen=True)
class ImageFact:
    """One image on the engine, as the budget sees it."""

    image_id: str
    refs: tuple[str, ...]  # its tags, as ``image_ref`` writes them
    unique_bytes: int  # what removing it frees: its layers no other image shares
    in_use: bool  # a container (any, of any worker, running or not) was created from it


class EngineImages:
    """See the module docstring. ``in_use`` returns the images of the backend's own
    containers, including those still being created (the engine does not list them yet)."""

    def __init__(self, api: Any, settings: WorkerSettings, in_use: Callable[[], set[str]]) -> None:
        self.api = api
        self.settings = settings
        self.in_use = in_use
        self.default = image_ref(settings.default_image)
        self.held: set[str] = set()  # as last listed, plus what was pulled since
        self.pulls: dict[str, asyncio.Task[float]] = {}  # ref -> its pull, while pulling
        self.used_ms: dict[str, int] = {}  # ref -> last used (unix ms), not yet published
        self.changed = asyncio.Event()  # held or pulling changed: publish again
        self.observer = Observer()  # the backend's, set by the backend's start
        self.engine_id = ""
        self._failed_s: dict[str, float] = {}  # ref -> when its last pull failed (monotonic)
        self._permits = asyncio.Semaphore(max(1, settings.image_pulls))
        self._free_permits = max(1, settings.image_pulls)

    @property
    def pulling(self) -> set[str]:
        """Images being pulled now."""
        return set(self.pulls)

    # ------------------------------------------------------------- listing
    async def refresh(self) -> set[str]:
        """List the engine's images again (tags and digests); returns ``held``."""
        if not self.engine_id:
            info = await asyncio.to_thread(self.api.info)
            self.engine_id = str(info.get("ID") or info.get("Name") or "engine")
        listed = await asyncio.to_thread(self.api.images)
        held = set()
        for image in listed:
            for name in (image.get("RepoTags") or []) + (image.get("RepoDigests") or []):
                if name and not name.startswith("<none>"):
                    held.add(image_ref(name))
        if held != self.held:
            self.held = held
            self.changed.set()
        return held

    def touch(self, image: str) -> None:
        """``image`` is being used now (the budget removes the least recently used)."""
        self.used_ms[image_ref(image)] = int(time.time() * 1000)

    # ------------------------------------------------------------- pulling
    async def ensure(self, image: str) -> float:
        """Make sure the engine has ``image``: pull it unless it is there (sharing a
        pull in flight). Returns the seconds waited for a pull (0: it was there)."""
        ref = image_ref(image)
        self.touch(ref)
        if ref in self.held and ref not in self.pulls:
            return 0.0
        if ref not in self.pulls and await self._present(image):
            self.held.add(ref)
            return 0.0
        started_s = time.monotonic()
        await asyncio.shield(self._pull_task(ref, image))
        return time.monotonic() - started_s

    def prefetch(self, image: str) -> bool:
        """Start pulling ``image`` in the background when the engine lacks it, nobody
        pulls it and a pull permit is free (a prefetch never waits for one)."""
        ref = image_ref(image)
        if ref in self.held or ref in self.pulls or self._free_permits <= 0:
            return False
        if time.monotonic() - self._failed_s.get(ref, -PREFETCH_RETRY_S) < PREFETCH_RETRY_S:
            return False  # its open will get the error; no point pulling it every second
        task = self._pull_task(ref, image, prefetch=True)
        task.add_done_callback(_log_failure)
        return True

    def _pull_task(self, ref: str, image: str, prefetch: bool = False) -> asyncio.Task[float]:
        task = self.pulls.get(ref)
        if task is None:
            task = asyncio.create_task(self._pull(ref, image, prefetch), name=f"pull-{ref}")
            self.pulls[ref] = task
            self.changed.set()
        return task

    async def _pull(self, ref: str, image: str, prefetch: bool) -> float:
        try:
            if prefetch and await self._present(image):  # e.g. pulled by hand meanwhile
                self.held.add(ref)
                return 0.0
            async with self._permits:
                self._free_permits -= 1
                try:
                    started_s = time.monotonic()
                    log.info("pulling image %s%s", image, " (prefetch)" if prefetch else "")
                    await asyncio.to_thread(self._pull_now, image)
                    seconds = time.monotonic() - started_s
                finally:
                    self._free_permits += 1
            self.observer.image_pulled(seconds, ok=True)
            log.info("pulled image %s in %.1fs", image, seconds)
            self.held.add(ref)
            self.touch(ref)
            return seconds
        except SandboxError:
            self._failed_s[ref] = time.monotonic()
            self.observer.image_pulled(0.0, ok=False)
            raise
        finally:
            self.pulls.pop(ref, None)
            self.changed.set()

    def _pull_now(self, image: str) -> None:
        from docker.errors import APIError, ImageNotFound

        said = ""
        try:
            said = str(self.api.pull(image))[-500:]  # docker-py splits "repo:tag" itself
            self.api.inspect_image(image)  # some failures only show in the pull's output
        except (APIError, ImageNotFound) as exc:
            reason = api_message(exc) if isinstance(exc, APIError) else said or str(exc)
            raise SandboxError(
                f"image {image} not found and pull failed: {reason}; "
                f"on the worker's host: {image_fix(image)}"
            ) from exc
        except Exception as exc:  # the engine's connection broke, a bad reference, ...
            raise SandboxError(f"image {image} not found and pull failed: {exc}") from exc

    async def _present(self, image: str) -> bool:
        from docker.errors import ImageNotFound

        try:
            await asyncio.to_thread(self.api.inspect_image, image)
            return True
        except ImageNotFound:
            return False
        except Exception as exc:  # e.g. an invalid reference: the pull says why
            log.debug("inspecting image %s: %s", image, exc)
            return False

    # -------------------------------------------------------------- budget
    def facts(self) -> tuple[int, list[ImageFact]]:
        """The engine's image layer bytes and its images (blocking: run in a thread)."""
        report = self.api.df()
        used_ids = {c.get("ImageID") for c in report.get("Containers") or []}
        facts = []
        for image in report.get("Images") or []:
            names = image.get("RepoTags") or []  # digests go with the last tag
            refs = tuple(sorted({image_ref(n) for n in names if not n.startswith("<none>")}))
            size = int(image.get("Size") or 0)
            shared = max(0, int(image.get("SharedSize") or 0))  # -1: not computed
            in_use = image.get("Id") in used_ids or int(image.get("Containers") or 0) > 0
            facts.append(ImageFact(str(image.get("Id")), refs, max(0, size - shared), in_use))
        return int(report.get("LayersSize") or 0), facts

    def remove(self, fact: ImageFact) -> bool:
        """Untag every name of ``fact`` (the last untag deletes it), never forced:
        False when the engine refused (a container uses it). Blocking: the caller
        updates ``held``."""
        from docker.errors import APIError, ImageNotFound

        for ref in fact.refs:
            try:
                self.api.remove_image(ref)
            except ImageNotFound:
                continue
            except APIError as exc:
                log.info("image %s not removed: %s", ref, api_message(exc))
                return False
        return True


def _log_failure(task: asyncio.Task[float]) -> None:
    if not task.cancelled():
        error = task.exception()
        if error is not None:
            log.warning("prefetch failed: %s", error)
