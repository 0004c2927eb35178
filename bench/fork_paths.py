"""How fast can one worker copy a prepared workspace into N containers? (issue 31)

    python bench/fork_paths.py [--mb 50] [--copies 8] [--rounds 2]

One Docker backend in this process (no worker, no Redis unless a path uses it).
A source container's workspace is filled with ``--mb`` MB in 200 files (half
generated text, half random bytes, as ``bench/snapshots.py``), then each path
copies it into ``--copies`` fresh slots, all at once; time from the first byte
packed to the last copy unpacked (the containers are started before). Paths:

- ``redis-gz``: today's fork: the agent packs a tar.gz, it goes through Redis
  (SET, then one GET), each copy's agent unpacks it;
- ``relay-gz``: the same tar.gz relayed by the worker, without Redis;
- ``relay-tar``: a plain tar (no compression) relayed by the worker;
- ``relay-tar-native``: the fork's pack (the image's ``tar``), relayed by the
  worker, unpacked with ``tar``;
- ``exchange-tar-native``: what a fork does (``docker_exchange``): the same tar
  written once, hard-linked into each copy's own read-only directory, unpacked
  with ``tar``;
- ``engine-file-gz``, ``engine-file-tar``: the archive (tar.gz or plain tar) put
  into each copy's container as one file by the engine's archive API (no attach
  stream), then unpacked by the copy's agent from that file;
- ``engine-archive``: the engine's archive API, container to container
  (``GET /containers/{src}/archive``, then ``PUT`` into each copy: ``docker cp``);
- ``commit``: ``docker commit`` of the source, then N containers started from
  that image (overlay copy-on-write; the writable layer only: a tmpfs is not
  committed), until each answers;
- ``host-cp``: a cached unpacked tree on the host, ``cp -a`` N times (the floor
  of any in-host copy; reflinks need a filesystem that has them).

Each copy's files are compared with the source's (sha256 of every file).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import IMAGE
from snapshots import prepare_command

from toolq.schemas import TrajectorySpec
from toolq.worker.backends.base import Slot
from toolq.worker.backends.docker import DockerBackend
from toolq.worker.embedded import EmbeddedRedis
from toolq.worker.settings import WorkerSettings

DIGEST = "cd {root} && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum"


async def call(slot: Slot, tool: str, blob: bytes | None = None, **args: object) -> dict:
    reply = await slot.channel.submit(
        "call", slot=slot.name, tool=tool, args=args, timeout_s=600, blob=blob
    )
    assert reply.get("ok", True), reply
    return reply


async def sh(slot: Slot, command: str) -> str:
    return str((await call(slot, "bash", command=command, timeout_s=600))["output"])


async def pack(slot: Slot, compress: bool | str) -> bytes:
    args = {"max_bytes": 1 << 30, "compress": compress}
    return bytes((await call(slot, "_snapshot_pack", **args))["blob"])


async def unpack_all(slots: list[Slot], blob: bytes, native: bool = False) -> None:
    await asyncio.gather(*(call(s, "_snapshot_unpack", blob=blob, native=native) for s in slots))


class Probe:
    def __init__(self, mb: int, copies: int, disk: bool) -> None:
        self.mb, self.copies, self.disk = mb, copies, disk
        ns = f"forkprobe{uuid.uuid4().hex[:6]}"
        self.settings = WorkerSettings(
            namespace=ns,
            backend="docker",
            default_image=IMAGE,
            slots=4 * copies,
            default_disk_mb=2048 if disk else 0,
            start_concurrency=4,
        )
        self.backend = DockerBackend(self.settings)
        self.seq = 0

    async def slots(self, n: int) -> list[Slot]:
        self.seq += 1
        names = [f"p{self.seq}-{i}" for i in range(n)]
        spec = TrajectorySpec()
        return list(await asyncio.gather(*(self.backend.acquire(t, spec) for t in names)))

    async def release(self, slots: list[Slot]) -> None:
        await asyncio.gather(*(self.backend.release(s) for s in slots))

    async def check(self, source_digest: str, slots: list[Slot], root: str = "/workspace") -> None:
        for slot in slots[:2]:
            got = await sh(slot, DIGEST.format(root=root))
            assert got == source_digest, (got, source_digest)


async def relay(
    probe: Probe, source: Slot, compress: bool | str, digest: str, via_redis: str
) -> float:
    """``compress`` "auto": the fork's pack (the image's tar), unpacked with tar too."""
    targets = await probe.slots(probe.copies)
    started = time.monotonic()
    blob = await pack(source, compress)
    if via_redis:
        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url(via_redis)
        await r.set("probe", blob)
        blob = bytes(await r.get("probe") or b"")
        await r.aclose()
    await unpack_all(targets, blob, native=compress == "auto")
    took = time.monotonic() - started
    await probe.check(digest, targets)
    await probe.release(targets)
    return took


def wrapped(blob: bytes, uid: int, gid: int, directory: str) -> bytes:
    """``blob`` as the one file of a tar (with its directory), for ``put_archive``."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        folder = tarfile.TarInfo(directory)
        folder.type, folder.mode, folder.uid, folder.gid = tarfile.DIRTYPE, 0o700, uid, gid
        tar.addfile(folder)
        info = tarfile.TarInfo(f"{directory}/snap.tar")
        info.size, info.mode, info.uid, info.gid = len(blob), 0o400, uid, gid
        tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


