"""Directories in and out of a workspace, through Redis on both backends: the
``unpack`` tool refuses every hostile archive before writing anything, and
``toolq upload`` / ``toolq download`` round-trip a tree."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import tarfile

import pytest

from toolq.producer import Client

MARK = "toolq-unpack-escape"


Member = tuple[tarfile.TarInfo, bytes | None]


def targz(*members: Member) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return base64.b64encode(buf.getvalue()).decode()


def entry(
    name: str, data: bytes | None = b"x", **attrs: object
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def sh(client: Client, traj: str, command: str) -> str:
    result = client.call(traj, "bash", {"command": command})
    assert result.ok, result
    return result.output


HOSTILE = {
    "zip slip": ([entry("ok.txt"), entry(f"../../{MARK}")], "path_outside_workspace"),
    "absolute path": ([entry(f"/tmp/{MARK}")], "path_outside_workspace"),
    "symlink to /etc": (
        [link("etc", "/etc"), entry(f"etc/{MARK}")],
        "invalid_args",
    ),
    "hard link to /etc/passwd": ([link("pw", "/etc/passwd", tarfile.LNKTYPE)], "invalid_args"),
    "device": ([entry("null", None, type=tarfile.CHRTYPE, devmajor=1, devminor=3)], "invalid_args"),
    "fifo": ([entry("pipe", None, type=tarfile.FIFOTYPE)], "invalid_args"),
}


def test_an_existing_symlink_out_of_the_workspace_refuses_the_whole_archive(
    backend, start_worker, client: Client
):
    start_worker(backend)
    client.open("t")
    sh(client, "t", "mkdir -p in; ln -s /tmp in/out; echo old > in/kept")
    archive = targz(
        entry("first.txt", b"first"), entry("kept", b"new"), entry(f"out/{MARK}"), entry("last")
    )
    result = client.call("t", "unpack", {"data": archive, "path": "in"})
    assert not result.ok and result.error_code == "path_outside_workspace", result
    # All or nothing: the entries before the bad one were not written either.
    assert sh(client, "t", "ls -A in; cat in/kept").split() == ["kept", "out", "old"]
    assert sh(client, "t", f"ls /tmp/{MARK} 2>/dev/null; echo end").strip() == "end"
    sh(client, "t", "echo file > in/plain")  # a file where the archive wants a directory
    result = client.call("t", "unpack", {"data": targz(entry("a"), entry("plain/b")), "path": "in"})
    assert not result.ok and result.error_code == "io_error", result
    assert sh(client, "t", "ls -A in").split() == ["kept", "out", "plain"]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_before_anything_is_written(
    case, backend, start_worker, client: Client
):
    start_worker(backend)
    client.open("t")
    members, code = HOSTILE[case]
    result = client.call("t", "unpack", {"data": targz(*members), "path": "in"})
    assert not result.ok and result.error_code == code, result
    # Nothing at all was unpacked (not even the harmless first entry), nowhere.
    assert sh(client, "t", "ls -A; ls -A in 2>/dev/null | wc -l").split() == ["0"]
    places = [f"{d}/{MARK}" for d in ("/tmp", "/etc", "..", "../..", "../../..", "/")]
    found = sh(client, "t", f"ls -d {' '.join(places)} 2>/dev/null; echo end")
    assert found.strip() == "end"
    assert client.call("t", "bash", {"command": "true"}).ok  # the trajectory goes on


def test_a_tar_bomb_stops_at_the_cap(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    zeros = b"\0" * (3 * 1024 * 1024)  # 3 MiB of zeros: a few KB compressed
    bomb = targz(entry("a.bin", zeros), entry("b.bin", zeros))
    assert len(bomb) < 64 * 1024
    result = client.call("t", "unpack", {"data": bomb, "max_bytes": 4 * 1024 * 1024})
    assert not result.ok and result.error_code == "limit_exceeded", result
    assert "4194304" in (result.error or "") and sh(client, "t", "ls -A") == ""
    many = targz(*(entry(f"f{i}", b"") for i in range(50)))
    fits = client.call("t", "unpack", {"data": many, "path": "many"})
    assert fits.ok and fits.data and fits.data["entries"] == 50


def test_garbage_is_refused_and_good_archives_land(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    junk = base64.b64encode(os.urandom(2000)).decode()
    for data, code in ((junk, "invalid_args"), ("%%%not base64", "invalid_args")):
        result = client.call("t", "unpack", {"data": data})
        assert not result.ok and result.error_code == code, result
    good = targz(
        entry("pkg/", None, type=tarfile.DIRTYPE, mode=0o755),
        entry("pkg/run.sh", b"#!/bin/sh\necho ran\n", mode=0o755),
        entry("./pkg/data.bin", bytes(range(256))),
    )
    landed = client.call("t", "unpack", {"data": good, "path": "dest/sub"})
    assert landed.ok and landed.data and landed.data["entries"] == 3, landed
    assert sh(client, "t", "dest/sub/pkg/run.sh; wc -c < dest/sub/pkg/data.bin").split() == [
        "ran",
        "256",
    ]
    outside = client.call("t", "unpack", {"data": good, "path": "../../up"})
    assert outside.error_code == "path_outside_workspace"


def toolq(redis_url: str, ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "toolq.producer.cli", "--redis-url", redis_url]
    return subprocess.run(
        [*cmd, "--namespace", ns, *args], capture_output=True, text=True, timeout=120
    )


def test_cli_upload_and_download_round_trip(start_worker, redis_url: str, ns: str, tmp_path):
    start_worker("local")
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "deep.txt").write_text("deep\n")
    (src / "bin.dat").write_bytes(os.urandom(5000))
    (src / "tool.sh").write_text("#!/bin/sh\n")
    (src / "tool.sh").chmod(0o750)
    up = toolq(redis_url, ns, "upload", "t", str(src), "--to", "proj")
    assert up.returncode == 0, up.stderr
    down = toolq(redis_url, ns, "download", "t", "proj", "--to", str(tmp_path / "back"))
    assert down.returncode == 0, down.stderr
    back = tmp_path / "back" / "proj"
    assert (back / "a" / "b" / "deep.txt").read_text() == "deep\n"
    assert (back / "bin.dat").read_bytes() == (src / "bin.dat").read_bytes()
    assert (back / "tool.sh").stat().st_mode & 0o777 == 0o750
    (src / "link").symlink_to("/etc/passwd")
    refused = toolq(redis_url, ns, "upload", "t", str(src))
    assert refused.returncode == 2 and "link" in refused.stderr
    missing = toolq(redis_url, ns, "download", "t", "nope")
    assert missing.returncode == 1 and "not_found" in missing.stdout


def test_cli_upload_of_a_huge_sparse_file_is_refused_before_packing(
    redis_url: str, ns: str, tmp_path
):
    from toolq.producer.cli_files import UPLOAD_MAX_BYTES

    src = tmp_path / "src"
    src.mkdir()
    (src / "small.txt").write_text("x")
    with open(src / "sparse.img", "wb") as fh:  # 10 GB that take no disk
        fh.truncate(10 * 1024**3)
    assert UPLOAD_MAX_BYTES < 10 * 1024**3
    # No worker: a refusal before packing never reaches Redis. Compressing 10 GB
    # of zeros takes a minute; the check is one walk of the tree.
    refused = subprocess.run(
        [sys.executable, "-m", "toolq.producer.cli", "--redis-url", redis_url, "--namespace", ns,
         "upload", "t", str(src)],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "sparse.img" in refused.stderr and "more than" in refused.stderr, refused.stderr
