"""Forks through Redis (issue 31): copies land on the worker that holds the
snapshot and copy its files in-host; identical (sha256) and isolated copies on
the Docker engine; the Redis path when that worker is full; a source worker
killed mid-fork leaves every copy answered exactly once; the cap refuses a fork
before any copy opens."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import threading

import pytest

from tests.conftest import TEST_IMAGE, TEST_RUNTIME, require_docker
from tests.helpers import wait_for, worker_process
from toolq.producer import Client, SnapshotFailed, TrajectoryEnded
from toolq.schemas import ErrorCode
from toolq.worker.backends.docker_box import safe_name

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
    # The pack came past the engine; gVisor keeps a host pipe to itself: the stream.
    assert taken.data["sent_via"] == ("stream" if TEST_RUNTIME == "runsc" else "pipe")
    for copy in copies:
        assert sh(client, copy, DIGEST) == digest  # identical, every file
        assert sh(client, copy, "readlink repo/link") == "a/f1.bin\n"
        record = client.record(copy)
        assert record and record.copied_via == "host", record
        assert record.owner == worker.settings.worker_id
    for copy in copies:  # each writes; nobody else sees it
        sh(client, copy, f"echo {copy} > repo/b/t1.txt && echo mine > {copy}.only")
    for copy in copies:
        # (no `ls`: coreutils 9's fails under Debian's gVisor, README.md)
        assert sh(client, copy, "cat repo/b/t1.txt; echo *.only") == f"{copy}\n{copy}.only\n"
    assert sh(client, "src", "cat repo/b/t1.txt; echo *.only") == "line1\n*.only\n"
    sandboxes = {r.sandbox for r in (client.record(c) for c in copies) if r}
    assert len(sandboxes) == len(copies)  # a container each (one slot per container)
    # The files came through the copy's own read-only directory, emptied since.
    seen = "find /opt/toolq/in -mindepth 1 | wc -l; "
    seen += "touch /opt/toolq/in/x 2>/dev/null || echo read-only"
    assert sh(client, copies[0], seen) == "0\nread-only\n"
    assert worker.worker and worker.worker.backend.engine.exchange is not None  # not given up
    assert sh(client, "src", "find /opt/toolq/in -mindepth 1 | wc -l") == "0\n"  # pipe gone
    base = worker.worker.backend.engine.exchange.base
    assert not [n for n in os.listdir(base) if n.endswith(".part")], os.listdir(base)
    for traj in ["src", *copies]:
        client.close(traj)


# In the source: wait for a fork's pack pipe and write into it first (a
# non-blocking open: a pipe gone meanwhile must not block the writer for good).
# "hold": keep it open; "first": a gzip bomb, let go once the agent's tar runs.
INTO_THE_PIPE = """python3 - <<'EOF'
import gzip, os, sys, time
bomb = gzip.compress(bytes(64 << 20))
def tar_runs():
    for pid in os.listdir("/proc"):
        try:
            if open("/proc/%s/comm" % pid).read().strip() == "tar":
                return True
        except OSError:
            pass
while True:
    for name in os.listdir("/opt/toolq/in"):
        try:
            fd = os.open("/opt/toolq/in/" + name, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue
        os.set_blocking(fd, True)
        os.write(fd, bomb if MODE == "first" else b"junk")
        while MODE == "first" and not tar_runs():
            time.sleep(0.001)
        if MODE == "first":
            os.close(fd)
        open("held", "w").close()
        time.sleep(600)
    time.sleep(0.001)
EOF"""
SPOILED = {"hold": "still open", "first": "not a plain tar"}


@pytest.mark.parametrize("mode", ["hold", "first"])
def test_sandbox_code_writing_into_the_pack_pipe_fails_its_fork_cleanly(
    start_worker, client: Client, mode
):
    """A process in the source that holds the pipe, or writes a gzip bomb ahead of
    tar's archive: the fork fails with internal_error (nothing gunzipped, no copy
    opened), another trajectory's fork meanwhile is whole, the worker goes on."""
    require_docker()
    if TEST_RUNTIME == "runsc":
        pytest.skip("gVisor does not pass a host pipe through: its forks use the stream")
    start_worker("docker", slots=8)
    for traj in ("src", "bystander"):
        client.open(traj)
        sh(client, traj, "head -c 30000000 /dev/urandom > big.bin && " + SEED)
    digest, theirs = sh(client, "src", DIGEST), sh(client, "bystander", DIGEST)
    writer = INTO_THE_PIPE.replace("MODE", repr(mode))
    ok(client.call("src", "bg_start", {"command": writer, "name": "writer"}))
    for attempt in range(5):  # the writer must open the pipe before tar ends
        copies = [f"h{attempt}-{i}" for i in range(2)]
        try:
            client.fork("src", copies)
        except SnapshotFailed as exc:
            result = exc.result
            assert result.error_code == "internal_error", result
            assert SPOILED[mode] in (result.error or ""), result
            assert all(client.record(c) is None for c in copies)  # no copy opened
            break
        for copy in copies:  # it missed (an ordinary fork), or wrote midway through tar's
            try:
                got = client.call(copy, "bash", {"command": "rm -f held; " + DIGEST})
            except TrajectoryEnded:  # a spoiled archive: the copy's start failed, once
                continue
            assert got.output == digest if got.ok else got.error_code != "internal_error", got
            client.close(copy)
    else:
        out = client.call("src", "bg_list", {}).output
        pytest.fail(f"the writer never caught the pipe: {out}")
    ok(client.fork("bystander", ["b1"]))  # not the source's: untouched
    assert sh(client, "b1", DIGEST) == theirs
    assert sh(client, "src", "cat big.bin | wc -c") == "30000000\n"  # the source goes on
    tasks = ok(client.call("src", "bg_list", {})).data or {}
    for task in tasks.get("tasks", []):
        ok(client.call("src", "bg_stop", {"task_id": task["task_id"], "force": True}))
    sh(client, "src", "rm -f held")
    taken = ok(client.fork("src", ["after"]))  # the next fork is whole
    assert taken.data and taken.data["sent_via"] == "pipe"
    assert sh(client, "after", DIGEST) == digest
    for traj in ["src", "after", "bystander", "b1"]:
        client.close(traj)


