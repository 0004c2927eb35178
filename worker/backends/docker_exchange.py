"""Files handed to one container through a read-only bind mount (issue 31).

A fork's copies on the worker that took its snapshot need the same archive in
each of their containers. Over each agent's attach stream the engine relays
every byte (N copies: N times the workspace through the engine); instead, when
the worker shares a filesystem with the engine's host, each container it starts
gets its own directory of ``root`` mounted read-only at ``IN_DIR``. The worker
writes the archive once and hard-links it into the directories of the copies'
containers; each agent unpacks it from there, and the worker unlinks it again.
A container sees only its own directory, read-only: nothing of another's.

``detect`` turns it on when the engine is reached by its local socket and says
it runs on this host; the worker setting ``exchange_dir`` names the directory
(or turns it off with ``""``). Where the directory is not what the engine
mounts after all, the agent finds no file and the copy falls back to its stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from .base import Backend, Slot
from .docker_outbox import Outbox

if TYPE_CHECKING:
    from ..settings import WorkerSettings
    from .docker_box import Box

log = logging.getLogger("toolq.worker.docker")

#: Where a container sees its own directory (read-only).
IN_DIR = "/opt/toolq/in"
OWNER_FILE = "owner.json"


class Exchange:
    """One worker's directories under ``root``: a cache of staged archives, and
    one directory per container it started."""

    def __init__(self, root: str, tag: str) -> None:
        self.root = root
        self.base = os.path.join(root, tag)
        os.makedirs(os.path.join(self.base, "cache"), mode=0o700, exist_ok=True)
        os.chmod(root, 0o711)  # nobody lists it; each container mounts its own part
        os.chmod(self.base, 0o711)  # nobody lists it either: a pipe's name is not found
        self._dirs: dict[str, str] = {}  # container id -> its directory
        self._lock = threading.Lock()
        self._outboxes = itertools.count(1)

    def binds(self, name: str) -> tuple[str, dict[str, dict[str, str]]]:
        """A new container's directory, and the bind that mounts it read-only."""
        path = os.path.join(self.base, name)
        os.makedirs(path, mode=0o755, exist_ok=True)
        os.chmod(path, 0o755)  # the sandbox user must read it
        return path, {path: {"bind": IN_DIR, "mode": "ro"}}

    def created(self, cid: str, path: str) -> None:
        self._dirs[cid] = path

    def stage(self, cid: str, key: str, data: bytes, name: str) -> str | None:
        """Put ``data`` (written once per ``key``) in the container's directory as
        ``name``; the path the container sees it at, or None when it has no directory."""
        directory = self._dirs.get(cid)
        if directory is None:
            return None
        cached = os.path.join(self.base, "cache", key)
        with self._lock:  # the copies of a fork stage at once: one writes it
            if not os.path.exists(cached):
                self._clear_cache()
                partial = f"{cached}.part"
                with open(partial, "wb") as fh:
                    fh.write(data)
                os.chmod(partial, 0o444)
                os.replace(partial, cached)
            target = os.path.join(directory, name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            os.link(cached, target)  # under the lock: no other archive evicts it first
        return f"{IN_DIR}/{name}"

    def outbox(self, cid: str, prefix: str, cap_bytes: int) -> Outbox | None:
        """A named pipe in the container's directory, open for reading: what the
        container's agent writes to it reaches the worker with no engine in between
        (a bind mount's read-only flag does not stop writes to a pipe). Named anew
        each time: a pipe given up is never mistaken for the next one."""
        directory = self._dirs.get(cid)
        if directory is None:
            return None
        name = f"{prefix}-{next(self._outboxes)}-{secrets.token_hex(4)}-pack.fifo"
        path = os.path.join(directory, name)
        os.mkfifo(path, 0o600)
        os.chmod(path, 0o622)  # the sandbox's user writes it; only we read it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with contextlib.suppress(OSError):  # 1 MiB, the unprivileged limit: fewer reads
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        part = os.path.join(self.base, f"{name}.part")  # not in cache/: stage empties it
        return Outbox(fd, path, f"{IN_DIR}/{name}", cap_bytes, part, self._cache)

    def _cache(self, part: str, sha256: str) -> None:
        """An outbox's file, written as it was read: the archive ``stage`` would write."""
        cached = os.path.join(self.base, "cache", staged_key(sha256))
        with self._lock:
            self._clear_cache()
            os.chmod(part, 0o444)
            os.replace(part, cached)

    def _clear_cache(self) -> None:
        """One archive at a time in the cache (the last snapshot's)."""
        cache = os.path.join(self.base, "cache")
        for old in os.listdir(cache):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(cache, old))

    def unstage(self, cid: str, name: str) -> None:
        directory = self._dirs.get(cid)
        if directory is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))

    def removed(self, cid: str) -> None:
        """The container is gone: so is its directory."""
        directory = self._dirs.pop(cid, None)
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    def mark(self, ns: str, worker_id: str) -> None:
        """Say whose directory this is, so that ``prune`` finds it once it is dead."""
        with open(os.path.join(self.base, OWNER_FILE), "w") as fh:
            json.dump({"ns": ns, "worker": worker_id}, fh)

    def prune(self, ns: str, alive: set[str]) -> int:
        """Remove the directories that workers of ``ns`` not in ``alive`` left (a
        SIGKILL leaves its cached archive, in memory under /dev/shm)."""
        removed = 0
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if path == self.base:
                continue
            try:
                with open(os.path.join(path, OWNER_FILE)) as fh:
                    owner = json.load(fh)
            except (OSError, ValueError):
                continue  # not a worker's, or being made
            if owner.get("ns") == ns and owner.get("worker") not in alive:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        return removed


