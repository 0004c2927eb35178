"""What one Redis carries: bytes and Redis CPU per call, and a cluster against one Redis.

    python bench/capacity.py            # ~6 min on 2 cores
    python bench/capacity.py --quick    # ~1 min smoke run

1. **Memory.** ``trajectories x calls`` (``true``, the local backend, so no
   container start is timed), every trajectory closed; then the Redis bytes
   retained per completed call at the default retention: ``MEMORY USAGE`` of
   every key of the namespace, by kind, and ``used_memory``.
2. **Redis cost per call** at 64 trajectories: commands (``INFO
   commandstats``, the commands inside Lua included) and Redis CPU µs.
3. **One Redis against a 3-master Redis Cluster**, 64 trajectories calling
   ``true``, rounds interleaved in the same run: calls/s and p50.

Writes ``bench/out/<time>/capacity.json`` and ``capacity.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from collections import defaultdict
from typing import Any

import redis
from common import OUT_DIR, host_info
from harness import WorkerProc

from toolq.producer import AsyncClient
from toolq.schemas.local import redis_target
from toolq.worker.embedded import EmbeddedRedis
from toolq.worker.embedded_cluster import EmbeddedCluster


def plain(url: str) -> Any:
    target, cluster = redis_target(url)
    return redis.RedisCluster.from_url(target) if cluster else redis.Redis.from_url(target)


def nodes(url: str) -> list[redis.Redis]:
    """A client per master (one for a plain Redis)."""
    target, cluster = redis_target(url)
    if not cluster:
        return [redis.Redis.from_url(target)]
    rc = redis.RedisCluster.from_url(target)
    return [redis.Redis(host=n.host, port=n.port) for n in rc.get_primaries()]


def command_stats(url: str) -> tuple[int, int]:
    """(commands, µs of Redis CPU) so far, summed over the masters."""
    calls = usec = 0
    for node in nodes(url):
        for name, stat in node.info("commandstats").items():
            if name.startswith("cmdstat_"):
                calls += int(stat["calls"])
                usec += int(stat["usec"])
    return calls, usec


async def agent(client: AsyncClient, traj: str, calls: int, lat: list[float]) -> None:
    await client.open(traj)
    for _ in range(calls):
        started = time.perf_counter()
        r = await client.call(traj, "bash", {"command": "true"}, wait_s=120)
        if not r.ok:
            raise RuntimeError(f"{traj}: {r.error_code} {r.error}")
        lat.append(time.perf_counter() - started)
    await client.close(traj)


async def run_wave(url: str, ns: str, trajs: list[str], calls: int) -> list[float]:
    lat: list[float] = []
    async with AsyncClient(url, ns) as client:
        await asyncio.gather(*(agent(client, t, calls, lat) for t in trajs))
    return lat


def memory_by_kind(url: str, ns: str) -> dict[str, list[int]]:
    found: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    r = plain(url)
    for node in nodes(url):
        for key in node.scan_iter(f"{ns}:*", count=1000):
            name = key.decode()
            kind = (
                "result" if ":result:" in name
                else "events" if name.endswith(":events")
                else "calls" if name.endswith(":calls")
                else "record" if name.endswith("}")
                else "bg" if ":bg" in name
                else "global"
            )  # fmt: skip
            found[kind][0] += int(r.memory_usage(key, samples=0) or 0)
            found[kind][1] += 1
    return dict(found)


def measure_memory(trajs: int, calls: int, wave: int) -> dict[str, Any]:
    with EmbeddedRedis() as server:
        ns = f"mem{uuid.uuid4().hex[:6]}"
        worker = WorkerProc(server.url, ns, backend="local", slots=wave)
        try:
            names = [f"t{i}" for i in range(trajs)]
            for i in range(0, trajs, wave):
                asyncio.run(run_wave(server.url, ns, names[i : i + wave], calls))
            time.sleep(1.0)  # the last ends written
        finally:
            worker.stop()
        by_kind = memory_by_kind(server.url, ns)
        r = redis.Redis.from_url(server.url)
        used1 = int(r.info("memory")["used_memory"])
        for key in r.scan_iter(f"{ns}:*", count=1000):  # what the keys themselves take
            r.delete(key)
        used = used1 - int(r.info("memory")["used_memory"])
    total_calls = trajs * calls
    keys_bytes = sum(b for b, _ in by_kind.values())
    return {
        "trajectories": trajs,
        "calls_per_trajectory": calls,
        "calls": total_calls,
        "bytes_per_call": keys_bytes / total_calls,
        "used_memory_bytes": used,
        "used_memory_per_call": used / total_calls,
        "by_kind": {
            k: {"bytes_per_call": b / total_calls, "keys": n} for k, (b, n) in by_kind.items()
        },
    }


def throughput(url: str, ns: str, trajs: int, seconds: float) -> dict[str, Any]:
    """Calls/s and p50 with ``trajs`` agents calling for ``seconds``; Redis cost per call."""

    async def loop(client: AsyncClient, traj: str, stop: float, lat: list[float]) -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            r = await client.call(traj, "bash", {"command": "true"}, wait_s=120)
            if not r.ok:
                raise RuntimeError(f"{traj}: {r.error_code} {r.error}")
            lat.append(time.perf_counter() - started)

    async def main() -> tuple[list[float], float]:
        lat: list[float] = []
        async with AsyncClient(url, ns) as client:
            run = uuid.uuid4().hex[:6]
            names = [f"tp{run}-{i}" for i in range(trajs)]
            for t in names:
                await client.open(t)
            await asyncio.gather(*(client.call(t, "bash", {"command": "true"}) for t in names))
            started = time.perf_counter()
            await asyncio.gather(*(loop(client, t, started + seconds, lat) for t in names))
            took = time.perf_counter() - started
            for t in names:
                await client.close(t)
        return lat, took

    cmds0, usec0 = command_stats(url)
    lat, took = asyncio.run(main())
    cmds1, usec1 = command_stats(url)
    n = len(lat)
    return {
        "calls": n,
        "calls_per_s": n / took,
        "p50_ms": statistics.median(lat) * 1000,
        "redis_commands_per_call": (cmds1 - cmds0) / n,
        "redis_usec_per_call": (usec1 - usec0) / n,
    }


def compare(trajs: int, seconds: float, rounds: int) -> dict[str, list[dict[str, Any]]]:
    """One Redis and a 3-master cluster, rounds interleaved, a worker on each."""
    found: dict[str, list[dict[str, Any]]] = {"single": [], "cluster": []}
    with EmbeddedRedis() as single, EmbeddedCluster(masters=3) as cluster:
        targets = {"single": single.url, "cluster": cluster.url}
        workers = {}
        try:
            for kind, url in targets.items():
                ns = f"cap{kind}{uuid.uuid4().hex[:4]}"
                workers[kind] = (ns, WorkerProc(url, ns, backend="local", slots=trajs))
            for _ in range(rounds):
                for kind, url in targets.items():
                    found[kind].append(throughput(url, workers[kind][0], trajs, seconds))
        finally:
            for _ns, worker in workers.values():
                worker.stop()
    return found


def median_of(runs: list[dict[str, Any]], field: str) -> float:
    return float(statistics.median(r[field] for r in runs))


def report(result: dict[str, Any]) -> str:
    mem, cmp_ = result["memory"], result["compare"]
    lines = [
        "# Redis capacity",
        "",
        f"Measured {result['when']} with `python bench/capacity.py{result['flags']}`.",
        "",
        f"## Memory: {mem['trajectories']} trajectories x {mem['calls_per_trajectory']} calls, "
        "all ended",
        "",
        f"**{mem['bytes_per_call']:.0f} bytes retained per completed call** "
        f"(MEMORY USAGE of every key; deleting them all freed "
        f"{mem['used_memory_per_call']:.0f} bytes per call of `used_memory`, "
        f"{mem['used_memory_bytes'] / 2**20:.1f} MiB) at the default retention "
        "(results 1 h, ended trajectories 1 day).",
        "",
        "| kind | bytes per call | keys |",
        "|---|--:|--:|",
    ]
    for kind, v in sorted(mem["by_kind"].items(), key=lambda kv: -kv[1]["bytes_per_call"]):
        lines.append(f"| {kind} | {v['bytes_per_call']:.0f} | {v['keys']} |")
    lines += [
        "",
        f"## One Redis against a 3-master cluster ({result['trajectories']} trajectories, `true`, "
        "local backend, rounds interleaved; medians)",
        "",
        "| Redis | calls/s | p50 ms | Redis commands per call | Redis CPU µs per call |",
        "|---|--:|--:|--:|--:|",
    ]
    for kind, runs in cmp_.items():
        lines.append(
            f"| {kind} | {median_of(runs, 'calls_per_s'):.0f} | {median_of(runs, 'p50_ms'):.2f} "
            f"| {median_of(runs, 'redis_commands_per_call'):.1f} "
            f"| {median_of(runs, 'redis_usec_per_call'):.0f} |"
        )
    ratio = median_of(cmp_["cluster"], "calls_per_s") / median_of(cmp_["single"], "calls_per_s")
    lines += ["", f"Cluster / one Redis, calls/s: **{ratio:.2f}**.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    trajs, calls, wave = (100, 100, 50) if opts.quick else (1000, 100, 100)
    level, seconds, rounds = 64, (3.0 if opts.quick else 10.0), (1 if opts.quick else 3)
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "flags": " --quick" if opts.quick else "",
        "host": host_info(),
        "trajectories": level,
        "memory": measure_memory(trajs, calls, wave),
    }
    print(json.dumps(result["memory"]), flush=True)
    result["compare"] = compare(level, seconds, rounds)
    out = os.path.join(OUT_DIR, time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "capacity.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    text = report(result)
    with open(os.path.join(out, "capacity.md"), "w") as fh:
        fh.write(text)
    print(text)
    print(f"[capacity] wrote {out}/capacity.{{json,md}}")


if __name__ == "__main__":
    main()
