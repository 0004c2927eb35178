"""SWE-ReX file requests on toolq: reads and writes (text and binary), uploads of
a directory and of a file, and paths outside the workspace, through swe-rex's own
request types against a live worker."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import pytest
from swerex.runtime.abstract import Command, ReadFileRequest, UploadRequest, WriteFileRequest

from tests.swerex_support import Deployer, deployer
from toolq.integrations.swerex import PathOutsideWorkspaceError


@pytest.fixture
def deployed(redis_url: str, ns: str) -> Deployer:
    return deployer(redis_url, ns)


def test_files_round_trip_text_and_binary(start_worker, deployed):
    start_worker("local")
    text = "héllo\nwörld ✓\n"
    binary = bytes(range(256)) * 3

    async def main() -> None:
        async with deployed() as deployment:
            rt = deployment.runtime
            await rt.write_file(WriteFileRequest(path="/workspace/notes/a.txt", content=text))
            assert (
                await rt.read_file(ReadFileRequest(path="/workspace/notes/a.txt"))
            ).content == text
            # the same file, relative to the working directory, for the file tools and the shell
            assert (await rt.read_file(ReadFileRequest(path="notes/a.txt"))).content == text
            shown = await rt.execute(Command(command=["cat", "notes/a.txt"]))
            assert shown.stdout == text
            # binary content: written by a command, read back byte for byte
            octal = "".join(f"\\{b:03o}" for b in binary)
            await rt.execute(Command(command=f"printf '{octal}' > bin.dat", shell=True, check=True))
            raw = await rt.read_file(ReadFileRequest(path="/workspace/bin.dat", encoding="latin-1"))
            assert raw.content.encode("latin-1") == binary
            with pytest.raises(UnicodeDecodeError):  # as Path.read_text would
                await rt.read_file(ReadFileRequest(path="bin.dat"))
            lenient = await rt.read_file(ReadFileRequest(path="bin.dat", errors="replace"))
            assert "\ufffd" in lenient.content
            with pytest.raises(FileNotFoundError):
                await rt.read_file(ReadFileRequest(path="/workspace/missing.txt"))

    asyncio.run(main())


def test_paths_outside_the_workspace_are_refused(start_worker, deployed, tmp_path: Path):
    start_worker("local")
    outside = tmp_path / "must-not-exist.txt"
    source = tmp_path / "one.txt"
    source.write_text("x")

    async def main() -> list[str]:
        errors = []
        async with deployed() as deployment:
            rt = deployment.runtime
            for request in (
                rt.read_file(ReadFileRequest(path="/etc/passwd")),
                rt.write_file(WriteFileRequest(path=str(outside), content="x")),
                rt.write_file(WriteFileRequest(path="../../escape.txt", content="x")),
                rt.upload(UploadRequest(source_path=str(source), target_path="/tmp/up.txt")),
            ):
                with pytest.raises(PathOutsideWorkspaceError) as refused:
                    await request
                errors.append(str(refused.value))
            # a symlink that leads out: the sandbox refuses it
            await rt.execute(Command(command=["ln", "-s", "/etc", "out"], check=True))
            with pytest.raises(PathOutsideWorkspaceError, match="outside the workspace"):
                await rt.read_file(ReadFileRequest(path="/workspace/out/passwd"))
        return errors

    errors = asyncio.run(main())
    assert "'/etc/passwd' is outside the workspace (/workspace" in errors[0]
    assert not outside.exists()


def test_upload_a_directory_and_a_file(start_worker, deployed, tmp_path: Path):
    start_worker("local")
    tree = tmp_path / "tree"
    (tree / "pkg" / "sub").mkdir(parents=True)
    (tree / "empty").mkdir()
    (tree / "README.md").write_text("# readme\n")
    (tree / "pkg" / "sub" / "mod.py").write_text("X = 1\n")
    blob = os.urandom(9 * 1024 * 1024 + 17)  # several write_file chunks
    (tree / "pkg" / "blob.bin").write_bytes(blob)
    tool = tree / "bin" / "tool.sh"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho tool ran\n")
    tool.chmod(0o755)
    single = tmp_path / "single.cfg"
    single.write_text("k=v\n")

    async def main() -> dict[str, Any]:
        async with deployed() as deployment:
            rt = deployment.runtime
            await rt.upload(UploadRequest(source_path=str(tree), target_path="/workspace/up"))
            await rt.upload(
                UploadRequest(source_path=str(single), target_path="/workspace/c/s.cfg")
            )
            with pytest.raises(FileNotFoundError):
                await rt.upload(UploadRequest(source_path=str(tmp_path / "nope"), target_path="x"))
            blob_back = await rt.read_file(
                ReadFileRequest(path="up/pkg/blob.bin", encoding="latin-1")
            )
            run = await rt.execute(Command(command=["up/bin/tool.sh"], check=True))
            listing = await rt.execute(
                Command(command="cd up && find . | sort && sha256sum pkg/blob.bin", shell=True)
            )
            modes = await rt.execute(
                Command(command=["stat", "-c", "%a", "up/bin/tool.sh", "up/README.md"])
            )
            return {
                "blob": blob_back.content.encode("latin-1"),
                "tool": run.stdout,
                "listing": listing.stdout.splitlines(),
                "modes": modes.stdout.split(),
                "mod": (
                    await rt.read_file(ReadFileRequest(path="/workspace/up/pkg/sub/mod.py"))
                ).content,
                "single": (await rt.read_file(ReadFileRequest(path="c/s.cfg"))).content,
            }

    got = asyncio.run(main())
    assert got["blob"] == blob
    assert got["tool"] == "tool ran\n"  # permission bits came along
    assert got["mod"] == "X = 1\n" and got["single"] == "k=v\n"
    expected = [".", "./README.md", "./bin", "./bin/tool.sh", "./empty", "./pkg"]
    expected += ["./pkg/blob.bin", "./pkg/sub", "./pkg/sub/mod.py"]
    assert got["listing"][:-1] == expected
    assert got["listing"][-1].split()[0] == hashlib.sha256(blob).hexdigest()
    readme_mode = stat.S_IMODE((tree / "README.md").stat().st_mode)
    assert got["modes"] == ["755", f"{readme_mode:o}"]


def test_an_upload_reads_its_files_off_the_event_loop(start_worker, deployed, tmp_path: Path):
    """The source is a FIFO whose writer is a coroutine of the same event loop: the
    upload completes only if its reads block a worker thread, not the loop."""
    start_worker("local")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    content = b"through a pipe\n" * 1000  # fits the pipe's buffer: one write

    async def feed() -> None:
        while True:  # open without blocking the loop: ENXIO until the upload opens it
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                await asyncio.sleep(0.01)
        try:
            os.write(fd, content)
        finally:
            os.close(fd)

    async def main() -> str:
        async with deployed() as deployment:
            rt = deployment.runtime
            request = UploadRequest(source_path=str(fifo), target_path="/workspace/piped.txt")
            await asyncio.gather(rt.upload(request), feed())
            return (await rt.read_file(ReadFileRequest(path="piped.txt"))).content

    pool = ThreadPoolExecutor(1)  # a loop stuck in a read cannot be cancelled: watch it
    try:
        piped = pool.submit(asyncio.run, main()).result(timeout=120)
    except FutureTimeout:
        with fifo.open("wb") as unblock:  # lets the stuck read finish
            unblock.write(content)
        pytest.fail("the upload read its source on the event loop")
    finally:
        pool.shutdown(wait=False)
    assert piped == content.decode()
