"""``toolq status``: two live workers, one dead one, backlog, states, error rate,
calls/s and latency percentiles, what runs now, the local backend's warning."""

from __future__ import annotations

import json
import math
import time

import pytest
from click.testing import CliRunner

from tests.helpers import wait_for
from toolq.producer import Client
from toolq.producer.cli import main
from toolq.producer.status import (
    collect,
    format_latency,
    latency_buckets,
    latency_from_fields,
    percentile_ms,
)
from toolq.schemas import LATENCY_BUCKETS_MS, Keys, WorkerInfo, latency_field


def _write_dead_worker(client: Client, ns: str, age_s: float) -> None:
    """A worker that stopped beating ``age_s`` ago (its hash not expired yet)."""
    keys = Keys(ns)
    beat_ms = int((time.time() - age_s) * 1000)
    info = WorkerInfo(
        worker="ghost-1",
        host="old-host",
        backend="docker",
        version="0.0.9",
        slots_total=8,
        slots_used=3,
        heartbeat_ms=beat_ms,
    )
    client.redis.zadd(keys.workers, {"ghost-1": beat_ms})
    client.redis.hset(keys.worker("ghost-1"), mapping=info.to_fields())


def _status(redis_url: str, ns: str, *args: str) -> str:
    args_ = ["--redis-url", redis_url, "--namespace", ns, "status", *args]
    result = CliRunner().invoke(main, args_)
    assert result.exit_code == 0, result.output
    assert "\x1b[" not in result.output  # plain text when not a terminal
    return result.output


def _line(text: str, *needles: str) -> str:
    """The one line of ``text`` that holds every needle."""
    found = [line for line in text.splitlines() if all(n in line for n in needles)]
    assert len(found) == 1, (needles, text)
    return found[0]


def test_status_shows_live_and_dead_workers(start_worker, client: Client, redis_url, ns):
    # Live workers take over (and forget) a worker dead for longer than their own
    # dead_after_s; a long one keeps the ghost visible while status looks at it.
    a = start_worker("local", slots=1, dead_after_s=600)
    b = start_worker("local", slots=2, dead_after_s=600)
    _write_dead_worker(client, ns, age_s=120)
    client.open("busy")  # takes one slot of one worker
    assert client.call("busy", "bash", {"command": "true"}).ok
    assert not client.call("busy", "bash", {"command": "exit 2"}).ok
    client.open("done")
    assert client.call("done", "bash", {"command": "true"}).ok
    client.close("done")
    wait_for(lambda: collect(client.redis, Keys(ns)).trajectories["completed"] == 1)
    wait_for(lambda: collect(client.redis, Keys(ns)).calls.calls == 3)
    wait_for(lambda: sum(w.slots_used for w in collect(client.redis, Keys(ns)).alive) == 1)

    data = json.loads(_status(redis_url, ns, "--json"))
    rows = {w["worker"]: w for w in data["workers"]}
    assert set(rows) == {a.worker.id, b.worker.id, "ghost-1"}
    assert rows[a.worker.id]["alive"] and rows[b.worker.id]["alive"]
    assert rows[a.worker.id]["backend"] == "local" and rows[a.worker.id]["version"] == "0.1.0"
    assert (rows[a.worker.id]["slots_total"], rows[b.worker.id]["slots_total"]) == (1, 2)
    assert rows[a.worker.id]["heartbeat_age_s"] < 15
    ghost = rows["ghost-1"]
    assert not ghost["alive"] and ghost["heartbeat_age_s"] >= 120
    assert (ghost["backend"], ghost["slots_used"]) == ("docker", 3)
    assert (data["workers_alive"], data["workers_dead"]) == (2, 1)
    assert (data["slots_used"], data["slots_total"]) == (1, 3)  # the dead one's slots excluded
    assert data["trajectories"]["running"] == 1 and data["trajectories"]["completed"] == 1
    assert data["calls"]["calls"] == 3 and data["calls"]["failed"] == 1
    assert data["calls"]["errors"] == {"exit_status": 1}
    assert abs(data["calls"]["error_rate"] - 1 / 3) < 1e-3
    latency = data["calls"]["latency"]  # the workers' own latency buckets
    assert latency["samples"] == 3 and sum(latency["buckets_ms"].values()) == 3
    assert 0 < latency["p50_ms"] <= latency["p95_ms"]

    text = _status(redis_url, ns)
    assert "2 alive, 1 dead" in text
    assert "slots 1/3 used" in text
    ghost_line = next(line for line in text.splitlines() if "ghost-1" in line)
    assert "DEAD" in ghost_line and "old-host" in ghost_line
    live_lines = [line for line in text.splitlines() if line.startswith((a.worker.id, b.worker.id))]
    assert len(live_lines) == 2 and all("alive" in line for line in live_lines)
    assert _line(text, "ANSWERED", "FAILED", "ERROR RATE", "CALLS/S", "P50", "P95")
    assert _line(text, "33.3%").split()[:3] == ["3", "1", "33.3%"]
    assert "errors: exit_status 1" in text
    assert "2 workers on the local backend" in _line(text, "WARNING", "not a sandbox")

    # What runs now: "busy", on the worker that took it, both calls answered.
    assert [r["traj"] for r in data["running"]] == ["busy"] and data["running_total"] == 1
    busy = data["running"][0]
    assert busy["owner"] in (a.worker.id, b.worker.id)
    assert (busy["calls_answered"], busy["calls_submitted"]) == (2, 2)
    assert busy["owner"] in _line(text, "busy ")
    assert "2/2" in _line(text, "busy ")


