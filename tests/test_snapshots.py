"""Snapshots and forks through Redis, on both backends: independent copies of a
workspace and its spec, running processes not copied, caps, TTLs, listing and
deletion, opening on another worker, and metrics."""

from __future__ import annotations

import asyncio
import base64
import os
import urllib.request

import pytest
from pydantic import ValidationError

from tests.helpers import redis_client, wait_for
from toolq.producer import Client, SnapshotFailed, WaitTimeout
from toolq.schemas import Keys


def ok(result):
    assert result.ok, result
    return result


def sh(client: Client, traj: str, command: str) -> str:
    return ok(client.call(traj, "bash", {"command": command})).output


SEED = (
    "mkdir -p repo/pkg && printf 'v1\\n' > repo/pkg/mod.py && "
    "printf '#!/bin/sh\\necho run\\n' > repo/run.sh && chmod 750 repo/run.sh && "
    "ln -s pkg/mod.py repo/link.py && mkdir -p empty/dir"
)


def seed(client: Client, traj: str) -> bytes:
    blob = os.urandom(50_000)
    sh(client, traj, SEED)
    content = base64.b64encode(blob).decode()
    args = {"path": "repo/blob.bin", "content": content, "encoding": "base64"}
    ok(client.call(traj, "write_file", args))
    return blob


def test_fork_copies_are_independent_of_each_other_and_the_source(
    backend, start_worker, client: Client
):
    start_worker(backend)
    client.open("src", {"env": {"STAGE": "prepared"}, "labels": {"task": "t1"}})
    blob = seed(client, "src")
    taken = client.fork("src", ["f1", "f2", "f3"], {"labels": {"rollout": "yes"}})
    assert taken.ok and taken.data and taken.data["entries"] >= 7, taken
    ok(client.call("src", "write_file", {"path": "repo/after.txt", "content": "source only"}))
    for fork in ("f1", "f2", "f3"):
        got = client.call(fork, "read_file", {"path": "repo/blob.bin", "encoding": "base64"})
        assert base64.b64decode(ok(got).output) == blob
        listing = sh(
            client, fork, "cat repo/link.py; stat -c %a repo/run.sh; readlink repo/link.py"
        )
        assert listing.split() == ["v1", "750", "pkg/mod.py"]
        assert sh(client, fork, "echo $STAGE; test -d empty/dir && echo dir").split() == [
            "prepared",
            "dir",
        ]
        assert (
            sh(client, fork, "ls repo/after.txt 2>&1 || true")
            .strip()
            .endswith("No such file or directory")
        )
        ok(client.call(fork, "write_file", {"path": "repo/pkg/mod.py", "content": fork}))
    for fork in ("f1", "f2", "f3"):  # each sees only its own write
        assert ok(client.call(fork, "read_file", {"path": "repo/pkg/mod.py"})).output == fork
        record = client.record(fork)
        assert record and record.spec and record.spec.labels == {"task": "t1", "rollout": "yes"}
        assert record.spec.env == {"STAGE": "prepared"} and record.spec.snapshot
    assert ok(client.call("src", "read_file", {"path": "repo/pkg/mod.py"})).output == "v1\n"
    for traj in ("src", "f1", "f2", "f3"):
        client.close(traj)


