"""Run the whole benchmark: toolq against the limit, RQ + docker exec, and the rest.

    python bench/run.py [--quick] [--publish] [--profile] [--paths toolq,limit,...]

Writes bench/out/<time>/ (report.json with every sample, report.md, results.png,
latency.png, throughput.png); ``--publish`` copies report.md and results.png to
bench/RESULTS.md and bench/results.png. Needs a Docker engine and the sandbox
image for every path but ``toolq_local`` and ``limit_local``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from calls import CALLS, SMALL_FILE, Call
from common import (
    BENCH_DIR,
    IMAGE,
    OUT_DIR,
    Budget,
    RedisCounter,
    Run,
    container_memory_mib,
    host_info,
    stage,
    tree_rss_kb,
    write_json,
)
from report import add_ratios, markdown, plots
from toolq_paths import (
    Accounting,
    WorkerProc,
    acquire_all,
    agent_call_fn,
    close_all,
    drive,
    open_all,
    release_all,
    toolq_call_fn,
)

from toolq.producer import AsyncClient
from toolq.worker.backends.base import Backend
from toolq.worker.embedded import EmbeddedRedis
from toolq.worker.settings import WorkerSettings

ALL_PATHS = ["exec", "limit", "toolq", "rq", "toolq_local", "limit_local"]
TRUE = CALLS["true"]


@dataclass
class Config:
    """How much each part measures (``--quick`` shrinks everything)."""

    levels: list[int] = field(default_factory=lambda: [1, 16, 64, 256])
    pack_above: int = 64  # levels above this pack slots into containers
    pack: int = 4  # slots per container above pack_above
    tool_s: float = 3.0  # per-tool latency runs: time box,
    tool_calls: int = 300  # call cap
    tool_min: int = 30  # and floor
    exec_calls: int = 40  # the same for the docker exec paths (~70 ms a call)
    exec_min: int = 10
    sweep_s: float = 4.0  # concurrency runs: time box, cap, floor per trajectory
    sweep_calls: int = 20000
    sweep_min_per_traj: int = 2
    rq_workers: int = 4
    rq_max_level: int = 64  # RQ needs a container per trajectory
    cold: int = 3
    warm: int = 3
    warm_pool: int = 2
    profile_level: int = 64

    def tool_budget(self, exec_path: bool = False) -> Budget:
        if exec_path:
            return Budget(self.tool_s, self.exec_calls, self.exec_min)
        return Budget(self.tool_s, self.tool_calls, self.tool_min)

    def sweep_budget(self, n: int) -> Budget:
        return Budget(self.sweep_s, self.sweep_calls, self.sweep_min_per_traj * n)

    def unpacked(self) -> list[int]:
        return [n for n in self.levels if n <= self.pack_above]

    def packed(self) -> list[int]:
        return [n for n in self.levels if n > self.pack_above]


QUICK = Config(
    levels=[1, 4],
    pack_above=2,
    pack=2,
    tool_s=0.2,
    tool_calls=5,
    tool_min=2,
    exec_calls=3,
    exec_min=1,
    sweep_s=0.3,
    sweep_calls=40,
    rq_workers=1,
    cold=1,
    warm=1,
    warm_pool=1,
    profile_level=4,
)


@dataclass
class Results:
    rows: list[Run] = field(default_factory=list)
    lifecycle: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)

    def add(self, run: Run) -> Run:
        s = run.stats()
        print(
            f"[bench]   {run.path:<12} {run.tool:<10} x{run.concurrency:<4} n={s['n']:<6} "
            f"err={s['errors']:<3} p50={s['p50_ms']:8.2f} ms p99={s['p99_ms']:8.2f} ms "
            f"{s['calls_per_s']:8.1f} calls/s",
            flush=True,
        )
        self.rows.append(run)
        return run

    def life(self, name: str, seconds: list[float], note: str = "") -> None:
        self.lifecycle[name] = {
            "n": len(seconds),
            "p50_s": round(statistics.median(seconds), 3),
            "max_s": round(max(seconds), 3),
            "note": note,
        }


# -- docker exec alone --------------------------------------------------------------
async def phase_exec(cfg: Config, res: Results) -> None:
    from rq_baseline import Containers, exec_cli_fns, exec_fns

    boxes = await asyncio.to_thread(Containers, 1)
    try:
        with ThreadPoolExecutor(4) as pool:
            for call in CALLS.values():
                fns = exec_fns(boxes.cids, call, pool)
                res.add(await drive("exec", call, fns, cfg.tool_budget(exec_path=True)))
        fns = exec_cli_fns(boxes.cids, TRUE)
        res.add(await drive("exec_cli", TRUE, fns, cfg.tool_budget(exec_path=True)))
    finally:
        await asyncio.to_thread(boxes.remove)


# -- the limit ------------------------------------------------------------------------
def docker_backend(ns: str, per_container: int) -> Backend:
    from toolq.worker.backends.docker import DockerBackend

    settings = WorkerSettings(
        backend="docker", default_image=IMAGE, namespace=ns, slots_per_container=per_container
    )
    return DockerBackend(settings)


async def phase_limit(cfg: Config, res: Results, local: bool = False) -> None:
    from toolq.worker.backends.local import LocalBackend

    path = "limit_local" if local else "limit"
    groups = [(cfg.unpacked(), 1), (cfg.packed(), cfg.pack)]
    for index, (levels, per_container) in enumerate(groups):
        if not levels:
            continue
        ns = f"benchlim{uuid.uuid4().hex[:6]}"
        backend = LocalBackend() if local else docker_backend(ns, per_container)
        slots, _ready = await acquire_all(backend, max(levels), per_container)
        try:
            if index == 0:
                for call in CALLS.values():
                    fns = [agent_call_fn(slots[:1], call)]
                    res.add(await drive(path, call, fns, cfg.tool_budget()))
            for n in levels:
                if n == 1 and index == 0:
                    continue  # measured with the other tools above
                fns = [agent_call_fn(slots, TRUE)] * n
                res.add(await drive(path, TRUE, fns, cfg.sweep_budget(n)))
        finally:
            await release_all(backend, slots)
            await backend.shutdown()


# -- toolq end to end -------------------------------------------------------------------
async def measure(
    res: Results,
    path: str,
    call: Call,
    client: AsyncClient,
    trajs: list[str],
    budget: Budget,
    acct: Accounting,
) -> Run:
    with acct:
        run = await drive(path, call, [toolq_call_fn(client, trajs, call)] * len(trajs), budget)
    run.extra.update(acct.per_call(len(run.samples_ms)))
    return res.add(run)


@contextlib.contextmanager
def profiling(pid: int, name: str, seconds: float, res: Results, out: str) -> Iterator[None]:
    """py-spy records ``pid`` for ``seconds`` (collapsed stacks + a top-functions summary)."""
    raw = os.path.join(out, f"profile-{name}.txt")
    spy = shutil.which("py-spy")
    proc = None
    if spy:
        proc = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
             "--rate", "250", "--format", "raw", "--output", raw, "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        yield
    finally:
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(seconds + 30)
            if os.path.exists(raw):
                res.profiles[name] = raw
                summarize_profile(raw)


def summarize_profile(raw: str, top: int = 25) -> None:
    """Next to the collapsed stacks: the functions with the most samples (self, inclusive)."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    with open(raw) as fh:
        for line in fh:
            stack, _, count = line.rstrip().rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + n
    with open(raw.replace(".txt", "-top.txt"), "w") as fh:
        fh.write(f"{total} samples\n\nself\n")
        for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
            fh.write(f"{100 * n / total:6.1f}%  {frame}\n")
        fh.write("\ninclusive\n")
        for frame, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[: top * 2]:
            fh.write(f"{100 * n / total:6.1f}%  {frame}\n")


