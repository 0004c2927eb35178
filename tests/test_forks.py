"""Forks through Redis (issue 31): copies land on the worker that holds the
snapshot and copy its files in-host; identical (sha256) and isolated copies on
the Docker engine; the Redis path when that worker is full; a source worker
killed mid-fork leaves every copy answered exactly once; the cap refuses a fork
before any copy opens."""

from __future__ import annotations

import base64
import os
import signal
import threading

import pytest

from tests.conftest import require_docker
from tests.helpers import wait_for, worker_process
from toolq.producer import Client, SnapshotFailed
from toolq.schemas import ErrorCode

# Every file's sha256, in name order, then one sha256 of that list.
DIGEST = "find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64"
SEED = (
    "mkdir -p repo/a repo/b && for i in $(seq 1 30); do head -c 20000 /dev/urandom > "
    "repo/a/f$i.bin; echo line$i > repo/b/t$i.txt; done && ln -s a/f1.bin repo/link"
)


def ok(result):
    assert result.ok, result
    return result


def sh(client: Client, traj: str, command: str) -> str:
    return ok(client.call(traj, "bash", {"command": command})).output


def test_copies_are_identical_isolated_and_copied_in_host(start_worker, client: Client):
    require_docker()
    worker = start_worker("docker", slots=8)
    client.open("src")
    sh(client, "src", SEED)
    digest = sh(client, "src", DIGEST)
    copies = [f"c{i}" for i in range(4)]
    taken = ok(client.fork("src", copies))
    assert taken.data and taken.data["worker"] == worker.settings.worker_id
    for copy in copies:
        assert sh(client, copy, DIGEST) == digest  # identical, every file
        assert sh(client, copy, "readlink repo/link") == "a/f1.bin\n"
        record = client.record(copy)
        assert record and record.copied_via == "host", record
        assert record.owner == worker.settings.worker_id
    for copy in copies:  # each writes; nobody else sees it
        sh(client, copy, f"echo {copy} > repo/b/t1.txt && echo mine > {copy}.only")
    for copy in copies:
        assert sh(client, copy, "cat repo/b/t1.txt; ls *.only") == f"{copy}\n{copy}.only\n"
    assert sh(client, "src", "cat repo/b/t1.txt; ls *.only 2>/dev/null | wc -l") == "line1\n0\n"
    sandboxes = {r.sandbox for r in (client.record(c) for c in copies) if r}
    assert len(sandboxes) == len(copies)  # a container each (one slot per container)
    for traj in ["src", *copies]:
        client.close(traj)


def test_copies_prefer_the_source_worker_and_overflow_through_redis(start_worker, client: Client):
    holder = start_worker("local", slots=3)
    client.open("src")
    sh(client, "src", "echo seeded > seed.txt")
    other = start_worker("local", slots=8)  # idle, with room: it still leaves them alone
    copies = [f"k{i}" for i in range(4)]
    ok(client.fork("src", copies))
    where = {}
    for copy in copies:
        assert sh(client, copy, "cat seed.txt") == "seeded\n"
        record = client.record(copy)
        assert record is not None
        where[copy] = (record.owner, record.copied_via)
    mine = holder.settings.worker_id
    on_holder = [c for c, (owner, _) in where.items() if owner == mine]
    assert len(on_holder) == 2, where  # as many as it had room for
    elsewhere = [via for owner, via in where.values() if owner != mine]
    assert all(owner in (mine, other.settings.worker_id) for owner, _ in where.values())
    assert all(via == "host" for owner, via in where.values() if owner == mine), where
    # The other worker reads the files from Redis once, then from its own memory.
    assert sorted(elsewhere) == ["host", "redis"], where
    for traj in ["src", *copies]:
        client.close(traj)


def test_source_worker_killed_mid_fork_answers_every_copy_once(
    start_worker, client: Client, redis_url: str, ns: str, tmp_path
):
    dying = worker_process(redis_url, ns, "dying", "--slots", "3", log_dir=str(tmp_path))
    try:
        client.open("src", {"labels": {"k": "v"}})
        blob = os.urandom(200_000)
        content = base64.b64encode(blob).decode()
        ok(
            client.call(
                "src", "write_file", {"path": "d.bin", "content": content, "encoding": "base64"}
            )
        )
        assert client.record("src").owner == "dying"  # type: ignore[union-attr]
        start_worker("local", slots=8, heartbeat_s=0.3, dead_after_s=2)
        copies = [f"m{i}" for i in range(5)]
        errors: list[BaseException] = []

        def fork() -> None:
            try:
                client.fork("src", copies)
            except BaseException as exc:  # looked at below
                errors.append(exc)

        forking = threading.Thread(target=fork)
        forking.start()

        def claimed_by_dying() -> bool:
            records = [client.record(c) for c in copies]
            return any(r is not None and r.owner == "dying" for r in records)

        wait_for(claimed_by_dying, what="a copy claimed by the source's worker")
        dying.send_signal(signal.SIGKILL)
        dying.wait()
        forking.join(120)
        assert not forking.is_alive() and not errors, errors
    finally:
        if dying.poll() is None:
            dying.kill()
    answered = {}
    for copy in copies:  # every copy opened from the snapshot, on the survivor
        submitted = client.submit(copy, "read_file", {"path": "d.bin", "encoding": "base64"})
        result = client.result(copy, submitted, timeout_s=120)
        answered[copy] = result
        if result.ok:
            assert base64.b64decode(result.output) == blob
        else:  # failed with a clear code, and the copy ended: nothing half-open
            assert result.error_code in {c.value for c in ErrorCode if c.value != "internal_error"}
    for copy, result in answered.items():
        record = client.record(copy)
        assert record is not None
        if result.ok:  # opened on the survivor, its one call answered once
            assert record.owner != "dying" and record.status.value == "running", record
            assert record.calls_total == 1 and record.copied_via in ("host", "redis"), record
        else:
            wait_for(lambda c=copy: client.record(c).status.final, what=f"{copy} ended")  # type: ignore[union-attr]
    assert sum(r.ok for r in answered.values()) >= 1, answered
    for traj in ["src", *copies]:
        client.close(traj)


@pytest.mark.parametrize("backend_name", ["local", "docker"])
def test_a_fork_over_the_cap_opens_no_copy(start_worker, client: Client, backend_name):
    if backend_name == "docker":
        require_docker()
    start_worker(backend_name, snapshot_max_bytes=20_000)
    client.open("big")
    sh(client, "big", "head -c 100000 /dev/urandom > noise")
    with pytest.raises(SnapshotFailed) as failed:
        client.fork("big", ["never-1", "never-2"])
    assert failed.value.result.error_code == "limit_exceeded"
    assert client.record("never-1") is None and client.record("never-2") is None
    assert client.snapshots() == []
    sh(client, "big", "true")  # the source goes on
    client.close("big")