def test_running_processes_are_not_copied(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("src")
    started = client.call(
        "src", "bg_start", {"command": "while true; do date >> tick; sleep 0.2; done"}
    )
    task_id = ok(started).data["task_id"]  # type: ignore[index]
    wait_for(lambda: "tick" in sh(client, "src", "ls"), what="the task writes")
    assert ok(client.snapshot("src", "busy")).data["name"] == "busy"  # type: ignore[index]
    client.open("copy", {"snapshot": "busy"})
    assert "tick" in sh(client, "copy", "ls")
    assert ok(client.call("copy", "bg_list")).data["tasks"] == []  # type: ignore[index]
    size = int(sh(client, "copy", "wc -c < tick"))
    wait_for(lambda: int(sh(client, "src", "wc -c < tick")) > size, what="source still running")
    assert int(sh(client, "copy", "wc -c < tick")) == size  # nothing writes in the copy
    assert ok(client.call("src", "bg_output", {"task_id": task_id})).data["status"] == "running"  # type: ignore[index]
    client.cancel("src")
    client.close("copy")


def test_open_from_a_missing_snapshot_fails_with_its_code(start_worker, client: Client):
    start_worker("local")
    client.open("lost", {"snapshot": "never-taken"})
    result = client.call("lost", "bash", {"command": "echo hi"})
    # Answered by the failed start, or (when it came later) as a call of an ended trajectory.
    assert not result.ok and result.error_code in ("snapshot_not_found", "trajectory_ended")
    assert "snapshot 'never-taken' not found" in (result.error or ""), result
    record = wait_for(lambda: (r := client.record("lost")) and r.status.final and r, what="end")
    assert record.status.value == "failed" and "never-taken" in (record.reason or "")


def test_forks_at_once_on_one_worker(start_worker, aclient_factory):
    """Forks of several sources at once on one worker: each fork's copies get their
    own source's files (from the worker's memory before they are in Redis)."""
    start_worker("local", slots=24)
    sources = [f"src{i}" for i in range(4)]

    async def run() -> dict[str, str]:
        async with aclient_factory() as client:
            for src in sources:
                await client.open(src)
                wrote = await client.call(src, "write_file", {"path": "who", "content": src})
                assert wrote.ok, wrote
            copies = {src: [f"{src}-c{i}" for i in range(3)] for src in sources}
            await asyncio.gather(*(client.fork(src, copies[src]) for src in sources))
            found = {}
            for mine in copies.values():
                for copy in mine:
                    read = await client.call(copy, "read_file", {"path": "who"})
                    found[copy] = read.output if read.ok else f"{read.error_code}: {read.error}"
            return found

    found = asyncio.run(run())
    assert found == {copy: copy.split("-")[0] for copy in found} and len(found) == 12, found


def test_a_fork_snapshot_deleted_while_written_stays_deleted(
    start_worker, client: Client, redis_url: str, ns: str
):
    """A fork's snapshot is written to Redis after the fork returns: deleted before
    that, it is not written back (its marker goes with the delete)."""
    start_worker("local")
    client.open("src")
    sh(client, "src", "echo x > f")
    name = str((ok(client.fork("src", ["d0", "d1"])).data or {})["name"])
    assert client.delete_snapshot(name)  # the marker at least: the write is pending
    raw, keys = redis_client(redis_url), Keys(ns)
    wait_for(lambda: not raw.exists(keys.snapshot_writing(name)), what="the write over")
    assert client.snapshots() == [] and not raw.exists(keys.snapshot_data(name))
    assert raw.hget(keys.snapshots, name) is None
    assert sh(client, "d1", "cat f") == "x\n"  # the copies have their files all the same
    for traj in ("src", "d0", "d1"):
        client.close(traj)


def test_an_open_waits_for_a_snapshot_still_being_written(
    start_worker, client: Client, redis_url: str, ns: str
):
    """A fork's snapshot reaches Redis after its result; while its worker writes it
    (the marker), an open elsewhere waits for it, and fails once the marker lapses
    without it (its worker died)."""
    start_worker("local")
    client.open("src")
    sh(client, "src", "echo late > note")
    ok(client.snapshot("src", "base"))
    raw, keys = redis_client(redis_url), Keys(ns)
    raw.set(keys.snapshot_writing("late"), 1, px=120_000)  # a worker writing "late"
    client.open("copy", {"snapshot": "late"})
    waiting = client.submit("copy", "bash", {"command": "cat note"})
    wait_for(lambda: (r := client.record("copy")) and r.owner, what="the copy claimed")
    with pytest.raises(WaitTimeout):  # no answer while it waits
        client.result("copy", waiting, wait_s=0.5)
    # Written as a worker writes it: the files, the index entry, then no marker.
    raw.set(keys.snapshot_data("late"), raw.get(keys.snapshot_data("base")))
    index = raw.hget(keys.snapshots, "base").replace(b'"name":"base"', b'"name":"late"')
    raw.hset(keys.snapshots, "late", index)
    raw.delete(keys.snapshot_writing("late"))
    assert ok(client.result("copy", waiting, wait_s=60)).output == "late\n"
    raw.set(keys.snapshot_writing("never"), 1, px=1500)  # its worker died mid-write
    client.open("orphan", {"snapshot": "never"})
    failed = client.call("orphan", "bash", {"command": "true"}, wait_s=60)
    assert not failed.ok and failed.error_code in ("snapshot_not_found", "trajectory_ended")
    assert "snapshot 'never' not found" in (failed.error or ""), failed
    for traj in ("src", "copy"):
        client.close(traj)


def test_cap_bad_names_and_the_trajectory_goes_on(
    start_worker, client: Client, redis_url: str, ns: str
):
    start_worker("local", snapshot_max_bytes=20_000)
    client.open("big")
    sh(client, "big", "head -c 100000 /dev/urandom > noise")
    over = client.snapshot("big", "too-big")
    assert not over.ok and over.error_code == "limit_exceeded" and "20000" in (over.error or "")
    assert client.snapshots() == []
    with pytest.raises(SnapshotFailed):
        client.fork("big", ["never-opened"])
    assert client.record("never-opened") is None
    with pytest.raises(ValidationError):  # the client checks before sending
        client.snapshot("big", "ok-name", ttl_s=-1)
    raw = redis_client(redis_url)  # another language's producer, unchecked
    entry = {"type": "snapshot", "args": '{"name": "../up"}', "call_id": "bad-name"}
    raw.xadd(Keys(ns).calls("big"), entry)
    bad = client.result("big", "bad-name")
    assert not bad.ok and bad.error_code == "invalid_args" and "name" in (bad.error or "")
    raw = client.submit("big", "bash", {"command": "true"})  # the stream is still served
    assert client.result("big", raw).ok
    client.close("big")


def test_list_ttl_delete_and_metrics(start_worker, client: Client):
    handle = start_worker("local", metrics_port=0, metrics_host="127.0.0.1")
    client.open("s")
    sh(client, "s", "echo hello > a.txt")
    kept = ok(client.snapshot("s", "kept"))
    ok(client.snapshot("s", "brief", ttl_s=1))
    names = [info.name for info in client.snapshots()]
    assert "kept" in names
    info = next(i for i in client.snapshots() if i.name == "kept")
    assert info.source == "s" and info.bytes == kept.data["bytes"] > 0  # type: ignore[index]
    wait_for(lambda: "brief" not in [i.name for i in client.snapshots()], what="brief expires")
    port = wait_for(lambda: handle.worker.observer.port, what="metrics port")

    def gauge(name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        lines = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
        return float(lines[0].split()[1]) if lines else -1.0

    wait_for(lambda: gauge("toolq_snapshots") == 1, what="one snapshot counted")
    assert gauge("toolq_snapshot_bytes") == info.bytes
    assert client.delete_snapshot("kept") and not client.delete_snapshot("kept")
    assert client.snapshots() == []
    client.open("late", {"snapshot": "kept"})
    gone = client.call("late", "bash", {"command": "true"})
    assert gone.error_code in ("snapshot_not_found", "trajectory_ended")
    assert "snapshot 'kept' not found" in (gone.error or "")
    client.close("s")


def test_a_snapshot_opens_on_another_worker(start_worker, client: Client):
    first = start_worker("local")
    client.open("a")
    sh(client, "a", "echo from-a > note")
    ok(client.snapshot("a", "travels"))
    client.close("a")
    first.stop()
    start_worker("local")
    client.open("b", {"snapshot": "travels"})
    assert sh(client, "b", "cat note") == "from-a\n"
    client.close("b")


def test_packed_slots_get_separate_copies(start_worker, client: Client, ns, docker_namespaces):
    docker_namespaces.add(ns)  # no container may be left behind
    start_worker("docker", slots_per_container=4)
    client.open("p0")
    sh(client, "p0", "echo base > f")
    client.fork("p0", ["p1", "p2"])
    for traj in ("p1", "p2"):
        sh(client, traj, f"echo {traj} >> f")
    assert sh(client, "p1", "cat f").split() == ["base", "p1"]
    assert sh(client, "p2", "cat f").split() == ["base", "p2"]
    assert sh(client, "p0", "cat f").split() == ["base"]
    records = [client.record(t) for t in ("p0", "p1", "p2")]
    assert len({r.sandbox for r in records if r}) == 1  # one container serves all three


@pytest.mark.redis_kinds("single", "cluster")
def test_async_fork_on_one_redis_and_a_cluster(start_worker, aclient_factory, redis_kind):
    start_worker("local")

    async def run() -> list[str]:
        async with aclient_factory() as client:
            async with client.trajectory("src") as src:
                await src.call("write_file", {"path": "seed.txt", "content": redis_kind})
                copies = await src.fork([f"copy-{i}" for i in range(4)])
            # A fork's snapshot is written to Redis after its result (off the copies' path)
            for _ in range(600):
                names = [info.name for info in await client.snapshots()]
                if names:
                    break
                await asyncio.sleep(0.05)
            assert len(names) == 1 and names[0].startswith("src.fork-")
            outputs = []
            for copy in copies:
                async with copy:
                    read = await copy.call("read_file", {"path": "seed.txt"})
                    outputs.append(read.output)
            return outputs

    assert asyncio.run(run()) == [redis_kind] * 4


def test_snapshots_survive_a_redis_restart_and_opens_ride_it_out(aof_redis, aof_worker, ns):
    with Client(aof_redis.url, ns) as client:
        client.open("src")
        sh(client, "src", "seq 1 1000 > numbers")
        ok(client.snapshot("src", "durable"))
        aof_redis.restart(down_s=0.5)  # the snapshot comes back from the AOF
        for i in range(4):
            client.open(f"copy-{i}", {"snapshot": "durable"})
        aof_redis.restart(down_s=0.5)  # while the copies open and fill
        for i in range(4):
            assert sh(client, f"copy-{i}", "tail -1 numbers") == "1000\n"
        assert [s.name for s in client.snapshots()] == ["durable"]


def test_the_snapshot_and_fork_commands(start_worker, client: Client, redis_url: str, ns: str):
    import json
    import subprocess
    import sys

    def toolq(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "toolq.producer.cli", "--redis-url", redis_url]
        return subprocess.run(
            [*cmd, "--namespace", ns, *args], capture_output=True, text=True, timeout=120
        )

    start_worker("local")
    client.open("src")
    sh(client, "src", "echo cli > note")
    took = toolq("snapshot", "take", "src", "by-cli", "--ttl", "600")
    assert took.returncode == 0, took.stderr
    assert json.loads(took.stdout)["data"]["name"] == "by-cli"
    listed = toolq("snapshot", "ls", "--json")
    assert [json.loads(line)["name"] for line in listed.stdout.splitlines()] == ["by-cli"]
    assert "by-cli" in toolq("snapshot", "ls").stdout
    forked = toolq("fork", "src", "c1", "c2", "--spec", '{"labels": {"k": "v"}}')
    assert forked.returncode == 0, forked.stderr
    assert json.loads(forked.stdout)["opened"] == ["c1", "c2"]
    assert sh(client, "c2", "cat note") == "cli\n"
    again = toolq("fork", "src", "c1")  # c1 exists: refused before anything is done
    assert again.returncode == 1 and "c1" in again.stderr
    refused = toolq("snapshot", "take", "src", "bad/name")
    assert refused.returncode == 2, refused
    assert toolq("snapshot", "rm", "by-cli").returncode == 0
    gone = toolq("snapshot", "rm", "by-cli")
    assert gone.returncode == 1 and "by-cli" in gone.stderr
