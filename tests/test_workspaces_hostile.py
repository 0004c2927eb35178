"""A hostile review of workspaces (issue 19): uploads, snapshots and forks
attacked through Redis with real workers.

Archives that try to leave the workspace, tar bombs, corrupt data, odd
workspaces, snapshots raced by cancels, closes and worker deaths. What must
hold: every call gets exactly one result, nothing lands outside the workspace,
the worker keeps serving. Fifteen of these found bugs when they were written
(among them directories made through a workspace symlink, a crafted hard link
through a symlink, a sub-millisecond TTL retried forever, a restore not checked
against its index, a corrupted gzip trailer accepted, a snapshot retaken in an
empty workspace after its worker died, a cancel that could not stop a pack,
workspaces nested deeper than Python recurses); all are fixed, and each test
guards its fix.
"""

from __future__ import annotations

import base64
import bz2
import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
import threading
import time
import uuid
from typing import Any

import pytest

from tests.conftest import NOPYTHON_IMAGE, require_docker
from tests.helpers import TOOLQ, redis_client, wait_for, worker_process
from tests.test_unpack import entry, link
from toolq.producer import Client, SnapshotFailed, ToolqError
from toolq.producer.snapshots import snapshot_entry
from toolq.schemas import Keys, SnapshotInfo, TrajectorySpec

Member = tuple[tarfile.TarInfo, bytes | None]


def tar_gz(*members: Member, fmt: int = tarfile.PAX_FORMAT, level: int = 9) -> bytes:
    """A tar.gz of hand-made members (any format, any gzip level)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt, compresslevel=level) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def ok(result: Any) -> Any:
    assert result.ok, result
    return result


def sh(client: Client, traj: str, command: str) -> str:
    return str(ok(client.call(traj, "bash", {"command": command})).output)


def cat(client: Client, traj: str, path: str) -> str:
    """A file's content, or what cat says when it is missing."""
    return str(client.call(traj, "bash", {"command": f"cat {path} 2>&1"}).output)


def all_answered(client: Client, redis_url: str, ns: str, traj: str) -> None:
    """Every entry submitted to ``traj`` was answered: an answered entry leaves the
    calls stream, and the record counts a result for every call the submit script
    counted (raw entries bypass that count, so at least as many)."""
    raw = redis_client(redis_url)

    def settled() -> bool:
        record = client.record(traj)
        if record is None or raw.xlen(Keys(ns).calls(traj)) != 0:
            return False
        return record.calls_total >= record.calls_submitted

    wait_for(settled, what=f"every call of {traj} answered")


def plant_snapshot(redis_url: str, ns: str, name: str, blob: bytes) -> None:
    """Store a snapshot as a worker would (files, then index entry): what anyone
    with write access to Redis can do."""
    raw, keys, now = redis_client(redis_url), Keys(ns), int(time.time() * 1000)
    info = SnapshotInfo(
        name=name,
        bytes=len(blob),
        created_ms=now,
        expires_ms=now + 600_000,
        sha256=hashlib.sha256(blob).hexdigest(),
        spec=TrajectorySpec(),
    )
    raw.set(keys.snapshot_data(name), blob, px=600_000)
    raw.hset(keys.snapshots, name, info.model_dump_json())


def submit_raw(redis_url: str, ns: str, traj: str, fields: dict[str, str]) -> None:
    """An entry as another language's producer sends it (no client-side checks)."""
    redis_client(redis_url).xadd(Keys(ns).calls(traj), fields)


# ------------------------------------------------------------------ uploads
MARK = f"toolq-hostile-{uuid.uuid4().hex[:8]}"


def _sparse_bomb() -> Member:
    info = tarfile.TarInfo("sparse.bin")  # one byte stored, a terabyte declared
    info.pax_headers = {"GNU.sparse.map": "0,1", "GNU.sparse.size": str(10**12)}
    return info, b"x"