def staged_key(sha256: str) -> str:
    """The name an archive of this sha256 is cached and staged under."""
    return f"{sha256[:32]}.tar"


def detect(api: Any, wanted: str | None, tag: str) -> Exchange | None:
    """The exchange to use: ``wanted`` ('' off), or, unset, one under /dev/shm when
    the engine is on this host (its local socket, its name is our host name)."""
    if wanted == "":
        return None
    root = wanted
    if root is None:
        try:
            local = str(api.base_url).startswith("http+docker://") and (
                str(api.info().get("Name") or "") == socket.gethostname()
            )
        except Exception:  # an engine that will not say: the stream path
            local = False
        if not local or not os.path.isdir("/dev/shm"):
            return None
        root = "/dev/shm/toolq-exchange"
    try:
        os.makedirs(root, mode=0o711, exist_ok=True)
        return Exchange(root, tag)
    except OSError as exc:
        log.warning("no exchange directory at %s (%s): copies use their streams", root, exc)
        return None


class HoldsExchange(Protocol):
    """What staging needs of the engine (``docker_engine.Engine``, which imports this
    module): the exchange it mounts into the containers it creates, if any."""

    exchange: Exchange | None

    def gvisor(self, box: Box) -> bool: ...


class Staging(Backend):
    """The part of ``DockerBackend`` that stages files for its slots' agents."""

    engine: HoldsExchange
    settings: WorkerSettings
    ns: str
    _by_slot: dict[str, Box]

    async def _prune_exchange(self, exchange: Exchange) -> None:
        """Mark our exchange directory; remove those dead workers of ours left."""
        exchange.mark(self.ns, self.settings.worker_id)
        try:
            beats = await self.worker_heartbeats() if self.worker_heartbeats else None
        except Exception as exc:  # Redis away: next start
            log.warning("could not tell which workers are alive: %s", exc)
            return
        if beats is not None:
            now_ms = time.time() * 1000
            dead_ms = self.settings.dead_after_s * 1000
            alive = {w for w, beat in beats.items() if 0 < now_ms - beat < dead_ms}
            alive.add(self.settings.worker_id)
            await asyncio.to_thread(exchange.prune, self.ns, alive)

    async def stage(self, slot: Slot, sha256: str, data: bytes) -> str | None:
        """Put ``data`` (of this sha256) in the slot's container as a file; the path it
        sees it at, or None where there is no exchange (adopted ones too)."""
        exchange = self.engine.exchange
        box = self._by_slot.get(slot.slot_id)
        if exchange is None or box is None or box.adopted:
            return None
        key = staged_key(sha256)
        name = f"{slot.name}-{key}"  # packed slots of one container stage apart
        try:
            return await asyncio.to_thread(exchange.stage, slot.sandbox_id, key, data, name)
        except OSError as exc:  # full, gone: the stream still works
            log.warning("staging a snapshot in %s failed: %s", exchange.base, exc)
            return None

    def outbox(self, slot: Slot, cap_bytes: int) -> Outbox | None:
        """A pipe the slot's agent can write a pack into (``Exchange.outbox``), or
        None where there is no exchange (adopted containers too), or under gVisor
        (which keeps a host pipe to itself: the agent would find nobody reading)."""
        exchange = self.engine.exchange
        box = self._by_slot.get(slot.slot_id)
        if exchange is None or box is None or box.adopted or self.engine.gvisor(box):
            return None
        try:
            return exchange.outbox(slot.sandbox_id, slot.name, cap_bytes)
        except OSError as exc:  # the stream still works
            log.warning("no pipe in %s: %s", exchange.base, exc)
            return None

    def unstage(self, slot: Slot, sha256: str, broken: bool = False) -> None:
        """Take a staged file away again; ``broken``: the container did not see it
        (the directory is not what the engine mounts): no more staging."""
        exchange = self.engine.exchange
        if exchange is not None:
            exchange.unstage(slot.sandbox_id, f"{slot.name}-{staged_key(sha256)}")
            if broken:
                log.warning("the engine does not mount %s: copies use their streams", exchange.base)
                self.engine.exchange = None
