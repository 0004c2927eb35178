"""A one-shot picture of a toolq deployment, read from Redis only (``toolq status``).

Two pipelined round trips, whatever the size of the deployment:

1. the workers zset, the pending zset (backlog), the newest runs and the
   per-minute call counts and latency buckets workers write (``Keys.minute_stats``);
2. each worker's heartbeat hash and a few fields of each sampled run's record
   (its status; owner, start and call counts for the running ones).

Trajectory counts cover the newest ``runs_sample`` runs, so a long history
does not make the view slow. ``status_render`` lays the result out.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from toolq.schemas import LATENCY_BUCKETS_MS, Keys, TrajStatus, WorkerInfo

DEAD_AFTER_S = 15.0  # the worker's default ``dead_after_s``
RUNS_SAMPLE = 10_000
WINDOW_MIN = 5
RUNNING_SHOWN = 10

#: Record fields read for every sampled run (only ``status`` for most of them).
_RUN_FIELDS = ("status", "owner", "started_ms", "created_ms", "calls_submitted", "calls_total")
_LAT_PREFIX = "lat_ms:"


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
    images_held: int | None = Field(
        None, description="Images its engine holds (None: it publishes none: not Docker)."
    )
    images_pulling: int | None = Field(None, description="Images its engine is pulling now.")


class Backlog(BaseModel):
    """Trajectories opened but not claimed by any worker yet."""

    pending: int = 0
    oldest_age_s: float = 0.0
    oldest_traj: str | None = None


class Latency(BaseModel):
    """Call latency (queued + run) from the workers' per-minute buckets.

    A percentile is the upper bound of the bucket it falls in (``p95_ms`` 20.0
    reads "95 % of calls took at most 20 ms"); ``inf`` when it falls above the
    largest bound, ``None`` when no call was counted.
    """

    # JSON has no infinity: the overflow bound is written as the string "Infinity".
    model_config = ConfigDict(ser_json_inf_nan="strings")

    samples: int = Field(0, description="Calls with a latency bucket (older workers write none).")
    buckets_ms: dict[str, int] = Field(
        default_factory=dict, description="bucket upper bound in ms ('inf' above all) -> calls"
    )
    p50_ms: float | None = None
    p95_ms: float | None = None


class CallStats(BaseModel):
    """Calls answered over the last ``window_s`` seconds (all workers)."""

    window_s: int
    covered_s: float = Field(0.0, description="Seconds of the window elapsed (now included).")
    calls: int = 0
    failed: int = 0
    last_minute_calls: int = Field(0, description="Calls answered in the last full minute.")
    recent_calls: int = Field(
        0, description="Calls answered in the last full minute and this one so far."
    )
    recent_s: float = Field(0.0, description="Seconds recent_calls cover (60 to 120).")
    errors: dict[str, int] = Field(default_factory=dict, description="error_code -> count")
    latency: Latency = Field(default_factory=Latency)

    @property
    def error_rate(self) -> float:
        """Failed calls / calls (0 when there were none)."""
        return self.failed / self.calls if self.calls else 0.0

    @property
    def calls_per_s(self) -> float:
        """Calls per second now: over the last full minute and this one so far (a
        window-long average would hide a change of pace for minutes)."""
        return self.recent_calls / self.recent_s if self.recent_s > 0 else 0.0

    @property
    def window_calls_per_s(self) -> float:
        """Calls per second over the elapsed part of the window (its average)."""
        return self.calls / self.covered_s if self.covered_s > 0 else 0.0

    @property
    def last_minute_calls_per_s(self) -> float:
        """Calls per second over the last full minute."""
        return self.last_minute_calls / 60


class RunningRow(BaseModel):
    """A trajectory that runs now (among the sampled runs)."""

    traj: str
    owner: str | None = None
    age_s: float | None = Field(None, description="Since it started (or was opened).")
    calls_submitted: int | None = None
    calls_answered: int | None = None


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
    running: list[RunningRow] = Field(
        default_factory=list, description="Running trajectories, newest first, capped."
    )
    running_total: int = Field(0, description="Running trajectories among the sampled runs.")

    @property
    def alive(self) -> list[WorkerRow]:
        """Workers whose heartbeat is recent."""
        return [w for w in self.workers if w.alive]

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict, with the derived figures spelled out."""
        data: dict[str, Any] = json.loads(self.model_dump_json())
        data["workers_alive"] = len(self.alive)
        data["workers_dead"] = len(self.workers) - len(self.alive)
        data["slots_used"] = sum(w.slots_used for w in self.alive)
        data["slots_total"] = sum(w.slots_total for w in self.alive)
        data["calls"]["error_rate"] = round(self.calls.error_rate, 4)
        data["calls"]["calls_per_s"] = round(self.calls.calls_per_s, 3)
        data["calls"]["window_calls_per_s"] = round(self.calls.window_calls_per_s, 3)
        data["calls"]["last_minute_calls_per_s"] = round(self.calls.last_minute_calls_per_s, 3)
        return data


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def collect(
    r: redis.Redis,
    keys: Keys,
    *,
    dead_after_s: float = DEAD_AFTER_S,
    runs_sample: int = RUNS_SAMPLE,
    window_min: int = WINDOW_MIN,
    running_shown: int = RUNNING_SHOWN,
    now_ms: int | None = None,
) -> Status:
    """Read the deployment's state from Redis (two round trips; a Redis Cluster
    client splits each pipeline by node). Redis errors propagate: the caller
    decides whether an unreachable Redis ends the command or is shown."""
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    # The current (partial) minute first, then earlier ones; the last full minute
    # (calls/s) is the second, read once more when the window is one minute.
    minutes = [now // 60_000 - i for i in range(max(window_min, 2))]
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
        pipe.hvals(keys.worker_images(_s(worker_id)))
    for traj_id in run_ids:
        pipe.hmget(keys.traj(_s(traj_id)), _RUN_FIELDS)
    replies = pipe.execute()
    infos, images = replies[: 2 * len(beats) : 2], replies[1 : 2 * len(beats) : 2]
    records = replies[2 * len(beats) :]
    runs = [
        (_s(traj_id), dict(zip(_RUN_FIELDS, record, strict=True)))
        for traj_id, record in zip(run_ids, records, strict=True)
    ]
    running = [row for row in (_running_row(t, rec, now) for t, rec in runs) if row]

    return Status(
        namespace=keys.ns,
        at_ms=now,
        workers=[
            _worker_row(_s(w), score, fields, now, dead_after_s, held)
            for (w, score), fields, held in zip(beats, infos, images, strict=True)
        ],
        backlog=_backlog(pending, oldest, now),
        trajectories=_count_statuses(rec["status"] for _, rec in runs),
        runs_sampled=len(run_ids),
        runs_total=int(runs_total),
        calls=_call_stats(stats[:window_min], stats[0], stats[1], window_min, now),
        running=_newest_first(running)[:running_shown],
        running_total=len(running),
    )


def _worker_row(
    worker_id: str,
    beat_ms: float,
    fields: dict[Any, Any],
    now: int,
    dead_after_s: float,
    images: list[Any] | None = None,
) -> WorkerRow:
    age_s = max(0.0, (now - beat_ms) / 1000)
    row = WorkerRow(worker=worker_id, alive=age_s <= dead_after_s, heartbeat_age_s=age_s)
    if images:  # Keys.worker_images: image states, and its free slots
        states = [_s(v) for v in images]
        row.images_held, row.images_pulling = states.count("held"), states.count("pulling")
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


def _count_statuses(statuses: Iterable[Any]) -> dict[str, int]:
    counts = {s.value: 0 for s in TrajStatus}
    for status in statuses:
        if status is not None:  # None: the record expired
            name = _s(status)
            counts[name] = counts.get(name, 0) + 1
    return counts


def _running_row(traj_id: str, record: dict[str, Any], now: int) -> RunningRow | None:
    if record["status"] is None or _s(record["status"]) != TrajStatus.RUNNING.value:
        return None
    since_ms = _int(record["started_ms"]) or _int(record["created_ms"])
    return RunningRow(
        traj=traj_id,
        owner=_s(record["owner"]) if record["owner"] is not None else None,
        age_s=max(0.0, (now - since_ms) / 1000) if since_ms else None,
        calls_submitted=_int(record["calls_submitted"]),
        calls_answered=_int(record["calls_total"]),
    )


def _newest_first(rows: list[RunningRow]) -> list[RunningRow]:
    # A row without an age (a record missing its times) goes last.
    return sorted(rows, key=lambda row: math.inf if row.age_s is None else row.age_s)


def _counts(fields: dict[Any, Any]) -> dict[str, int]:
    return {_s(field): int(n) for field, n in fields.items()}


def _call_stats(
    window: list[dict[Any, Any]],
    this_minute: dict[Any, Any],
    last_minute: dict[Any, Any],
    window_min: int,
    now: int,
) -> CallStats:
    totals: dict[str, int] = {}
    for fields in window:
        for field, n in _counts(fields).items():
            totals[field] = totals.get(field, 0) + n
    errors = {k.split(":", 1)[1]: n for k, n in totals.items() if k.startswith("error:")}
    return CallStats(
        window_s=window_min * 60,
        covered_s=(window_min - 1) * 60 + (now % 60_000) / 1000,
        calls=totals.get("calls", 0),
        failed=totals.get("failed", 0),
        last_minute_calls=_counts(last_minute).get("calls", 0),
        recent_calls=_counts(last_minute).get("calls", 0) + _counts(this_minute).get("calls", 0),
        recent_s=60 + (now % 60_000) / 1000,
        errors=dict(sorted(errors.items(), key=lambda kv: -kv[1])),
        latency=latency_from_fields(totals),
    )


# ---------------------------------------------------------------- latency
def latency_buckets(fields: Mapping[str, int]) -> dict[float, int]:
    """Bucket upper bound in ms (``inf`` for ``lat_ms:inf``) -> calls, in bound order,
    from ``minute_stats`` fields (other fields and unknown bounds are ignored)."""
    known = {str(b): float(b) for b in LATENCY_BUCKETS_MS} | {"inf": math.inf}
    found: dict[float, int] = {}
    for field, n in fields.items():
        bound = known.get(field[len(_LAT_PREFIX) :]) if field.startswith(_LAT_PREFIX) else None
        if bound is not None and n > 0:
            found[bound] = found.get(bound, 0) + n
    return dict(sorted(found.items()))


def percentile_ms(buckets: Mapping[float, int], fraction: float) -> float | None:
    """The upper bound of the bucket holding the ``fraction`` quantile (nearest
    rank: the smallest bound with at least ``ceil(fraction * n)`` calls at or below
    it), or None when there are no calls. ``buckets`` maps bound -> count."""
    total = sum(buckets.values())
    if total <= 0:
        return None
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for bound, count in sorted(buckets.items()):
        seen += count
        if seen >= rank:
            return bound
    raise AssertionError("unreachable: the counts add up to total")


def latency_from_fields(fields: Mapping[str, int]) -> Latency:
    """p50/p95 and the bucket counts from summed ``minute_stats`` fields."""
    buckets = latency_buckets(fields)
    return Latency(
        samples=sum(buckets.values()),
        buckets_ms={("inf" if math.isinf(b) else f"{b:g}"): n for b, n in buckets.items()},
        p50_ms=percentile_ms(buckets, 0.50),
        p95_ms=percentile_ms(buckets, 0.95),
    )


def format_latency(bound_ms: float | None) -> str:
    """A percentile for people: ``≤ 20 ms``, ``≤ 2 s``, ``> 60 s``, or ``-`` (no calls)."""
    if bound_ms is None:
        return "-"
    if math.isinf(bound_ms):
        return f"> {_ms_text(max(LATENCY_BUCKETS_MS))}"
    return f"≤ {_ms_text(bound_ms)}"


def _ms_text(ms: float) -> str:
    return f"{ms:g} ms" if ms < 1000 else f"{ms / 1000:g} s"


def format_age(seconds: float) -> str:
    """A duration for people: 4.2s, 3.5m, 1.2h."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"