def _pax_size_bomb() -> Member:
    info = tarfile.TarInfo("big.bin")
    info.pax_headers = {"size": str(10 * 10**12)}  # no data follows: caught at the header
    return info, None


def _pax_path(path: str) -> Member:
    info = tarfile.TarInfo("harmless.txt")
    info.pax_headers = {"path": path}
    return info, b"x"


ODD_ARCHIVES: dict[str, tuple[bytes, str]] = {
    "dot then dotdot": (tar_gz(entry(f"./../{MARK}")), "path_outside_workspace"),
    "dotdot after a dir and a dot": (tar_gz(entry(f"a/./../../{MARK}")), "path_outside_workspace"),
    "doubled slashes": (tar_gz(entry(f"a//..//..//{MARK}")), "path_outside_workspace"),
    "two leading slashes": (tar_gz(entry(f"//tmp/{MARK}")), "path_outside_workspace"),
    "PAX path climbs": (tar_gz(_pax_path(f"../../{MARK}")), "path_outside_workspace"),
    "PAX path absolute": (tar_gz(_pax_path(f"/tmp/{MARK}")), "path_outside_workspace"),
    "GNU long name climbs": (
        tar_gz(entry("a/" * 60 + "../" * 64 + MARK), fmt=tarfile.GNU_FORMAT),
        "path_outside_workspace",
    ),
    "bz2, not gzip, climbs": (
        bz2.compress(tarfile.TarInfo(f"../{MARK}").tobuf(tarfile.USTAR_FORMAT) + b"\0" * 1024),
        "path_outside_workspace",
    ),
    "sparse file declares a terabyte": (tar_gz(_sparse_bomb()), "limit_exceeded"),
    "PAX size of 10 TB": (tar_gz(_pax_size_bomb()), "limit_exceeded"),
    "truncated gzip": (tar_gz(entry("t.txt", os.urandom(4000)))[:-600], "invalid_args"),
    "a name past NAME_MAX": (tar_gz(entry("n" * 300)), "io_error"),
}


def test_odd_archives_are_refused_and_nothing_lands(start_worker, client: Client, redis_url, ns):
    start_worker("local")
    client.open("t")
    sh(client, "t", "mkdir -p in/d1/d2")
    for case, (data, code) in ODD_ARCHIVES.items():
        result = client.call("t", "unpack", {"data": b64(data), "path": "in/d1/d2"})
        assert not result.ok and result.error_code == code, (case, result)
    # Nothing was written, in the workspace or above it.
    assert sh(client, "t", "find . -mindepth 1 | sort").split() == ["./in", "./in/d1", "./in/d1/d2"]
    found = sh(
        client, "t", f"ls -d ../{MARK} ../../{MARK} /tmp/{MARK} /{MARK} 2>/dev/null; echo end"
    )
    assert found.strip() == "end"
    # The worker's own tools are not callable, and an oversized entry is refused.
    inner = client.call("t", "_snapshot_unpack", {"data": "", "max_bytes": 2**62})
    assert inner.error_code == "unknown_tool", inner
    big = json.dumps({"data": "A" * (17 * 1024 * 1024)})
    submit_raw(redis_url, ns, "t", {"tool": "unpack", "args": big, "call_id": "huge"})
    assert client.result("t", "huge").error_code == "payload_too_large"
    assert sh(client, "t", "echo alive") == "alive\n"
    all_answered(client, redis_url, ns, "t")
    client.close("t")


