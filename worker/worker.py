"""The toolq worker: claims trajectories, drains their call streams, runs calls.

One asyncio process. A reader task does every Redis read (one XREADGROUP over
the open stream, while a slot is free, and every owned call stream); each owned
trajectory has a task that runs its calls in order in its slot; a writer task
flushes finished results in one pipelined round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from toolq.schemas import (
    GROUP,
    PROTOCOL_VERSION,
    CallEntry,
    ErrorCode,
    InvalidIdError,
    Keys,
    OpenRequest,
    Result,
    TrajectorySpec,
    TrajStatus,
    WorkerInfo,
    __version__,
    check_part,
    check_traj_id,
)

from . import scripts
from .backends.base import Backend, SandboxError, Slot, TrajState
from .bgtasks import BgRecorder
from .channel import ChannelClosedError
from .external import ExternalRunner
from .metrics import Observer, WorkerMetrics
from .registry import load_registry, publish_registry
from .settings import WorkerSettings
from .tools import InvalidArgsError, Registry

log = logging.getLogger("toolq.worker")

# The agent enforces call timeouts; this is how much longer the worker waits
# before it declares the sandbox unresponsive.
AGENT_GRACE_S = 15.0
# After Redis errors, idempotent writes of this many recent seconds are
# replayed: a Redis restarted from an AOF (fsync every second) may have lost them.
REPLAY_WINDOW_S = 10.0
# Results up to this size (as JSON) are copied into their result event, so that
# a waiting client needs no HGETALL; larger ones are only in the result hash.
INLINE_RESULT_MAX_BYTES = 4096


def now_ms() -> int:
    return int(time.time() * 1000)


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def traj_of_stream(stream: str) -> str:
    """``<ns>:{T}:calls`` -> ``T``."""
    return stream[stream.index("{") + 1 : stream.rindex("}")]


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0


def entry_ms(entry_id: str) -> int:
    try:
        return int(entry_id.split("-", 1)[0])
    except ValueError:
        return now_ms()


@dataclass
class Item:
    """One entry read from a trajectory's call stream."""

    entry_id: str
    entry: CallEntry | None  # None when the entry could not be parsed
    error: tuple[ErrorCode, str] | None = None

    @property
    def call_id(self) -> str:
        return (self.entry.call_id if self.entry and self.entry.call_id else None) or self.entry_id

    @property
    def kind(self) -> str:
        return self.entry.type if self.entry else "call"


@dataclass
class Traj:
    """A trajectory this worker owns."""

    traj_id: str
    spec: TrajectorySpec
    items: deque[Item] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    slot: Slot | None = None
    task: asyncio.Task[None] | None = None
    ending: tuple[TrajStatus, str, str] | None = None  # status, reason, entry id to ack
    busy: bool = False
    slot_reset: bool = False
    slot_lost: bool = False  # the slot died during a call: the next one starts a fresh one
    last_activity: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)
    calls: int = 0
    seen_call_ids: set[str] = field(default_factory=set)
    previous_owner: str | None = None  # set when taken over or handed over
    unflushed: int = 0  # results handed to the writer, not yet in Redis
    flushed: asyncio.Event = field(default_factory=asyncio.Event)  # set while unflushed == 0

    def __post_init__(self) -> None:
        self.flushed.set()

    current: Item | None = None  # the call being run
    last_entry_id: str = "0-0"  # newest entry dispatched (recovery skips older ones)

    def push(self, item: Item) -> None:
        self.items.append(item)
        self.last_entry_id = max(self.last_entry_id, item.entry_id, key=_entry_key)
        self.wakeup.set()

    def request_end(self, status: TrajStatus, reason: str, entry_id: str = "") -> None:
        if self.ending is None:
            self.ending = (status, reason, entry_id)
        self.wakeup.set()


@dataclass
class Refusal:
    """Why a call is answered with an error instead of being run."""

    code: ErrorCode
    message: str


@dataclass
class Pending:
    """A result (or a bare ack) waiting for the writer."""

    traj_id: str
    entry_id: str
    result: Result | None
    traj: Traj | None = None  # the owned trajectory, told when this is written


