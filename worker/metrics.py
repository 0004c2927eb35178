"""Worker metrics: lifecycle hooks the worker calls, exported to Prometheus.

The worker never updates a metric inline: it calls hooks on its ``observer``
(``call_finished``, ``batch_read``, ``traj_ended``, ...) and backends call the
container hooks on ``backend.observer``. ``Observer`` is the interface, every
hook a no-op; ``WorkerMetrics`` implements it with

- a Prometheus registry per worker (several workers can share a process),
  served over HTTP when ``settings.metrics_port`` is set (0: any free port);
- per-minute call counts and latency buckets in Redis (``Keys.minute_stats``),
  written with the heartbeat, which ``toolq status`` reads for its recent error
  rate and latency percentiles.

Label values are bounded: tools are registered tool names or ``other``,
outcomes are ``ok`` or an ``ErrorCode`` value or ``other``; no trajectory,
call or slot id is ever a label.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter as Tally
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from redis.exceptions import RedisError

from toolq.schemas import FINAL_STATUSES, ErrorCode, Keys, Result, __version__, latency_field

from .metrics_images import ImageHooks, ImageMetrics
from .metrics_redis import instrument_redis

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from .settings import WorkerSettings
    from .tools import Registry

log = logging.getLogger("toolq.worker.metrics")

# No `*_created` series: they double the series count and no panel uses them.
# (Through Any: the function is unannotated, which strict mypy would flag.)
_disable_created: Any = disable_created_metrics
_disable_created()

OTHER = "other"
OUTCOMES = frozenset(["ok", *(code.value for code in ErrorCode)])
SLOT_STATES = ("busy", "idle", "starting", "free")
BG_STATUSES = ("running", "completed", "failed", "stopped", "lost")
REDIS_ERROR_KINDS = ("connection", "timeout", "reply")
# Why the Docker backend did not reuse a container (docker_recycle.REJECT_REASONS).
RECYCLE_REJECT_REASONS = ("processes", "filesystem", "leftovers", "agent", "error")
MINUTE_STATS_TTL_S = 2 * 3600

_FAST_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUEUE_BUCKETS_S = (*_FAST_S, 30.0, 60.0, 120.0, 300.0)
RUN_BUCKETS_S = (*_FAST_S, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
START_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Observer(ImageHooks):
    """Lifecycle hooks of a worker and its backend. Every hook is a no-op here."""

    async def worker_started(self, worker_id: str, backend: str, redis: aioredis.Redis) -> None:
        """The worker is starting (before its first command on ``redis``)."""

    async def worker_stopped(self) -> None:
        """The worker has shut down."""

    def batch_read(self, entries: int) -> None:
        """One XREADGROUP returned ``entries`` entries (opens and calls together)."""

    def call_finished(self, result: Result) -> None:
        """A call's final result was written to Redis."""

    def traj_claimed(self) -> None:
        """This worker took ownership of a trajectory."""

    def traj_ended(self, status: str) -> None:
        """A trajectory this worker owned reached the final ``status``."""

    def slot_started(self, seconds: float) -> None:
        """``backend.acquire`` returned a slot after ``seconds``."""

    def slot_lost(self) -> None:
        """A slot's sandbox died or stopped answering."""

    def container_started(self, seconds: float) -> None:
        """The Docker backend started a container in ``seconds`` (create to agent ready)."""

    def container_removed(self) -> None:
        """The Docker backend removed a container."""

    def container_lost(self) -> None:
        """The Docker backend found a container dead that it had not stopped."""

    def container_recycled(self, seconds: float) -> None:
        """The Docker backend reset and verified a container for reuse in ``seconds``."""

    def container_recycle_rejected(self, reason: str) -> None:
        """The Docker backend removed a container that failed its reset (``reason``)."""

    def bg_task_changed(self, status: str) -> None:
        """A background task started (``running``) or ended with ``status``."""

    def heartbeat(self, pipe: Any) -> None:
        """Add commands to the heartbeat's Redis pipeline (sent right after)."""

    def slots_sampled(self, *, busy: int, idle: int, starting: int, free: int) -> None:
        """The worker's slots by state (sampled at each heartbeat)."""

    def backlog_sampled(self, count: int, oldest_age_s: float) -> None:
        """Trajectories waiting for a slot (all workers) and the oldest one's age."""

    def snapshot_taken(self, size_bytes: int) -> None:
        """This worker stored a snapshot of ``size_bytes`` (compressed)."""

    def snapshot_restored(self) -> None:
        """This worker filled a new workspace from a snapshot."""

    def snapshots_sampled(self, count: int, size_bytes: int) -> None:
        """The snapshots kept in Redis (all workers'), and their compressed bytes."""