def box_ids(ns: str) -> list[str]:
    import docker

    found = docker.from_env().api.containers(filters={"label": f"toolq.ns={ns}"}, quiet=True)
    return [c["Id"] for c in found]


async def phase_toolq(
    cfg: Config, res: Results, url: str, out: str, local: bool, profile: bool
) -> None:
    path = "toolq_local" if local else "toolq"
    backend = "local" if local else "docker"
    sync = redis.Redis.from_url(url)
    groups = [(cfg.unpacked(), 1), (cfg.packed(), cfg.pack)]
    for index, (levels, per_container) in enumerate(groups):
        if not levels:
            continue
        top = max(levels)
        ns = f"bench{uuid.uuid4().hex[:6]}"
        worker = WorkerProc(
            url, ns, backend=backend, default_image=IMAGE, slots=top,
            slots_per_container=per_container,
        )  # fmt: skip
        acct = Accounting(worker, sync)
        try:
            async with AsyncClient(url, ns) as client:
                if index == 0 and not local:
                    await cold_opens(cfg, res, client)
                rss0 = tree_rss_kb(worker.pid)
                trajs = [f"t{i}" for i in range(top)]
                ready = await open_all(client, trajs, per_container)
                kind = "packed" if per_container > 1 else "unpacked"
                res.life(
                    f"{backend}: open {top} at once ({kind})",
                    ready,
                    f"{per_container} slot(s)/container, start cap 4" if not local else "",
                )
                await asyncio.sleep(0.5)
                res.memory[f"{backend}_{kind}"] = memory(worker, ns, top, per_container, rss0)
                if index == 0:
                    for call in CALLS.values():
                        await measure(res, path, call, client, trajs[:1], cfg.tool_budget(), acct)
                for n in levels:
                    if n == 1 and index == 0:
                        continue  # measured with the other tools above
                    budget = cfg.sweep_budget(n)
                    if profile and not local and n == cfg.profile_level:
                        with (
                            profiling(worker.pid, "worker", cfg.sweep_s, res, out),
                            profiling(os.getpid(), "client", cfg.sweep_s, res, out),
                        ):
                            await measure(res, path, TRUE, client, trajs[:n], budget, acct)
                    else:
                        await measure(res, path, TRUE, client, trajs[:n], budget, acct)
                await close_all(client, trajs)
        finally:
            await asyncio.to_thread(worker.stop)
    sync.close()