def test_workspace_links_at_entry_names_are_replaced_not_followed(
    start_worker, client: Client, tmp_path, redis_url, ns
):
    """A symlink or a hard link an earlier call left in the workspace, where an
    archive entry lands: the entry replaces it and nothing outside changes."""
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret").write_text("outside\n")
    (outside / "linked").write_text("outside\n")
    start_worker("local")
    client.open("t")
    sh(client, "t", f"ln -s {outside}/secret f; ln -s {outside}/dir d; ln {outside}/linked h")
    archive = tar_gz(
        entry("f", b"file over a symlink"),
        entry("d", None, type=tarfile.DIRTYPE, mode=0o755),  # a directory over a symlink
        entry("d/inner", b"in the workspace"),
        entry("h", b"file over a hard link"),
        entry("x", b"a file, then a directory of that name"),
        entry("x", None, type=tarfile.DIRTYPE, mode=0o755),
        entry("x/y", b"y"),
    )
    ok(client.call("t", "unpack", {"data": b64(archive)}))
    shown = sh(client, "t", "find . -type l | wc -l; cat f d/inner h x/y")
    assert shown.splitlines() == [
        "0",
        "file over a symlinkin the workspacefile over a hard linky",
    ]
    assert (outside / "secret").read_text() == (outside / "linked").read_text() == "outside\n"
    assert sorted(p.name for p in outside.rglob("*")) == ["dir", "linked", "secret"]
    all_answered(client, redis_url, ns, "t")
    client.close("t")


def test_unpack_creates_nothing_through_a_workspace_symlink(
    backend, start_worker, client: Client, tmp_path, ns, docker_namespaces
):
    docker_namespaces.add(ns)
    start_worker(backend)
    client.open("t")
    # Local: a directory of the test's; Docker: a directory of the container's.
    outside = str(tmp_path / "outside") if backend == "local" else f"/tmp/{MARK}"
    sh(client, "t", f"mkdir -p {outside} && ln -s {outside} s")
    archive = tar_gz(entry("s/made/by/unpack.txt", b"escaped"))
    result = client.call("t", "unpack", {"data": b64(archive)})
    assert not result.ok and result.error_code == "path_outside_workspace", result
    assert sh(client, "t", f"find {outside} -mindepth 1") == ""


# ---------------------------------------------------------------- snapshots
def test_a_crafted_snapshot_cannot_link_to_a_file_outside(
    start_worker, client: Client, tmp_path, redis_url, ns
):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("outside\n")
    crafted = tar_gz(link("s", str(outside)), link("h", "s/secret", tarfile.LNKTYPE))
    plant_snapshot(redis_url, ns, "crafted", crafted)
    start_worker("local")
    client.open("copy", {"snapshot": "crafted"})
    # Refused at the restore, or a link inside the workspace: either way, not outside.
    client.call("copy", "write_file", {"path": "h", "content": "written\n"})
    assert (outside / "secret").read_text() == "outside\n"


def test_a_crafted_snapshot_replaces_links_it_made_itself(
    start_worker, client: Client, tmp_path, redis_url, ns
):
    """Duplicate names in a snapshot: a file, then a symlink out, then the file
    again; a symlink out, then a directory of that name: the last entry wins and
    nothing is written through a link."""
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret").write_text("outside\n")
    crafted = tar_gz(
        entry("x", b"one"),
        link("x", str(outside / "secret")),
        entry("x", b"two"),
        link("d", str(outside / "dir")),
        entry("d", None, type=tarfile.DIRTYPE, mode=0o755),
        entry("d/inner", b"inside"),
    )
    plant_snapshot(redis_url, ns, "dupes", crafted)
    start_worker("local")
    client.open("copy", {"snapshot": "dupes"})
    assert sh(client, "copy", "find . -type l | wc -l; cat x d/inner").split() == ["0", "twoinside"]
    assert (outside / "secret").read_text() == "outside\n"
    assert sorted(p.name for p in outside.rglob("*")) == ["dir", "secret"]
    all_answered(client, redis_url, ns, "copy")
    client.close("copy")