class WorkerMetrics(ImageMetrics, Observer):
    """The worker's Prometheus metrics and per-minute Redis call counts."""

    def __init__(self, settings: WorkerSettings, tools: Registry) -> None:
        self.settings = settings
        self.tools = tools
        self.keys = Keys(settings.namespace)
        self.registry = CollectorRegistry()
        self.port: int | None = None  # the bound metrics port, once serving
        self._server: Any = None
        self._redis: aioredis.Redis | None = None
        self._minutes: dict[int, Tally[str]] = {}
        self._define()

    # -------------------------------------------------------------- metrics
    def _define(self) -> None:
        """Create every metric in this worker's registry."""
        r = self.registry
        ProcessCollector(registry=r)
        self.define_image_metrics(r)
        self.info = Info("toolq_worker", "Worker identity.", registry=r)
        self.calls = Counter(
            "toolq_calls", "Calls answered, by tool and outcome.", ["tool", "outcome"], registry=r
        )
        self.queue_s = Histogram(
            "toolq_call_queue_seconds",
            "Time from XADD of a call to the worker starting it.",
            ["tool"],
            buckets=QUEUE_BUCKETS_S,
            registry=r,
        )
        self.wait_s = Histogram(
            "toolq_call_wait_seconds",
            "Time a call waited for toolq: its queue wait minus the part spent behind its "
            "trajectory's earlier calls (which run one at a time).",
            ["tool"],
            buckets=QUEUE_BUCKETS_S,
            registry=r,
        )
        self.run_s = Histogram(
            "toolq_call_run_seconds",
            "Time a call ran in its sandbox (as the agent measured it).",
            ["tool"],
            buckets=RUN_BUCKETS_S,
            registry=r,
        )
        self.batch = Histogram(
            "toolq_read_batch_size",
            "Entries returned by one non-empty XREADGROUP.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.slots = Gauge("toolq_slots", "Slots by state.", ["state"], registry=r)
        self.slot_start_s = Histogram(
            "toolq_slot_start_seconds",
            "Time to get a ready slot from the backend (warm or cold).",
            buckets=START_BUCKETS_S,
            registry=r,
        )
        self.slots_lost = Counter(
            "toolq_slots_lost", "Slots whose sandbox died or stopped answering.", registry=r
        )
        self.containers_started = Counter(
            "toolq_containers_started", "Containers started.", registry=r
        )
        self.containers_removed = Counter(
            "toolq_containers_removed", "Containers removed.", registry=r
        )
        self.containers_lost = Counter(
            "toolq_containers_lost", "Containers found dead unexpectedly.", registry=r
        )
        self.container_start_s = Histogram(
            "toolq_container_start_seconds",
            "Time from container create to its agent answering.",
            buckets=START_BUCKETS_S,
            registry=r,
        )
        self.recycled = Counter(
            "toolq_containers_recycled", "Containers reset, verified and reused.", registry=r
        )
        self.recycle_rejected = Counter(
            "toolq_containers_recycle_rejected",
            "Containers removed because their reset failed, by reason.",
            ["reason"],
            registry=r,
        )
        self.recycle_s = Histogram(
            "toolq_container_recycle_seconds",
            "Time from a container's last slot ending to it being back in the pool.",
            buckets=START_BUCKETS_S,
            registry=r,
        )
        self.opened = Counter(
            "toolq_trajectories_opened", "Trajectories claimed by this worker.", registry=r
        )
        self.ended = Counter(
            "toolq_trajectories_ended", "Trajectories ended, by status.", ["status"], registry=r
        )
        self.owned = Gauge("toolq_trajectories_owned", "Trajectories owned now.", registry=r)
        self.backlog = Gauge(
            "toolq_open_backlog", "Trajectories waiting for a slot (all workers).", registry=r
        )
        self.backlog_age_s = Gauge(
            "toolq_open_backlog_age_seconds",
            "Age of the oldest trajectory waiting for a slot (0 when none).",
            registry=r,
        )
        self.bg_tasks = Counter(
            "toolq_bg_tasks", "Background task transitions, by status.", ["status"], registry=r
        )
        self.redis_round_trips = Counter(
            "toolq_redis_round_trips", "Commands or pipelines sent to Redis.", registry=r
        )
        self.redis_errors = Counter(
            "toolq_redis_errors", "Redis errors, by kind.", ["kind"], registry=r
        )
        self.snapshots = Gauge("toolq_snapshots", "Snapshots kept (all workers').", registry=r)
        self.snapshot_bytes = Gauge(
            "toolq_snapshot_bytes", "Compressed bytes of the snapshots kept.", registry=r
        )
        self.snapshot_ops = Counter(
            "toolq_snapshot_ops", "Snapshots taken and restored here.", ["op"], registry=r
        )
        self.heartbeat_ts = Gauge(
            "toolq_heartbeat_timestamp_seconds", "Unix time of the last heartbeat.", registry=r
        )
        # Known label values export 0 from the start, so rates and panels
        # have a series before the first event.
        for children, values in (
            (self.slots, SLOT_STATES),
            (self.ended, sorted(FINAL_STATUSES)),
            (self.bg_tasks, BG_STATUSES),
            (self.redis_errors, REDIS_ERROR_KINDS),
            (self.snapshot_ops, ("taken", "restored")),
            (self.recycle_rejected, RECYCLE_REJECT_REASONS),
        ):
            for value in values:
                children.labels(value)

    def tool_label(self, name: str) -> str:
        """A registered tool's canonical name, else ``other`` (keeps labels bounded)."""
        tool = self.tools.resolve(name) if name else None
        return tool.name if tool is not None else OTHER

    @staticmethod
    def outcome_label(result: Result) -> str:
        """``ok``, or the result's error code if it is a known one, else ``other``."""
        outcome = "ok" if result.ok else (result.error_code or OTHER)
        return outcome if outcome in OUTCOMES else OTHER

    # ---------------------------------------------------------------- hooks
    async def worker_started(self, worker_id: str, backend: str, redis: aioredis.Redis) -> None:
        """Instrument the worker's Redis client and serve /metrics."""
        self.info.info({"worker": worker_id, "version": __version__, "backend": backend})
        instrument_redis(redis, self)
        self._redis = redis
        self.slots_sampled(busy=0, idle=0, starting=0, free=self.settings.slots)
        if self.settings.metrics_port is not None:
            self.serve(self.settings.metrics_port, self.settings.metrics_host)

    async def worker_stopped(self) -> None:
        """Flush the last call counts, stop serving."""
        if self._redis is not None and self._minutes:
            pipe = self._redis.pipeline(transaction=False)
            self.flush_minutes(pipe)
            with contextlib.suppress(RedisError, OSError):
                await pipe.execute()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def batch_read(self, entries: int) -> None:
        if entries > 0:
            self.batch.observe(entries)

    def call_finished(self, result: Result) -> None:
        tool = self.tool_label(result.tool)
        outcome = self.outcome_label(result)
        self.calls.labels(tool, outcome).inc()
        self.queue_s.labels(tool).observe(result.queued_ms / 1000)
        # Waiting for one's turn is the agent's doing (parallel tool calls of one
        # trajectory run in order); only the rest says whether toolq keeps up.
        self.wait_s.labels(tool).observe(max(0.0, result.queued_ms - result.behind_ms) / 1000)
        if result.slot:  # it ran in a sandbox (refused calls never did)
            self.run_s.labels(tool).observe(result.run_ms / 1000)
        minute = self._minutes.setdefault(result.finished_ms // 60_000, Tally())
        minute["calls"] += 1
        minute[latency_field(result.queued_ms + result.run_ms)] += 1
        if outcome != "ok":
            minute["failed"] += 1
            minute[f"error:{outcome}"] += 1

    def traj_claimed(self) -> None:
        self.opened.inc()

    def traj_ended(self, status: str) -> None:
        self.ended.labels(status if status in FINAL_STATUSES else OTHER).inc()

    def slot_started(self, seconds: float) -> None:
        self.slot_start_s.observe(seconds)

    def slot_lost(self) -> None:
        self.slots_lost.inc()

    def snapshot_taken(self, size_bytes: int) -> None:
        self.snapshot_ops.labels("taken").inc()

    def snapshot_restored(self) -> None:
        self.snapshot_ops.labels("restored").inc()

    def snapshots_sampled(self, count: int, size_bytes: int) -> None:
        self.snapshots.set(count)
        self.snapshot_bytes.set(size_bytes)

    def container_started(self, seconds: float) -> None:
        self.containers_started.inc()
        self.container_start_s.observe(seconds)

    def container_removed(self) -> None:
        self.containers_removed.inc()

    def container_lost(self) -> None:
        self.containers_lost.inc()

    def container_recycled(self, seconds: float) -> None:
        self.recycled.inc()
        self.recycle_s.observe(seconds)

    def container_recycle_rejected(self, reason: str) -> None:
        self.recycle_rejected.labels(reason if reason in RECYCLE_REJECT_REASONS else OTHER).inc()

    def bg_task_changed(self, status: str) -> None:
        self.bg_tasks.labels(status if status in BG_STATUSES else OTHER).inc()

    def heartbeat(self, pipe: Any) -> None:
        """Record the beat and flush the per-minute call counts into the pipeline."""
        self.heartbeat_ts.set(time.time())
        self.flush_minutes(pipe)

    def flush_minutes(self, pipe: Any) -> None:
        """Add the per-minute call counts gathered since the last flush to ``pipe``."""
        minutes, self._minutes = self._minutes, {}
        for minute, tally in minutes.items():
            key = self.keys.minute_stats(minute)
            for field, n in tally.items():
                pipe.hincrby(key, field, n)
            pipe.expire(key, MINUTE_STATS_TTL_S)

    # -------------------------------------------------------------- serving
    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve this worker's /metrics over HTTP; returns the bound port."""
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._server.server_port)
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    # ------------------------------------------------------------- sampling
    def slots_sampled(self, *, busy: int, idle: int, starting: int, free: int) -> None:
        for state, n in (("busy", busy), ("idle", idle), ("starting", starting), ("free", free)):
            self.slots.labels(state).set(n)
        self.owned.set(busy + idle + starting)

    def backlog_sampled(self, count: int, oldest_age_s: float) -> None:
        self.backlog.set(count)
        self.backlog_age_s.set(oldest_age_s)
