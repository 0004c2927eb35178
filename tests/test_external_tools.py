"""External tools through Redis: a real toolq worker and a real `toolq rq-worker` process.

One RQ worker (forking, like production) serves the whole module; each test
gets its own namespace and toolq worker, loaded with ``tests.fixtures_tools``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Worker as RQWorker
from rq.job import Job

from tests.helpers import wait_for
from toolq.producer import Client
from toolq.schemas import Keys
from toolq.worker.external import job_id_for

ROOT_DIR = str(Path(__file__).parent.parent)  # `tests` is a package
TOOLS = ("tests.fixtures_tools",)


@pytest.fixture(scope="module")
def rq_worker(redis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `toolq rq-worker --tools tests.fixtures_tools` subprocess; yields its log path."""
    log_path = tmp_path_factory.mktemp("rq") / "rq-worker.log"
    name = f"rqtest-{uuid.uuid4().hex[:8]}"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([ROOT_DIR, os.environ.get("PYTHONPATH", "")]),
        TOOLQ_REDIS_URL=redis_server.url,
    )
    cmd = [sys.executable, "-m", "toolq.producer.cli", "rq-worker", "--tools", TOOLS[0]]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*cmd, "--name", name], env=env, stdout=log, stderr=log)
    try:
        _wait_registered(redis.Redis.from_url(redis_server.url), name, proc, log_path)
        yield str(log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_registered(conn: redis.Redis, name: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(w.name == name for w in RQWorker.all(connection=conn)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"rq-worker exited: {log.read_text()}")
        time.sleep(0.1)
    raise AssertionError(f"rq-worker did not register: {log.read_text()}")


@pytest.fixture
def worker(rq_worker: str, start_worker: Any) -> Any:
    return start_worker("local", tools_modules=TOOLS)


@pytest.fixture
def rconn(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


def result_events(client: Client, traj: str) -> list[str]:
    """Call ids of the trajectory's result events, in order."""
    entries = client.redis.xrange(client.keys.events(traj))
    return [f[b"call_id"].decode() for _, f in entries if f.get(b"type") == b"result"]


def job_status(conn: redis.Redis, ns: str, traj: str, call_id: str) -> str | None:
    raw = conn.hget(Job.key_for(job_id_for(ns, traj, call_id)), "status")
    return raw.decode() if raw else None


def test_success_lands_like_a_sandbox_result(worker: Any, client: Client):
    client.open("t")
    sandbox = client.call("t", "bash", {"command": "echo hi"})
    r = client.call("t", "add", {"a": 2, "b": 40})
    assert r.ok, r
    assert r.data == {"sum": 42} and r.output == '{"sum": 42}'
    assert r.tool == "add" and r.traj == "t" and r.worker == sandbox.worker
    assert set(r.to_fields()) >= set(sandbox.to_fields()) - {"exit_code"}
    aliased = client.call("t", "sum_numbers", {"a": 1, "b": 1})
    assert aliased.ok and aliased.data == {"sum": 2} and aliased.tool == "add"
    text = client.call("t", "shout", {"text": "hey", "times": 2})
    assert text.ok and text.output == "HEY HEY" and text.data is None
    assert result_events(client, "t") == [sandbox.call_id, r.call_id, aliased.call_id, text.call_id]
    record = client.record("t")
    assert record is not None and record.calls_total == 4 and record.calls_failed == 0


def test_exception_is_an_error_result_with_the_message(worker: Any, client: Client):
    client.open("t")
    r = client.call("t", "fail", {"message": "boom-42"})
    assert not r.ok and r.error_code == "tool_error"
    assert r.error == "ValueError: boom-42"
    assert "Traceback" in r.output and "boom-42" in r.output
    after = client.call("t", "add", {"a": 1, "b": 2})  # the trajectory goes on
    assert after.ok
    assert result_events(client, "t") == [r.call_id, after.call_id]
    record = client.record("t")
    assert record is not None and record.calls_failed == 1


def test_timeout_is_an_error_result(worker: Any, client: Client):
    client.open("t")
    r = client.call("t", "slow", {"seconds": 30})
    assert not r.ok and r.error_code == "timeout" and r.timed_out
    assert "timed out after 1s" in (r.error or "")
    assert result_events(client, "t") == [r.call_id]


def test_retry_then_success(worker: Any, client: Client, tmp_path: Path):
    counter = tmp_path / "count"
    client.open("t")
    r = client.call("t", "flaky", {"counter_path": str(counter), "fail_times": 2})
    assert r.ok, r
    assert r.output == "succeeded on attempt 3"
    assert result_events(client, "t") == [r.call_id]  # failed attempts answer nothing


def test_retries_exhausted_report_the_last_error(worker: Any, client: Client, tmp_path: Path):
    client.open("t")
    r = client.call("t", "flaky", {"counter_path": str(tmp_path / "n"), "fail_times": 5})
    assert not r.ok and r.error_code == "tool_error"
    assert r.error == "RuntimeError: attempt 3 failed"  # 1 run + 2 retries


def test_invalid_args_are_refused_before_any_job(
    worker: Any, client: Client, rconn: redis.Redis, ns: str
):
    client.open("t")
    r = client.call("t", "add", {"a": "many", "c": 1})
    assert not r.ok and r.error_code == "invalid_args"
    assert "a: Input should be a valid integer" in (r.error or "")
    assert "b: missing" in (r.error or "")
    assert "c: not a parameter" in (r.error or "")
    assert job_status(rconn, ns, "t", r.call_id) is None  # nothing was enqueued


def test_only_registered_tools_run(worker: Any, client: Client):
    client.open("t")
    for name in ("os.system", "tests.fixtures_tools.add", "toolq.worker.external.run_tool"):
        r = client.call("t", name, {"command": "true"})
        assert not r.ok and r.error_code == "unknown_tool", name


def test_ordering_with_sandbox_calls(worker: Any, client: Client, tmp_path: Path):
    log = tmp_path / "order.log"
    client.open("t")
    # Submitted at once; the first external call pauses: a worker that did not
    # wait for it would let the bash call after it write first.
    ids = [
        client.submit("t", "append_line", {"path": str(log), "line": "1", "pause_s": 0.5}),
        client.submit("t", "bash", {"command": f"echo 2 >> {log}"}),
        client.submit("t", "append_line", {"path": str(log), "line": "3"}),
        client.submit("t", "bash", {"command": f"echo 4 >> {log}"}),
    ]
    results = [client.result("t", i) for i in ids]
    assert all(r.ok for r in results), results
    assert log.read_text() == "1\n2\n3\n4\n"
    assert result_events(client, "t") == ids


def test_waiting_does_not_block_other_trajectories(worker: Any, client: Client, tmp_path: Path):
    marker, release = tmp_path / "started", tmp_path / "release"
    client.open("a")
    client.open("b")
    blocked = client.submit("a", "block", {"marker": str(marker), "release": str(release)})
    try:
        wait_for(marker.exists, what="the external job to start")
        other = client.call("b", "bash", {"command": "echo free"}, wait_s=60)
        assert other.ok and other.output == "free\n"
        assert client.redis.exists(client.keys.result("a", blocked)) == 0
    finally:
        release.write_text("go")
    assert client.result("a", blocked).output == "released"


def test_cancel_answers_the_running_call_and_stops_the_jobs(
    worker: Any, client: Client, rconn: redis.Redis, ns: str, tmp_path: Path
):
    marker, release = tmp_path / "started", tmp_path / "release"
    client.open("a")
    client.open("b")
    running = client.submit("a", "block", {"marker": str(marker), "release": str(release)})
    try:
        wait_for(marker.exists, what="the external job to start")
        # b's job waits in the RQ queue behind a's (one RQ worker).
        queued = client.submit("b", "add", {"a": 1, "b": 2})
        wait_for(lambda: job_status(rconn, ns, "b", queued) == "queued", what="b's job queued")
        after = client.submit("b", "add", {"a": 3, "b": 4})
        client.cancel("b")
        rq = client.result("b", queued)
        assert rq.error_code == "cancelled", rq
        assert client.result("b", after).error_code == "cancelled"
        wait_for(lambda: job_status(rconn, ns, "b", queued) == "canceled", what="b's job canceled")

        client.cancel("a")
        ra = client.result("a", running)
        assert not ra.ok and ra.error_code == "cancelled"
        wait_for(lambda: job_status(rconn, ns, "a", running) == "stopped", what="a's job stopped")
    finally:
        release.write_text("go")
    assert result_events(client, "a") == [running]
    assert sorted(result_events(client, "b")) == sorted([queued, after])  # once each
    for traj in ("a", "b"):  # the answer comes first; the final state follows it
        wait_for(lambda traj=traj: _status(client, traj) == "cancelled", what=f"{traj} cancelled")


def _status(client: Client, traj: str) -> str | None:
    record = client.record(traj)
    return record.status.value if record else None


def test_external_calls_respect_the_tool_policy(worker: Any, client: Client, rconn, ns):
    client.open("t", {"blocked_tools": ["add"], "limits": {"max_calls": 2}})
    r = client.call("t", "sum_numbers", {"a": 1, "b": 2})
    assert r.error_code == "tool_blocked"
    assert job_status(rconn, ns, "t", r.call_id) is None
    assert client.call("t", "shout", {"text": "x"}).ok
    assert client.call("t", "shout", {"text": "y"}).error_code == "limit_exceeded"


def test_a_job_that_dies_without_a_callback_is_answered(worker: Any, client: Client):
    client.open("t")
    r = client.call("t", "die", {})
    # the RQ side failed, not the tool: an infrastructure code (issue 22)
    assert not r.ok and r.error_code == "external_lost"
    assert "Work-horse terminated unexpectedly" in (r.error or "")
    assert client.call("t", "add", {"a": 1, "b": 1}).ok  # and the trajectory goes on


def test_a_lost_notice_is_recovered_from_rq(
    worker: Any, client: Client, rconn: redis.Redis, ns: str, tmp_path: Path
):
    """A job whose notice goes elsewhere (e.g. to a previous owner) is still answered."""
    marker, release = tmp_path / "started", tmp_path / "release"
    client.open("t")
    call_id = client.submit("t", "block", {"marker": str(marker), "release": str(release)})
    try:
        wait_for(marker.exists, what="the external job to start")
        job = Job.fetch(job_id_for(ns, "t", call_id), connection=rconn)
        job.meta["toolq_notify"] = Keys(ns).external_done("some-other-worker")
        job.save_meta()
    finally:
        release.write_text("go")
    r = client.result("t", call_id)
    assert r.ok and r.output == "released"
    assert rconn.llen(Keys(ns).external_done("some-other-worker")) == 1