def test_odd_workspace_content_survives_a_fork(start_worker, client: Client, redis_url, ns):
    """FIFOs are left out (and counted), odd names, hard links and links that
    point outside are copied as they are, never followed."""
    start_worker("local")
    client.open("src")
    sh(
        client,
        "src",
        "mkfifo pipe; printf a > $'bad\\xffname'; printf b > $'new\\nline'; "
        "printf c > ' -lead \"q\" *?'; printf d > one; ln one two; ln -s /etc/hostname abs; "
        "ln -s ../../.. up",
    )
    taken = ok(client.fork("src", ["copy"]))
    assert taken.data["skipped"] == 1 and taken.data["entries"] == 8, taken.data
    listing = "ls -A --ignore=pipe | od -An -c; cat $'bad\\xffname' $'new\\nline' ' -lead \"q\" *?'"
    assert sh(client, "copy", listing) == sh(client, "src", listing)
    shown = sh(client, "copy", "stat -c %h two; readlink abs up; test -p pipe || echo nopipe")
    assert shown.split() == ["2", "/etc/hostname", "../../..", "nopipe"]
    all_answered(client, redis_url, ns, "copy")
    for traj in ("src", "copy"):
        client.close(traj)


def test_a_socket_is_counted_as_skipped(start_worker, client: Client):
    start_worker("local")
    client.open("src")
    sh(client, "src", "python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('sock')\"")
    assert sh(client, "src", "test -S sock && echo socket") == "socket\n"
    taken = ok(client.snapshot("src", "with-socket"))
    assert taken.data["skipped"] == 1, taken.data


def test_a_sub_millisecond_ttl_is_answered(start_worker, client: Client):
    start_worker("local", shutdown_grace_s=1.0)
    client.open("src")
    sh(client, "src", "echo data > f")
    # The client accepts it (ttl_s > 0), so does the worker's SnapshotArgs.
    result = client.snapshot("src", "brief", ttl_s=0.0004, wait_s=10)
    assert result.ok or result.error_code == "invalid_args", result


def test_an_opener_can_turn_the_network_off_again(start_worker, client: Client):
    start_worker("local")
    client.open("src", {"limits": {"network": True}})
    ok(client.snapshot("src", "online"))
    client.open("copy", {"snapshot": "online", "limits": {"network": False}})
    sh(client, "copy", "true")
    record = client.record("copy")
    assert record and record.spec and record.spec.limits.network is False


def test_restore_checks_the_snapshot_against_its_index(start_worker, client: Client, redis_url, ns):
    start_worker("local")
    client.open("src")
    sh(client, "src", "echo first > f")
    ok(client.snapshot("src", "a"))
    sh(client, "src", "echo second > f")
    ok(client.snapshot("src", "b"))
    raw, keys = redis_client(redis_url), Keys(ns)
    raw.set(keys.snapshot_data("a"), raw.get(keys.snapshot_data("b")), px=600_000)
    client.open("copy", {"snapshot": "a"})
    result = client.call("copy", "bash", {"command": "cat f"})
    assert not result.ok, f"opened {result.output!r} from a snapshot whose sha256 differs"


def test_a_corrupted_upload_is_refused(start_worker, client: Client):
    start_worker("local")
    client.open("t")
    payload = b"exact bytes " * 200
    archive = bytearray(tar_gz(entry("data.txt", payload), level=0))  # stored: bytes as is
    archive[archive.index(payload) + 5] ^= 0x20  # one flipped bit, in the file's bytes
    result = client.call("t", "unpack", {"data": b64(bytes(archive))})
    assert not result.ok and result.error_code == "invalid_args", result
    assert sh(client, "t", "ls -A") == ""


def test_fork_refuses_ids_in_use(start_worker, client: Client):
    start_worker("local")
    client.open("src")
    sh(client, "src", "echo source > f")
    client.open("busy")
    sh(client, "busy", "echo other work > f")
    with pytest.raises(ToolqError):
        client.fork("src", ["busy"])


def test_a_copy_whose_workdir_is_a_symlink_opens(start_worker, client: Client):
    start_worker("local")
    client.open("src", {"workdir": "current"})
    sh(client, "src", "cd .. && mkdir v1 && echo one > v1/x && rmdir current && ln -s v1 current")
    assert sh(client, "src", "cat x") == "one\n"
    ok(client.snapshot("src", "release"))
    client.open("copy", {"snapshot": "release"})
    result = client.call("copy", "bash", {"command": "cat x"})
    assert result.ok and result.output == "one\n", result


