"""Background tasks through Redis, on every backend: tools, hashes, events, CLI."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any

import pytest
from click.testing import CliRunner

from tests.helpers import count_procs, unique_sleep, wait_for
from toolq.producer import Client
from toolq.producer.cli import main as cli_main
from toolq.schemas import BgTask


def bg_events(client: Client, traj: str) -> list[tuple[str, str]]:
    """(task_id, status) of every bg event on the trajectory's events stream."""
    entries = client.redis.xrange(client.keys.events(traj))
    return [
        (f[b"task_id"].decode(), f[b"status"].decode()) for _id, f in entries if f[b"type"] == b"bg"
    ]


def start(client: Client, traj: str, command: str, **extra: Any) -> str:
    r = client.call(traj, "bg_start", {"command": command, **extra})
    assert r.ok and r.data, r
    return str(r.data["task_id"])


def test_task_output_goes_to_its_hash_and_an_event_ends_it(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    task_id = start(client, "t", "echo out; echo err >&2; sleep 0.2; echo done; exit 4", name="job")
    # the hash exists as soon as the id is known
    first = client.bg_get("t", task_id)
    assert first is not None and first.name == "job" and first.pid
    waited = client.call("t", "bg_output", {"task_id": task_id, "block": True, "timeout_s": 30})
    assert waited.ok and waited.data and waited.data["status"] == "failed", waited
    assert waited.exit_code == 4 and waited.data["stdout_bytes"] == len("out\ndone\n")
    assert waited.output.startswith("out\ndone\n--- stderr ---\nerr\n")
    task = client.bg_output("t", task_id, wait_s=30)
    assert isinstance(task, BgTask)
    assert (task.status, task.exit_code, task.traj) == ("failed", 4, "t")
    assert (task.stdout_tail, task.stderr_tail) == ("out\ndone\n", "err\n")
    assert (task.stdout_bytes, task.stderr_bytes, task.truncated) == (9, 4, False)
    assert task.ended_ms is not None and task.ended_ms >= task.started_ms > 0
    assert client.redis.zscore(client.keys.bg_index("t"), task_id) == task.started_ms
    assert bg_events(client, "t") == [(task_id, "failed")]


def test_running_task_reports_output_and_block_says_still_running(
    backend, start_worker, client: Client
):
    start_worker(backend)
    client.open("t")
    secs = unique_sleep()
    task_id = start(client, "t", f"echo tick; sleep {secs}")
    wait_for(lambda: (client.bg_get("t", task_id) or BgTask(task_id="", traj="")).stdout_tail)
    now = client.call("t", "bg_output", {"task_id": task_id})
    assert now.ok and now.data and now.data["running"] and now.output.startswith("tick\n")
    waited = client.call("t", "bg_output", {"task_id": task_id, "block": True, "timeout_s": 0.3})
    assert waited.ok and waited.data and waited.data["status"] == "running"
    assert "is running" in waited.output
    task = client.bg_output("t", task_id, wait_s=0.2)
    assert task is not None and task.status == "running" and task.stdout_tail == "tick\n"
    listing = client.call("t", "bg_list", {})
    assert listing.ok and listing.data
    assert [(t["task_id"], t["status"]) for t in listing.data["tasks"]] == [(task_id, "running")]
    assert listing.data["tasks"][0]["duration_s"] >= 0
    stopped = client.bg_stop("t", task_id)
    assert stopped.ok and stopped.data and stopped.data["signal"] == "SIGTERM"
    assert count_procs(client, "t", f"sleep {secs}") == 0


def test_stop_kills_every_child_even_ones_that_ignore_sigterm(
    backend, start_worker, client: Client
):
    start_worker(backend)
    client.open("t")
    secs = unique_sleep()
    # children in the group, a double-forked one, one in its own session, and a
    # shell (and so its children) that ignores SIGTERM
    task_id = start(
        client,
        "t",
        f"trap '' TERM; sleep {secs} & (sleep {secs} &); setsid sleep {secs} & "
        f"echo started; sleep {secs}; wait",
    )
    # 4 sleeps and the task's shell, whose command line names them too
    wait_for(lambda: count_procs(client, "t", f"sleep {secs}") == 5, what="the sleeps")
    r = client.call("t", "bg_stop", {"task_id": task_id})
    assert r.ok and r.data and r.data["signal"] == "SIGKILL" and r.data["was_running"], r
    assert r.data["status"] == "stopped"
    assert count_procs(client, "t", f"sleep {secs}") == 0
    task = client.bg_output("t", task_id, wait_s=30)
    assert task is not None and task.status == "stopped" and task.stdout_tail == "started\n"
    assert (task_id, "stopped") in bg_events(client, "t")
    again = client.call("t", "bg_stop", {"task_id": task_id})
    assert again.ok and again.data and not again.data["was_running"]


def test_a_stopped_task_never_reports_completed(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    # exits 0 on SIGTERM: without the stop it would look completed
    task_id = start(client, "t", "trap 'exit 0' TERM; echo up; while :; do sleep 0.05; done")
    wait_for(lambda: (client.bg_get("t", task_id) or BgTask(task_id="", traj="")).stdout_tail)
    r = client.call("t", "bg_stop", {"task_id": task_id, "force": False})
    assert r.ok and r.data and r.data["signal"] == "SIGTERM" and r.data["exit_code"] == 0
    assert r.data["status"] == "stopped"
    task = client.bg_get("t", task_id)
    assert task is not None and task.status == "stopped" and task.exit_code == 0
    assert bg_events(client, "t") == [(task_id, "stopped")]


def test_force_stop_and_unknown_tasks(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    task_id = start(client, "t", "sleep 1000")
    r = client.call("t", "bg_stop", {"task_id": task_id, "force": True})
    assert r.ok and r.data and r.data["signal"] == "SIGKILL" and r.data["exit_code"] == -9
    for tool in ("bg_output", "bg_stop"):
        missing = client.call("t", tool, {"task_id": "bg99-none"})
        assert not missing.ok and missing.error_code == "not_found", missing
    empty = client.call("t", "bg_start", {"command": ""})
    assert not empty.ok and empty.error_code == "invalid_args"
    assert client.bg_get("t", "bg99-none") is None
    assert client.bg_output("t", "bg99-none", wait_s=0.1) is None


def test_bash_background_and_the_terminal_alias_start_tasks(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    a = client.call("t", "bash", {"command": "echo from-bash", "background": True})
    b = client.call("t", "terminal", {"command": "echo from-terminal", "background": True})
    assert a.ok and b.ok and a.data and b.data
    ids = [a.data["task_id"], b.data["task_id"]]
    for task_id, text in zip(ids, ["from-bash\n", "from-terminal\n"], strict=True):
        task = client.bg_output("t", task_id, wait_s=30)
        assert task is not None and task.status == "completed" and task.stdout_tail == text
    assert [t.task_id for t in client.bg_list("t")] == ids


@pytest.mark.parametrize("how", ["close", "cancel"])
def test_a_task_that_outlives_its_trajectory_is_stopped(
    backend, start_worker, client: Client, how: str
):
    start_worker(backend)
    client.open("t")
    secs = unique_sleep()
    task_id = start(client, "t", f"sleep {secs} & sleep {secs}")
    getattr(client, how)("t")
    wait_for(
        lambda: (rec := client.record("t")) is not None and rec.status.final,
        what="the trajectory to end",
    )
    task = client.bg_get("t", task_id)
    assert task is not None and task.status == "stopped" and task.ended_ms, task
    assert (task_id, "stopped") in bg_events(client, "t")
    if backend == "local":  # the sandbox is this host: its processes are visible here
        ps = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True)
        alive = [line for line in ps.stdout.splitlines() if secs in line and line[0] != "Z"]
        assert alive == []


def test_tasks_of_a_lost_sandbox_are_marked_lost(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    task_id = start(client, "t", "sleep 1000")
    # the agent is the parent of a fresh shell: killing it loses the sandbox
    r = client.call("t", "bash", {"command": "kill -9 $PPID; sleep 5"})
    assert not r.ok and r.error_code == "sandbox_lost", r
    task = client.bg_get("t", task_id)
    assert task is not None and task.status == "lost" and task.ended_ms
    if backend == "local" and task.pid:  # orphaned on this host (a container goes away)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(task.pid, signal.SIGKILL)
    assert (task_id, "lost") in bg_events(client, "t")
    fresh = client.call("t", "bg_list", {})
    assert fresh.ok and fresh.slot_reset and fresh.output == "no background tasks"


def test_cli_lists_prints_and_stops_tasks(backend, start_worker, client: Client, redis_url, ns):
    start_worker(backend)
    client.open("t")
    done = start(client, "t", "echo hello; echo oops >&2", name="greet")
    running = start(client, "t", "sleep 1000")
    base = ["--redis-url", redis_url, "--namespace", ns, "bg"]
    runner = CliRunner()
    out = runner.invoke(cli_main, [*base, "output", "t", done, "--wait", "30"])
    assert out.exit_code == 0, out.output
    assert out.stdout == "hello\n" and out.stderr.startswith("oops\n[" + done + " completed")
    listing = runner.invoke(cli_main, [*base, "list", "t"])
    assert listing.exit_code == 0
    rows = listing.stdout.splitlines()
    assert rows[0].startswith("TASK") and len(rows) == 3
    assert rows[1].split()[:2] == [done, "completed"] and "[greet]" in rows[1]
    assert rows[2].split()[:2] == [running, "running"]
    stop = runner.invoke(cli_main, [*base, "stop", "t", running])
    assert stop.exit_code == 0 and '"ok":true' in stop.stdout.replace(" ", "")
    as_json = runner.invoke(cli_main, [*base, "list", "t", "--json"])
    statuses = [BgTask.model_validate_json(line).status for line in as_json.stdout.splitlines()]
    assert statuses == ["completed", "stopped"]
    unknown = runner.invoke(cli_main, [*base, "output", "t", "bg9-none"])
    assert unknown.exit_code == 1 and "no background task" in unknown.stderr