class Worker:
    """Runs tool calls from Redis in backend slots. See module docstring."""

    def __init__(
        self,
        settings: WorkerSettings,
        redis: aioredis.Redis,
        backend: Backend,
        registry: Registry | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.backend = backend
        self.registry = registry or load_registry(settings.tools_modules)
        self.keys = Keys(settings.namespace)
        self.id = settings.worker_id
        self.owned: dict[str, Traj] = {}
        self.starting = 0  # trajectories claimed whose slot is not ready yet
        self._out: asyncio.Queue[Pending] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self._journal: deque[tuple[float, Any]] = deque()  # (monotonic time, async op)
        self._recover_needed: bool | str = False  # a reason to catch up before the next read
        self.draining = False  # set on shutdown: no new call starts
        self._healthy_since = time.monotonic()  # last time Redis failed us (or start)
        self._last_beat_s = time.monotonic()  # last successful heartbeat
        self._clock_offset_ms = 0  # Redis server time - our time: heartbeats use Redis's clock
        self.ready = asyncio.Event()  # set once the worker serves
        self._tasks: list[asyncio.Task[Any]] = []
        self._finish = redis.register_script(scripts.FINISH_CALL)
        self._claim = redis.register_script(scripts.CLAIM_TRAJ)
        self._end = redis.register_script(scripts.END_TRAJ)
        self._release = redis.register_script(scripts.RELEASE_TRAJ)
        self.started_ms = now_ms()
        backend.on_event = self._on_agent_event
        backend.worker_heartbeats = self._worker_heartbeats
        backend.trajectory_states = self._trajectory_states
        self.observer = observer or WorkerMetrics(settings, self.registry)
        backend.observer = self.observer
        self.external = ExternalRunner(settings, redis, self.registry, self.id)
        self.bg = BgRecorder(
            redis,
            self.keys,
            traj_of_slot=lambda name: getattr(self.traj_for_slot(name), "traj_id", None),
            retention_s=settings.retention_s,
            events_maxlen=settings.events_maxlen,
            observer=self.observer,
        )

    async def _on_agent_event(self, msg: dict[str, Any]) -> None:
        """Unsolicited agent news (e.g. background tasks); ``msg["slot"]`` names the slot."""
        if msg.get("event") == "bg":
            await self.bg.on_event(msg)
        else:
            log.debug("agent event: %s", msg.get("event"))

    async def _worker_heartbeats(self) -> dict[str, int]:
        """Every registered worker id -> its last heartbeat (unix ms)."""
        pairs: Any = await self.redis.zrange(self.keys.workers, 0, -1, withscores=True)
        return {_s(worker): int(score) for worker, score in pairs}

    async def _trajectory_states(self, traj_ids: list[str]) -> dict[str, TrajState]:
        """What the records of ``traj_ids`` say; trajectories without a record are left out."""
        pipe = self.redis.pipeline(transaction=False)
        fields = ("status", "owner", "slot", "last_activity_ms", "spec")
        for traj_id in traj_ids:
            pipe.hmget(self.keys.traj(traj_id), fields)
        states = {}
        for traj_id, (status, owner, slot, activity_ms, spec) in zip(
            traj_ids, await pipe.execute(), strict=True
        ):
            if status is None:
                continue
            try:
                limits = TrajectorySpec.model_validate_json(spec or b"{}").limits
            except ValueError:
                limits = TrajectorySpec().limits
            states[traj_id] = TrajState(
                status=_s(status),
                owner=_s(owner or ""),
                slot=_s(slot or ""),
                last_activity_ms=entry_ms(_s(activity_ms or "0")),
                idle_timeout_s=limits.idle_timeout_s,
            )
        return states

    def traj_for_slot(self, slot_name: str) -> Traj | None:
        """The owned trajectory served by the slot the agent calls ``slot_name``."""
        for traj in self.owned.values():
            if traj.slot is not None and traj.slot.name == slot_name:
                return traj
        return None

    # ------------------------------------------------------------------ run
    async def run(self) -> None:
        """Serve until ``stop()`` is called, then shut down gracefully."""
        await self.startup()
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="reader"),
            asyncio.create_task(self._write_loop(), name="writer"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._reap_loop(), name="reaper"),
        ]
        self.ready.set()
        await self._stopping.wait()
        await self.shutdown()

    def stop(self) -> None:
        """Ask the worker to stop claiming and shut down (signal-safe)."""
        self._stopping.set()

    async def startup(self) -> None:
        await self.observer.worker_started(self)
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists already
            await self.redis.xgroup_create(self.keys.open, GROUP, id="0", mkstream=True)
        await self.backend.start()
        await self._heartbeat()
        # Restarted under a stable id (a pod name): what "we" owned before the
        # crash is re-queued as a crashed worker's, and our unanswered reads re-read.
        for traj_id in await self.redis.smembers(self.keys.worker_trajs(self.id)):
            await self._requeue(_s(traj_id), self.id, graceful=False)
        self._recover_needed = "startup"
        await publish_registry(self.redis, self.keys, self.registry)
        log.info(
            "worker %s up: backend=%s slots=%d", self.id, self.backend.name, self.settings.slots
        )

    @property
    def free_slots(self) -> int:
        return self.settings.slots - len(self.owned)

    # --------------------------------------------------------------- reader
    async def _read_loop(self) -> None:
        backoff_s = 0.1
        while not self._stopping.is_set():
            try:
                if self._recover_needed:
                    await self._recover()
                await self._read_once()
                backoff_s = 0.1
            except (RedisError, OSError) as exc:
                self._redis_failed()
                log.warning("read failed (%s); retrying in %.1fs", exc, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
            except Exception:  # a bug here must not stop the worker serving
                log.exception("reader error; retrying in %.1fs", backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)

    async def _read_once(self) -> None:
        streams: dict[str, str] = {}
        if self.free_slots > 0:
            streams[self.keys.open] = ">"
        streams.update({self.keys.calls(t): ">" for t in self.owned})
        if not streams:  # full and nothing owned cannot happen with slots >= 1
            await asyncio.sleep(0.1)
            return
        # COUNT applies to every stream: while claiming, never take more
        # trajectories than free slots; calls beyond that come next read.
        count = self.free_slots if self.keys.open in streams else self.settings.batch_max
        resp: Any = await self.redis.xreadgroup(
            GROUP,
            self.id,
            streams,  # type: ignore[arg-type]
            count=max(1, count),
            block=self.settings.block_ms,
        )
        self.observer.batch_read(sum(len(entries) for _, entries in resp or []))
        for stream, entries in resp or []:
            name = _s(stream)
            if name == self.keys.open:
                for entry_id, fields in entries:
                    await self._on_open(_s(entry_id), fields)
            else:
                self._on_calls(traj_of_stream(name), entries)

    async def _recover(self) -> None:
        """Catch up after Redis errors (a restart, a failover, a network cut).

        Replays recent idempotent writes (a restart may have lost the last
        second of them), recreates consumer groups a Redis without persistence
        forgot, and re-reads entries delivered to this worker whose reply never
        arrived. Nothing runs twice: results are written only where missing and
        entries already dispatched are skipped.
        """
        log.log(
            logging.INFO if self._recover_needed == "startup" else logging.WARNING,
            "catching up (%s)",
            self._recover_needed or "after Redis errors",
        )
        self._recover_needed = False
        cutoff = time.monotonic() - REPLAY_WINDOW_S
        for at, op in list(self._journal):
            if at >= cutoff:
                await op()
        with contextlib.suppress(ResponseError):
            await self.redis.xgroup_create(self.keys.open, GROUP, id="0", mkstream=True)
        for traj_id in self.owned:
            with contextlib.suppress(ResponseError):
                await self.redis.xgroup_create(
                    self.keys.calls(traj_id), GROUP, id="0", mkstream=True
                )
        await self._heartbeat()
        streams = {self.keys.open: "0", **{self.keys.calls(t): "0" for t in self.owned}}
        resp: Any = await self.redis.xreadgroup(GROUP, self.id, streams, count=1000)  # type: ignore[arg-type]
        for stream, entries in resp or []:
            name = _s(stream)
            if name == self.keys.open:
                for entry_id, fields in entries:
                    await self._on_open(_s(entry_id), fields)
                continue
            traj = self.owned.get(traj_of_stream(name))
            if traj is not None:
                newer = [
                    e for e in entries if _entry_key(_s(e[0])) > _entry_key(traj.last_entry_id)
                ]
                self._on_calls(traj.traj_id, newer)

    def _redis_failed(self) -> None:
        self._recover_needed = True
        self._healthy_since = time.monotonic()

    def _journal_op(self, op: Any) -> None:
        now = time.monotonic()
        self._journal.append((now, op))
        while self._journal and self._journal[0][0] < now - REPLAY_WINDOW_S:
            self._journal.popleft()

    async def _on_open(self, entry_id: str, fields: dict[Any, Any]) -> None:
        try:
            req = OpenRequest.from_fields(fields)
            if req.v > PROTOCOL_VERSION:
                raise ValueError(f"protocol version {req.v} is newer than this worker's")
        except ValueError as exc:
            reason = f"bad open request: {exc}"
            await self._dead(self.keys.open, entry_id, fields, reason)
            await self._fail_unopenable(_s(fields.get(b"traj", fields.get("traj", ""))), reason)
            await self.redis.xack(self.keys.open, GROUP, entry_id)
            return
        await self.claim(req.traj, req.spec, req.previous_owner, req.graceful)
        await self.redis.xack(self.keys.open, GROUP, entry_id)

    async def _fail_unopenable(self, traj_id: str, reason: str) -> None:
        """A trajectory whose open request is invalid fails; its calls are answered."""
        try:
            check_traj_id(traj_id)
        except InvalidIdError:
            return  # no keys can be named after it: the dead letter is all there is
        ended = await self._end(
            keys=[self.keys.traj(traj_id), self.keys.events(traj_id), self.keys.calls(traj_id)],
            args=[
                TrajStatus.FAILED.value,
                now_ms(),
                reason,
                self.settings.retention_s * 1000,
                self.settings.events_maxlen,
                self.id,
            ],
        )
        await self.redis.zrem(self.keys.pending, traj_id)
        if ended:
            with contextlib.suppress(ResponseError):  # BUSYGROUP
                await self.redis.xgroup_create(
                    self.keys.calls(traj_id), GROUP, id="0", mkstream=True
                )
            await self._drain_stream(traj_id)

    async def claim(
        self,
        traj_id: str,
        spec: TrajectorySpec,
        previous_owner: str | None = None,
        graceful: bool = False,
    ) -> bool:
        """Take ownership of a trajectory and start serving it."""
        if traj_id in self.owned:
            owner = _s(await self.redis.hget(self.keys.traj(traj_id), "owner") or b"")
            if owner in (self.id, ""):
                return False  # a duplicate open request
            await self._abandon(self.owned[traj_id])  # we were taken for dead meanwhile
        # Indexed before the claim: a crash right after it leaves nothing unfindable.
        await self.redis.sadd(self.keys.worker_trajs(self.id), traj_id)
        got = _s(
            await self._claim(
                keys=[self.keys.traj(traj_id), self.keys.calls(traj_id)],
                args=[
                    self.id,
                    now_ms(),
                    spec.model_dump_json(exclude_none=True),
                    traj_id,
                    GROUP,
                    previous_owner or "",
                ],
            )
        )
        await self.redis.zrem(self.keys.pending, traj_id)  # owned or ended: not waiting
        if got != "ok":
            log.info("not claiming %s: %s", traj_id, got)
            await self.redis.srem(self.keys.worker_trajs(self.id), traj_id)
            return False
        self.observer.traj_claimed()
        traj = Traj(traj_id, spec, previous_owner=previous_owner)
        self.owned[traj_id] = traj
        await self._adopt_pending_entries(traj, crashed=bool(previous_owner) and not graceful)
        traj.task = asyncio.create_task(self._serve(traj), name=f"traj-{traj_id}")
        return True

    async def _adopt_pending_entries(self, traj: Traj, crashed: bool) -> None:
        """Entries read by a previous owner but never answered run here first.

        After a crash the first unanswered call may have been running when the
        owner died: it gets ``worker_lost`` unless it is marked idempotent
        (then it runs again). Calls behind it never started (calls of one
        trajectory run in order), so they simply run here.
        """
        stream = self.keys.calls(traj.traj_id)
        start, entries = "0-0", []
        while True:
            resp: Any = await self.redis.xautoclaim(stream, GROUP, self.id, 0, start, count=500)
            start = _s(resp[0])
            entries += [(e[0], e[1] or {}) for e in resp[1] if e]  # {}: deleted entry
            if start == "0-0" or not resp[1]:
                break
        entries.sort(key=lambda e: _entry_key(_s(e[0])))
        if crashed:
            entries = self._answer_lost_call(traj, entries)
        self._on_calls(traj.traj_id, entries)

    def _answer_lost_call(self, traj: Traj, entries: list[Any]) -> list[Any]:
        for index, (entry_id, fields) in enumerate(entries):
            item = self._parse_item(_s(entry_id), fields)
            if item.kind != "call":
                continue
            if item.entry is not None and item.entry.idempotent:
                return entries  # safe to run again
            self._answer(
                traj.traj_id,
                item,
                ErrorCode.WORKER_LOST,
                f"the worker running this call ({traj.previous_owner}) died",
            )
            return entries[:index] + entries[index + 1 :]
        return entries

    def _on_calls(self, traj_id: str, entries: Iterable[Any]) -> None:
        traj = self.owned.get(traj_id)
        for entry_id, fields in entries:
            item = self._parse_item(_s(entry_id), fields)
            if traj is not None:
                if _entry_key(item.entry_id) <= _entry_key(traj.last_entry_id):
                    continue  # delivered again (failover, group reset): it was dispatched
                traj.last_entry_id = item.entry_id
            if traj is None or traj.ending is not None:
                self._refuse(traj_id, item, ErrorCode.TRAJECTORY_ENDED, self._ended_message(traj))
            elif item.kind != "call" and item.error is not None:
                # a control entry this worker cannot trust (newer version): never act on it
                self._ack(traj_id, item.entry_id)
                log.warning("ignored %s entry %s: %s", item.kind, item.entry_id, item.error[1])
            elif item.kind == "cancel":
                self._cancel(traj, item)
            else:
                traj.push(item)

    def _parse_item(self, entry_id: str, fields: dict[Any, Any] | None) -> Item:
        if not fields:  # deleted entry (XDEL/XTRIM) still in the PEL
            return Item(entry_id, None, (ErrorCode.BAD_REQUEST, "entry was deleted"))
        size = sum(len(k) + len(v) for k, v in fields.items())
        if size > self.settings.max_entry_bytes:
            return Item(
                entry_id,
                None,
                (
                    ErrorCode.PAYLOAD_TOO_LARGE,
                    f"entry is {size} bytes; the limit is {self.settings.max_entry_bytes}",
                ),
            )
        try:
            entry = CallEntry.from_fields(fields)
        except ValueError as exc:
            return Item(entry_id, None, (ErrorCode.BAD_REQUEST, f"malformed call entry: {exc}"))
        if entry.call_id is not None:
            try:
                check_part(entry.call_id, "call_id")
            except InvalidIdError as exc:
                return Item(entry_id, None, (ErrorCode.BAD_REQUEST, str(exc)))
        if entry.v > 1:
            return Item(
                entry_id,
                entry,
                (
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"protocol version {entry.v} is newer than this worker's (1)",
                ),
            )
        return Item(entry_id, entry)

    @staticmethod
    def _ended_message(traj: Traj | None) -> str:
        if traj is None or traj.ending is None:
            return "the trajectory has ended"
        status, reason, _ = traj.ending
        return f"the trajectory has ended ({status.value}: {reason})"

    def _cancel(self, traj: Traj, item: Item) -> None:
        """Cancel at once: kill what runs, answer what waits, end the trajectory."""
        for queued in traj.items:
            self._refuse(traj.traj_id, queued, ErrorCode.CANCELLED, "trajectory cancelled")
        traj.items.clear()
        traj.request_end(TrajStatus.CANCELLED, "cancelled by client", item.entry_id)
        self.external.cancel(traj.traj_id)  # its running RQ job, if any
        if traj.slot is not None and traj.slot.channel.alive:
            with contextlib.suppress(ChannelClosedError):
                traj.slot.channel.submit("cancel", slot=traj.slot.name)

    # ---------------------------------------------------------- trajectory
    async def _serve(self, traj: Traj) -> None:
        """Run one trajectory's calls in order until it ends."""
        try:
            await self._serve_calls(traj)
        except Exception as exc:  # keep the worker alive; end this trajectory
            log.exception("trajectory %s crashed", traj.traj_id)
            traj.request_end(TrajStatus.FAILED, f"internal error: {exc}")
        await self._end_traj(traj)

    async def _serve_calls(self, traj: Traj) -> None:
        # Start the slot at once: the sandbox boots while the client prepares its first call.
        if not await self._ensure_slot(traj, None):
            return
        while traj.ending is None:
            if not traj.items or self.draining:  # draining: queued calls run on the next owner
                traj.wakeup.clear()
                await traj.wakeup.wait()
                continue
            item = traj.items.popleft()
            if item.kind == "close":
                traj.request_end(TrajStatus.COMPLETED, "closed by client", item.entry_id)
                return
            traj.busy, traj.current = True, item
            try:
                await self._run_item(traj, item)
            except Exception as exc:  # the call still gets its one result
                log.exception("call %s of %s failed inside the worker", item.entry_id, traj.traj_id)
                self._answer(traj.traj_id, item, ErrorCode.INTERNAL_ERROR, f"worker error: {exc}")
            finally:
                traj.busy, traj.current = False, None
                traj.last_activity = time.monotonic()

    async def _run_item(self, traj: Traj, item: Item) -> None:
        received_ms = now_ms()
        if item.error is not None or item.entry is None:
            code, message = item.error or (ErrorCode.BAD_REQUEST, "malformed entry")
            self._answer(traj.traj_id, item, code, message)
            return
        if await self._already_answered(traj, item):
            self._ack(traj.traj_id, item.entry_id)
            return
        traj.calls += 1  # refused calls count too
        checked = self._check_call(traj, item.entry)
        if isinstance(checked, Refusal):
            self._answer(traj.traj_id, item, checked.code, checked.message)
            return
        tool_name, args, timeout_s = checked
        if self.external.handles(tool_name):  # an RQ job, no sandbox needed
            reply = await self.external.call(traj, item, tool_name, args)
            self._emit(traj, item, reply, tool_name, received_ms)
            return
        needs_slot = traj.slot is None or not traj.slot.channel.alive
        if needs_slot and not await self._ensure_slot(traj, item):
            return
        assert traj.slot is not None
        # A crash must not mistake a finished call for the running one: results of
        # earlier calls are in Redis before the next call starts.
        await traj.flushed.wait()
        if traj.ending is not None:  # cancelled or ended while we waited
            cancelled = traj.ending[0] == TrajStatus.CANCELLED
            code = ErrorCode.CANCELLED if cancelled else ErrorCode.TRAJECTORY_ENDED
            self._answer(traj.traj_id, item, code, self._ended_message(traj))
            return
        reply = await self._call_agent(traj, traj.slot, tool_name, args, timeout_s)
        if reply.get("timed_out") and self._deadline_left_s(traj) <= 0.05:
            reply["error"] = f"deadline_s limit ({traj.spec.limits.deadline_s}s) reached"
        if traj.ending is not None and traj.ending[0] == TrajStatus.CANCELLED:
            reply = {
                "ok": False,
                "error_code": "cancelled",
                "error": "trajectory cancelled",
                "output": reply.get("output", ""),
            }
        self._emit(traj, item, reply, tool_name, received_ms)

    async def _already_answered(self, traj: Traj, item: Item) -> bool:
        """A client call_id seen before (idempotent resubmission) is not run twice."""
        assert item.entry is not None
        if item.entry.call_id is None:
            return False
        if item.call_id in traj.seen_call_ids:
            return True
        traj.seen_call_ids.add(item.call_id)
        key = self.keys.result(traj.traj_id, item.call_id)
        return bool(await self._retry(lambda: self.redis.exists(key)))

    def _check_call(
        self, traj: Traj, entry: CallEntry
    ) -> Refusal | tuple[str, dict[str, Any], float]:
        """Validate a call: tool, policy, limits, arguments. Refusal or what to run."""
        name = entry.tool or ""
        tool = self.registry.resolve(name)
        if not name:
            return Refusal(ErrorCode.BAD_REQUEST, "call entry has no 'tool' field")
        if tool is None:
            return Refusal(ErrorCode.UNKNOWN_TOOL, f"unknown tool {name!r}")
        spec = traj.spec
        if name in spec.blocked_tools or tool.name in spec.blocked_tools:
            return Refusal(
                ErrorCode.TOOL_BLOCKED, f"tool {name!r} is blocked by the trajectory's policy"
            )
        if spec.allowed_tools is not None and not {name, tool.name} & set(spec.allowed_tools):
            return Refusal(
                ErrorCode.TOOL_BLOCKED, f"tool {name!r} is not in the allowed_tools policy"
            )
        limits = spec.limits
        if limits.max_calls is not None and traj.calls > limits.max_calls:
            return Refusal(
                ErrorCode.LIMIT_EXCEEDED, f"max_calls limit ({limits.max_calls}) reached"
            )
        if limits.deadline_s is not None and time.monotonic() - traj.started > limits.deadline_s:
            return Refusal(
                ErrorCode.LIMIT_EXCEEDED, f"deadline_s limit ({limits.deadline_s}s) passed"
            )
        try:
            args = self.registry.validate(tool, entry.args)
        except InvalidArgsError as exc:
            return Refusal(ErrorCode.INVALID_ARGS, str(exc))
        wanted = args.get("timeout_s") or entry.timeout_s or limits.call_timeout_s
        cap = min(limits.max_call_timeout_s, self.settings.max_call_timeout_s)
        # A deadline is hard: a call may not run past it.
        return tool.name, args, max(0.001, min(float(wanted), cap, self._deadline_left_s(traj)))

    @staticmethod
    def _deadline_left_s(traj: Traj) -> float:
        deadline_s = traj.spec.limits.deadline_s
        if deadline_s is None:
            return float("inf")
        return deadline_s - (time.monotonic() - traj.started)

    async def _ensure_slot(self, traj: Traj, item: Item | None) -> bool:
        """Start the trajectory's slot (again, after a loss); answer the call on failure."""
        if traj.slot is not None:  # lost while idle: replace it
            self.observer.slot_lost()
            await self._drop_slot(traj)
            traj.slot_lost = True
        if traj.slot_lost:  # say so in the next result
            traj.slot_reset, traj.slot_lost = True, False
        try:
            started = time.monotonic()
            traj.slot = await self.backend.acquire(traj.traj_id, traj.spec)
            self.observer.slot_started(time.monotonic() - started)
        except SandboxError as exc:
            for waiting in ([item] if item else []) + list(traj.items):
                self._refuse(traj.traj_id, waiting, ErrorCode.SANDBOX_ERROR, str(exc))
            traj.items.clear()
            traj.request_end(TrajStatus.FAILED, f"sandbox failed to start: {exc}")
            return False
        if traj.previous_owner and not traj.slot.adopted:
            traj.slot_reset = True  # the previous owner's workspace is gone
        traj.previous_owner = None
        key, slot_id = self.keys.traj(traj.traj_id), traj.slot.slot_id
        await self._retry(lambda: self.redis.hset(key, "slot", slot_id))
        return True

    async def _call_agent(
        self, traj: Traj, slot: Slot, tool: str, args: dict[str, Any], timeout_s: float
    ) -> dict[str, Any]:
        try:
            fut = slot.channel.submit(
                "call",
                slot=slot.name,
                tool=tool,
                args=args,
                timeout_s=timeout_s,
                max_output_bytes=traj.spec.limits.max_output_bytes,
            )
            return await asyncio.wait_for(fut, timeout_s + AGENT_GRACE_S)
        except (ChannelClosedError, asyncio.TimeoutError) as exc:
            why = "sandbox stopped answering" if isinstance(exc, asyncio.TimeoutError) else exc
            self.observer.slot_lost()
            await self._drop_slot(traj)
            traj.slot_lost = True
            return {
                "ok": False,
                "error_code": ErrorCode.SANDBOX_LOST.value,
                "error": f"the sandbox was lost during the call: {why}",
            }

    def _emit(
        self, traj: Traj, item: Item, reply: dict[str, Any], tool: str, received_ms: int
    ) -> None:
        run_ms = float(reply.get("run_ms") or 0.0)
        reset, traj.slot_reset = traj.slot_reset, False
        data = reply.get("data")
        result = Result(
            call_id=item.call_id,
            traj=traj.traj_id,
            tool=tool,
            ok=bool(reply.get("ok")),
            output=str(reply.get("output", "")),
            exit_code=reply.get("exit_code"),
            error_code=reply.get("error_code"),
            error=reply.get("error"),
            truncated=bool(reply.get("truncated")),
            output_bytes=int(reply.get("output_bytes") or len(str(reply.get("output", "")))),
            timed_out=bool(reply.get("timed_out")),
            slot_reset=reset,
            queued_ms=max(0.0, float(received_ms - entry_ms(item.entry_id))),
            run_ms=run_ms,
            worker=self.id,
            slot=traj.slot.slot_id if traj.slot else "",
            finished_ms=now_ms(),
            data=data if isinstance(data, dict) else None,
        )
        self._queue_result(
            Pending(traj.traj_id, item.entry_id, result, self.owned.get(traj.traj_id))
        )

    def _answer(self, traj_id: str, item: Item, code: ErrorCode, message: str) -> None:
        """Give a call an error result without running it."""
        result = Result(
            call_id=item.call_id,
            traj=traj_id,
            tool=(item.entry.tool or "") if item.entry else "",
            ok=False,
            error_code=code.value,
            error=message,
            worker=self.id,
            queued_ms=max(0.0, float(now_ms() - entry_ms(item.entry_id))),
            finished_ms=now_ms(),
        )
        self._queue_result(Pending(traj_id, item.entry_id, result, self.owned.get(traj_id)))

    def _queue_result(self, pending: Pending) -> None:
        if pending.traj is not None:
            pending.traj.unflushed += 1
            pending.traj.flushed.clear()
        self._out.put_nowait(pending)

    def _refuse(self, traj_id: str, item: Item, code: ErrorCode, message: str) -> None:
        """Answer a call with an error; a control entry is only acknowledged."""
        if item.kind == "call":
            self._answer(traj_id, item, code, message)
        else:
            self._ack(traj_id, item.entry_id)

    def _ack(self, traj_id: str, entry_id: str) -> None:
        self._out.put_nowait(Pending(traj_id, entry_id, None))

    async def _drop_slot(self, traj: Traj, keep: bool = False) -> None:
        slot, traj.slot = traj.slot, None
        if slot is not None:
            await self.bg.stop_tasks(slot)  # reported stopped before the sandbox goes
            try:
                await self.backend.release(slot, keep=keep)
            except Exception:
                log.exception("releasing slot %s failed", slot.slot_id)
            # Tasks still running in Redis now had nobody left to report them: lost.
            await self.bg.slot_gone(traj.traj_id, slot.name, now_ms())

    async def _end_traj(self, traj: Traj) -> None:
        """Free the slot, record the final state once, answer what is left."""
        status, reason, entry_id = traj.ending or (TrajStatus.FAILED, "ended", "")
        for item in traj.items:
            self._refuse(
                traj.traj_id,
                item,
                ErrorCode.TRAJECTORY_ENDED,
                f"the trajectory has ended ({status.value})",
            )
        traj.items.clear()
        await self._drop_slot(traj)
        end_args = [
            status.value,
            now_ms(),
            reason,
            self.settings.retention_s * 1000,
            self.settings.events_maxlen,
            self.id,
        ]
        end_keys = [
            self.keys.traj(traj.traj_id),
            self.keys.events(traj.traj_id),
            self.keys.calls(traj.traj_id),
        ]
        await self._retry(lambda: self._end(keys=end_keys, args=end_args))
        self._journal_op(lambda: self._end(keys=end_keys, args=end_args))
        if entry_id:
            self._ack(traj.traj_id, entry_id)
        # Calls that reached the stream before the final state was recorded
        # are answered here; later ones are refused by the producer's submit.
        await self._retry(lambda: self._drain_stream(traj.traj_id))
        self.owned.pop(traj.traj_id, None)
        await self._retry(lambda: self.redis.srem(self.keys.worker_trajs(self.id), traj.traj_id))
        self.observer.traj_ended(status.value)
        log.info("trajectory %s ended: %s (%s)", traj.traj_id, status.value, reason)

    async def _drain_stream(self, traj_id: str) -> None:
        stream = self.keys.calls(traj_id)
        while True:
            resp: Any = await self.redis.xreadgroup(GROUP, self.id, {stream: ">"}, count=500)
            entries = resp[0][1] if resp else []
            if not entries:
                return
            for entry_id, fields in entries:
                item = self._parse_item(_s(entry_id), fields)
                self._refuse(traj_id, item, ErrorCode.TRAJECTORY_ENDED, "the trajectory has ended")

    # --------------------------------------------------------------- writer
    async def _write_loop(self) -> None:
        """Flush every result that is ready in one pipelined round trip."""
        while True:
            batch = [await self._out.get()]
            while not self._out.empty():
                batch.append(self._out.get_nowait())
            try:
                await self._retry(lambda batch=batch: self._flush(batch))
            except Exception:  # never let one bad result stop every later one
                log.exception("writing %d results failed; writing them one by one", len(batch))
                await self._flush_each(batch)
            self._journal_op(lambda batch=batch: self._flush(batch))
            for p in batch:
                if p.result is not None:
                    self.observer.call_finished(p.result)
                if p.traj is not None:
                    p.traj.unflushed -= 1
                    if p.traj.unflushed <= 0:
                        p.traj.flushed.set()
                self._out.task_done()

    async def _flush_each(self, batch: list[Pending]) -> None:
        """Write results one at a time; one that cannot be written becomes internal_error."""
        for p in batch:
            try:
                await self._retry(lambda p=p: self._flush([p]))
            except Exception as exc:
                if p.result is None:
                    continue
                r = p.result
                p.result = Result(
                    call_id=r.call_id,
                    traj=r.traj,
                    tool=r.tool,
                    ok=False,
                    error_code=ErrorCode.INTERNAL_ERROR.value,
                    error=f"the result could not be stored: {exc}",
                    worker=self.id,
                    finished_ms=now_ms(),
                )
                with contextlib.suppress(Exception):
                    await self._retry(lambda p=p: self._flush([p]))

    async def _flush(self, batch: list[Pending]) -> None:
        for loaded in (False, True):
            pipe = self.redis.pipeline(transaction=False)
            for p in batch:
                self._queue_finish(pipe, p)
            try:
                await pipe.execute()
                return
            except NoScriptError:  # a restarted Redis forgot the script; rerunning is safe
                if loaded:
                    raise
                await self.redis.script_load(scripts.FINISH_CALL)

    def _queue_finish(self, pipe: Any, p: Pending) -> None:
        """Queue one result's FINISH_CALL (or a bare XACK) as a plain EVALSHA.

        Not a Script object: a redis-py pipeline holding one sends SCRIPT EXISTS
        first, a round trip per flush. Small results ride inline in their event
        too, which saves clients an HGETALL.
        """
        calls = self.keys.calls(p.traj_id)
        if p.result is None:
            pipe.xack(calls, GROUP, p.entry_id)
            return
        r = p.result
        as_fields = r.to_fields()
        # bytes, not str: a lone surrogate in a tool's output must not fail the write
        fields = [x.encode("utf-8", "replace") for kv in as_fields.items() for x in kv]
        size = sum(len(k) + len(v) for k, v in as_fields.items())
        inline = ""
        if size <= INLINE_RESULT_MAX_BYTES:
            inline = json.dumps(as_fields, separators=(",", ":"))
        keys = [
            self.keys.result(p.traj_id, r.call_id),
            self.keys.events(p.traj_id),
            calls,
            self.keys.traj(p.traj_id),
        ]
        pipe.evalsha(
            self._finish.sha,
            len(keys),
            *keys,
            GROUP,
            p.entry_id,
            self.settings.result_ttl_s * 1000,
            self.settings.events_maxlen,
            "1" if r.ok else "0",
            r.error_code or "",
            r.call_id,
            r.finished_ms,
            inline,
            *fields,
        )

    async def _retry(self, fn: Any, attempts: int = 0) -> Any:
        """Run a Redis operation until it succeeds: results are never dropped."""
        delay_s = 0.05
        while True:
            try:
                return await fn()
            except (RedisError, OSError) as exc:
                self._redis_failed()
                attempts += 1
                log.warning("redis write failed (%s); retry %d in %.2fs", exc, attempts, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)

    async def _dead(self, stream: str, entry_id: str, fields: dict[Any, Any], reason: str) -> None:
        preview = {_s(k)[:100]: _s(v)[:1000] for k, v in list(fields.items())[:20]}
        await self.redis.xadd(
            self.keys.dead,
            {
                "stream": stream,
                "entry_id": entry_id,
                "reason": reason,
                "worker": self.id,
                "fields": json.dumps(preview),
            },
            maxlen=10_000,
        )

    # ------------------------------------------------------ heartbeat, reap
    async def _take_over_dead(self) -> None:
        """Re-queue the trajectories of workers whose heartbeat stopped.

        Safe to run on every worker at once: only the first release of a
        trajectory (owner still the dead worker) re-queues it.
        """
        if time.monotonic() - self._healthy_since < self.settings.dead_after_s:
            return  # we just lost Redis ourselves: the others' heartbeats may be stale too
        cutoff = self._redis_now_ms() - int(self.settings.dead_after_s * 1000)
        for raw in await self.redis.zrangebyscore(self.keys.workers, "-inf", cutoff):
            dead = _s(raw)
            if dead == self.id:
                continue
            for traj_id in await self.redis.smembers(self.keys.worker_trajs(dead)):
                await self._requeue(_s(traj_id), dead, graceful=False)
            await self._release_open_entries(dead)
            await self.redis.zrem(self.keys.workers, dead)
            await self.redis.delete(self.keys.worker_trajs(dead), self.keys.worker(dead))
            log.warning("worker %s is dead: its trajectories were re-queued", dead)

    async def _trim_open(self) -> None:
        """Drop open requests every worker has read and acknowledged (the stream
        would otherwise grow by one entry per trajectory forever)."""
        groups: Any = await self.redis.xinfo_groups(self.keys.open)
        group = next((g for g in groups if _s(g["name"]) == GROUP), None)
        if group is None:
            return
        floor = _s(group["last-delivered-id"])
        pending: Any = await self.redis.xpending(self.keys.open, GROUP)
        if pending and pending.get("pending"):
            floor = min(floor, _s(pending["min"]), key=_entry_key)
        # MINID keeps `floor` itself: entries older than it are read and acknowledged.
        await self.redis.xtrim(self.keys.open, minid=floor, approximate=True)

    async def _requeue(self, traj_id: str, owner: str, graceful: bool) -> None:
        """Give ``owner``'s trajectory back to the pool (any worker may claim it).

        The open request goes first: a crash between the two steps leaves a
        request that can still displace ``owner``, never a trajectory nobody
        will claim. Repeating it (several workers at once) is harmless.
        """
        record = await self.redis.hmget(self.keys.traj(traj_id), ["owner", "spec"])
        if _s(record[0] or b"") != owner:
            return  # ended, gone, or already re-queued and claimed
        req = OpenRequest(
            traj=traj_id, spec=_s(record[1] or "{}"), previous_owner=owner, graceful=graceful
        )
        await self.redis.xadd(self.keys.open, req.to_fields())
        if await self._release(keys=[self.keys.traj(traj_id)], args=[owner]):
            await self.redis.zadd(self.keys.pending, {traj_id: now_ms()}, nx=True)

    async def _release_open_entries(self, consumer: str) -> None:
        """Open requests a dead worker had read but not acted on go back to the stream."""
        pending: Any = await self.redis.xpending_range(
            self.keys.open, GROUP, min="-", max="+", count=1000, consumername=consumer
        )
        for p in pending:
            entry_id = _s(p["message_id"])
            found: Any = await self.redis.xrange(self.keys.open, entry_id, entry_id)
            for _id, fields in found or []:
                await self.redis.xadd(self.keys.open, fields)
            await self.redis.xack(self.keys.open, GROUP, entry_id)
        await self.redis.xgroup_delconsumer(self.keys.open, GROUP, consumer)

    async def _check_ownership(self) -> None:
        """Stop serving trajectories another worker owns now (we were taken for dead)."""
        trajs = list(self.owned.values())
        if not trajs:
            return
        pipe = self.redis.pipeline(transaction=False)
        for traj in trajs:
            pipe.hget(self.keys.traj(traj.traj_id), "owner")
        for traj, owner in zip(trajs, await pipe.execute(), strict=True):
            if owner is not None and _s(owner) != self.id and traj.ending is None:
                log.error(
                    "trajectory %s is owned by %s now: abandoning it", traj.traj_id, _s(owner)
                )
                await self._abandon(traj)

    async def _abandon(self, traj: Traj) -> None:
        self.owned.pop(traj.traj_id, None)
        if traj.task is not None:
            traj.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await traj.task
        await self._drop_slot(traj, keep=True)

    async def _heartbeat_loop(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            beats += 1
            try:
                await self._heartbeat()
                beat_at = time.monotonic()
                if beat_at - self._last_beat_s > max(3 * self.settings.heartbeat_s, 1.0):
                    # We were stalled too (Redis frozen, loop starved): the others'
                    # stale heartbeats prove nothing until we have been healthy a while.
                    self._healthy_since = beat_at
                self._last_beat_s = beat_at
                await self._check_ownership()
                await self._take_over_dead()
                if beats % max(1, int(30 / self.settings.heartbeat_s)) == 0:
                    await self._trim_open()
            except (RedisError, OSError) as exc:
                self._redis_failed()
                log.warning("heartbeat failed: %s", exc)

    async def _heartbeat(self) -> None:
        info = WorkerInfo(
            worker=self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            backend=self.backend.name,
            version=__version__,
            slots_total=self.settings.slots,
            slots_used=len(self.owned),
            started_ms=self.started_ms,
            heartbeat_ms=self._redis_now_ms(),
        )
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        pipe.zadd(self.keys.workers, {self.id: info.heartbeat_ms})
        pipe.hset(self.keys.worker(self.id), mapping=info.to_fields())
        pipe.pexpire(self.keys.worker(self.id), int(self.settings.dead_after_s * 4000))
        self.observer.heartbeat(pipe)
        sent_ms = now_ms()
        replies = await pipe.execute()
        seconds, micros = replies[0]
        self._clock_offset_ms = int(seconds) * 1000 + int(micros) // 1000 - sent_ms

    def _redis_now_ms(self) -> int:
        """Now, by Redis's clock: heartbeats of workers on other hosts compare fairly."""
        return now_ms() + self._clock_offset_ms

    async def _reap_loop(self) -> None:
        """End trajectories that went idle (abandoned rollouts) or passed their deadline."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for traj in list(self.owned.values()):
                limits = traj.spec.limits
                if traj.busy or traj.items or traj.ending is not None:
                    continue
                if now - traj.last_activity > limits.idle_timeout_s:
                    traj.request_end(
                        TrajStatus.TIMEOUT,
                        f"idle_timeout_s limit ({limits.idle_timeout_s}s) passed",
                    )
                elif limits.deadline_s is not None and now - traj.started > limits.deadline_s:
                    traj.request_end(
                        TrajStatus.TIMEOUT, f"deadline_s limit ({limits.deadline_s}s) passed"
                    )

    # ------------------------------------------------------------- shutdown
    async def shutdown(self) -> None:
        """Stop reading, let running calls finish, hand back what is owned."""
        log.info("worker %s shutting down", self.id)
        reader = self._tasks[0] if self._tasks else None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        self.draining = True  # calls already queued run on the next owner, not here
        running = [t for t in self.owned.values() if t.busy]
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while any(t.busy for t in running) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        try:
            keep = await self._successor_alive() if self.owned else False
            for traj in list(self.owned.values()):
                try:
                    await self._hand_back(traj, keep)
                except Exception:  # one failure must not keep the others' sandboxes alive
                    log.exception("handing back %s failed", traj.traj_id)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._out.join(), 10)
        finally:
            for task in self._tasks[1:]:
                task.cancel()
            await self.external.close()
            await self.backend.shutdown()
            with contextlib.suppress(RedisError, OSError):
                await self.redis.zrem(self.keys.workers, self.id)
                await self.redis.delete(self.keys.worker(self.id))
            await self.observer.worker_stopped()

    async def _successor_alive(self) -> bool:
        """Is another worker alive to take over (and adopt kept sandboxes)?

        The last worker to leave keeps nothing: kept sandboxes would wait for a
        worker that may never come; the next one reports the slots reset.
        """
        try:
            beats = await self._worker_heartbeats()
        except (RedisError, OSError):
            return False
        cutoff = self._redis_now_ms() - int(self.settings.dead_after_s * 1000)
        return any(w != self.id and ms >= cutoff for w, ms in beats.items())

    async def _hand_back(self, traj: Traj, keep: bool = True) -> None:
        """Give a trajectory back to the pool; its unanswered calls stay pending.

        A call still running after the grace period gets ``worker_lost`` (or
        stays pending to run again elsewhere, when idempotent). With ``keep`` the
        backend leaves the sandbox for the next owner to adopt.
        """
        running = traj.current
        if running is not None and not (running.entry and running.entry.idempotent):
            self._answer(
                traj.traj_id,
                running,
                ErrorCode.WORKER_LOST,
                "the worker shut down while the call ran",
            )
        if traj.ending is not None and traj.task is not None:
            # It is ending anyway: let its task finish that (cancelling it midway
            # could leave its sandbox behind).
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(traj.task), 30)
            if traj.task.done():
                return
        if traj.task is not None:
            traj.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await traj.task
        if traj.ending is not None:  # it was ending anyway: finish that
            await self._end_traj(traj)
            return
        await self._drop_slot(traj, keep=keep)
        # The worker_lost result is in Redis before the next owner can see the entry.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(traj.flushed.wait(), 10)
        await self._requeue(traj.traj_id, self.id, graceful=True)
        self.owned.pop(traj.traj_id, None)
        await self.redis.srem(self.keys.worker_trajs(self.id), traj.traj_id)