def test_fork_after_the_source_closed_opens_nothing(start_worker, client: Client, redis_url, ns):
    start_worker("local")
    client.open("src")
    sh(client, "src", "echo data > f")
    client.close("src")  # queued before the fork's snapshot: the close wins
    with pytest.raises(SnapshotFailed) as failed:
        client.fork("src", ["never-1", "never-2"])
    assert failed.value.result.error_code == "trajectory_ended"
    assert client.record("never-1") is None and client.record("never-2") is None
    assert client.snapshots() == []
    client.open("next")
    assert sh(client, "next", "echo served") == "served\n"


def test_broken_snapshots_fail_only_their_openers(start_worker, client: Client, redis_url, ns):
    """An index entry that is not JSON, files that are gone, files that are not a
    tar.gz: each opener fails with one result per call; the worker goes on."""
    raw, keys = redis_client(redis_url), Keys(ns)
    raw.hset(keys.snapshots, "junk", "{not json")
    plant_snapshot(redis_url, ns, "garbage", os.urandom(3000))
    plant_snapshot(redis_url, ns, "no-files", tar_gz(entry("f")))
    raw.delete(keys.snapshot_data("no-files"))
    start_worker("local")
    for name in ("junk", "garbage", "no-files"):
        client.open(name, {"snapshot": name})
        calls = [client.submit(name, "bash", {"command": "echo ran"}) for _ in range(3)]
        results = [client.result(name, call_id) for call_id in calls]
        assert all(not r.ok for r in results), (name, results)
        record = wait_for(lambda n=name: (r := client.record(n)) and r.status.final and r)
        assert record.status.value == "failed", (name, record)
    assert "junk" not in [s.name for s in client.snapshots()]  # not JSON: left out
    client.open("next")
    assert sh(client, "next", "echo served") == "served\n"


def test_a_lost_sandbox_of_a_copy_whose_snapshot_is_gone(
    start_worker, client: Client, redis_url, ns
):
    start_worker("local")
    client.open("src")
    sh(client, "src", "echo data > f")
    ok(client.snapshot("src", "once"))
    client.open("copy", {"snapshot": "once"})
    assert sh(client, "copy", "cat f") == "data\n"
    assert client.delete_snapshot("once")
    record = client.record("copy")
    assert record and record.sandbox
    os.kill(int(record.sandbox), signal.SIGKILL)  # the local backend's agent process
    # The call that finds the sandbox gone (or the one after it) needs a new one,
    # filled from the snapshot: gone, so the copy fails, and says why.
    results = [client.call("copy", "bash", {"command": "cat f"}) for _ in range(2)]
    assert [r.ok for r in results] == [False, False], results
    assert "snapshot_not_found" in [r.error_code for r in results], results
    final = wait_for(lambda: (r := client.record("copy")) and r.status.final and r)
    assert final.status.value == "failed" and "once" in (final.reason or ""), final
    late = client.call("copy", "bash", {"command": "true"})
    assert late.error_code == "trajectory_ended"
    all_answered(client, redis_url, ns, "copy")


# ------------------------------------------------------- snapshots under way
#: A sparse file of 1 GiB: no disk, but packing reads (and compresses) a GiB of
#: zeros, so a snapshot of it takes seconds: time for a kill or a cancel.
SLOW_TO_PACK = "echo precious > f && truncate -s 1G sparse"


def wait_until_packing(client: Client, traj: str) -> str:
    """Until the trajectory's local agent has the sparse file open (packing it);
    returns the workspace's directory."""
    record = client.record(traj)
    assert record and record.sandbox
    fds = f"/proc/{record.sandbox}/fd"

    def sparse_open() -> str | None:
        for fd in os.listdir(fds):
            try:
                target = os.readlink(f"{fds}/{fd}")
            except FileNotFoundError:  # closed meanwhile
                continue
            if target.endswith("/sparse"):
                return os.path.dirname(target)
        return None

    return str(wait_for(sparse_open, what="the agent packs the workspace"))


