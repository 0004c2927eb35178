"""Runs like an agent runner's: tool policies that change mid-run (policy entries),
exit tools, and results that say when the infrastructure is to blame. Through a
real Redis and real workers."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from tests.helpers import wait_for
from toolq.producer import Client, ops
from toolq.schemas import TrajectoryRecord


def record_of(client: Client, traj_id: str) -> TrajectoryRecord:
    record = client.record(traj_id)
    assert record is not None
    return record


# -------------------------------------------------------------- policies
@pytest.mark.redis_kinds("single", "cluster")
def test_a_policy_entry_changes_the_tools_between_calls(start_worker, client: Client):
    start_worker("local")
    client.open("steps", {"step": "explore", "allowed_tools": ["bash", "read_file"]})
    assert client.call("steps", "bash", {"command": "echo hi > notes"}).ok
    refused = client.call("steps", "write_file", {"path": "x", "content": "y"})
    assert refused.error_code == "tool_blocked" and "step 'explore'" in (refused.error or "")

    policy_id = client.set_policy("steps", step="edit", allowed_tools=["write_file", "read_file"])
    blocked = client.call("steps", "bash", {"command": "echo no"})
    assert blocked.error_code == "tool_blocked" and "step 'edit'" in (blocked.error or "")
    assert client.call("steps", "write_file", {"path": "x", "content": "y"}).ok

    applied = client.result("steps", policy_id)
    assert applied.ok and applied.data and applied.data["step"] == "edit"
    record = record_of(client, "steps")
    assert record.step == "edit" and record.policy is not None
    assert record.policy.allowed_tools == ["write_file", "read_file"]


def test_a_policy_changes_the_call_timeout_within_the_specs_cap(start_worker, client: Client):
    start_worker("local")
    client.open("timeouts", {"limits": {"max_call_timeout_s": 30}})
    too_long = client.set_policy("timeouts", step="x", call_timeout_s=31)
    refused = client.result("timeouts", too_long)
    assert refused.error_code == "invalid_args" and "max_call_timeout_s" in (refused.error or "")
    assert record_of(client, "timeouts").step is None  # nothing changed

    client.set_policy("timeouts", step="quick", call_timeout_s=1)
    cut = client.call("timeouts", "bash", {"command": "sleep 20"})
    assert cut.timed_out and cut.error_code == "timeout"


def test_a_policy_racing_calls_from_several_producers_splits_them_by_stream_order(
    start_worker, client: Client, redis_url: str, ns: str
):
    """Calls before the policy entry in the stream run under the old policy, calls
    after it under the new, whichever producer sent them; each runs at most once."""
    start_worker("local")
    client.open("race")
    submitted: list[ops.Submitted] = []
    lock = threading.Lock()

    policy_sent = threading.Event()

    def producer(n: int) -> None:
        with Client(redis_url, ns) as own:
            for i in range(25):
                if n < 2 and i == 10:  # two producers go on only after it: both sides get calls
                    policy_sent.wait(120)
                entry = ops.ToolCall("bash", {"command": f"echo {n}-{i} >> ran"})
                done = own._drive(ops.submit(own.keys, "race", entry))
                with lock:
                    submitted.append(done)

    threads = [threading.Thread(target=producer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(submitted) >= 20, what="calls on the way")  # then race the others
    policy = client._drive(
        ops.submit(client.keys, "race", ops.policy_entry(blocked_tools=["bash"]))
    )
    policy_sent.set()
    for thread in threads:
        thread.join()

    def entry_key(entry_id: str) -> tuple[int, int]:
        ms, seq = entry_id.split("-")
        return int(ms), int(seq)

    results = client.results([(d.traj_id, d.call_id) for d in submitted], wait_s=120)
    before = [entry_key(d.entry_id) < entry_key(policy.entry_id) for d in submitted]
    assert [r.ok for r in results] == before
    assert all(
        r.error_code == "tool_blocked" for r, b in zip(results, before, strict=True) if not b
    )
    # every call that ran, ran once: the file has one line per ok result
    client.set_policy("race", blocked_tools=[])
    lines = client.call("race", "bash", {"command": "cat ran"}).output.splitlines()
    assert 20 <= sum(before) < len(submitted)  # it did race: calls on both sides
    assert len(set(lines)) == len(lines) == sum(before)


def test_the_policy_in_force_survives_a_change_of_worker(start_worker, client: Client):
    first = start_worker("local")
    client.open("moves")
    client.set_policy("moves", step="review", blocked_tools=["bash"])
    assert client.call("moves", "bash", {"command": "true"}).error_code == "tool_blocked"
    first.stop()  # hands the trajectory back; the next worker claims it
    start_worker("local")
    again = client.call("moves", "bash", {"command": "true"}, wait_s=120)
    assert again.error_code == "tool_blocked" and "step 'review'" in (again.error or "")


# ------------------------------------------------------------ exit tools
@pytest.mark.redis_kinds("single", "cluster")
def test_an_exit_tool_ends_the_run_with_its_arguments_as_final_result(start_worker, client: Client):
    start_worker("local")
    client.open("exits", {"exit_tools": ["submit"]})
    assert client.call("exits", "bash", {"command": "echo work"}).ok
    done = client.call("exits", "submit", {"answer": 42, "notes": "done"})
    assert done.ok and done.tool == "submit"
    after = client.call("exits", "bash", {"command": "echo more"})
    assert after.error_code == "trajectory_ended"
    wait_for(lambda: record_of(client, "exits").status.value == "completed", what="the end")
    record = record_of(client, "exits")
    assert record.final_result == {"answer": 42, "notes": "done"}
    assert record.exit_tool == "submit" and record.reason == "exit tool submit called"


def test_an_exit_tool_obeys_the_tool_policy(start_worker, client: Client):
    start_worker("local")
    client.open("early", {"exit_tools": ["complete"], "blocked_tools": ["complete"]})
    refused = client.call("early", "complete", {})
    assert refused.error_code == "tool_blocked"
    assert record_of(client, "early").status.value == "running"
    client.set_policy("early", step="finish", blocked_tools=[])
    assert client.call("early", "complete", {"ok": True}).ok
    wait_for(lambda: record_of(client, "early").status.value == "completed", what="the end")


# --------------------------------------------------- infrastructure failures
def test_a_lost_sandbox_marks_results_and_the_record_infra(start_worker, client: Client):
    start_worker("local")
    client.open("infra")
    ok = client.call("infra", "bash", {"command": "echo fine"})
    assert ok.ok and not ok.infra
    failed = client.call("infra", "bash", {"command": "exit 3"})
    assert not failed.ok and not failed.infra  # the call's own failure
    assert record_of(client, "infra").calls_infra == 0

    running = client.submit("infra", "bash", {"command": "sleep 60"})
    wait_for(lambda: record_of(client, "infra").calls_in_flight == 1, what="the sleep")
    sandbox_pid = int(record_of(client, "infra").sandbox or 0)
    assert sandbox_pid > 0
    os.kill(sandbox_pid, signal.SIGKILL)
    lost = client.result("infra", running, timeout_s=120)
    assert lost.error_code == "sandbox_lost" and lost.infra
    fresh = client.call("infra", "bash", {"command": "echo again"})
    assert fresh.ok and fresh.slot_reset and fresh.infra  # ran, but in a new workspace
    record = record_of(client, "infra")
    assert record.calls_infra == 2 and record.infra_affected
