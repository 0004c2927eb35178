"""Cold container starts at once: toolq's against the simplest program's.

    python bench/starts.py [--count 8] [--rounds 3]

``toolq``: ``count`` slots acquired at once through the worker's Docker backend
(the test image, no warm pool, ``start_concurrency`` = ``count``), until each
agent answered a first call; its engine requests are counted and timed per
kind. ``plain``: the same number of ``docker run -d`` of the image (one tmpfs,
no limits, no init: less than toolq's containers get) plus a ``docker exec
python3 -c pass`` in each, at once, through the same engine: the least any
executor does to get Python running in a new container. Each is warmed up once;
rounds alternate the two, each waiting until the last one's containers are gone.
Prints the medians and toolq ÷ plain.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import docker
from common import IMAGE
from harness import acquire_all, release_all

from toolq.worker.backends.docker import DockerBackend
from toolq.worker.settings import WorkerSettings

STEPS = (
    "create_container",
    "put_archive",
    "get_archive",
    "start",
    "exec_create",
    "exec_start",
    "exec_inspect",
)
GONE_TIMEOUT_S = 120.0


def count_requests(api: Any, spent: dict[str, list[float]]) -> None:
    """Wrap the engine client's requests so that each one's seconds are kept."""
    for name in STEPS:
        request: Callable[..., Any] = getattr(api, name)

        @functools.wraps(request)
        def timed(*args: Any, _name: str = name, _request: Any = request, **kw: Any) -> Any:
            started = time.perf_counter()
            try:
                return _request(*args, **kw)
            finally:
                spent.setdefault(_name, []).append(time.perf_counter() - started)

        setattr(api, name, timed)


async def toolq_starts(backend: DockerBackend, count: int, api: Any, ns: str) -> float:
    slots, ready_s = await acquire_all(backend, count)
    await release_all(backend, slots)
    deadline = time.monotonic() + GONE_TIMEOUT_S  # removed: not beside the next round
    while api.containers(all=True, filters={"label": f"toolq.ns={ns}"}):
        if time.monotonic() > deadline:
            raise RuntimeError("toolq's containers were not removed")
        await asyncio.sleep(0.2)
    return max(ready_s)


def plain_starts(api: Any, count: int) -> float:
    """``count`` containers started and a Python run in each, at once (threads)."""
    import concurrent.futures

    cids: list[str] = []

    def one(_: int) -> None:
        cid = api.create_container(
            IMAGE,
            ["sleep", "infinity"],
            host_config=api.create_host_config(
                network_mode="none", tmpfs={"/workspace": "size=512m"}
            ),
            labels={"toolq.bench": "starts"},
        )["Id"]
        cids.append(cid)
        api.start(cid)
        api.exec_start(api.exec_create(cid, ["python3", "-c", "pass"])["Id"])

    started = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            list(pool.map(one, range(count)))
        return time.perf_counter() - started
    finally:
        for cid in cids:
            api.remove_container(cid, force=True)


async def measure(count: int, rounds: int) -> None:
    ns = f"starts{uuid.uuid4().hex[:6]}"
    settings = WorkerSettings(
        backend="docker", default_image=IMAGE, namespace=ns, start_concurrency=count
    )
    backend = DockerBackend(settings)
    await asyncio.to_thread(backend.engine.load_runtimes)
    own_api = docker.from_env().api  # the plain program's requests are not counted
    spent: dict[str, list[float]] = {}
    toolq: list[float] = []
    plain: list[float] = []
    try:
        await toolq_starts(backend, 1, own_api, ns)  # the image's user and home, read once
        await asyncio.to_thread(plain_starts, own_api, 1)
        count_requests(backend.engine.api, spent)
        for n in range(rounds):
            plain.append(await asyncio.to_thread(plain_starts, own_api, count))
            toolq.append(await toolq_starts(backend, count, own_api, ns))
            print(f"round {n + 1}/{rounds} done", file=sys.stderr)
    finally:
        await backend.shutdown()
    t, p = statistics.median(toolq), statistics.median(plain)
    print(f"| {count} at once, until the last is ready (median of {rounds}) | seconds |")
    print("|---|--:|")
    print(f"| toolq: slots acquired, a first call answered | {t:.2f} |")
    print(f"| plain: `docker run -d` + `docker exec python3 -c pass` | {p:.2f} |")
    print(f"| toolq ÷ plain | **{t / p:.2f}x** |")
    starts = rounds * count
    counts = ", ".join(
        f"{k} {len(v) / starts:.1f} ({sum(v) / starts * 1000:.0f} ms)"
        for k, v in sorted(spent.items())
    )
    plain_counts = "create_container 1, start 1, exec_create 1, exec_start 1"
    print(f"toolq's engine requests per start: {counts} (plain: {plain_counts})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(measure(args.count, args.rounds))


if __name__ == "__main__":
    main()
