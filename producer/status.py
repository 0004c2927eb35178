"""A one-shot picture of a toolq deployment, read from Redis only (``toolq status``).

Two pipelined round trips, whatever the size of the deployment:

1. the workers zset, the pending zset (backlog), the newest runs and the
   per-minute call counts workers write (``Keys.minute_stats``);
2. each worker's heartbeat hash and each sampled run's ``status`` field.

Trajectory counts cover the newest ``runs_sample`` runs, so a long history
does not make the view slow.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from pydantic import BaseModel, Field

from toolq.schemas import Keys, TrajStatus, WorkerInfo

DEAD_AFTER_S = 15.0  # the worker's default ``dead_after_s``
RUNS_SAMPLE = 10_000
WINDOW_MIN = 5


class WorkerRow(BaseModel):
    """One worker as its heartbeat describes it."""

    worker: str
    alive: bool
    heartbeat_age_s: float
    slots_used: int = 0
    slots_total: int = 0
    backend: str = ""
    version: str = ""
    host: str = ""
    pid: int = 0


class Backlog(BaseModel):
    """Trajectories opened but not claimed by any worker yet."""

    pending: int = 0
    oldest_age_s: float = 0.0
    oldest_traj: str | None = None


class CallStats(BaseModel):
    """Calls answered over the last ``window_s`` seconds (all workers)."""

    window_s: int
    calls: int = 0
    failed: int = 0
    errors: dict[str, int] = Field(default_factory=dict, description="error_code -> count")

    @property
    def error_rate(self) -> float:
        """Failed calls / calls (0 when there were none)."""
        return self.failed / self.calls if self.calls else 0.0


class Status(BaseModel):
    """Everything ``toolq status`` shows."""

    namespace: str
    at_ms: int
    workers: list[WorkerRow]
    backlog: Backlog
    trajectories: dict[str, int] = Field(description="status -> count over the sampled runs")
    runs_sampled: int
    runs_total: int
    calls: CallStats

    @property
    def alive(self) -> list[WorkerRow]:
        """Workers whose heartbeat is recent."""
        return [w for w in self.workers if w.alive]

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict, with the derived figures spelled out."""
        data = self.model_dump()
        data["workers_alive"] = len(self.alive)
        data["workers_dead"] = len(self.workers) - len(self.alive)
        data["slots_used"] = sum(w.slots_used for w in self.alive)
        data["slots_total"] = sum(w.slots_total for w in self.alive)
        data["calls"]["error_rate"] = round(self.calls.error_rate, 4)
        return data


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def collect(
    r: redis.Redis,
    keys: Keys,
    *,
    dead_after_s: float = DEAD_AFTER_S,
    runs_sample: int = RUNS_SAMPLE,
    window_min: int = WINDOW_MIN,
    now_ms: int | None = None,
) -> Status:
    """Read the deployment's state from Redis (two round trips; a Redis Cluster
    client splits each pipeline by node)."""
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    minutes = [now // 60_000 - i for i in range(window_min)]
    pipe = r.pipeline(transaction=False)
    pipe.zrange(keys.workers, 0, -1, withscores=True)
    pipe.zcard(keys.pending)
    pipe.zrange(keys.pending, 0, 0, withscores=True)
    pipe.zcard(keys.runs)
    pipe.zrevrange(keys.runs, 0, max(0, runs_sample - 1))  # (ECHO is refused on a cluster)
    for minute in minutes:
        pipe.hgetall(keys.minute_stats(minute))
    beats, pending, oldest, runs_total, run_ids, *stats = pipe.execute()
    run_ids = run_ids if runs_sample > 0 else []

    pipe = r.pipeline(transaction=False)
    for worker_id, _ in beats:
        pipe.hgetall(keys.worker(_s(worker_id)))
    for traj_id in run_ids:
        pipe.hget(keys.traj(_s(traj_id)), "status")
    replies = pipe.execute()
    infos, statuses = replies[: len(beats)], replies[len(beats) :]

    return Status(
        namespace=keys.ns,
        at_ms=now,
        workers=[
            _worker_row(_s(w), score, fields, now, dead_after_s)
            for (w, score), fields in zip(beats, infos, strict=True)
        ],
        backlog=_backlog(pending, oldest, now),
        trajectories=_count_statuses(statuses),
        runs_sampled=len(run_ids),
        runs_total=int(runs_total),
        calls=_call_stats(stats, window_min),
    )


def _worker_row(
    worker_id: str, beat_ms: float, fields: dict[Any, Any], now: int, dead_after_s: float
) -> WorkerRow:
    age_s = max(0.0, (now - beat_ms) / 1000)
    row = WorkerRow(worker=worker_id, alive=age_s <= dead_after_s, heartbeat_age_s=age_s)
    if fields:  # the hash expires a while after a worker dies
        info = WorkerInfo.from_fields(fields)
        row = row.model_copy(
            update=info.model_dump(include=set(WorkerRow.model_fields) - {"worker", "alive"})
        )
    return row


def _backlog(pending: int, oldest: list[tuple[bytes, float]], now: int) -> Backlog:
    if not oldest:
        return Backlog(pending=int(pending))
    traj_id, opened_ms = oldest[0]
    return Backlog(
        pending=int(pending),
        oldest_age_s=max(0.0, (now - opened_ms) / 1000),
        oldest_traj=_s(traj_id),
    )


def _count_statuses(statuses: list[Any]) -> dict[str, int]:
    counts = {s.value: 0 for s in TrajStatus}
    for status in statuses:
        if status is not None:  # None: the record expired
            name = _s(status)
            counts[name] = counts.get(name, 0) + 1
    return counts


def _call_stats(stats: list[dict[Any, Any]], window_min: int) -> CallStats:
    totals: dict[str, int] = {}
    for fields in stats:
        for field, n in fields.items():
            totals[_s(field)] = totals.get(_s(field), 0) + int(n)
    errors = {k.split(":", 1)[1]: n for k, n in totals.items() if k.startswith("error:")}
    return CallStats(
        window_s=window_min * 60,
        calls=totals.get("calls", 0),
        failed=totals.get("failed", 0),
        errors=dict(sorted(errors.items(), key=lambda kv: -kv[1])),
    )


# ------------------------------------------------------------------ render
def format_age(seconds: float) -> str:
    """A duration for people: 4.2s, 3.5m, 1.2h."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def render(status: Status) -> str:
    """The human view: workers, backlog, trajectories, recent calls."""
    alive = status.alive
    used = sum(w.slots_used for w in alive)
    total = sum(w.slots_total for w in alive)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.at_ms / 1000))
    lines = [
        f"toolq status  namespace={status.namespace}  {stamp}",
        "",
        f"WORKERS  {len(alive)} alive, {len(status.workers) - len(alive)} dead"
        f"  slots {used}/{total} used",
    ]
    if status.workers:
        lines.append(
            f"  {'WORKER':<32} {'STATE':<5} {'HEARTBEAT':>9} {'SLOTS':>7}  "
            f"{'BACKEND':<7} {'VERSION':<8} HOST"
        )
    for w in sorted(status.workers, key=lambda w: (not w.alive, w.worker)):
        lines.append(
            f"  {w.worker:<32} {'alive' if w.alive else 'DEAD':<5} "
            f"{format_age(w.heartbeat_age_s) + ' ago':>9} {f'{w.slots_used}/{w.slots_total}':>7}  "
            f"{w.backend or '?':<7} {w.version or '?':<8} {w.host or '?'}"
        )
    b = status.backlog
    oldest = f", oldest waiting {format_age(b.oldest_age_s)} ({b.oldest_traj})" if b.pending else ""
    lines += ["", f"BACKLOG  {b.pending} trajectories waiting for a slot{oldest}", ""]
    scope = (
        f"newest {status.runs_sampled} of {status.runs_total} runs"
        if status.runs_sampled < status.runs_total
        else f"{status.runs_total} runs"
    )
    counts = "  ".join(f"{k} {n}" for k, n in status.trajectories.items())
    lines.append(f"TRAJECTORIES  ({scope})  {counts}")
    c = status.calls
    top = ", ".join(f"{code} {n}" for code, n in list(c.errors.items())[:5])
    lines += [
        "",
        f"CALLS  last {c.window_s // 60} min: {c.calls} answered, {c.failed} failed "
        f"({c.error_rate:.1%})" + (f"  errors: {top}" if top else ""),
    ]
    return "\n".join(lines)
