"""The four tool calls every path runs, in toolq's terms and in `docker exec` terms."""

from __future__ import annotations

import io
import os
import tarfile
import time
from dataclasses import dataclass
from typing import Any

from toolq.schemas import TrajectorySpec

SMALL_FILE = "small.txt"
SMALL_TEXT = "".join(f"line {i}: the quick brown fox\n" for i in range(8))  # ~230 bytes
WRITE_BYTES = 64 * 1024
WRITE_TEXT = ("0123456789abcdef" * (WRITE_BYTES // 16))[:WRITE_BYTES]
OUT_BYTES = 1024 * 1024
# Every byte of the 1 MB output travels back: the spec keeps up to 2 MiB per call.
MAX_OUTPUT_BYTES = 2 * 1024 * 1024
EXEC_WORKDIR = "/tmp"  # where the exec paths keep their files


@dataclass(frozen=True)
class Call:
    """One benchmark call: the toolq tool + args, and what `docker exec` runs instead."""

    name: str
    tool: str
    args: dict[str, Any]
    argv: list[str] | None  # docker exec command; None: a put_archive upload instead
    expect_bytes: int = 0  # output length to check (0: do not check)


CALLS: dict[str, Call] = {
    c.name: c
    for c in (
        Call("true", "bash", {"command": "true"}, ["bash", "-c", "true"]),
        Call(
            "cat",
            "bash",
            {"command": f"cat {SMALL_FILE}"},
            ["bash", "-c", f"cat {SMALL_FILE}"],
            len(SMALL_TEXT),
        ),
        Call("write_64k", "write_file", {"path": "out.txt", "content": WRITE_TEXT}, None),
        Call(
            "out_1mb",
            "bash",
            {"command": f"head -c {OUT_BYTES} /dev/zero | tr '\\0' x"},
            ["bash", "-c", f"head -c {OUT_BYTES} /dev/zero | tr '\\0' x"],
            OUT_BYTES,
        ),
    )
}

SETUP_ARGS = {"path": SMALL_FILE, "content": SMALL_TEXT}


def bench_spec(per_container: int = 1) -> TrajectorySpec:
    """The spec every benchmark trajectory opens with.

    A packed container gets the per-slot CPU limit times its slots, and Docker
    refuses more CPUs than the host has: packed slots ask for a share.
    """
    cpus = min(1.0, (os.cpu_count() or 1) / per_container)
    limits = {"max_output_bytes": MAX_OUTPUT_BYTES, "cpus": cpus}
    return TrajectorySpec.model_validate({"limits": limits})


def check_output(call: Call, output: str) -> bool:
    return not call.expect_bytes or len(output) == call.expect_bytes


def tar_of(name: str, data: bytes) -> bytes:
    """A one-file tar, for docker's put_archive."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
