"""External tools: Python callables run as RQ jobs, answered like sandbox tools.

Two halves:

* In the RQ worker (``toolq rq-worker``): ``run_tool`` is the one job function
  toolq ever enqueues. It looks the tool up *by name* in the registry loaded
  from the RQ worker's own ``--tools`` modules (``TOOLQ_TOOLS``), so a message
  can never name an import path. RQ callbacks (``on_success`` / ``on_failure``
  / ``on_stopped``) push the final reply to the owning toolq worker.
* In the toolq worker: ``ExternalRunner.call`` enqueues the job and waits for
  that reply; the worker writes it with the same FINISH_CALL script as every
  other result, so exactly-once and the result format hold unchanged.

Why a pushed notice and not polling each job: a waiting call costs nothing
while it waits, and one ``BLPOP`` on one per-worker list (``Keys.external_done``)
serves every outstanding call of the worker, however many trajectories wait.
RQ runs the callbacks *before* it records the job's final status, so a notice
always precedes the status. Jobs that end without a callback (a killed work
horse, a job that expired in its queue, a notice sent to a previous owner)
are caught by one pipelined status read per second over all outstanding
jobs: a final status seen twice in a row with no notice is read back from RQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError
from redis import Redis as SyncRedis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError
from rq import Queue, Retry
from rq.callbacks import Callback
from rq.command import send_stop_job_command
from rq.exceptions import DuplicateJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.timeouts import JobTimeoutException

from toolq.schemas import ErrorCode, Keys

from .registry import load_registry
from .results import error_reply
from .tools import Registry, Tool, format_validation_error

if TYPE_CHECKING:
    from .plan import Plan
    from .settings import WorkerSettings
    from .state import Item, Traj

log = logging.getLogger("toolq.external")

POLL_S = 1.0  # status read of outstanding jobs (fallback path only)
RESULT_TTL_S = 600  # RQ keeps a job's return value this long (read by the fallback)
FAILURE_TTL_S = 24 * 3600  # failed jobs stay inspectable in RQ's failed registry
NOTICE_TTL_MS = 24 * 3600 * 1000  # notices for a worker that died expire
_FINAL = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}
_WAITING = {s.value for s in JobStatus} - {s.value for s in _FINAL}
_UNSAFE = re.compile(r"[^A-Za-z0-9-]")


def job_id_for(namespace: str, traj_id: str, call_id: str) -> str:
    """The RQ job id of a call: readable, unique across namespaces and trajectories.

    RQ allows ``[A-Za-z0-9_-]``; ids may hold ``.`` and ``:``, so every other
    byte becomes ``_xx`` (hex). ``__`` never appears inside an escaped part,
    which makes it a safe separator.
    """
    return "tq__" + "__".join(_escape(p) for p in (namespace, traj_id, call_id))


def _escape(part: str) -> str:
    return _UNSAFE.sub(lambda m: "".join(f"_{b:02x}" for b in m.group().encode()), part)


# =====================================================================
# RQ worker side
# =====================================================================
_registry: Registry | None = None


def set_registry(registry: Registry) -> None:
    """Use this registry in this process (``toolq rq-worker`` loads it before forking)."""
    global _registry
    _registry = registry


def rq_registry() -> Registry:
    """The RQ worker's registry; a plain ``rq worker`` loads it from ``TOOLQ_TOOLS``."""
    global _registry
    if _registry is None:
        _registry = load_registry(tools_from_env())
    return _registry


def tools_from_env() -> list[str]:
    """Module names in ``TOOLQ_TOOLS`` (separated by spaces or commas)."""
    return [m for m in re.split(r"[\s,]+", os.environ.get("TOOLQ_TOOLS", "")) if m]


def run_tool(tool: str, args: dict[str, Any], max_output_bytes: int = 65536) -> dict[str, Any]:
    """The RQ job function: run registered external tool ``tool`` with ``args``.

    Returns the reply (a dict like the sandbox agent's). Exceptions and
    timeouts propagate so that RQ retries them; the failure callback turns the
    last one into the error reply.
    """
    found = rq_registry().resolve(tool)
    if found is None or not found.external:
        return error_reply(
            ErrorCode.UNKNOWN_TOOL,
            f"{tool!r} is not an external tool of this RQ worker "
            f"(tools modules: {', '.join(tools_from_env()) or 'none'})",
        )
    try:
        model = found.args_model.model_validate(args)
    except ValidationError as exc:
        return error_reply(ErrorCode.INVALID_ARGS, format_validation_error(found.name, exc))
    assert found.func is not None
    started = time.perf_counter()
    value = found.func(**dict(model))
    return success_reply(value, (time.perf_counter() - started) * 1000, max_output_bytes)


