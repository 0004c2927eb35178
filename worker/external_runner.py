"""External tools, the toolq worker's half: enqueue the RQ job, wait for its reply.

``ExternalRunner.call`` enqueues ``external.run_tool`` and waits for the reply
the job's callback pushes; the runner writes it like every other result, so
exactly-once and the result format hold unchanged.

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis import Redis as SyncRedis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError
from rq import Queue, Retry
from rq.callbacks import Callback
from rq.command import send_stop_job_command
from rq.exceptions import DuplicateJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from toolq.schemas import ErrorCode, Keys
from toolq.schemas.local import redis_target

from .external import (
    FAILURE_TTL_S,
    POLL_S,
    RESULT_TTL_S,
    WAITING_STATUSES,
    cancelled_reply,
    job_id_for,
    on_failure,
    on_stopped,
    on_success,
    outcome_of,
    run_tool,
)
from .results import error_reply
from .tools import Registry

if TYPE_CHECKING:
    from .plan import Plan
    from .settings import WorkerSettings
    from .state import Item, Traj

log = logging.getLogger("toolq.external")

#: How long past its timeout an external call may take before it is answered
#: ``external_lost``: RQ's whole-second job timeout, queueing, a slow callback.
GRACE_S = 10.0


class ExternalToolsError(RuntimeError):
    """External tools cannot run with this configuration."""


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
    _async: AsyncRedis | None = None

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.namespace)

    def handles(self, tool_name: str) -> bool:
        """True when ``tool_name`` (already resolved) is an external tool."""
        found = self.registry.tools.get(tool_name)
        return found is not None and found.external

    async def call(self, traj: Traj, item: Item, plan: Plan) -> dict[str, Any]:
        """Run one external call as an RQ job; returns its reply (never raises).

        The call ends by its timeout plus ``GRACE_S`` however RQ fares (waiting
        in the queue counts): a job no RQ worker finished by then is stopped
        and the call answered ``external_lost``.
        """
        tool = plan.tool
        job_id = job_id_for(self.settings.namespace, traj.traj_id, item.call_id)
        waiter = Waiter(traj.traj_id, tool.queue, asyncio.get_running_loop().create_future())
        self.waiting[job_id] = waiter
        self._start()
        try:
            try:
                await asyncio.to_thread(self._enqueue, job_id, traj, item, plan)
            except Exception as exc:  # the call must still get its one result
                log.exception("enqueueing %s failed", job_id)
                return error_reply(ErrorCode.INTERNAL_ERROR, f"could not enqueue the job: {exc}")
            waiter.enqueued = True
            if waiter.future.done():  # cancelled while it was being enqueued
                self._spawn(self._stop_job(job_id))
            try:
                return await asyncio.wait_for(
                    asyncio.shield(waiter.future), plan.timeout_s + GRACE_S
                )
            except asyncio.TimeoutError:
                self._spawn(self._stop_job(job_id))
                return error_reply(
                    ErrorCode.EXTERNAL_LOST,
                    f"no RQ worker finished the job within its {plan.timeout_s:g}s timeout "
                    f"and {GRACE_S:g}s of grace (is one serving queue {tool.queue!r}, "
                    "and alive?); the tool did not fail",
                )
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
        if self._async is not None and self._async is not self.redis:
            await self._async.aclose()

    # -------------------------------------------------------- enqueueing
    def _enqueue(self, job_id: str, traj: Traj, item: Item, plan: Plan) -> None:
        """Create the job (in a thread: RQ is synchronous), or adopt an existing one.

        An existing job is the same call started by a previous owner of the
        trajectory: it is not run twice, its notice is redirected here.
        """
        tool = plan.tool
        conn = self._connection()
        notify_key = self.keys.external_done(self.worker_id)
        retry = Retry(max=tool.retries, interval=tool.retry_interval_s) if tool.retries else None
        try:
            Queue(tool.queue, connection=conn).enqueue_call(
                run_tool,
                kwargs={
                    "tool": tool.name,
                    "args": plan.args,
                    "max_output_bytes": plan.max_output_bytes,
                    "timeout_s": plan.timeout_s,
                },
                job_id=job_id,
                unique=True,
                timeout=max(1, math.ceil(plan.timeout_s)),
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

    def rq_url(self) -> str | None:
        """The Redis RQ uses; raises ExternalToolsError for a Redis Cluster."""
        url = self.settings.rq_redis_url or self.settings.redis_url
        if url and redis_target(url)[1]:
            raise ExternalToolsError(
                "external tools run on RQ, which does not support Redis Cluster: set "
                "--rq-redis-url (TOOLQ_RQ_REDIS_URL) to a plain Redis for them, and point "
                "`toolq rq-worker` at it"
            )
        return url

    def _rq_async(self) -> AsyncRedis:
        """An asyncio client for RQ's Redis (notices, job states)."""
        if self._async is None:
            url = self.rq_url()
            self._async = (
                AsyncRedis.from_url(url) if url != self.settings.redis_url and url else self.redis
            )
        return self._async

    def _connection(self) -> SyncRedis:
        """A synchronous Redis client for RQ, to RQ's Redis."""
        if self._sync is None:
            url = self.rq_url()
            if url:
                self._sync = SyncRedis.from_url(url)
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
                got = await self._rq_async().blpop([key], timeout=5)
                if got is None:
                    continue
                more = await self._rq_async().lpop(key, 500) or []
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
        pipe = self._rq_async().pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(Job.key_for(job_id), "status")
        statuses = await pipe.execute()
        for job_id, raw in zip(ids, statuses, strict=True):
            waiter = self.waiting.get(job_id)
            if waiter is None or waiter.future.done():
                continue
            status = raw.decode() if isinstance(raw, bytes) else raw
            waiter.final_polls = 0 if status in WAITING_STATUSES else waiter.final_polls + 1
            # Twice: a notice pushed just before the status changed is read by now.
            if waiter.final_polls >= 2:
                reply = await asyncio.to_thread(
                    outcome_of, self._connection(), job_id, waiter.queue
                )
                if not waiter.future.done():
                    waiter.future.set_result(reply)