def test_a_fork_whose_plain_tar_passes_the_cap_takes_a_tar_gz(start_worker, client: Client):
    """Over the cap as a plain tar, within it gzipped: packed into memory and
    compressed (not through the pipe), the copies whole."""
    require_docker()
    start_worker("docker", snapshot_max_bytes=1_000_000)
    client.open("zeros")
    sh(client, "zeros", "head -c 1500000 /dev/zero > zeros.bin && " + SEED)
    digest = sh(client, "zeros", DIGEST)
    taken = ok(client.fork("zeros", ["z1"]))
    assert taken.data and taken.data["sent_via"] == "stream", taken.data
    assert taken.data["bytes"] < 1_000_000 < taken.data["uncompressed_bytes"]
    assert sh(client, "z1", DIGEST) == digest
    for traj in ("zeros", "z1"):
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
    # The other worker reads the files from Redis (then, for a copy that opens
    # after that read, from its own memory).
    assert len(elsewhere) == 2 and "redis" in elsewhere and set(elsewhere) <= {"host", "redis"}
    for traj in ["src", *copies]:
        client.close(traj)


@pytest.mark.parametrize(
    ("backend_name", "when"), [("local", "mid-fork"), ("docker", "mid-fork"), ("local", "written")]
)
def test_source_worker_killed_mid_fork_answers_every_copy_once(
    start_worker, client: Client, redis_url: str, ns: str, tmp_path, backend_name, when
):
    """Killed as it opens the copies (a fork's snapshot reaches Redis after them: the
    copies may all fail, each once, with a clear code), or once the snapshot is in
    Redis (every copy opens on the survivor)."""
    extra = ["--slots", "3"]
    if backend_name == "docker":
        require_docker()
        extra += ["--backend", "docker", "--image", TEST_IMAGE]  # the last --backend wins
    dying = worker_process(redis_url, ns, "dying", *extra, log_dir=str(tmp_path))
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
        start_worker(backend_name, slots=8, heartbeat_s=0.3, dead_after_s=2)
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
        if when == "written":
            wait_for(client.snapshots, what="the fork's snapshot written to Redis")
        dying.send_signal(signal.SIGKILL)
        dying.wait()
        forking.join(120)
        assert not forking.is_alive() and not errors, errors
    finally:
        if dying.poll() is None:
            dying.kill()
    answered = {}
    for copy in copies:  # every copy opened from the snapshot, on the survivor
        try:
            submitted = client.submit(copy, "read_file", {"path": "d.bin", "encoding": "base64"})
        except TrajectoryEnded as ended:  # its start failed already (its snapshot is gone)
            assert "not found" in str(ended) and when == "mid-fork", ended
            continue
        result = client.result(copy, submitted, wait_s=120)
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
    if when == "written":
        assert len(answered) == len(copies) and all(r.ok for r in answered.values()), answered
    for traj in ["src", *copies]:
        with contextlib.suppress(TrajectoryEnded):  # a copy whose start failed has ended
            client.close(traj)
    if backend_name == "docker":  # what the killed worker left in the exchange goes
        survivor = start_worker("docker")
        exchange = survivor.worker and survivor.worker.backend.engine.exchange
        assert exchange is not None
        left = os.path.join(exchange.root, safe_name(f"{ns}-dying"))
        assert not os.path.exists(left), os.listdir(exchange.root)


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
