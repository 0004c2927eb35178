"""The measuring harness: a worker process, call loops, Redis accounting, slot helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis
from calls import CALLS, MAX_OUTPUT_BYTES, SETUP_ARGS, Call, bench_spec, check_output
from common import (
    BENCH_DIR,
    OUT_DIR,
    Budget,
    RedisCounter,
    Run,
    commandstats,
    diff,
    process_cpu_s,
    redis_cpu_s,
    stage_breakdown,
)

from toolq.producer import AsyncClient
from toolq.schemas import Keys
from toolq.worker.backends.base import Backend, Slot

WAIT_S = 300.0  # a first call may wait for a container start under a start storm
CALL_WAIT_S = 60.0  # a measured call: longer is an error (a hang must not stall the run)


# -- the worker process ------------------------------------------------------------
class WorkerProc:
    """``bench/worker_main.py`` as a child process (its own CPU, its own GIL)."""

    def __init__(self, redis_url: str, ns: str, **settings: Any) -> None:
        self.redis_url, self.ns = redis_url, ns
        fields = {"redis_url": redis_url, "namespace": ns, "block_ms": 1000, **settings}
        os.makedirs(OUT_DIR, exist_ok=True)
        self.stats_path = os.path.join(OUT_DIR, f".worker-{ns}.json")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                os.path.join(BENCH_DIR, "worker_main.py"),
                json.dumps(fields),
                self.stats_path,
            ],
            cwd=BENCH_DIR,
        )
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        from toolq.schemas.local import redis_target

        target, cluster = redis_target(self.redis_url)
        client: Any = (redis.RedisCluster if cluster else redis.Redis).from_url(target)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.proc.returncode}")
                if client.zcard(Keys(self.ns).workers):
                    return
                time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError("worker did not register in time")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict[str, int]:
        """The worker's Redis round trips, commands and RSS so far."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.stats_path)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError), open(self.stats_path) as fh:
                return dict(json.load(fh))
            time.sleep(0.01)
        raise RuntimeError("worker did not report its stats")

    def stop(self, timeout_s: float = 180.0) -> None:
        """SIGTERM: a graceful shutdown removes the worker's containers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.stats_path)


# -- driving calls -------------------------------------------------------------------
CallFn = Callable[[int], Awaitable[tuple[bool, str]]]  # trajectory index -> (ok, output)


async def drive(
    path: str, call: Call, fns: list[CallFn], budget: Budget, concurrency: int | None = None
) -> Run:
    """``len(fns)`` trajectories, each: call, wait for the result, call again."""
    run = Run(path, call.name, concurrency or len(fns))
    started = time.perf_counter()
    count = 0

    async def loop(index: int) -> None:
        nonlocal count
        while not budget.done(started, count):
            count += 1
            t0 = time.perf_counter()
            try:
                ok, output = await fns[index](index)
            except Exception as exc:  # counted, shown, never fatal
                ok, output = False, repr(exc)
            run.samples_ms.append((time.perf_counter() - t0) * 1000)
            if not ok or not check_output(call, output):
                run.errors += 1
                if run.errors <= 3:
                    print(f"[bench] {path} {call.name} error: {output[:300]!r}", flush=True)

    await asyncio.gather(*(loop(i) for i in range(len(fns))))
    run.wall_s = time.perf_counter() - started
    return run


def toolq_call_fn(
    client: AsyncClient,
    trajs: list[str],
    call: Call,
    breakdown: list[dict[str, float]] | None = None,
) -> CallFn:
    """A toolq call; with ``breakdown``, each call's time per stage is added to it."""

    async def fn(index: int) -> tuple[bool, str]:
        submitted = time.time() * 1000
        r = await client.call(trajs[index], call.tool, call.args, wait_s=CALL_WAIT_S)
        if breakdown is not None and r.stages:
            times = {**r.stages, "submitted": submitted, "woken": time.time() * 1000}
            breakdown.append(stage_breakdown(times))
        return r.ok, r.output

    return fn