def snapshot_fields(name: str, call_id: str) -> dict[str, str]:
    """A snapshot entry as the client sends it (idempotent), without waiting for it."""
    entry_ = snapshot_entry(name, None).model_copy(update={"call_id": call_id})
    return {k: str(v) for k, v in entry_.to_fields().items()}


def test_a_fork_whose_worker_dies_mid_snapshot_copies_no_empty_workspace(
    redis_url, ns, client: Client, tmp_path, monkeypatch
):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the killed worker's workspaces land here
    workers = [worker_process(redis_url, ns, "first")]
    try:
        client.open("src")
        sh(client, "src", SLOW_TO_PACK)
        forked: dict[str, Any] = {}

        def fork() -> None:
            with Client(redis_url, ns) as other:
                try:
                    forked["result"] = other.fork("src", ["copy"])
                except ToolqError as exc:
                    forked["result"] = exc

        thread = threading.Thread(target=fork)
        thread.start()
        wait_until_packing(client, "src")
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait(30)
        workers.append(worker_process(redis_url, ns, "second"))
        thread.join(120)
        outcome = forked["result"]  # refused, or taken of the files it was asked for
        assert isinstance(outcome, SnapshotFailed) or cat(client, "copy", "f") == "precious\n"
    finally:
        for proc in workers:
            proc.kill()
            proc.wait(30)


def test_a_cancel_during_a_snapshot_answers_it_cancelled(
    start_worker, client: Client, redis_url, ns
):
    start_worker("local")
    client.open("src")
    sh(client, "src", SLOW_TO_PACK)
    submit_raw(redis_url, ns, "src", snapshot_fields("mid-cancel", "snap-1"))
    wait_until_packing(client, "src")
    client.cancel("src")
    result = client.result("src", "snap-1")
    assert result.error_code == "cancelled", result
    assert "mid-cancel" not in [s.name for s in client.snapshots()]


def test_a_file_deleted_during_a_snapshot_is_left_out(start_worker, client: Client, redis_url, ns):
    start_worker("local")
    client.open("src")
    sh(client, "src", f"{SLOW_TO_PACK} && echo object > tmp.o")  # packed in name order
    submit_raw(redis_url, ns, "src", snapshot_fields("busy", "snap-1"))
    workspace = wait_until_packing(client, "src")  # the root is listed: tmp.o comes next
    os.remove(os.path.join(workspace, "tmp.o"))  # as a build cleaning up would
    result = client.result("src", "snap-1")
    assert result.ok, result


# ---------------------------------------------------------------- deep trees
def test_a_deep_workspace_is_snapshotted_or_refused_cleanly(start_worker, client: Client):
    start_worker("local")
    client.open("src")
    try:
        sh(client, "src", "mkdir -p $(printf 'a/%.0s' $(seq 1100)) && echo made")
        result = client.snapshot("src", "deep")
        assert result.ok or result.error_code == "limit_exceeded", result
    finally:  # the local backend's rmtree recurses too: remove it with rm
        sh(client, "src", "rm -rf a")
        client.close("src")


def test_a_deep_archive_is_unpacked_or_refused_cleanly(start_worker, client: Client):
    start_worker("local")
    client.open("t")
    deep = "a/" * 1500 + "leaf.txt"  # 3008 characters: under PATH_MAX
    result = client.call("t", "unpack", {"data": b64(tar_gz(entry(deep, b"leaf")))})
    try:
        assert result.ok or result.error_code == "limit_exceeded", result
    finally:
        sh(client, "t", "rm -rf a")
        client.close("t")


