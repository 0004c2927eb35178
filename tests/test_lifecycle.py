"""Trajectory lifecycle, limits, policy, cancel and listing, through Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest

from tests.helpers import redis_client
from toolq.producer import Client
from toolq.schemas import Keys

pytestmark = pytest.mark.redis_kinds("single", "cluster")


def wait_status(client: Client, traj: str, status: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    rec = None
    while time.monotonic() < deadline:
        rec = client.record(traj)
        if rec is not None and rec.status.value == status:
            return
        time.sleep(0.05)
    raise AssertionError(f"{traj} is {rec.status.value if rec else None}, not {status}")


def test_states_and_times_from_pending_to_completed(start_worker, client: Client):
    client.open("t", {"labels": {"exp": "e1"}})
    rec = client.record("t")
    assert rec is not None and rec.status.value == "pending" and rec.created_ms
    assert [r.traj for r in client.runs(status="pending")] == ["t"]
    start_worker("local")
    r = client.call("t", "bash", {"command": "exit 2"})
    wait_status(client, "t", "running")
    rec = client.record("t")
    assert rec is not None and rec.owner and rec.slot and rec.started_ms
    assert rec.calls_total == 1 and rec.calls_failed == 1 and rec.calls_in_flight == 0
    assert rec.spec is not None and rec.spec.labels == {"exp": "e1"}
    assert not r.ok
    client.close("t")
    wait_status(client, "t", "completed")
    rec = client.record("t")
    assert rec is not None and rec.ended_ms and rec.ended_ms >= (rec.started_ms or 0)


def test_a_close_sent_again_is_no_error_but_closing_a_cancelled_one_is(
    start_worker, client: Client
):
    """A close retried after its reply was lost (a Redis restart) finds the
    trajectory closed by itself: that is no error. Other ends still are."""
    from toolq.producer import TrajectoryEnded

    start_worker("local")
    for traj in ("closed", "cancelled"):
        client.open(traj)
        assert client.call(traj, "bash", {"command": "true"}).ok
    assert client.close("closed")
    wait_status(client, "closed", "completed")
    assert client.close("closed") == ""
    client.cancel("cancelled")
    wait_status(client, "cancelled", "cancelled")
    with pytest.raises(TrajectoryEnded):
        client.close("cancelled")


def test_failed_when_the_slot_cannot_start(start_worker, client: Client):
    start_worker("local")
    client.open("t", {"workdir": "../../escape"})
    r = client.call("t", "bash", {"command": "true"})
    assert r.error_code == "sandbox_error"
    wait_status(client, "t", "failed")


def test_cancel_while_a_command_runs_and_calls_are_queued(start_worker, client: Client):
    handle = start_worker("local")
    client.open("t")
    client.call("t", "bash", {"command": "true"})
    nap = f"sleep 60.{uuid.uuid4().int % 10**6}"  # unique, so pgrep finds only ours
    running = client.submit("t", "bash", {"command": nap})
    queued = [client.submit("t", "bash", {"command": "echo never"}) for _ in range(3)]
    time.sleep(0.5)  # let the sleep start
    assert client.cancel("t") == "requested"
    first = client.result("t", running, timeout_s=10)  # far sooner than the 60 s sleep
    assert first.error_code == "cancelled"
    assert [client.result("t", q, timeout_s=10).error_code for q in queued] == ["cancelled"] * 3
    wait_status(client, "t", "cancelled")
    late = client.submit("t", "bash", {"command": "echo late"})
    assert client.result("t", late, timeout_s=10).error_code == "trajectory_ended"
    ps = subprocess.run(["pgrep", "-f", nap], capture_output=True, text=True)
    assert ps.stdout.strip() == "", "the cancelled command is still running"
    assert handle.worker is not None and "t" not in handle.worker.owned


def test_cancel_a_pending_trajectory_answers_its_calls_without_a_worker(
    start_worker, client: Client
):
    client.open("p")
    ids = [client.submit("p", "bash", {"command": "echo no"}) for _ in range(3)]
    assert client.cancel("p") == "cancelled"
    assert [client.result("p", i, timeout_s=5).error_code for i in ids] == ["cancelled"] * 3
    start_worker("local")
    client.open("other")
    assert client.call("other", "bash", {"command": "echo yes"}).ok  # the worker is serving
    rec = client.record("p")
    assert rec is not None and rec.status.value == "cancelled" and not rec.owner
    assert client.cancel("p") == "ended"


def test_deadline_stops_a_running_call_and_the_late_result_keeps_timeout(
    start_worker, client: Client
):
    start_worker("local")
    client.open("t", {"limits": {"deadline_s": 1.5}})
    r = client.call("t", "bash", {"command": "echo start; sleep 30"})
    assert r.timed_out and "deadline_s" in (r.error or "") and r.output == "start\n"
    wait_status(client, "t", "timeout")
    rec = client.record("t")
    assert rec is not None and "deadline_s" in (rec.reason or "")
    late = client.call("t", "bash", {"command": "true"})
    assert late.error_code == "trajectory_ended" and "deadline_s" in (late.error or "")
    time.sleep(0.5)
    assert client.record("t").status.value == "timeout"  # type: ignore[union-attr]


def test_close_twice_and_calls_after_close_each_get_an_error(start_worker, client: Client):
    start_worker("local")
    client.open("t")
    assert client.call("t", "bash", {"command": "true"}).ok
    client.close("t")
    client.close("t")
    wait_status(client, "t", "completed")
    ids = [client.submit("t", "bash", {"command": "true"}) for _ in range(5)]
    codes = [client.result("t", i, timeout_s=10).error_code for i in ids]
    assert codes == ["trajectory_ended"] * 5


def test_idle_trajectory_is_reaped_while_its_client_is_gone(start_worker, client: Client):
    handle = start_worker("local", slots=1)
    client.open("idle", {"limits": {"idle_timeout_s": 1}})
    assert client.call("idle", "bash", {"command": "true"}).ok
    wait_status(client, "idle", "timeout", timeout_s=20)
    rec = client.record("idle")
    assert rec is not None and "idle_timeout_s" in (rec.reason or "")
    client.open("next")  # the single slot was freed
    assert client.call("next", "bash", {"command": "true"}, wait_s=20).ok
    assert handle.worker is not None and "idle" not in handle.worker.owned


def test_max_calls_counts_refused_calls(start_worker, client: Client):
    start_worker("local")
    client.open("t", {"limits": {"max_calls": 3}, "blocked_tools": ["write_file"]})
    assert client.call("t", "bash", {"command": "true"}).ok
    assert client.call("t", "write_file", {"path": "a", "content": ""}).error_code == (
        "tool_blocked"
    )
    assert client.call("t", "bash", {"command": "true"}).ok
    over = client.call("t", "bash", {"command": "true"})
    assert over.error_code == "limit_exceeded" and "max_calls" in (over.error or "")


def test_tool_policy_block_wins_over_allow(start_worker, client: Client):
    start_worker("local")
    client.open("t", {"allowed_tools": ["bash", "read_file"], "blocked_tools": ["read_file"]})
    assert client.call("t", "bash", {"command": "true"}).ok
    blocked = client.call("t", "read_file", {"path": "x"})
    assert blocked.error_code == "tool_blocked" and "blocked" in (blocked.error or "")
    not_allowed = client.call("t", "write_file", {"path": "x", "content": ""})
    assert not_allowed.error_code == "tool_blocked" and "allowed_tools" in (not_allowed.error or "")


def test_runs_by_status_and_label_and_counts(start_worker, client: Client):
    start_worker("local")
    for i in range(4):
        client.open(f"r{i}", {"labels": {"parent": "p1" if i < 3 else "p2"}})
        client.call(f"r{i}", "bash", {"command": "true"})
    client.close("r0")
    wait_status(client, "r0", "completed")
    assert {r.traj for r in client.runs(label={"parent": "p1"})} == {"r0", "r1", "r2"}
    assert [r.traj for r in client.runs(status="completed", label=["parent=p1"])] == ["r0"]
    assert client.runs(limit=2)[0].traj == "r3"  # newest first
    counts = client.run_counts(label=["parent=p1"])
    assert counts["completed"] == 1 and counts["running"] == 2


def test_oldest_pending_trajectory_is_served_first(start_worker, client: Client):
    start_worker("local", slots=1)
    client.open("a")
    assert client.call("a", "bash", {"command": "true"}).ok
    client.open("b")
    time.sleep(0.01)
    client.open("c")
    assert {r.traj for r in client.runs(status="pending")} == {"b", "c"}
    client.close("a")
    wait_status(client, "b", "running")
    assert client.record("c").status.value == "pending"  # type: ignore[union-attr]


def test_ended_records_expire_after_retention(start_worker, client: Client, redis_url, ns):
    start_worker("local", retention_s=1)
    client.open("t")
    client.call("t", "bash", {"command": "true"})
    client.close("t")
    wait_status(client, "t", "completed")
    r = redis_client(redis_url)
    deadline = time.monotonic() + 10
    while r.exists(Keys(ns).traj("t")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not r.exists(Keys(ns).traj("t"))
    assert client.runs() == []  # the listing forgets expired records


def test_runs_and_show_cli(start_worker, client: Client, redis_url, ns):
    start_worker("local")
    client.open("s1", {"labels": {"exp": "x"}})
    client.call("s1", "bash", {"command": "echo shown"})
    env = {"TOOLQ_REDIS_URL": redis_url, "TOOLQ_NAMESPACE": ns, "PATH": "/usr/bin:/bin"}
    cli = [sys.executable, "-m", "toolq.producer.cli"]
    listed = subprocess.run(
        [*cli, "runs", "--label", "exp=x"], env=env, capture_output=True, text=True, check=True
    )
    assert "s1" in listed.stdout and "running" in listed.stdout
    import json

    shown = subprocess.run(
        [*cli, "show", "s1"], env=env, capture_output=True, text=True, check=True
    )
    doc = json.loads(shown.stdout)
    assert doc["status"] == "running" and doc["last_calls"][0]["output"] == "shown\n"
    assert subprocess.run([*cli, "show", "nope"], env=env, capture_output=True).returncode == 1


def test_calls_to_an_unopened_trajectory_get_an_error(start_worker, client: Client):
    start_worker("local")
    call_id = client.submit("never-opened", "bash", {"command": "true"})
    r = client.result("never-opened", call_id, timeout_s=5)
    assert r.error_code == "bad_request" and "not open" in (r.error or "")


def test_an_invalid_spec_fails_the_trajectory_and_answers_its_calls(
    start_worker, client: Client, redis_url, ns
):
    from toolq.schemas import lua

    keys = Keys(ns)
    r = redis_client(redis_url)
    # what a client in another language might send: a record, then a bad spec
    bad_spec = '{"limits": {"memory_mb": "lots"}}'
    r.eval(lua.OPEN, 1, keys.traj("bad"), "bad", int(time.time() * 1000), bad_spec, 0)
    queued = client.submit("bad", "bash", {"command": "true"})
    r.xadd(keys.open, {"v": "1", "traj": "bad", "spec": bad_spec})
    start_worker("local")
    wait_status(client, "bad", "failed")
    rec = client.record("bad")
    assert rec is not None and "bad open request" in (rec.reason or "")
    assert client.result("bad", queued, timeout_s=10).error_code == "trajectory_ended"
    dead = r.xrange(keys.dead)
    assert len(dead) == 1 and json.loads(dead[0][1][b"fields"])["traj"] == "bad"