def success_reply(value: Any, run_ms: float, max_output_bytes: int) -> dict[str, Any]:
    """A tool's return value as a reply: text output, plus ``data`` for a dict."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    data = None
    if value is None:
        text = ""
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, default=str, ensure_ascii=False)
        if isinstance(value, dict) and len(text) <= max_output_bytes:
            data = json.loads(text)  # plain JSON values, whatever the dict held
    output, truncated, total = cap_text(text, max_output_bytes)
    return {
        "ok": True,
        "output": output,
        "truncated": truncated,
        "output_bytes": total,
        "run_ms": run_ms,
        "data": data,
    }


def cap_text(text: str, max_bytes: int) -> tuple[str, bool, int]:
    """Keep the head and tail of ``text`` (like the agent does); (text, truncated, bytes)."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= max_bytes:
        return text, False, len(raw)
    half = max(max_bytes // 2, 64)
    head = raw[:half].decode("utf-8", "ignore")
    tail = raw[-half:].decode("utf-8", "ignore")
    omitted = len(raw) - 2 * half
    return f"{head}\n[... {omitted} bytes omitted ...]\n{tail}", True, len(raw)


def failure_reply(job: Job, exc_type: Any, exc_value: Any, tb: Any) -> dict[str, Any]:
    """The reply for a job whose last attempt raised (or timed out)."""
    cap = int(job.kwargs.get("max_output_bytes", 65536))
    trace = "".join(traceback.format_exception(exc_type, exc_value, tb))
    output, truncated, total = cap_text(trace, cap)
    extra = {"truncated": truncated, "output_bytes": total, "run_ms": _run_ms(job)}
    tool = job.kwargs.get("tool", "?")
    if exc_type is not None and issubclass(exc_type, JobTimeoutException):
        message = f"external tool {tool} timed out after {job.timeout}s"
        return error_reply(ErrorCode.TIMEOUT, message, output, timed_out=True, **extra)
    name = getattr(exc_type, "__name__", "Error")
    return error_reply(ErrorCode.TOOL_ERROR, f"{name}: {exc_value}", output, **extra)


def _run_ms(job: Job) -> float:
    if job.started_at and job.ended_at:
        return (job.ended_at - job.started_at).total_seconds() * 1000
    return 0.0


def cancelled_reply() -> dict[str, Any]:
    return error_reply(ErrorCode.CANCELLED, "trajectory cancelled")


def on_success(job: Job, connection: SyncRedis, result: Any) -> None:
    """RQ success callback: report the reply ``run_tool`` returned."""
    reply = (
        result if isinstance(result, dict) else error_reply(ErrorCode.INTERNAL_ERROR, repr(result))
    )
    notify(job, connection, reply)


def on_failure(job: Job, connection: SyncRedis, exc_type: Any, exc_value: Any, tb: Any) -> None:
    """RQ failure callback: report the last attempt's error (RQ calls it on every attempt)."""
    if job.should_retry:  # RQ runs it again: only the final outcome is an answer
        return
    notify(job, connection, failure_reply(job, exc_type, exc_value, tb))


def on_stopped(job: Job, connection: SyncRedis) -> None:
    """RQ stopped callback: the job was stopped because its trajectory was cancelled."""
    notify(job, connection, cancelled_reply())


def notify(job: Job, connection: SyncRedis, reply: dict[str, Any]) -> None:
    """Push the reply to the worker waiting for it (meta is re-read: owners change)."""
    key = job.get_meta(refresh=True).get("toolq_notify")
    if not key:
        return
    pipe = connection.pipeline(transaction=False)
    pipe.rpush(key, json.dumps({"job": job.id, "reply": reply}, default=str))
    pipe.pexpire(key, NOTICE_TTL_MS)
    pipe.execute()


def outcome_of(connection: SyncRedis, job_id: str, queue: str) -> dict[str, Any]:
    """Read a job's final outcome back from RQ (the fallback when no notice came)."""
    try:
        job = Job.fetch(job_id, connection=connection)
    except NoSuchJobError:
        return error_reply(
            ErrorCode.TIMEOUT,
            f"the RQ job expired before an RQ worker ran it (is one serving queue {queue!r}?)",
        )
    status = job.get_status()
    if status == JobStatus.FINISHED:
        value = job.return_value()
        if isinstance(value, dict):
            return value
    if status in (JobStatus.STOPPED, JobStatus.CANCELED):
        return cancelled_reply()
    latest = job.latest_result()
    trace = (latest.exc_string if latest else None) or ""
    if "JobTimeoutException" in trace:
        return error_reply(ErrorCode.TIMEOUT, f"external tool timed out after {job.timeout}s")
    last = trace.strip().splitlines()[-1] if trace.strip() else f"RQ job ended: {status}"
    return error_reply(ErrorCode.TOOL_ERROR, last, trace, run_ms=_run_ms(job))


# =====================================================================
# toolq worker side
# =====================================================================
@dataclass
class Waiter:
    """One outstanding external call."""

    traj_id: str
    queue: str
    future: asyncio.Future[dict[str, Any]]
    enqueued: bool = False
    final_polls: int = 0  # consecutive status reads that found the job over


@dataclass
class ExternalRunner:
    """Enqueues a worker's external calls and hands each its reply."""

    settings: WorkerSettings
    redis: AsyncRedis
    registry: Registry
    worker_id: str
    waiting: dict[str, Waiter] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _side_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _sync: SyncRedis | None = None

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.namespace)

    def handles(self, tool_name: str) -> bool:
        """True when ``tool_name`` (already resolved) is an external tool."""
        found = self.registry.tools.get(tool_name)
        return found is not None and found.external

    async def call(self, traj: Traj, item: Item, plan: Plan) -> dict[str, Any]:
        """Run one external call as an RQ job; returns its reply (never raises)."""
        tool, args = plan.tool, plan.args
        job_id = job_id_for(self.settings.namespace, traj.traj_id, item.call_id)
        waiter = Waiter(traj.traj_id, tool.queue, asyncio.get_running_loop().create_future())
        self.waiting[job_id] = waiter
        self._start()
        try:
            try:
                await asyncio.to_thread(
                    self._enqueue, tool, job_id, traj, item, args, plan.timeout_s
                )
            except Exception as exc:  # the call must still get its one result
                log.exception("enqueueing %s failed", job_id)
                return error_reply(ErrorCode.INTERNAL_ERROR, f"could not enqueue the job: {exc}")
            waiter.enqueued = True
            if waiter.future.done():  # cancelled while it was being enqueued
                self._spawn(self._stop_job(job_id))
            return await waiter.future
        finally:
            self.waiting.pop(job_id, None)

    def cancel(self, traj_id: str) -> None:
        """Answer the trajectory's outstanding call ``cancelled``; stop its RQ job."""
        for job_id, waiter in list(self.waiting.items()):
            if waiter.traj_id != traj_id or waiter.future.done():
                continue
            waiter.future.set_result(cancelled_reply())
            if waiter.enqueued:
                self._spawn(self._stop_job(job_id))

    def forget(self, traj_id: str) -> None:
        """Stop waiting for the trajectory's calls (another worker owns it now and
        adopts its job: the job id is the call's)."""
        for job_id, waiter in list(self.waiting.items()):
            if waiter.traj_id == traj_id:
                self.waiting.pop(job_id, None)
                if not waiter.future.done():
                    waiter.future.cancel()

    async def close(self) -> None:
        """Stop the notice and poll tasks (outstanding jobs keep running in RQ)."""
        for task in self._tasks + list(self._side_tasks):
            task.cancel()
        for task in self._tasks + list(self._side_tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._sync is not None:
            self._sync.close()

    # -------------------------------------------------------- enqueueing
    def _enqueue(
        self,
        tool: Tool,
        job_id: str,
        traj: Traj,
        item: Item,
        args: dict[str, Any],
        timeout_s: float,
    ) -> None:
        """Create the job (in a thread: RQ is synchronous), or adopt an existing one.

        An existing job is the same call started by a previous owner of the
        trajectory: it is not run twice, its notice is redirected here.
        """
        conn = self._connection()
        notify_key = self.keys.external_done(self.worker_id)
        retry = Retry(max=tool.retries, interval=tool.retry_interval_s) if tool.retries else None
        try:
            Queue(tool.queue, connection=conn).enqueue_call(
                run_tool,
                kwargs={
                    "tool": tool.name,
                    "args": args,
                    "max_output_bytes": traj.spec.limits.max_output_bytes,
                },
                job_id=job_id,
                unique=True,
                timeout=max(1, math.ceil(timeout_s)),
                retry=retry,
                # A job no RQ worker takes within the trajectory's idle timeout
                # expires; the poll then answers the call instead of waiting forever.
                ttl=max(1, int(traj.spec.limits.idle_timeout_s)),
                result_ttl=RESULT_TTL_S,
                failure_ttl=FAILURE_TTL_S,
                description=f"toolq {tool.name} {traj.traj_id}/{item.call_id}",
                meta={"toolq_notify": notify_key, "toolq_traj": traj.traj_id},
                on_success=Callback(on_success),
                on_failure=Callback(on_failure),
                on_stopped=Callback(on_stopped),
            )
        except DuplicateJobError:
            job: Any = Job.fetch(job_id, connection=conn)  # Any: save_meta is unannotated
            job.meta["toolq_notify"] = notify_key
            job.save_meta()

    def _connection(self) -> SyncRedis:
        """A synchronous Redis client for RQ, to the worker's Redis."""
        if self._sync is None:
            if self.settings.redis_url:
                self._sync = SyncRedis.from_url(self.settings.redis_url)
            else:
                kw = self.redis.connection_pool.connection_kwargs
                self._sync = SyncRedis(
                    host=kw.get("host", "localhost"),
                    port=kw.get("port", 6379),
                    db=kw.get("db", 0),
                    username=kw.get("username"),
                    password=kw.get("password"),
                )
        return self._sync

    async def _stop_job(self, job_id: str) -> None:
        """Cancel a queued job, stop a running one (best effort: it may just have ended)."""
        await asyncio.to_thread(self._stop_job_sync, job_id)

    def _stop_job_sync(self, job_id: str) -> None:
        conn = self._connection()
        try:
            job = Job.fetch(job_id, connection=conn)
            if job.get_status() == JobStatus.STARTED:
                send_stop_job_command(conn, job_id)
            else:
                job.cancel()
        except (NoSuchJobError, InvalidJobOperation):
            pass
        except Exception:
            log.exception("stopping RQ job %s failed", job_id)

    # ----------------------------------------------------- waiting tasks
    def _start(self) -> None:
        if not self._tasks:  # started on first use: workers without external tools pay nothing
            self._tasks = [
                asyncio.create_task(self._notice_loop(), name="external-notices"),
                asyncio.create_task(self._poll_loop(), name="external-poll"),
            ]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _notice_loop(self) -> None:
        key = self.keys.external_done(self.worker_id)
        while True:
            try:
                got = await self.redis.blpop([key], timeout=5)
                if got is None:
                    continue
                more = await self.redis.lpop(key, 500) or []
                for raw in [got[1], *more]:
                    self._deliver(raw)
            except (RedisError, OSError) as exc:
                log.warning("reading external notices failed (%s); retrying", exc)
                await asyncio.sleep(1.0)

    def _deliver(self, raw: Any) -> None:
        try:
            notice = json.loads(raw)
            waiter = self.waiting.get(str(notice["job"]))
            reply = notice["reply"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed external notice: %r", raw[:200])
            return
        if waiter is not None and not waiter.future.done() and isinstance(reply, dict):
            waiter.future.set_result(reply)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await self._poll_once()
            except Exception:  # never let the fallback die
                log.exception("polling external jobs failed")

    async def _poll_once(self) -> None:
        ids = [j for j, w in self.waiting.items() if w.enqueued and not w.future.done()]
        if not ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(Job.key_for(job_id), "status")
        statuses = await pipe.execute()
        for job_id, raw in zip(ids, statuses, strict=True):
            waiter = self.waiting.get(job_id)
            if waiter is None or waiter.future.done():
                continue
            status = raw.decode() if isinstance(raw, bytes) else raw
            waiter.final_polls = 0 if status in _WAITING else waiter.final_polls + 1
            # Twice: a notice pushed just before the status changed is read by now.
            if waiter.final_polls >= 2:
                reply = await asyncio.to_thread(
                    outcome_of, self._connection(), job_id, waiter.queue
                )
                if not waiter.future.done():
                    waiter.future.set_result(reply)
