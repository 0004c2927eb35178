"""Worker metrics: real workers serve /metrics, real Redis, values checked exactly."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_docker
from toolq.producer import Client
from toolq.schemas import LATENCY_BUCKETS_MS, Keys, Result, latency_field
from toolq.worker.metrics import WorkerMetrics
from toolq.worker.settings import WorkerSettings
from toolq.worker.tools import builtin_registry

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of a worker's /metrics: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(port: int, check: Callable[[Samples], bool], timeout_s: float = 20) -> Samples:
    """Scrape until ``check`` holds (results reach Redis before the counters move)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(port)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def metrics_port(handle: Any) -> int:
    port = handle.worker.observer.port
    assert isinstance(port, int) and port > 0
    return port


def test_calls_are_counted_by_tool_and_outcome(start_worker, client: Client, ns: str):
    handle = start_worker("local", metrics_port=0, metrics_host="127.0.0.1")
    port = metrics_port(handle)
    client.open("traj-a")
    for i in range(3):
        assert client.call("traj-a", "bash", {"command": f"echo {i}"}).ok
    assert client.call("traj-a", "terminal", {"command": "true"}).ok  # alias of bash
    assert client.call("traj-a", "bash", {"command": "exit 3"}).error_code == "exit_status"
    refused = client.call("traj-a", "no-such-tool-123", {})
    assert refused.error_code == "unknown_tool"
    client.close("traj-a")

    def done(s: Samples) -> bool:
        ended = value(s, "toolq_trajectories_ended_total", status="completed")
        return ended == 1 and value(s, "toolq_calls_total", tool="other", outcome="unknown_tool")

    s = wait_for(port, done)
    assert value(s, "toolq_calls_total", tool="bash", outcome="ok") == 4
    assert value(s, "toolq_calls_total", tool="bash", outcome="exit_status") == 1
    assert value(s, "toolq_calls_total", tool="other", outcome="unknown_tool") == 1
    assert value(s, "toolq_call_queue_seconds_count", tool="bash") == 5
    assert value(s, "toolq_call_wait_seconds_count", tool="bash") == 5  # all of them
    assert value(s, "toolq_call_run_seconds_count", tool="bash") == 5
    assert value(s, "toolq_call_run_seconds_sum", tool="bash") > 0
    assert value(s, "toolq_call_queue_seconds_count", tool="other") == 1
    assert value(s, "toolq_call_run_seconds_count", tool="other") == 0  # never ran
    assert value(s, "toolq_trajectories_opened_total") == 1
    assert value(s, "toolq_trajectories_ended_total", status="completed") == 1
    assert value(s, "toolq_trajectories_ended_total", status="failed") == 0
    assert value(s, "toolq_slot_start_seconds_count") == 1
    assert value(s, "toolq_read_batch_size_count") >= 1
    assert value(s, "toolq_redis_round_trips_total") > 10
    info = [labels for name, labels in s if name == "toolq_worker_info"]
    assert info == [
        frozenset({"worker": handle.worker.id, "version": "0.1.0", "backend": "local"}.items())
    ]
    # Bounded labels only: no trajectory id or call id ever becomes a label value.
    label_values = {v for _, labels in s for _, v in labels}
    assert not any("traj-a" in v or "no-such-tool" in v for v in label_values)
    assert {v for name, labels in s for k, v in labels if k == "tool"} <= {"bash", "other"}


def test_minute_counts_reach_redis_for_toolq_status(start_worker, client: Client, ns: str):
    start_worker("local")
    client.open("t")
    assert client.call("t", "bash", {"command": "true"}).ok
    assert not client.call("t", "bash", {"command": "exit 1"}).ok
    assert not client.call("t", "read_file", {"path": "missing"}).ok
    keys = Keys(ns)
    r = client.redis
    deadline = time.monotonic() + 20
    totals: dict[str, int] = {}
    while time.monotonic() < deadline:
        stat_keys = r.keys(keys.minute_stats(0).replace(":0", ":*"))
        totals = {}
        for key in stat_keys:
            for field, n in r.hgetall(key).items():
                totals[field.decode()] = totals.get(field.decode(), 0) + int(n)
            assert 0 < r.ttl(key) <= 2 * 3600
        if totals.get("calls") == 3:
            break
        time.sleep(0.1)
    latency = {f: n for f, n in totals.items() if f.startswith("lat_ms:")}
    assert {f: n for f, n in totals.items() if f not in latency} == {
        "calls": 3,
        "failed": 2,
        "error:exit_status": 1,
        "error:not_found": 1,
    }
    # Every call counted once in a latency bucket, so `toolq status` can take percentiles.
    assert sum(latency.values()) == 3
    assert set(latency) <= {latency_field(b) for b in (*LATENCY_BUCKETS_MS, math.inf)}