def memory(worker: WorkerProc, ns: str, slots: int, per_container: int, rss0: int) -> dict[str, Any]:
    rss1 = tree_rss_kb(worker.pid)
    found: dict[str, Any] = {
        "slots": slots,
        "per_container": per_container,
        "worker_kib_per_slot": (rss1 - rss0) / slots,
    }
    cids = box_ids(ns)
    if cids:
        import docker

        mib = container_memory_mib(docker.from_env().api, cids[:8])
        if mib:
            found["container_mib"] = statistics.fmean(mib)
            found["container_mib_per_slot"] = statistics.fmean(mib) / per_container
            found["containers"] = len(cids)
    else:  # local: the agents are the worker's children, counted in its tree's RSS
        found["note"] = "worker RSS includes its agent subprocesses"
    return found


async def cold_opens(cfg: Config, res: Results, client: AsyncClient) -> None:
    """Open one trajectory at a time on an idle worker: container start included."""
    took = []
    for i in range(cfg.cold):
        started = time.perf_counter()
        await client.open(f"cold{i}")
        r = await client.call(f"cold{i}", "bash", {"command": "true"}, wait_s=120)
        took.append(time.perf_counter() - started)
        assert r.ok, r
        await client.close(f"cold{i}")
        await asyncio.sleep(0.5)  # let its container go
    res.life("docker: cold open (image present)", took, "create + start + agent + init")


async def phase_warm_pool(cfg: Config, res: Results, url: str) -> None:
    ns = f"benchwarm{uuid.uuid4().hex[:6]}"
    worker = WorkerProc(
        url, ns, backend="docker", default_image=IMAGE, slots=4, warm_pool=cfg.warm_pool
    )
    took = []
    try:
        async with AsyncClient(url, ns) as client:
            for i in range(cfg.warm):
                await wait_warm(ns, cfg.warm_pool)
                started = time.perf_counter()
                await client.open(f"warm{i}")
                r = await client.call(f"warm{i}", "bash", {"command": "true"}, wait_s=120)
                took.append(time.perf_counter() - started)
                assert r.ok, r
                await client.close(f"warm{i}")
    finally:
        await asyncio.to_thread(worker.stop)
    res.life("docker: warm-pool open", took, f"warm_pool={cfg.warm_pool}, refilled between opens")


async def wait_warm(ns: str, count: int, timeout_s: float = 60.0) -> None:
    """Until ``count`` idle warm containers exist, plus time for their agents to boot."""
    import docker

    api = docker.from_env().api
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        labels = [f"toolq.ns={ns}", "toolq.pool=warm", "toolq.traj="]
        found = await asyncio.to_thread(api.containers, filters={"label": labels})
        if len(found) >= count:
            await asyncio.sleep(1.5)
            return
        await asyncio.sleep(0.2)


