"""Snapshots: a trajectory's workspace files and spec, saved under a name in Redis.

A ``snapshot`` entry in a trajectory's calls stream runs in order with its
calls: the agent packs the workspace (a tar.gz, links kept, running processes
not), and the worker stores it as ``<ns>:snap:{name}`` (with a TTL, under a size
cap) and its ``SnapshotInfo`` in the ``<ns>:snapshots`` index. A trajectory
opened with ``spec.snapshot`` runs with the snapshot's spec under its own
(``overlay``) and its new workspace gets the snapshot's files, on any worker of
the fleet, since the files are in Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from pydantic import BaseModel, ValidationError

from toolq.schemas import ErrorCode, Keys, SnapshotArgs, SnapshotInfo, TrajectorySpec, lua

from .backends.base import SandboxError, Slot
from .channel import AGENT_GRACE_S, ChannelClosedError
from .lease import RedisHealth, retrying, wait_event
from .metrics import Observer
from .plan import Plan, Refusal
from .settings import WorkerSettings
from .tools import Tool, ToolArgs

if TYPE_CHECKING:
    from .backends.docker_outbox import Outbox

log = logging.getLogger("toolq.worker.snapshots")

PACK_TOOL = Tool("_snapshot_pack", "The worker's own: pack the workspace.", ToolArgs)
#: Snapshots are counted every this many heartbeats (and after each one taken).
SAMPLE_EVERY_BEATS = 5
#: Copies of a snapshot up to this size (its files' bytes) get a plain tar, which
#: the worker gunzips once for all of them (the agents' ``tar`` unpacks it several
#: times faster than a tar.gz); larger ones get the tar.gz (the worker's memory).
PLAIN_MAX_BYTES = 512 * 1024 * 1024
#: How often a copy whose fork's snapshot is still being written looks for it.
WRITE_POLL_S = 0.05
#: A fork's snapshot is written to Redis this long after its copies here got their
#: files (their first calls slowed down 0.1-0.5 s beside a 50 MB write: bench/notes.md),
#: and at the latest ``WRITE_DELAY_S`` after its result (copies elsewhere claim after
#: ``PREFER_SOURCE_MS``, 2 s: they seldom wait for it).
WRITE_GRACE_S = 0.5
WRITE_DELAY_S = 1.5
#: A fork's pack sent through a pipe (``docker_outbox``) must reach its end this long
#: after the agent's tar did: all of it but the pipe's 1 MiB is read by then.
PIPE_END_S = 10.0
#: The marker of a fork's snapshot being written lapses this long after its worker died.
MARK_TTL_S = 10.0


@dataclass
class Pending:
    """A fork's snapshot taken here whose files are not in Redis yet."""

    info: SnapshotInfo
    data: bytes  # its files (another fork's may have taken the place in ``_recent``)
    left: int  # copies expected on this worker that have not got their files yet
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def copied(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.done.set()

    async def settled(self) -> None:
        """Return once the copies here got their files and had ``WRITE_GRACE_S`` for
        their first calls, or ``WRITE_DELAY_S`` after the result at the latest."""
        started = time.monotonic()
        await wait_event(self.done, WRITE_DELAY_S)
        await asyncio.sleep(
            max(0.0, min(WRITE_GRACE_S, started + WRITE_DELAY_S - time.monotonic()))
        )


class SnapshotMissing(SandboxError):
    """The snapshot a trajectory starts from is gone (expired, deleted, never taken)."""

    code = ErrorCode.SNAPSHOT_NOT_FOUND


def now_ms() -> int:
    return int(time.time() * 1000)


def overlay(base: TrajectorySpec, top: TrajectorySpec) -> TrajectorySpec:
    """``base`` (a snapshot's spec) under ``top`` (the opener's): every field the
    opener's spec sets wins (``model_fields_set``: the fields its JSON held);
    ``env`` and ``labels`` merge key by key, ``limits`` field by field."""
    merged = base.model_dump()
    for name in top.model_fields_set:
        mine = getattr(top, name)
        if name in ("env", "labels"):
            merged[name] = {**merged[name], **mine}
        elif name == "limits":
            merged[name].update(mine.model_dump(include=mine.model_fields_set))
        else:
            merged[name] = mine if not isinstance(mine, BaseModel) else mine.model_dump()
    return TrajectorySpec.model_validate(merged)


def saved_spec(spec: TrajectorySpec) -> TrajectorySpec:
    """What a snapshot keeps of the spec in force: all but where it came from."""
    return spec.model_copy(update={"snapshot": None, "parent": None})


class Snapshots:
    """Takes snapshots of owned trajectories and starts new workspaces from them."""

    def __init__(
        self,
        settings: WorkerSettings,
        redis: aioredis.Redis,
        health: RedisHealth,
        observer: Observer,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.health = health
        self._recent: dict[tuple[str, str], bytes] = {}  # (name, sha256) -> files: see _keep
        self._plain: dict[tuple[str, str], asyncio.Task[bytes]] = {}  # the same, gunzipped
        self._packed_here: set[tuple[str, str]] = set()  # of those, the ones taken here
        # A fork's snapshots whose files are still being written to Redis (see store)
        self._writing: dict[str, Pending] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self.keys = Keys(settings.namespace)
        self.observer = observer

    # ---------------------------------------------------------------- take
    def pack_plan(self, args: dict[str, Any]) -> tuple[SnapshotArgs, Plan] | Refusal:
        """The agent call that packs the workspace, or why the entry is refused."""
        try:
            wanted = SnapshotArgs.model_validate(args)
        except ValidationError as exc:
            message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            return Refusal(ErrorCode.INVALID_ARGS, f"bad snapshot arguments: {message}")
        cap = self.settings.snapshot_max_bytes
        # A fork's: a plain tar when it fits the cap (packed faster, and its copies
        # here unpack it with tar; Redis holds it uncompressed).
        args = {"max_bytes": cap, **({"compress": "auto"} if wanted.copies else {})}
        return wanted, Plan(PACK_TOOL, args, self.settings.snapshot_timeout_s, 0)

    def outbox(self, backend: Any, slot: Slot, wanted: SnapshotArgs) -> Outbox | None:
        """For a fork's pack: a pipe from the slot's container to us (no bytes through
        the engine: bench/notes.md), where the backend has one. (No await: the
        runner starts the pack right after its lease check.)"""
        if not wanted.copies or getattr(backend, "outbox", None) is None:
            return None
        box: Outbox | None = backend.outbox(slot, self.settings.snapshot_max_bytes)
        return box

    async def received(
        self, reply: dict[str, Any], outbox: Outbox | None
    ) -> tuple[dict[str, Any], str | None]:
        """The pack's reply with its bytes, and their sha256 when the pipe brought them
        (summed as they came). An agent that could not use the pipe sent them itself."""
        if outbox is None or not reply.get("fifo"):
            return {**reply, "sent_via": "stream"}, None
        got = await outbox.collect(PIPE_END_S)
        if isinstance(got, tuple) and not is_plain_tar(got[0]):
            # Sandbox code wrote into the pipe too: never gunzipped or kept as ours.
            got = "what came through the pipe is not a plain tar (written into by the sandbox?)"
        if isinstance(got, str):
            code = ErrorCode.LIMIT_EXCEEDED if outbox.over_cap else ErrorCode.INTERNAL_ERROR
            return {"ok": False, "error_code": code.value, "error": f"the pack: {got}"}, None
        return {**reply, "blob": got[0], "sent_via": "pipe"}, got[1]

    async def store(
        self,
        traj_id: str,
        spec: TrajectorySpec,
        wanted: SnapshotArgs,
        reply: dict[str, Any],
        copies_here: int = 0,
        sha256: str | None = None,
    ) -> dict[str, Any]:
        """Keep what the agent packed; the reply the snapshot entry gets. A fork's
        (``wanted.copies``) goes to Redis after the reply, once ``copies_here`` of its
        copies got their files here from memory, or after ``WRITE_DELAY_S``.
        ``sha256``: the bytes' own, when already summed."""
        if not reply.get("ok", True):
            return reply
        data = reply.get("blob") or b""
        counts = reply.get("data") or {}
        ttl_s = min(wanted.ttl_s or self.settings.snapshot_ttl_s, self.settings.snapshot_max_ttl_s)
        created = now_ms()
        info = SnapshotInfo(
            name=wanted.name,
            source=traj_id,
            bytes=len(data),
            uncompressed_bytes=int(counts.get("bytes", 0)),
            entries=int(counts.get("entries", 0)),
            created_ms=created,
            expires_ms=created + int(ttl_s * 1000),
            worker=self.settings.worker_id,
            sha256=sha256 or await digest(data),  # ours: what restores check against
            spec=saved_spec(spec),
        )
        self._keep(wanted.name, info.sha256, data)
        self._packed_here = {(wanted.name, info.sha256)}
        if wanted.copies and copies_here > 0:
            # A fork's copies open next, mostly here, from these files in memory:
            # the Redis copy (for copies elsewhere, which claim after PREFER_SOURCE_MS)
            # is written after them, off their path (the 50 MB SET took Redis from the
            # result's flush and the copies' opens: bench/notes.md); the marker makes
            # a copy elsewhere that comes earlier wait for it (``info``).
            await self._mark(wanted.name)
            pending = self._writing[wanted.name] = Pending(info, data, copies_here)
            writing = self._write(info, data, ttl_s, pending)
            write = asyncio.create_task(writing, name="snapshot-write")
            self._writes.add(write)
            write.add_done_callback(self._writes.discard)
        else:
            await self._write(info, data, ttl_s)
        skipped, vanished = int(counts.get("skipped", 0)), int(counts.get("vanished", 0))
        note = f"; {skipped} special files left out" if skipped else ""
        note += f"; {vanished} files deleted while packing left out" if vanished else ""
        output = (
            f"snapshot {wanted.name}: {info.entries} entries, {info.uncompressed_bytes} bytes "
            f"({info.bytes} {'compressed' if is_gzip(data) else 'stored'}), "
            f"kept {ttl_s:g}s{note}"
        )
        shown = info.model_dump(exclude={"spec"})
        data_out = {**shown, "skipped": skipped, "vanished": vanished}
        data_out["sent_via"] = reply.get("sent_via", "stream")  # how the pack reached us
        return {"ok": True, "output": output, "data": data_out}

    async def _write(
        self, info: SnapshotInfo, data: bytes, ttl_s: float, pending: Pending | None = None
    ) -> None:
        """The snapshot's files, then its index entry (an index entry never names
        files that were not written); a fork's (``pending``) only while its marker
        is there, which goes once written."""
        name = info.name
        data_key, ttl_ms = self.keys.snapshot_data(name), max(1, int(ttl_s * 1000))
        marker = self.keys.snapshot_writing(name)
        renew = asyncio.create_task(self._renew_mark(name)) if pending is not None else None
        kept = True
        try:
            if pending is not None:  # the copies here first: the write would slow them down
                await pending.settled()
            store = lambda: self.redis.set(data_key, data, px=ttl_ms)  # noqa: E731
            await retrying(self.health, store, "snapshot")
            if pending is not None:
                # Its marker gone: the snapshot was deleted meanwhile, or the marker
                # lapsed (Redis away): copies waiting elsewhere failed. Not kept then.
                check = lambda: self.redis.eval(lua.SNAPSHOT_KEPT, 2, marker, data_key)  # noqa: E731
                kept = bool(await retrying(self.health, check, "snapshot kept"))
            if kept:
                index = (self.keys.snapshots, name, info.model_dump_json())
                await retrying(self.health, lambda: self.redis.hset(*index), "snapshot index")
        finally:
            if pending is not None and self._writing.get(name) is pending:
                del self._writing[name]
            if renew is not None:
                renew.cancel()
        if renew is not None:  # its last SET has run before this DEL
            await asyncio.wait([renew])
            await retrying(self.health, lambda: self.redis.delete(marker), "marker")
        if not kept:
            log.warning("snapshot %s was deleted (or its marker lapsed) while written", name)
            return
        self.observer.snapshot_taken(len(data))
        await self.sample_safely()

    async def _mark(self, name: str, renew: bool = False) -> None:
        """Set the marker (``renew``: only while it exists: a deleted one stays gone)."""
        marker, ttl_ms = self.keys.snapshot_writing(name), int(MARK_TTL_S * 1000)
        mark = lambda: self.redis.set(marker, 1, px=ttl_ms, xx=renew)  # noqa: E731
        await retrying(self.health, mark, "marker")

    async def _renew_mark(self, name: str) -> None:
        """Keep the marker while the files are written: if this worker dies, it lapses
        within ``MARK_TTL_S`` and the copies waiting elsewhere fail (snapshot_not_found)."""
        while True:
            await asyncio.sleep(MARK_TTL_S / 3)
            await self._mark(name, renew=True)

    async def drain(self, timeout_s: float) -> None:
        """Let the fork snapshots being written finish (a worker shutting down)."""
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=timeout_s)

    # ------------------------------------------------------------- restore
    async def info(self, name: str) -> SnapshotInfo | None:
        """The snapshot's index entry, unless it is missing or expired. A fork's
        snapshot taken here is known before its index entry is written; one taken
        elsewhere and still being written (its marker) is waited for."""
        raw = await self._index_entry(name)
        if raw is None or isinstance(raw, SnapshotInfo):
            info = raw
        else:
            try:
                info = SnapshotInfo.model_validate_json(raw)
            except ValidationError:  # not written by a worker: as good as missing
                log.warning("snapshot %s has an unreadable index entry", name)
                return None
        return info if info is not None and info.expires_ms > now_ms() else None

    async def _index_entry(self, name: str) -> SnapshotInfo | bytes | None:
        deadline = time.monotonic() + self.settings.snapshot_timeout_s
        marker = self.keys.snapshot_writing(name)
        while True:
            here = self._writing.get(name)
            if here is not None:
                return here.info
            raw, writing = await retrying(self.health, lambda: self._lookup(name, marker), "lookup")
            if raw is not None or not writing or time.monotonic() > deadline:
                return bytes(raw) if raw is not None else None
            await asyncio.sleep(WRITE_POLL_S)

    async def _lookup(self, name: str, marker: str) -> tuple[Any, bool]:
        """The index entry, and whether the snapshot is still being written. Two keys,
        two slots on a cluster: two reads, the index again when the marker is gone
        (it goes after the entry is written, maybe between the first two reads)."""
        raw = await self.redis.hget(self.keys.snapshots, name)
        if raw is not None:
            return raw, False
        if await self.redis.exists(marker):
            return None, True
        return await self.redis.hget(self.keys.snapshots, name), False

    async def resolve(self, spec: TrajectorySpec) -> TrajectorySpec:
        """The spec a trajectory opened from ``spec.snapshot`` runs with."""
        assert spec.snapshot is not None
        info = await self.info(spec.snapshot)
        if info is None:
            raise SnapshotMissing(_missing(spec.snapshot))
        return overlay(info.spec, spec)

    async def restore(self, slot: Slot, name: str, backend: Any = None) -> str:
        """Fill a new workspace with the snapshot's files (checked against the index:
        files and index are two writes, so a snapshot retaken under the same name
        meanwhile, or damaged files, are refused rather than opened). Returns how
        they came: ``host`` (this worker's memory: it took the snapshot, or read it
        for an earlier copy) or ``redis``.

        A snapshot taken here goes to the copy as a plain tar, as a file staged in
        its container where the backend can (``DockerBackend.stage``: no bytes
        through the engine's stream), else over the agent's stream."""
        info = await self.info(name)
        if info is None:
            raise SnapshotMissing(_missing(name))
        pending = self._writing.get(name)
        if pending is not None and pending.info.sha256 != info.sha256:
            pending = None
        via, data = "host", self._recent.get((name, info.sha256))
        if data is None and pending is not None:  # not in Redis yet
            data = pending.data
        if data is None:
            via, data = "redis", await self._read(name, info.sha256)
        # Packed here: our own agent's archive of a workspace, never one crafted in
        # Redis, so the copy's agent may unpack it with the image's tar (a pipe's may
        # hold bytes the source's own sandbox wrote: only its copies unpack them).
        native = (name, info.sha256) in self._packed_here or pending is not None
        staged, key = None, info.sha256
        if native and info.uncompressed_bytes <= PLAIN_MAX_BYTES:
            data = await self._plain_tar(name, info.sha256, data)
            if getattr(backend, "stage", None) is not None:
                staged = await backend.stage(slot, key, data)
        try:
            reply = await self._unpack(slot, name, {"native": native, "file": staged}, data)
            if staged and reply.get("error_code") == "not_found":  # not what the engine mounts
                backend.unstage(slot, key, broken=True)
                staged, reply = None, await self._unpack(slot, name, {"native": native}, data)
        finally:
            if staged:
                backend.unstage(slot, key)
            if (pending := self._writing.get(name)) is not None:
                pending.copied()
        if not reply.get("ok", True):
            raise SandboxError(f"restoring snapshot {name} failed: {reply.get('error')}")
        self.observer.snapshot_restored()
        return via

    async def _unpack(
        self, slot: Slot, name: str, args: dict[str, Any], data: bytes
    ) -> dict[str, Any]:
        """The agent's reply to unpacking ``data`` (or the file ``args`` names)."""
        timeout_s = self.settings.snapshot_timeout_s
        try:
            fut = slot.channel.submit(
                "call",
                slot=slot.name,
                tool="_snapshot_unpack",
                args=args,
                blob=None if args.get("file") else data,
                timeout_s=timeout_s,
            )
            return await asyncio.wait_for(fut, timeout_s + AGENT_GRACE_S)
        except (ChannelClosedError, asyncio.TimeoutError) as exc:
            lost = f"restoring snapshot {name} failed: the sandbox was lost ({exc!r})"
            raise SandboxError(lost) from None

    async def _read(self, name: str, sha256: str) -> bytes:
        key = self.keys.snapshot_data(name)
        data: Any = await retrying(self.health, lambda: self.redis.get(key), "snapshot read")
        if data is None:
            raise SnapshotMissing(_missing(name))
        if await digest(data) != sha256:
            raise SnapshotMissing(f"snapshot {name!r} does not match its index (being replaced?)")
        self._keep(name, sha256, data)
        return bytes(data)

    def _keep(self, name: str, sha256: str, data: bytes) -> None:
        """Remember the last snapshot's files: a fork's copies are opened together,
        mostly on the worker that took it, and each would read and hash them again.
        Keyed by the index's sha256, so a snapshot retaken under the name is read anew."""
        if (name, sha256) not in self._recent:
            self._recent, self._plain, self._packed_here = {(name, sha256): data}, {}, set()

    async def _plain_tar(self, name: str, sha256: str, data: bytes) -> bytes:
        """The snapshot's files as a plain tar, gunzipped once (in a thread) for all
        the copies that open together."""
        if not is_gzip(data):
            return data  # a fork's, stored plain
        key = (name, sha256)
        task = self._plain.get(key)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(gunzip_at_most, data, PLAIN_MAX_BYTES))
            if key in self._recent:
                self._plain[key] = task
        return await asyncio.shield(task)

    # ------------------------------------------------------------- metrics
    async def sample_loop(self) -> None:
        """Count the snapshots that exist (and prune expired index entries)."""
        while True:
            await self.sample_safely()
            await asyncio.sleep(self.settings.heartbeat_s * SAMPLE_EVERY_BEATS)

    async def sample_safely(self) -> None:
        try:
            await self.sample()
        except Exception as exc:  # Redis down: the next round tries again
            log.debug("sampling snapshots failed: %s", exc)

    async def sample(self) -> tuple[int, int]:
        now, count, size, expired = now_ms(), 0, 0, []
        for name, raw in (await self.redis.hgetall(self.keys.snapshots)).items():
            try:
                info = SnapshotInfo.model_validate_json(raw)
            except ValidationError:  # not ours: leave it, count nothing
                continue
            if info.expires_ms <= now:
                expired.append(name)
            else:
                count, size = count + 1, size + info.bytes
        if expired:
            await self.redis.hdel(self.keys.snapshots, *expired)
        self.observer.snapshots_sampled(count, size)
        return count, size


def gunzip_at_most(data: bytes, max_bytes: int) -> bytes:
    """``data`` gunzipped, refused past ``max_bytes`` (a crafted archive's bomb
    must not take the worker's memory; a copy fails instead)."""
    unzip = zlib.decompressobj(31)
    plain = unzip.decompress(data, max_bytes + 1)
    if len(plain) > max_bytes or unzip.unconsumed_tail:
        raise SandboxError(f"the snapshot unpacks to more than {max_bytes} bytes")
    if not unzip.eof:
        raise SandboxError("the snapshot's archive is cut short")
    return plain


async def digest(data: bytes) -> str:
    """sha256 in a thread: a workspace's tens of MB would hold up the event loop."""
    return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())


def is_gzip(data: bytes) -> bool:
    return data[:2] == b"\x1f\x8b"


def is_plain_tar(data: bytes) -> bool:
    """A tar's first header (ustar or GNU magic at offset 257), never a gzip."""
    return len(data) >= 512 and data[257:262] == b"ustar"


def _missing(name: str) -> str:
    return f"snapshot {name!r} not found (never taken, deleted or expired)"