def test_status_shows_the_backlog_and_watch_refreshes(start_worker, client, redis_url, ns):
    start_worker("local", slots=1)
    client.open("holder")
    assert client.call("holder", "bash", {"command": "true"}).ok
    client.open("waiting-1")
    client.open("waiting-2")
    time.sleep(0.05)  # lets the oldest waiting age be non-zero
    status = collect(client.redis, Keys(ns))
    assert status.backlog.pending == 2
    assert status.backlog.oldest_traj == "waiting-1"
    assert status.backlog.oldest_age_s > 0
    assert status.trajectories["pending"] == 2 and status.trajectories["running"] == 1

    out = _status(redis_url, ns, "--watch", "--interval", "0.05", "--count", "3")
    assert out.count("BACKLOG  2 trajectories waiting for a slot") == 3
    assert out.count("waiting-1") == 3  # the backlog's oldest, once per refresh
    lines = _status(redis_url, ns, "--watch", "--json", "--interval", "0.05", "--count", "2")
    docs = [json.loads(line) for line in lines.splitlines()]
    assert [d["backlog"]["pending"] for d in docs] == [2, 2]


def test_status_of_an_empty_namespace(client: Client, redis_url, ns):
    text = _status(redis_url, ns)
    assert "0 alive, 0 dead" in text
    assert "BACKLOG  0 trajectories" in text
    assert _line(text, "0.0%").split() == ["0", "0", "0.0%", "0.00", "0.00", "0.00", "-", "-"]
    assert "RUNNING NOW  none" in text
    assert "WARNING" not in text


# ---------------------------------------------------------- latency math (pure)
def test_percentiles_are_the_upper_bound_of_their_bucket():
    buckets = {5.0: 90, 200.0: 10}
    assert percentile_ms(buckets, 0.50) == 5.0
    assert percentile_ms(buckets, 0.90) == 5.0  # the 90th call is the last <= 5 ms
    assert percentile_ms(buckets, 0.95) == 200.0
    assert percentile_ms({20.0: 1}, 0.95) == 20.0  # one call is every percentile
    assert percentile_ms({1.0: 1, math.inf: 99}, 0.50) == math.inf
    assert percentile_ms({}, 0.5) is None
    assert percentile_ms({10.0: 0}, 0.5) is None


def test_latency_buckets_read_the_fields_workers_write():
    fields = {
        "calls": 7,
        "failed": 1,
        "error:timeout": 1,
        latency_field(0.4): 2,  # lat_ms:1
        latency_field(15): 4,  # lat_ms:20
        latency_field(10**6): 1,  # lat_ms:inf
        "lat_ms:3": 9,  # not a bound of LATENCY_BUCKETS_MS: ignored
    }
    assert latency_buckets(fields) == {1.0: 2, 20.0: 4, math.inf: 1}
    latency = latency_from_fields(fields)
    assert latency.samples == 7
    assert latency.buckets_ms == {"1": 2, "20": 4, "inf": 1}
    assert (latency.p50_ms, latency.p95_ms) == (20.0, math.inf)
    assert latency_from_fields({"calls": 3}).p50_ms is None  # calls from an older worker


def test_latency_for_people():
    assert format_latency(None) == "-"
    assert format_latency(20.0) == "≤ 20 ms"
    assert format_latency(2000.0) == "≤ 2 s"
    assert format_latency(math.inf) == f"> {max(LATENCY_BUCKETS_MS) // 1000} s"


# ------------------------------------------- calls/s, latency, running: in Redis
def _count_calls(client: Client, ns: str, minute: int, latencies_ms: dict[float, int]) -> None:
    """Add calls to one minute the way workers do (HINCRBY into ``minute_stats``)."""
    key = Keys(ns).minute_stats(minute)
    for latency_ms, n in latencies_ms.items():
        client.redis.hincrby(key, "calls", n)
        client.redis.hincrby(key, latency_field(latency_ms), n)