# -- RQ ---------------------------------------------------------------------------------
async def phase_rq(cfg: Config, res: Results, url: str) -> None:
    from rq_baseline import Containers, RqWorkers

    levels = [n for n in cfg.levels if n <= cfg.rq_max_level]
    boxes = await asyncio.to_thread(Containers, max(levels))
    workers = RqWorkers(url, cfg.rq_workers)
    try:
        with ThreadPoolExecutor(max(levels) + 4) as pool:
            warm = workers.fns(boxes.cids[:1], TRUE, pool)  # imports, connections
            await drive("rq", TRUE, warm, Budget(0, cfg.rq_workers * 2, cfg.rq_workers * 2))
            for call in CALLS.values():
                fns = workers.fns(boxes.cids[:1], call, pool)
                res.add(await drive("rq", call, fns, cfg.tool_budget(exec_path=True)))
            for n in levels:
                if n == 1:
                    continue  # measured with the other tools above
                fns = workers.fns(boxes.cids[:n], TRUE, pool)
                res.add(await drive("rq", TRUE, fns, cfg.sweep_budget(n)))
    finally:
        workers.stop()
        await asyncio.to_thread(boxes.remove)


# -- main -------------------------------------------------------------------------------
async def run_all(args: argparse.Namespace, cfg: Config, out: str) -> Results:
    res = Results()
    RedisCounter.install()
    paths = args.paths
    with EmbeddedRedis() as server:
        if "exec" in paths:
            with stage("docker exec alone", res.stages):
                await phase_exec(cfg, res)
        if "limit" in paths:
            with stage("limit (agent over its stream)", res.stages):
                await phase_limit(cfg, res)
        if "toolq" in paths:
            with stage("toolq end to end, Docker", res.stages):
                await phase_toolq(cfg, res, server.url, out, local=False, profile=args.profile)
            with stage("warm pool", res.stages):
                await phase_warm_pool(cfg, res, server.url)
        if "rq" in paths:
            with stage("RQ + docker exec", res.stages):
                await phase_rq(cfg, res, server.url)
        if "limit_local" in paths:
            with stage("limit, local agent", res.stages):
                await phase_limit(cfg, res, local=True)
        if "toolq_local" in paths:
            with stage("toolq end to end, local backend", res.stages):
                await phase_toolq(cfg, res, server.url, out, local=True, profile=False)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run")
    parser.add_argument("--publish", action="store_true", help="copy to bench/RESULTS.md + png")
    parser.add_argument("--profile", action="store_true", help="py-spy the worker and client")
    parser.add_argument("--paths", default=",".join(ALL_PATHS), help="comma-separated subset")
    parser.add_argument("--levels", default=None, help="concurrency levels, e.g. 1,16,64,256")
    parser.add_argument("--pack", type=int, default=None, help="slots per container above 64")
    parser.add_argument("--rq-workers", type=int, default=None)
    parser.add_argument("--out", default=None, help="output directory")
    args = parser.parse_args(argv)
    args.paths = [p for p in args.paths.split(",") if p]
    unknown = set(args.paths) - set(ALL_PATHS)
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}; choose from {ALL_PATHS}")
    cfg = QUICK if args.quick else Config()
    if args.levels:
        cfg.levels = sorted(int(x) for x in args.levels.split(","))
    if args.pack:
        cfg.pack = args.pack
    if args.rq_workers:
        cfg.rq_workers = args.rq_workers
    out = args.out or os.path.join(OUT_DIR, time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)

    started, t0 = time.strftime("%Y-%m-%d %H:%M %Z"), time.perf_counter()
    host = host_info()
    res = asyncio.run(run_all(args, cfg, out))
    rows = [r.stats() for r in res.rows]
    add_ratios(rows)
    report = {
        "started": started,
        "command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "host": host,
        "config": {**asdict(cfg), "paths": args.paths, "small_file": SMALL_FILE},
        "rows": rows,
        "lifecycle": res.lifecycle,
        "memory": res.memory,
        "stages": res.stages,
        "profiles": res.profiles,
        "samples_ms": {
            f"{r.path}|{r.tool}|{r.concurrency}": [round(x, 3) for x in r.samples_ms]
            for r in res.rows
        },
    }
    write_json(os.path.join(out, "report.json"), report)
    md = markdown(report)
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(md)
    pngs = plots(report, os.path.join(out, ""))
    print(md)
    print(f"[bench] wrote {out}/ (report.json, report.md, {', '.join(pngs)})")
    if args.publish:
        shutil.copy(os.path.join(out, "report.md"), os.path.join(BENCH_DIR, "RESULTS.md"))
        shutil.copy(pngs["results"], os.path.join(BENCH_DIR, "results.png"))
        print("[bench] published bench/RESULTS.md and bench/results.png")
    errors = sum(r["errors"] for r in rows)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