async def engine_file(probe: Probe, source: Slot, compress: bool, digest: str) -> float:
    """The archive put into each container by the engine (``PUT /archive``: no
    attach stream), then unpacked by the copy's agent from that file."""
    targets = await probe.slots(probe.copies)
    api = probe.backend.api
    started = time.monotonic()
    blob = await pack(source, compress)
    user = probe.backend.engine.known_user(IMAGE)
    assert user is not None
    directory = f"tmp/.toolq-in-{uuid.uuid4().hex[:8]}"
    outer = wrapped(blob, user.uid, user.gid, directory)

    async def one(slot: Slot) -> None:
        await asyncio.to_thread(api.put_archive, slot.sandbox_id, "/", outer)
        await call(slot, "_snapshot_unpack", file=f"/{directory}/snap.tar")

    await asyncio.gather(*(one(s) for s in targets))
    took = time.monotonic() - started
    await probe.check(digest, targets)
    assert await sh(targets[0], f"ls -a /{directory} 2>&1 | wc -l") == "1\n"  # removed
    await probe.release(targets)
    return took


async def exchange(probe: Probe, source: Slot, digest: str) -> float:
    """What a fork does now: the image's tar packs, the worker stages the tar in
    each copy's own read-only directory (hard links), the copy's tar unpacks it."""
    targets = await probe.slots(probe.copies)
    started = time.monotonic()
    blob = await pack(source, "auto")
    key = f"{uuid.uuid4().hex[:8]}.tar"

    async def one(slot: Slot) -> None:
        path = await probe.backend.stage(slot, key, blob)
        assert path, "no exchange directory"
        await call(slot, "_snapshot_unpack", file=path, native=True)
        probe.backend.unstage(slot, key)

    await asyncio.gather(*(one(s) for s in targets))
    took = time.monotonic() - started
    await probe.check(digest, targets)
    await probe.release(targets)
    return took


async def engine_archive(probe: Probe, source: Slot, digest: str) -> float:
    targets = await probe.slots(probe.copies)
    api = probe.backend.api

    def copy() -> None:
        stream, _ = api.get_archive(source.sandbox_id, "/workspace/.")
        data = b"".join(stream)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(probe.copies) as pool:
            list(pool.map(lambda s: api.put_archive(s.sandbox_id, "/workspace", data), targets))

    started = time.monotonic()
    await asyncio.to_thread(copy)
    took = time.monotonic() - started
    try:
        await probe.check(digest, targets)
    except AssertionError as exc:
        print(f"  engine-archive: copies differ ({str(exc)[:80]})", file=sys.stderr)
        took = float("nan")
    await probe.release(targets)
    return took


async def commit(probe: Probe, source: Slot, digest: str) -> float:
    api = probe.backend.api
    started = time.monotonic()
    image = await asyncio.to_thread(api.commit, source.sandbox_id)
    spec = TrajectorySpec(image=str(image["Id"]))
    names = [f"c{probe.seq}-{i}" for i in range(probe.copies)]
    targets = list(await asyncio.gather(*(probe.backend.acquire(t, spec) for t in names)))
    took = time.monotonic() - started
    await probe.check(digest, targets)
    await probe.release(targets)
    await asyncio.sleep(1)
    subprocess.run(["docker", "rmi", "-f", str(image["Id"])], capture_output=True)
    return took


async def host_cp(probe: Probe, source: Slot) -> float:
    blob = await pack(source, False)
    base = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        src = os.path.join(base, "src")
        os.mkdir(src)
        subprocess.run(["tar", "xf", "-", "-C", src], input=blob, check=True)
        started = time.monotonic()
        procs = [
            subprocess.Popen(["cp", "-a", src, os.path.join(base, f"c{i}")])
            for i in range(probe.copies)
        ]
        for p in procs:
            p.wait()
        return time.monotonic() - started
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def main_async(mb: int, copies: int, rounds: int, disk: bool) -> dict[str, list[float]]:
    probe = Probe(mb, copies, disk)
    await probe.backend.start()
    times: dict[str, list[float]] = {}
    with EmbeddedRedis() as server:
        try:
            (source,) = await probe.slots(1)
            await sh(source, prepare_command(mb))
            digest = await sh(source, DIGEST.format(root="/workspace"))
            print(f"source: {await sh(source, 'du -sm . | cut -f1')} MB", file=sys.stderr)
            for n in range(rounds):
                paths = {
                    "redis-gz": relay(probe, source, True, digest, server.url),
                    "relay-gz": relay(probe, source, True, digest, ""),
                    "relay-tar": relay(probe, source, False, digest, ""),
                    "relay-tar-native": relay(probe, source, "auto", digest, ""),
                    "exchange-tar-native": exchange(probe, source, digest),
                    "engine-file-gz": engine_file(probe, source, True, digest),
                    "engine-file-tar": engine_file(probe, source, False, digest),
                    "engine-archive": engine_archive(probe, source, digest),
                    "host-cp": host_cp(probe, source),
                }
                if not disk:
                    paths["commit"] = commit(probe, source, digest)
                for name, run in paths.items():
                    took = await run
                    times.setdefault(name, []).append(took)
                    print(f"round {n + 1} {name}: {took:.2f} s", file=sys.stderr)
            await probe.release([source])
        finally:
            await probe.backend.shutdown()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"| path ({args.copies} copies of {args.mb} MB) | tmpfs workspace | writable layer |")
    print("|---|--:|--:|")
    rows: dict[str, list[str]] = {}
    for disk in (True, False):
        times = asyncio.run(main_async(args.mb, args.copies, args.rounds, disk))
        for name, values in times.items():
            rows.setdefault(name, ["—", "—"])[0 if disk else 1] = (
                f"{statistics.median(values):.2f} s"
            )
    for name, cells in rows.items():
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