def test_minute_latency_buckets_place_each_call_by_its_latency(
    start_worker, client: Client, ns: str
):
    start_worker("local")
    client.open("lat")
    results = [client.call("lat", "bash", {"command": "true"})]
    results.append(client.call("lat", "bash", {"command": "sleep 1.2"}))
    client.close("lat")
    expected: dict[str, int] = {}
    for result in results:
        field = latency_field(result.queued_ms + result.run_ms)
        expected[field] = expected.get(field, 0) + 1
    slow = latency_field(results[1].queued_ms + results[1].run_ms)
    assert slow in ("lat_ms:2000", "lat_ms:5000", "lat_ms:10000")  # it slept 1.2 s
    keys = Keys(ns)
    minutes = {r.finished_ms // 60_000 for r in results}

    def counted() -> dict[str, int]:
        totals: dict[str, int] = {}
        for minute in minutes:
            for field, n in client.redis.hgetall(keys.minute_stats(minute)).items():
                if field.startswith(b"lat_ms:"):
                    totals[field.decode()] = totals.get(field.decode(), 0) + int(n)
        return totals

    deadline = time.monotonic() + 20
    while counted() != expected:
        assert time.monotonic() < deadline, f"{counted()} != {expected}"
        time.sleep(0.1)


def test_slot_states_backlog_and_cancel(start_worker, client: Client):
    handle = start_worker("local", slots=1, metrics_port=0, metrics_host="127.0.0.1")
    port = metrics_port(handle)
    client.open("first")
    client.submit("first", "bash", {"command": "sleep 60"})
    s = wait_for(port, lambda s: value(s, "toolq_slots", state="busy") == 1)
    assert value(s, "toolq_slots", state="busy") == 1
    assert value(s, "toolq_slots", state="free") == 0
    assert value(s, "toolq_trajectories_owned") == 1

    client.open("second")
    client.open("third")
    s = wait_for(port, lambda s: value(s, "toolq_open_backlog") == 2)
    assert value(s, "toolq_open_backlog") == 2
    s = wait_for(port, lambda s: value(s, "toolq_open_backlog_age_seconds") > 0)
    assert 0 < value(s, "toolq_open_backlog_age_seconds") < 600

    client.cancel("first")  # kills the sleep; "second" gets the slot
    s = wait_for(port, lambda s: value(s, "toolq_open_backlog") == 1)
    assert value(s, "toolq_open_backlog") == 1
    assert value(s, "toolq_trajectories_ended_total", status="cancelled") == 1
    assert value(s, "toolq_calls_total", tool="bash", outcome="cancelled") == 1


def test_background_tasks_are_counted_by_status(start_worker, client: Client):
    handle = start_worker("local", metrics_port=0, metrics_host="127.0.0.1")
    port = metrics_port(handle)
    client.open("bg")
    assert client.call("bg", "bg_start", {"command": "echo hi"}).ok
    assert client.call("bg", "bg_start", {"command": "exit 4"}).ok
    s = wait_for(
        port,
        lambda s: (
            value(s, "toolq_bg_tasks_total", status="completed")
            + value(s, "toolq_bg_tasks_total", status="failed")
            == 2
        ),
    )
    assert value(s, "toolq_bg_tasks_total", status="running") == 2
    assert value(s, "toolq_bg_tasks_total", status="completed") == 1
    assert value(s, "toolq_bg_tasks_total", status="failed") == 1


def test_docker_containers_are_counted(start_worker, client: Client):
    require_docker()
    handle = start_worker("docker", metrics_port=0, metrics_host="127.0.0.1")
    port = metrics_port(handle)
    client.open("boxed")
    assert client.call("boxed", "bash", {"command": "echo in-a-box"}).ok
    client.close("boxed")
    s = wait_for(port, lambda s: value(s, "toolq_containers_removed_total") >= 1)
    assert value(s, "toolq_containers_started_total") == 1
    assert value(s, "toolq_container_start_seconds_count") == 1
    assert value(s, "toolq_container_start_seconds_sum") > 0
    assert value(s, "toolq_containers_removed_total") == 1
    assert value(s, "toolq_containers_lost_total") == 0
    assert value(s, "toolq_slot_start_seconds_count") == 1
    info = next(labels for name, labels in s if name == "toolq_worker_info")
    assert ("backend", "docker") in info


def test_redis_errors_are_counted_by_kind(start_worker, client: Client, redis_url: str):
    handle = start_worker("local", metrics_port=0, metrics_host="127.0.0.1")
    port = metrics_port(handle)
    worker = handle.worker
    with pytest.raises(redis.ResponseError):
        handle.run(worker.redis.execute_command("XADD", "only-a-key"))
    s = wait_for(port, lambda s: value(s, "toolq_redis_errors_total", kind="reply") == 1)
    assert value(s, "toolq_redis_errors_total", kind="reply") == 1
    assert value(s, "toolq_redis_errors_total", kind="connection") == 0

    # Cut the worker's connections server-side: its next reads fail, it reconnects.
    admin = redis.Redis.from_url(redis_url)
    ids = [c["id"] for c in admin.client_list() if c.get("cmd") in ("xreadgroup", "evalsha")]
    for conn_id in ids:
        admin.client_kill_filter(_id=conn_id)
    s = wait_for(port, lambda s: value(s, "toolq_redis_errors_total", kind="connection") >= 1)
    assert value(s, "toolq_redis_errors_total", kind="connection") >= 1
    client.open("after")
    assert client.call("after", "bash", {"command": "echo still"}).output == "still\n"


def test_label_values_stay_bounded():
    metrics = WorkerMetrics(WorkerSettings(), builtin_registry())
    assert metrics.tool_label("bash") == "bash"
    assert metrics.tool_label("terminal") == "bash"
    assert metrics.tool_label("rm -rf /; traj-123") == "other"
    assert metrics.tool_label("") == "other"

    def outcome(**fields: Any) -> str:
        return metrics.outcome_label(Result(call_id="c", traj="t", **fields))

    assert outcome(ok=True) == "ok"
    assert outcome(ok=False, error_code="timeout") == "timeout"
    assert outcome(ok=False, error_code="made-up-by-an-agent") == "other"
    assert outcome(ok=False) == "other"
    metrics.bg_task_changed("completed")
    metrics.bg_task_changed("weird")
    metrics.container_started(1.5)
    metrics.container_removed()
    metrics.container_lost()
    metrics.traj_ended("exploded")
    got = metrics.registry.get_sample_value
    assert got("toolq_bg_tasks_total", {"status": "completed"}) == 1
    assert got("toolq_bg_tasks_total", {"status": "other"}) == 1
    assert got("toolq_bg_tasks_total", {"status": "lost"}) == 0  # known values export 0
    assert got("toolq_containers_started_total") == 1
    assert got("toolq_container_start_seconds_sum") == 1.5
    assert got("toolq_containers_removed_total") == 1
    assert got("toolq_containers_lost_total") == 1
    assert got("toolq_trajectories_ended_total", {"status": "other"}) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_toolq_worker_serves_metrics_on_the_env_port_and_host(redis_url: str, ns: str):
    port = _free_port()
    env = {
        **os.environ,
        "TOOLQ_REDIS_URL": redis_url,
        "TOOLQ_NAMESPACE": ns,
        "TOOLQ_METRICS_PORT": str(port),
        "TOOLQ_METRICS_HOST": "127.0.0.1",
    }
    cmd = [sys.executable, "-c", "from toolq.producer.cli import main; main()", "worker"]
    proc = subprocess.Popen(
        [*cmd, "--backend", "local", "--slots", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        samples: Samples = {}
        while not samples and time.monotonic() < deadline and proc.poll() is None:
            try:
                samples = scrape(port)
            except OSError:
                time.sleep(0.1)
        assert samples, proc.stderr.read().decode() if proc.poll() is not None else "no metrics"
        assert value(samples, "toolq_slots", state="free") == 2
        assert value(samples, "process_resident_memory_bytes") > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
