"""Snapshots and forks against the cold path (Docker backend).

    python bench/snapshots.py [--mb 100] [--forks 8] [--more 16] [--rounds 3] [--install]
                              [--warm N]

A prepared workspace of ``--mb`` MB (half generated source text, half random
bytes: a repository and its binary dependencies) is the starting state; with
``--install`` its preparation also copies the image's standard library into
the workspace and byte-compiles it (CPU work like a ``pip install``). Writing
bytes is the cheapest preparation there is: real ones (clone, install, build)
cost more, snapshots the same.
Compared, in rounds, each against its baseline in the same run:

- ``snapshot``: one ``snapshot`` of that workspace (the call's latency);
- ``fork into N``: ``fork`` to N new trajectories until each has answered a
  first call, against ``cold N``: N new trajectories that each prepare the
  same state with their own tool calls (the path without snapshots); with
  ``--more M`` also ``fork into M``, against ``fork into N`` (how it scales);
  the copies' records say how their files came (``copied_via``), counted in
  ``copies via host``;
- ``open from snapshot``: one trajectory opened from it until its first
  call's answer, against ``cold open``: an empty one (no preparation) and
  ``cold open + prepare``.

``--warm N`` gives the worker a warm pool of N containers (every open, cold or
copy, may take one); without it a fork's copies get containers the worker
starts while the snapshot is packed, and cold opens start their own.

Prints a Markdown table of medians and ratios; absolute times on a shared
2-core machine are noise, ratios within one run are the result.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import IMAGE
from harness import WorkerProc

from toolq.producer import AsyncClient
from toolq.worker.embedded import EmbeddedRedis

WAIT_S = 600.0


# An install-like step: the image's standard library copied into the workspace and
# byte-compiled, the kind of CPU work a `pip install` of dependencies does.
INSTALL = (
    "lib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()[\"stdlib\"])') && "
    'cp -r "$lib" deps/stdlib && python3 -m compileall -q -j 1 deps/stdlib > /dev/null'
)


def prepare_command(mb: int, install: bool = False) -> str:
    """Shell that builds the starting state: ``mb/2`` MB of text files, ``mb/2`` of
    random bytes, and (``install``) a byte-compiled library tree on top."""
    half = mb // 2
    text = (
        "import os, random\n"
        "random.seed(7)\n"
        "words = [''.join(random.choice('abcdefghij_') for _ in range(8)) for _ in range(500)]\n"
        f"left = {half} * 1024 * 1024\n"
        "i = 0\n"
        "while left > 0:\n"
        "    os.makedirs('repo/pkg%d' % (i // 100), exist_ok=True)\n"
        "    body = '\\n'.join('def %s(x):\\n    return x + %d' % (random.choice(words), n)\n"
        "                      for n in range(600)).encode()\n"
        "    open('repo/pkg%d/mod%d.py' % (i // 100, i), 'wb').write(body)\n"
        "    left -= len(body); i += 1\n"
    )
    files = f'python3 -c "{text}" && mkdir -p deps && head -c {half}M /dev/urandom > deps/lib.so'
    return f"{files} && {INSTALL}" if install else files


async def first_answer(client: AsyncClient, traj: str) -> None:
    result = await client.call(traj, "bash", {"command": "ls repo | wc -l"}, wait_s=WAIT_S)
    assert result.ok, result


async def cold(client: AsyncClient, trajs: list[str], mb: int, install: bool) -> float:
    started = time.monotonic()

    async def one(traj: str) -> None:
        await client.open(traj)
        r = await client.call(
            traj, "bash", {"command": prepare_command(mb, install), "timeout_s": 600}, wait_s=WAIT_S
        )
        assert r.ok, r
        await first_answer(client, traj)

    await asyncio.gather(*(one(t) for t in trajs))
    return time.monotonic() - started


async def forked(client: AsyncClient, source: str, trajs: list[str]) -> tuple[float, int]:
    """Seconds until every copy answered, and how many got their files in-host."""
    started = time.monotonic()
    taken = await client.fork(source, trajs, wait_s=WAIT_S)
    assert taken.ok, taken
    await asyncio.gather(*(first_answer(client, t) for t in trajs))
    took = time.monotonic() - started
    records = await asyncio.gather(*(client.record(t) for t in trajs))
    return took, sum(1 for r in records if r is not None and r.copied_via == "host")


async def opened(client: AsyncClient, traj: str, spec: dict[str, str] | None) -> float:
    started = time.monotonic()
    await client.open(traj, spec)
    r = await client.call(traj, "bash", {"command": "true"}, wait_s=WAIT_S)
    assert r.ok, r
    return time.monotonic() - started


async def settle(
    ns: str, containers: int, worker: WorkerProc, warm: int, timeout_s: float = 180.0
) -> None:
    """Wait until the worker has exactly ``containers`` containers (the open
    trajectories' and its warm pool's) and ``warm`` of them booted and free:
    removals and refills of the last step do not run into the next one."""
    import docker

    api = docker.from_env().api
    deadline = time.monotonic() + timeout_s

    def count() -> int:
        return len(api.containers(filters={"label": [f"toolq.ns={ns}"]}))

    while time.monotonic() < deadline and await asyncio.to_thread(count) != containers:
        await asyncio.sleep(0.2)
    while time.monotonic() < deadline:
        if (await asyncio.to_thread(worker.stats))["warm_ready"] >= warm:
            return
        await asyncio.sleep(0.2)


async def measure(
    url: str,
    ns: str,
    worker: WorkerProc,
    mb: int,
    forks: int,
    more: int,
    rounds: int,
    install: bool,
    warm: int,
) -> dict[str, list[float]]:
    client = AsyncClient(url, ns)
    times: dict[str, list[float]] = {}

    async def closed(trajs: list[str]) -> None:
        for traj in trajs:
            await client.close(traj)
        await settle(ns, 1 + warm, worker, warm)  # the source's and the warm pool

    def add(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    await client.open("source")
    r = await client.call(
        "source", "bash", {"command": prepare_command(mb, install), "timeout_s": 600}, wait_s=WAIT_S
    )
    assert r.ok, r
    usage = await client.call("source", "bash", {"command": "du -sm . | cut -f1"})
    print(f"source workspace: {usage.output.strip()} MB", file=sys.stderr)
    await settle(ns, 1 + warm, worker, warm)
    for n in range(rounds):
        started = time.monotonic()
        taken = await client.snapshot("source", f"bench-{n}", wait_s=WAIT_S)
        assert taken.ok, taken
        add("snapshot", time.monotonic() - started)
        add("snapshot MB compressed", (taken.data or {})["bytes"] / 1e6)
        copies, colds = [f"f{n}-{i}" for i in range(forks)], [f"c{n}-{i}" for i in range(forks)]
        took, via_host = await forked(client, "source", copies)
        add(f"fork into {forks}", took)
        add(f"copies via host (of {forks})", via_host)
        await closed(copies)
        if more:
            extra = [f"g{n}-{i}" for i in range(more)]
            took, via_host = await forked(client, "source", extra)
            add(f"fork into {more}", took)
            add(f"copies via host (of {more})", via_host)
            await closed(extra)
        add(f"cold {forks} (prepare each)", await cold(client, colds, mb, install))
        await closed(colds)
        add("open from snapshot", await opened(client, f"s{n}", {"snapshot": f"bench-{n}"}))
        add("cold open (empty)", await opened(client, f"e{n}", None))
        add("cold open + prepare", await cold(client, [f"p{n}"], mb, install))
        await closed([f"s{n}", f"e{n}", f"p{n}"])
        await client.delete_snapshot(f"bench-{n}")
        print(f"round {n + 1}/{rounds} done", file=sys.stderr)
    await client.close("source")
    await client.aclose()
    return times


def report(times: dict[str, list[float]], forks: int, more: int) -> str:
    med = {name: statistics.median(values) for name, values in times.items()}
    pairs = {
        f"fork into {forks}": f"cold {forks} (prepare each)",
        f"fork into {more}": f"fork into {forks}",
        "open from snapshot": "cold open + prepare",
        "cold open (empty)": "cold open + prepare",
    }
    lines = ["| measured | median | against | ratio |", "|---|---:|---|---:|"]
    for name, value in med.items():
        unit = "" if "MB" in name or "copies" in name else " s"
        base = pairs.get(name)
        ratio = f"{value / med[base]:.2f}x" if base else ""
        lines.append(f"| {name} | {value:.2f}{unit} | {base or ''} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--forks", type=int, default=8)
    parser.add_argument("--more", type=int, default=0, help="also fork into this many")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm", type=int, default=0, help="the worker's warm_pool")
    parser.add_argument(
        "--install", action="store_true", help="also byte-compile a library tree (CPU work)"
    )
    args = parser.parse_args()
    with EmbeddedRedis() as server:
        ns = f"snapbench{uuid.uuid4().hex[:6]}"
        slots = 2 * args.forks + args.more + 4
        worker = WorkerProc(
            server.url, ns, backend="docker", default_image=IMAGE, slots=slots, warm_pool=args.warm
        )
        try:
            run = measure(
                server.url,
                ns,
                worker,
                args.mb,
                args.forks,
                args.more,
                args.rounds,
                args.install,
                args.warm,
            )
            times = asyncio.run(run)
        finally:
            worker.stop()
    print(report(times, args.forks, args.more))


if __name__ == "__main__":
    main()
