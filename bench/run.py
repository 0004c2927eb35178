"""Run the whole benchmark: toolq against the limit, RQ + docker exec, and the rest.

    python bench/run.py [--quick] [--publish] [--profile] [--paths toolq,limit,...]
                        [--runtimes runc,runsc]

Writes bench/out/<time>/ (report.json with every sample, report.md, results.png,
latency.png, throughput.png); ``--publish`` copies report.md and results.png to
bench/RESULTS.md and bench/results.png. Needs a Docker engine and the sandbox
image for every path but ``toolq_local`` and ``limit_local``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from calls import CALLS, SMALL_FILE, Call
from common import (
    BENCH_DIR,
    IMAGE,
    OUT_DIR,
    Budget,
    RedisCounter,
    Run,
    host_info,
    stage,
    write_json,
)
from harness import (
    CallFn,
    WorkerProc,
    acquire_all,
    agent_call_fn,
    close_all,
    open_all,
    release_all,
    toolq_call_fn,
)
from paths import ExecPath, LimitPath, Path, RelayAgentPath, RqPath, ToolqPath
from readme_table import publish as publish_readme_table
from relay import relay_round_trips_ms
from report import add_ratios, markdown, plots

from toolq.producer import AsyncClient
from toolq.worker.embedded import EmbeddedRedis

T = TypeVar("T")
ALL_PATHS = ["exec", "limit", "relay_agent", "toolq", "rq", "toolq_local", "limit_local"]
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
    local_max_level: int = 64  # a local agent is a ~20 MB Python process per slot
    cold: int = 3
    warm: int = 3
    warm_pool: int = 2
    profile_level: int = 64
    rounds: int = 3  # each measurement in this many slices, interleaved across paths
    scale: int = 1000  # the scale row: this many trajectories calling at once,
    scale_pack: int = 8  # this many slots per container
    beside_running: int = 8  # claims beside calls: these trajectories call in a loop
    beside_opened: int = 64  # while this many are opened at once
    runtime_level: int = 16  # --runtimes rows: per tool at 1, then `true` at this many
    relay_calls: int = 1000  # the floor (bench/relay.py): round trips, before and after

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
    rounds=2,
    scale=0,
    beside_running=1,
    beside_opened=2,
    runtime_level=2,
    relay_calls=20,
)


@dataclass
class Results:
    rows: list[Run] = field(default_factory=list)
    lifecycle: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)
    beside: dict[str, Any] = field(default_factory=dict)

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


# -- comparing paths ---------------------------------------------------------------------
async def compare(
    cfg: Config, res: Results, paths: list[Path], levels: list[int], out: str, profile: bool
) -> None:
    """Start the paths, then measure them back to back: per tool at 1, then each level."""
    for path in paths:
        with stage(f"start {path.name} for {path.size}", res.stages):
            await path.start()
        for name, seconds in path.lifecycle.items():
            note = (
                "start cap 4 (start_concurrency)" if "at once" in name and "docker" in name else ""
            )
            res.life(name, seconds, note)
        if path.memory:
            per = path.memory["per_container"]
            kind = f"{path.name}, " + (
                f"{per} slot(s) per container" if per != "-" else "an agent process per slot"
            )
            res.memory[kind] = path.memory
    try:
        if 1 in levels:
            for call in CALLS.values():
                runs = [(p, call, 1, cfg.tool_budget(p.slow)) for p in paths if p.supports(call, 1)]
                await interleaved(res, runs, cfg.rounds)
        for n in [n for n in levels if n > 1]:
            runs = [(p, TRUE, n, cfg.sweep_budget(n)) for p in paths if p.supports(TRUE, n)]
            await interleaved(res, runs, cfg.rounds)
            toolq = next((p for p in paths if p.name == "toolq"), None)
            if profile and n == cfg.profile_level and isinstance(toolq, ToolqPath):
                # An extra, unrecorded run: py-spy's sampling costs CPU the others lack.
                assert toolq.worker is not None
                with (
                    profiling(toolq.worker.pid, "worker", cfg.sweep_s, res, out),
                    profiling(os.getpid(), "client", cfg.sweep_s, res, out),
                ):
                    await toolq.run(TRUE, n, cfg.sweep_budget(n))
    finally:
        for path in paths:
            with stage(f"stop {path.name}", res.stages):
                await path.stop()


async def interleaved(
    res: Results, runs: list[tuple[Path, Call, int, Budget]], rounds: int
) -> None:
    """Each path's budget in ``rounds`` slices, round robin: a burst of host load
    (other work on a shared machine) then hits every path alike."""
    merged: dict[int, Run] = {}
    for _ in range(rounds):
        for index, (path, call, n, budget) in enumerate(runs):
            got = await path.run(call, n, budget.split(rounds))
            if index in merged:
                merged[index].merge(got)
            else:
                merged[index] = got
    for index in range(len(runs)):
        res.add(merged[index])


@contextlib.contextmanager
def profiling(pid: int, name: str, seconds: float, res: Results, out: str) -> Iterator[None]:
    """py-spy samples ``pid`` while it holds the GIL (its Python CPU time) for ``seconds``.

    Writes the collapsed stacks and a top-functions summary next to the report.
    """
    raw = os.path.join(out, f"profile-{name}.txt")
    spy = shutil.which("py-spy")
    proc = None
    if spy:
        proc = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
             "--rate", "250", "--gil", "--format", "raw", "--output", raw, "--nonblocking"],
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
            fh.write(f"{100 * n / max(total, 1):6.1f}%  {frame}\n")
        fh.write("\ninclusive\n")
        for frame, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[: top * 2]:
            fh.write(f"{100 * n / max(total, 1):6.1f}%  {frame}\n")


# -- container lifecycle --------------------------------------------------------------
async def warm_pool_opens(cfg: Config, res: Results, url: str, runtime: str = "") -> None:
    """Open -> first result when an idle warm container is waiting."""
    ns = f"benchwarm{uuid.uuid4().hex[:6]}"
    worker = await asyncio.to_thread(
        WorkerProc, url, ns, backend="docker", default_image=IMAGE, slots=4,
        warm_pool=cfg.warm_pool, runtime=runtime or "runc",
    )  # fmt: skip
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
    where = f"docker ({runtime})" if runtime else "docker"
    note = f"warm_pool={cfg.warm_pool}, refilled between opens"
    res.life(f"{where}: warm-pool open", took, note)


async def runtime_rows(cfg: Config, res: Results, url: str, runtimes: list[str]) -> None:
    """The same calls under each Docker runtime (runc, runsc: gVisor), interleaved in
    one stage: the limit, toolq and relay_agent per runtime, cold and warm opens per
    runtime."""
    paths: list[Path] = []
    for runtime in runtimes:
        paths.append(LimitPath(cfg.runtime_level, runtime=runtime))
        paths.append(ToolqPath(cfg.runtime_level, url, cold=cfg.cold, runtime=runtime))
        # The simplest program doing toolq's work under the same runtime (issue 37):
        # does the runtime make toolq's own work cost more, or any program's on it?
        paths.append(RelayAgentPath(cfg.runtime_level, url, runtime=runtime))
    await compare(cfg, res, paths, [1, cfg.runtime_level], "", False)
    kinds = ("limit", "toolq", "relay_agent")
    names = {f"{kind}_{runtime}": runtime for runtime in runtimes for kind in kinds}
    for run in res.rows:
        if run.path in names:
            run.extra["runtime"] = names[run.path]
    for runtime in runtimes:
        await warm_pool_opens(cfg, res, url, runtime)


async def open_storm(res: Results, url: str, size: int) -> None:
    """``size`` trajectories opened at once, a container each (not in the default run)."""
    path = ToolqPath(size, url)
    try:
        await path.start()
    finally:
        await path.stop()
    for name, seconds in path.lifecycle.items():
        res.life(name, seconds, "start cap 4 (start_concurrency)")
    res.memory[f"toolq, {size} unpacked"] = path.memory


async def scale_row(cfg: Config, res: Results, url: str) -> None:
    """The scale row: ``cfg.scale`` trajectories packed ``cfg.scale_pack`` per
    container, each calling in a loop; with the worker's RSS and Redis's memory."""
    path = ToolqPath(cfg.scale, url, cfg.scale_pack)
    try:
        await path.start()
        for name, seconds in path.lifecycle.items():
            res.life(name, seconds, "start cap 4 (start_concurrency)")
        res.memory[f"toolq, {cfg.scale} trajectories, {cfg.scale_pack} per container"] = path.memory
        res.add(await path.run(TRUE, cfg.scale, cfg.sweep_budget(cfg.scale)))
    finally:
        await path.stop()


async def claims_beside_calls(cfg: Config, res: Results, url: str) -> None:
    """``beside_running`` trajectories call ``true`` in a loop; then
    ``beside_opened`` more are opened at once (a container each). The running
    ones' latency before, and while the others are claimed and started; the
    same for the limit (the agent driven from here) while this process starts
    as many containers, which shows what the container starts alone cost."""
    running, opened = cfg.beside_running, cfg.beside_opened
    budget = Budget(cfg.sweep_s, cfg.sweep_calls, 4 * running)
    toolq = ToolqPath(running, url, slots=running + opened)
    try:
        await toolq.start()
        assert toolq.client is not None
        client = toolq.client
        before = await toolq.run(TRUE, running, budget)
        new = [f"new{i}" for i in range(opened)]
        fn = toolq_call_fn(client, toolq.trajs, TRUE)
        during, ready_s = await _latency_beside(fn, running, lambda: open_all(client, new, 1))
        await close_all(client, new)
    finally:
        await toolq.stop()
    res.beside["toolq"] = _beside_figures(before, during, ready_s)
    limit = LimitPath(running)
    try:
        await limit.start()
        assert limit.backend is not None
        backend = limit.backend
        before = await limit.run(TRUE, running, budget)
        fn = agent_call_fn(limit.slots, TRUE)
        during, (slots, ready_s) = await _latency_beside(
            fn, running, lambda: acquire_all(backend, opened)
        )
        await release_all(backend, slots)
    finally:
        await limit.stop()
    res.beside["limit"] = _beside_figures(before, during, ready_s)
    res.beside.update(running=running, opened=opened)
    print(f"[bench] claims beside calls: {res.beside}", flush=True)


async def _latency_beside(
    fn: CallFn, n: int, storm: Callable[[], Awaitable[T]]
) -> tuple[list[float], T]:
    """Latencies (ms) of ``n`` loops calling ``fn`` while ``storm`` runs; its result."""
    during: list[float] = []
    stop = asyncio.Event()

    async def loop(index: int) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            ok, output = await fn(index)
            during.append((time.perf_counter() - t0) * 1000)
            if not ok:
                raise RuntimeError(f"a call failed beside the storm: {output[:200]}")

    loops = [asyncio.create_task(loop(i)) for i in range(n)]
    try:
        got = await storm()
    finally:
        stop.set()
        await asyncio.gather(*loops)
    return during, got


def _beside_figures(before: Run, during: list[float], ready_s: list[float]) -> dict[str, Any]:
    b = before.stats()
    return {
        "opened_ready_p50_s": round(statistics.median(ready_s), 3),
        "opened_ready_max_s": round(max(ready_s), 3),
        "before_p50_ms": b["p50_ms"],
        "before_p99_ms": b["p99_ms"],
        "during_n": len(during),
        "during_p50_ms": round(statistics.median(during), 2),
        "during_p99_ms": round(sorted(during)[int(0.99 * (len(during) - 1))], 2),
        "during_max_ms": round(max(during), 2),
    }


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


# -- main -------------------------------------------------------------------------------
async def relay_floor(cfg: Config, into: Run, url: str) -> None:
    """The floor of any Redis-queued call here (``bench/relay.py``): the same hops as
    toolq's, no work. toolq's added cost is reported as a multiple of its p50."""
    started = time.perf_counter()
    samples, _ = await asyncio.to_thread(
        relay_round_trips_ms, url, cfg.relay_calls, prefix=f"relay{uuid.uuid4().hex[:6]}"
    )
    into.samples_ms += samples
    into.wall_s += time.perf_counter() - started


async def run_all(args: argparse.Namespace, cfg: Config, out: str) -> Results:
    res = Results()
    RedisCounter.install()
    want = set(args.paths)
    with EmbeddedRedis() as server:
        url = server.url
        small, big = cfg.unpacked(), cfg.packed()
        if small:
            top = max(small)
            rq_top = max([n for n in small if n <= cfg.rq_max_level], default=0)
            paths: list[Path] = []
            if "limit" in want:
                paths.append(LimitPath(top))
            if "relay_agent" in want:
                paths.append(RelayAgentPath(top, url))
            if "toolq" in want:
                paths.append(ToolqPath(top, url, cold=cfg.cold))
            if "rq" in want and rq_top:
                paths.append(RqPath(rq_top, url, cfg.rq_workers))
            if "exec" in want:
                paths += [ExecPath(), ExecPath(cli=True)]
            if paths:
                floor = Run("relay", "floor", 1)  # before and after: the same load as the paths
                await relay_floor(cfg, floor, url)
                with stage(f"Docker paths, up to {top} trajectories", res.stages):
                    await compare(cfg, res, paths, small, out, args.profile)
                await relay_floor(cfg, floor, url)
                res.add(floor)
        if big and want & {"limit", "toolq"}:
            paths = []
            if "limit" in want:
                paths.append(LimitPath(max(big), cfg.pack))
            if "toolq" in want:
                paths.append(ToolqPath(max(big), url, cfg.pack))
            with stage(f"Docker paths, {cfg.pack} slots per container", res.stages):
                await compare(cfg, res, paths, big, out, False)
        if len(args.runtimes) > 1 or args.runtimes != ["runc"]:
            with stage(f"runtimes {', '.join(args.runtimes)}", res.stages):
                await runtime_rows(cfg, res, url, args.runtimes)
        if args.storm:
            with stage(f"open {args.storm} unpacked trajectories at once", res.stages):
                await open_storm(res, url, args.storm)
        if "toolq" in want and cfg.beside_opened:
            with stage("claims beside running calls", res.stages):
                await claims_beside_calls(cfg, res, url)
        if "toolq" in want and cfg.scale:
            with stage(f"scale: {cfg.scale} trajectories", res.stages):
                await scale_row(cfg, res, url)
        if "toolq" in want and cfg.warm:
            with stage("warm pool", res.stages):
                await warm_pool_opens(cfg, res, url)
        levels = [n for n in cfg.levels if n <= cfg.local_max_level]
        local: list[Path] = []
        if "limit_local" in want:
            local.append(LimitPath(max(levels), local=True))
        if "toolq_local" in want:
            local.append(ToolqPath(max(levels), url, local=True))
        if local:
            with stage("local backend", res.stages):
                await compare(cfg, res, local, levels, out, False)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run")
    parser.add_argument("--publish", action="store_true", help="copy to bench/RESULTS.md + png")
    parser.add_argument("--profile", action="store_true", help="py-spy the worker and client")
    parser.add_argument("--paths", default=",".join(ALL_PATHS), help="comma-separated subset")
    parser.add_argument("--levels", default=None, help="concurrency levels, e.g. 1,16,64,256")
    parser.add_argument(
        "--runtimes",
        default="runc",
        help="Docker runtimes compared side by side (limit and toolq rows, cold and warm "
        "opens), e.g. runc,runsc; registered with the engine (see README, gVisor)",
    )
    parser.add_argument("--pack", type=int, default=None, help="slots per container above 64")
    parser.add_argument("--rq-workers", type=int, default=None)
    parser.add_argument(
        "--scale", type=int, default=None, help="the scale row's trajectories (0: none)"
    )
    parser.add_argument("--out", default=None, help="output directory")
    parser.add_argument("--from-json", default=None, help="only render this report.json again")
    parser.add_argument(
        "--storm", type=int, default=0, help="also open N unpacked trajectories at once"
    )
    args = parser.parse_args(argv)
    args.paths = [p for p in args.paths.split(",") if p]
    args.runtimes = [r for r in args.runtimes.split(",") if r]
    unknown = set(args.paths) - set(ALL_PATHS)
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}; choose from {ALL_PATHS}")
    if args.from_json:  # render an earlier run again (after a change to report.py)
        with open(args.from_json) as fh:
            report = json.load(fh)
        return render(report, os.path.dirname(os.path.abspath(args.from_json)), args.publish)
    cfg = QUICK if args.quick else Config()
    if args.levels:
        cfg.levels = sorted(int(x) for x in args.levels.split(","))
    if args.pack:
        cfg.pack = args.pack
    if args.rq_workers:
        cfg.rq_workers = args.rq_workers
    if args.scale is not None:
        cfg.scale = args.scale
    out = args.out or os.path.join(OUT_DIR, time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)

    # SIGTERM (and SIGINT, even when a background shell ignores it) cancels the
    # run: the paths' clean-up then removes their containers and workers.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.default_int_handler)
    started, t0 = time.strftime("%Y-%m-%d %H:%M %Z"), time.perf_counter()
    host = host_info()
    import toolq.worker

    host["toolq_source"] = os.path.dirname(os.path.dirname(toolq.worker.__file__))
    with contextlib.suppress(Exception):
        git = ["git", "-C", BENCH_DIR, "rev-parse", "--short", "HEAD"]
        host["commit"] = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    res = asyncio.run(run_all(args, cfg, out))
    host["loadavg_end"] = os.getloadavg()
    rows = [r.stats() for r in res.rows]
    add_ratios(rows)
    report = {
        "started": started,
        "command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "host": host,
        "config": {
            **asdict(cfg),
            "paths": args.paths,
            "runtimes": args.runtimes,
            "small_file": SMALL_FILE,
        },
        "rows": rows,
        "lifecycle": res.lifecycle,
        "memory": res.memory,
        "stages": res.stages,
        "profiles": res.profiles,
        "beside": res.beside,
        "samples_ms": {
            f"{r.path}|{r.tool}|{r.concurrency}": [round(x, 3) for x in r.samples_ms]
            for r in res.rows
        },
    }
    write_json(os.path.join(out, "report.json"), report)
    return render(report, out, args.publish)


def render(report: dict[str, Any], out: str, publish: bool) -> int:
    """report.md and the PNGs next to report.json; exit status 1 if any call failed."""
    md = markdown(report)
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(md)
    pngs = plots(report, os.path.join(out, ""))
    print(md)
    print(f"[bench] wrote {out}/ (report.json, report.md, {', '.join(pngs)})")
    if publish:
        shutil.copy(os.path.join(out, "report.md"), os.path.join(BENCH_DIR, "RESULTS.md"))
        shutil.copy(pngs["results"], os.path.join(BENCH_DIR, "results.png"))
        publish_readme_table(report)
        print("[bench] published bench/RESULTS.md, bench/results.png and README.md's table")
    return 1 if sum(r["errors"] for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