# -------------------------------------------------------------------- Docker
def test_docker_unreadable_files_and_another_image(
    start_worker, client: Client, ns, docker_namespaces
):
    """The agent is not root: a file of mode 000 stops the snapshot with a clear
    error (naming it); readable again, it is taken, and a copy opened with an
    image that cannot run the agent fails cleanly."""
    require_docker()
    docker_namespaces.add(ns)
    start_worker("docker")
    client.open("src")
    sh(client, "src", "echo secret > locked && chmod 000 locked && echo fine > ok.txt")
    refused = client.snapshot("src", "locked")
    assert refused.error_code == "io_error" and "locked" in (refused.error or ""), refused
    sh(client, "src", "chmod 400 locked")
    ok(client.snapshot("src", "readable"))
    client.open("elsewhere", {"snapshot": "readable", "image": NOPYTHON_IMAGE})
    lost = client.call("elsewhere", "bash", {"command": "true"})
    assert not lost.ok and lost.error_code in ("sandbox_error", "trajectory_ended"), lost
    client.open("copy", {"snapshot": "readable"})
    assert sh(client, "copy", "stat -c %a locked; cat locked ok.txt").split() == [
        "400",
        "secret",
        "fine",
    ]
    for traj in ("src", "copy"):
        client.close(traj)


def test_docker_copy_past_its_disk_cap_fails_cleanly(
    start_worker, client: Client, ns, docker_namespaces
):
    """A sparse file costs the source nothing and the snapshot little, but a copy
    is written in full: over the copy's disk_mb its start fails, with one result
    per call, and the source goes on."""
    require_docker()
    docker_namespaces.add(ns)
    start_worker("docker")
    client.open("src")
    sh(client, "src", "echo precious > f && truncate -s 256M sparse")
    taken = ok(client.snapshot("src", "sparse"))
    assert taken.data["bytes"] < 4 * 1024 * 1024 < taken.data["uncompressed_bytes"]
    client.open("small", {"snapshot": "sparse", "limits": {"disk_mb": 64}})
    calls = [client.submit("small", "bash", {"command": "cat f"}) for _ in range(2)]
    results = [client.result("small", call_id) for call_id in calls]
    assert [r.ok for r in results] == [False, False], results
    assert "disk_mb" in (results[0].error or ""), results[0]
    record = wait_for(lambda: (r := client.record("small")) and r.status.final and r)
    assert record.status.value == "failed"
    assert sh(client, "src", "cat f") == "precious\n"
    client.close("src")


# ------------------------------------------------------------ Redis restarts
def test_a_redis_restart_while_a_fork_packs(aof_redis, aof_worker, ns):
    """Redis goes away while the worker packs a fork's snapshot: the snapshot is
    stored once Redis is back, and the copy holds the files."""
    with Client(aof_redis.url, ns) as client:
        client.open("src")
        sh(client, "src", SLOW_TO_PACK)
        forked: dict[str, Any] = {}

        def fork() -> None:
            with Client(aof_redis.url, ns) as other:
                forked["result"] = other.fork("src", ["copy"])

        thread = threading.Thread(target=fork)
        thread.start()
        wait_until_packing(client, "src")
        aof_redis.restart(down_s=0.5)
        thread.join(120)
        assert forked["result"].ok, forked
        assert sh(client, "copy", "cat f") == "precious\n"
        for traj in ("src", "copy"):
            client.close(traj)


# ---------------------------------------------------------- the command line
def test_download_of_a_workspace_with_an_absolute_link(
    start_worker, client: Client, redis_url, ns, tmp_path
):
    start_worker("local")
    client.open("t")
    sh(client, "t", "mkdir -p proj/bin && echo hi > proj/a.txt && ln -s /usr/bin/env proj/bin/x")
    cmd = [*TOOLQ, "--redis-url", redis_url, "--namespace", ns, "download", "t", "proj"]
    done = subprocess.run(
        [*cmd, "--to", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "proj" / "a.txt").read_text() == "hi\n"