@pytest.mark.redis_kinds("single", "cluster")
def test_calls_per_second_and_latency_percentiles(client: Client, redis_url, ns):
    now_ms = (int(time.time()) // 60) * 60_000 + 30_000  # half way into this minute
    minute = now_ms // 60_000
    _count_calls(client, ns, minute - 1, {3: 114, 150: 6})  # the last full minute: 2 calls/s
    _count_calls(client, ns, minute, {40: 30})
    _count_calls(client, ns, minute - 9, {1: 500})  # outside a 5-minute window

    calls = collect(client.redis, Keys(ns), now_ms=now_ms).calls
    assert (calls.calls, calls.last_minute_calls) == (150, 120)
    assert calls.last_minute_calls_per_s == 2.0
    assert calls.covered_s == 4 * 60 + 30
    assert calls.window_calls_per_s == pytest.approx(150 / 270)
    assert calls.calls_per_s == pytest.approx((120 + 30) / 90)  # now: the last 1.5 minutes
    assert calls.latency.samples == 150
    assert (calls.latency.p50_ms, calls.latency.p95_ms) == (5.0, 50.0)

    one_minute = collect(client.redis, Keys(ns), now_ms=now_ms, window_min=1).calls
    assert (one_minute.calls, one_minute.last_minute_calls) == (30, 120)
    assert one_minute.latency.p95_ms == 50.0


def test_status_shows_calls_per_second_and_latency(client: Client, redis_url, ns):
    # The same calls in every minute around now: the figures do not depend on
    # when the test crosses a minute boundary.
    minute = int(time.time()) // 60
    for m in range(minute - 6, minute + 3):
        _count_calls(client, ns, m, {15: 57, 900: 3})  # 1 call/s

    data = json.loads(_status(redis_url, ns, "--json"))
    assert data["calls"]["last_minute_calls_per_s"] == 1.0
    assert data["calls"]["latency"]["p50_ms"] == 20.0
    assert data["calls"]["latency"]["p95_ms"] == 20.0
    assert data["calls"]["latency"]["buckets_ms"] == {"20": 5 * 57, "1000": 5 * 3}

    text = _status(redis_url, ns)
    row = _line(text, "≤ 20 ms").split()  # answered, failed, rate, calls/s, last min, avg, p50, p95
    assert row == ["300", "0", "0.0%", row[3], "1.00", row[5], "≤", "20", "ms", "≤", "20", "ms"]


def _running(client: Client, ns: str, traj: str, age_s: float, answered: int, sent: int) -> None:
    """A running trajectory's record, as a worker leaves it."""
    client.redis.zadd(Keys(ns).runs, {traj: int((time.time() - age_s) * 1000)})
    client.redis.hset(
        Keys(ns).traj(traj),
        mapping={
            "traj": traj,
            "status": "running",
            "owner": "w-1",
            "started_ms": int((time.time() - age_s) * 1000),
            "calls_submitted": sent,
            "calls_total": answered,
        },
    )


@pytest.mark.redis_kinds("single", "cluster")
def test_what_runs_now_newest_first_and_capped(client: Client, redis_url, ns):
    for i in range(13):
        _running(client, ns, f"run-{i:02d}", age_s=100 - i, answered=i, sent=i + 1)
    client.redis.hset(Keys(ns).traj("done"), mapping={"traj": "done", "status": "completed"})
    client.redis.zadd(Keys(ns).runs, {"done": int(time.time() * 1000)})

    status = collect(client.redis, Keys(ns))
    assert status.running_total == 13
    assert [r.traj for r in status.running] == [f"run-{i:02d}" for i in range(12, 2, -1)]
    newest = status.running[0]
    assert (newest.owner, newest.calls_answered, newest.calls_submitted) == ("w-1", 12, 13)
    assert newest.age_s is not None and 88 <= newest.age_s < 120

    text = _status(redis_url, ns)
    assert "RUNNING NOW  13 trajectories, newest first" in text
    _, owner, age, calls, in_flight = _line(text, "run-12").split()
    assert (owner, calls, in_flight) == ("w-1", "12/13", "1") and age.endswith("m")
    assert "run-02" not in text and "… and 3 more" in text


def test_the_headline_calls_per_second_is_the_pace_now(client: Client, redis_url, ns):
    """Quiet for minutes, then 160 calls/s: CALLS/S says 160, not a 5-minute average."""
    now_ms = (int(time.time()) // 60) * 60_000 + 30_000
    minute = now_ms // 60_000
    _count_calls(client, ns, minute - 1, {3: 160 * 60})
    _count_calls(client, ns, minute, {3: 160 * 30})
    calls = collect(client.redis, Keys(ns), now_ms=now_ms).calls
    assert calls.calls_per_s == pytest.approx(160)
    assert calls.window_calls_per_s == pytest.approx(160 * 90 / 270)  # the average lags
