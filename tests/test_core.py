"""Core tool calls through Redis, on every backend (Docker ones need the engine)."""

from __future__ import annotations

import base64
import time

import pytest

from tests.helpers import redis_client, unique_sleep
from toolq.producer import Client
from toolq.schemas import Keys

pytestmark = pytest.mark.redis_kinds("single", "cluster")


def test_echo_round_trip(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t1")
    r = client.call("t1", "bash", {"command": "echo hi"})
    assert r.ok, r
    assert r.output == "hi\n"
    assert r.exit_code == 0
    assert r.traj == "t1" and r.tool == "bash"
    assert r.worker and r.slot
    assert r.run_ms > 0


def test_files_persist_within_and_are_private_across_trajectories(
    backend, start_worker, client: Client
):
    start_worker(backend)
    client.open("a")
    client.open("b")
    assert client.call("a", "write_file", {"path": "notes/x.txt", "content": "alpha"}).ok
    assert client.call("a", "bash", {"command": "cat notes/x.txt"}).output == "alpha"
    r = client.call("a", "read_file", {"path": "notes/x.txt"})
    assert r.ok and r.output == "alpha" and r.data and r.data["size"] == 5
    other = client.call("b", "read_file", {"path": "notes/x.txt"})
    assert not other.ok and other.error_code == "not_found"
    assert client.call("b", "bash", {"command": "ls notes"}).exit_code != 0


def test_nonzero_exit_is_a_failed_result(backend, start_worker, client: Client):
    start_worker(backend)
    r = (
        client.call("t", "bash", {"command": "echo out; echo err >&2; exit 3"})
        if client.open("t")
        else None
    )
    assert r is not None
    assert not r.ok and r.exit_code == 3 and r.error_code == "exit_status"
    assert "out" in r.output and "err" in r.output


def test_timeout_kills_the_group_and_keeps_partial_output(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    nap = unique_sleep()  # no other process on this machine sleeps this long
    r = client.call(
        "t",
        "bash",
        {"command": f"echo before; (sleep {nap}; echo child) & sleep {nap}", "timeout_s": 1},
    )
    assert not r.ok and r.timed_out and r.error_code == "timeout"
    assert r.output == "before\n"
    # the background child died with its group: nothing is left sleeping
    ps = client.call("t", "bash", {"command": f"ps -eo args | grep -c '^sleep {nap}' || true"})
    assert ps.output.strip() == "0", ps.output


def test_output_flood_is_capped_with_head_and_tail(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t", {"limits": {"max_output_bytes": 4096}})
    r = client.call(
        "t",
        "bash",
        {"command": "echo START; head -c 5000000 /dev/zero | tr '\\0' x; echo; echo END"},
    )
    assert r.ok and r.truncated
    assert r.output_bytes == 5000000 + len("START\n") + 1 + len("END\n")
    assert r.output.startswith("START\n") and r.output.endswith("END\n")
    assert len(r.output) < 4096 + 100
    assert "bytes omitted" in r.output


def test_paths_cannot_escape_the_workspace(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    for path in ("../outside.txt", "/etc/passwd", "a/../../x"):
        r = client.call("t", "read_file", {"path": path})
        assert r.error_code == "path_outside_workspace", (path, r)
        w = client.call("t", "write_file", {"path": path, "content": "x"})
        assert w.error_code == "path_outside_workspace", (path, w)
    assert client.call("t", "bash", {"command": "ln -s / root_link && ln -s .. up"}).ok
    assert (
        client.call("t", "read_file", {"path": "root_link/etc/passwd"}).error_code
        == "path_outside_workspace"
    )
    assert (
        client.call("t", "write_file", {"path": "up/evil", "content": "x"}).error_code
        == "path_outside_workspace"
    )


def test_binary_round_trip_and_sha256(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    blob = bytes(range(256)) * 40
    w = client.call(
        "t",
        "write_file",
        {"path": "b.bin", "content": base64.b64encode(blob).decode(), "encoding": "base64"},
    )
    assert w.ok, w
    r = client.call("t", "read_file", {"path": "b.bin", "encoding": "base64", "sha256": True})
    assert r.ok and base64.b64decode(r.output) == blob
    import hashlib

    assert r.data and r.data["sha256"] == hashlib.sha256(blob).hexdigest()


def test_unknown_tool_and_bad_args_get_errors_and_worker_keeps_serving(
    start_worker, client: Client
):
    start_worker("local")
    client.open("t")
    assert client.call("t", "no_such_tool", {}).error_code == "unknown_tool"
    bad = client.call("t", "bash", {"cmd": "ls"})
    assert bad.error_code == "invalid_args" and "command" in (bad.error or "")
    wrong_type = client.call("t", "bash", {"command": 42})
    assert wrong_type.error_code == "invalid_args"
    assert client.call("t", "terminal", {"command": "echo alias"}).output == "alias\n"


def test_garbage_entries_get_error_results_or_dead_letters(
    start_worker, client: Client, redis_url: str, ns: str
):
    start_worker("local")
    keys = Keys(ns)
    r = redis_client(redis_url)
    client.open("t")
    client.call("t", "bash", {"command": "true"})  # trajectory is live
    junk_ids = [
        r.xadd(keys.calls("t"), {"tool": "bash", "args": "{not json"}).decode(),
        r.xadd(keys.calls("t"), {"tool": "bash", "args": "[1,2]"}).decode(),
        r.xadd(keys.calls("t"), {"\xff\xfe": b"\x00\x01binary"}).decode(),
        r.xadd(keys.calls("t"), {"type": "explode"}).decode(),
        r.xadd(keys.calls("t"), {"v": "99", "tool": "bash", "args": "{}"}).decode(),
        r.xadd(keys.calls("t"), {"tool": "bash", "call_id": "bad id{}"}).decode(),
    ]
    codes = [client.result("t", i, timeout_s=20).error_code for i in junk_ids]
    assert codes == [
        "invalid_args",  # args the model should hear about
        "invalid_args",
        "bad_request",
        "bad_request",
        "unsupported_version",
        "bad_request",
    ]
    r.xadd(keys.open, {"traj": "bad traj id!", "spec": "{}"})
    r.xadd(keys.open, {"garbage": "x"})
    deadline = time.monotonic() + 10
    while r.xlen(keys.dead) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.xlen(keys.dead) == 2
    assert client.call("t", "bash", {"command": "echo still serving"}).output == "still serving\n"


def test_close_frees_the_slot_and_later_calls_get_errors(
    backend, start_worker, client: Client, redis_url: str, ns: str
):
    handle = start_worker(backend, slots=1)
    client.open("first")
    root = client.call("first", "bash", {"command": "pwd"}).output.strip()
    client.close("first")
    late = client.submit("first", "bash", {"command": "echo late"})
    assert client.result("first", late, timeout_s=20).error_code == "trajectory_ended"
    # the only slot is free again: a second trajectory gets served
    client.open("second")
    assert client.call("second", "bash", {"command": "echo ok"}, wait_s=30).ok
    rec = client.record("first")
    assert rec is not None and rec.status.value == "completed"
    if backend == "local":
        import os

        assert not os.path.exists(root)
    assert handle.worker is not None and "first" not in handle.worker.owned


def test_idempotent_resubmission_runs_once(start_worker, client: Client):
    start_worker("local")
    client.open("t")
    a = client.call("t", "bash", {"command": "echo x >> count.txt"}, call_id="step-1")
    b = client.call("t", "bash", {"command": "echo x >> count.txt"}, call_id="step-1")
    assert a.ok and b.ok and a.finished_ms == b.finished_ms
    assert client.call("t", "bash", {"command": "wc -l < count.txt"}).output.strip() == "1"


def test_two_workers_share_trajectories_each_in_one_workspace(start_worker, client: Client):
    start_worker("local", slots=3)
    start_worker("local", slots=3)
    trajs = [f"t{i}" for i in range(6)]
    for t in trajs:
        client.open(t)
    ids = {
        t: [client.submit(t, "bash", {"command": "pwd; echo $$"}) for _ in range(4)] for t in trajs
    }
    workers = set()
    for t in trajs:
        results = [client.result(t, i, timeout_s=30) for i in ids[t]]
        assert all(r.ok for r in results)
        assert len({r.output.splitlines()[0] for r in results}) == 1  # one workspace
        assert len({(r.worker, r.slot) for r in results}) == 1  # one sticky slot
        workers.add(results[0].worker)
    assert len(workers) == 2  # capacity-aware claiming spread them


def test_async_client(start_worker, aclient_factory):
    import asyncio

    start_worker("local")

    async def main():
        async with aclient_factory() as c:
            await c.open("ta")
            results = await asyncio.gather(
                *(c.call("ta", "bash", {"command": f"echo {i}"}) for i in range(5))
            )
            await c.close("ta")
            return results

    results = asyncio.run(main())
    assert sorted(r.output for r in results) == [f"{i}\n" for i in range(5)]