async def open_all(client: AsyncClient, trajs: list[str], per_container: int = 1) -> list[float]:
    """Open trajectories at once; per trajectory, seconds from open to its first result.

    The first call writes the small file the ``cat`` call reads.
    """
    started = time.perf_counter()

    async def one(traj: str) -> float:
        await client.open(traj, bench_spec(per_container))
        r = await client.call(traj, "write_file", SETUP_ARGS, wait_s=WAIT_S)
        if not r.ok:
            raise RuntimeError(f"{traj}: first call failed: {r.error}")
        return time.perf_counter() - started

    return list(await asyncio.gather(*(one(t) for t in trajs)))


async def close_all(client: AsyncClient, trajs: list[str]) -> None:
    await asyncio.gather(*(client.close(t) for t in trajs))


class Accounting:
    """Redis traffic of one measured run: client side (this process), worker side, server."""

    def __init__(self, worker: WorkerProc, sync: redis.Redis) -> None:
        self.worker, self.sync = worker, sync

    def __enter__(self) -> Accounting:
        self.client0 = RedisCounter.snapshot()
        self.worker0 = self.worker.stats()
        self.server0 = commandstats(self.sync)
        self.cpu0 = (process_cpu_s(self.worker.pid), redis_cpu_s(self.sync))
        return self

    def __exit__(self, *exc: object) -> None:
        self.client1 = RedisCounter.snapshot()
        self.worker1 = self.worker.stats()
        self.server1 = commandstats(self.sync)
        self.cpu1 = (process_cpu_s(self.worker.pid), redis_cpu_s(self.sync))

    def counts(self) -> dict[str, Any]:
        """Round trips and commands during the run (``Run.merge`` adds them up)."""
        server = diff(self.server1, self.server0)
        server.pop("info", None)  # our own INFO commandstats
        return {
            "client_rt": self.client1["round_trips"] - self.client0["round_trips"],
            "client_cmds": self.client1["commands"] - self.client0["commands"],
            "worker_rt": self.worker1["round_trips"] - self.worker0["round_trips"],
            "worker_cmds": self.worker1["commands"] - self.worker0["commands"],
            "server_cmds": server,
            "worker_cpu_s": self.cpu1[0] - self.cpu0[0],
            "redis_cpu_s": self.cpu1[1] - self.cpu0[1],
        }


# -- the limit: the agent over its stream, no Redis, no worker ------------------------
def agent_call_fn(slots: list[Slot], call: Call) -> CallFn:
    async def fn(index: int) -> tuple[bool, str]:
        slot = slots[index]
        reply = await slot.channel.request(
            "call",
            slot=slot.name,
            tool=call.tool,
            args=call.args,
            timeout_s=60.0,
            max_output_bytes=MAX_OUTPUT_BYTES,
        )
        return bool(reply.get("ok")), str(reply.get("output", ""))

    return fn


async def acquire_all(
    backend: Backend, count: int, per_container: int = 1
) -> tuple[list[Slot], list[float]]:
    """``count`` slots at once, each with the small file written; seconds to each ready."""
    started = time.perf_counter()

    async def one(index: int) -> tuple[Slot, float]:
        slot = await backend.acquire(f"limit{index}", bench_spec(per_container))
        fn = agent_call_fn([slot], Call("setup", "write_file", SETUP_ARGS, None))
        ok, output = await fn(0)
        if not ok:
            raise RuntimeError(f"setup failed: {output}")
        return slot, time.perf_counter() - started

    got = await asyncio.gather(*(one(i) for i in range(count)))
    return [s for s, _ in got], [t for _, t in got]


async def release_all(backend: Backend, slots: list[Slot]) -> None:
    await asyncio.gather(*(backend.release(s) for s in slots), return_exceptions=True)


def per_tool_calls() -> list[Call]:
    return list(CALLS.values())
