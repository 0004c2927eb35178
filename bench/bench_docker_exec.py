"""Per-call latency: `docker exec` versus toolq's attached agent stream.

    python bench/bench_docker_exec.py [--calls N] [--exec-calls M] [--image IMAGE]

Measures, one call at a time (latency, not throughput):

  exec_sdk     docker-py exec_create + exec_start of `sh -c true`
  exec_cli     `docker exec <c> sh -c true` (a CLI process per call)
  agent_ping   the agent over its attached exec stream: a `ping` op (no fork)
  agent_bash   the agent over its attached exec stream: bash `true`
  local_*      the same two against the agent as a local subprocess (no Docker)
  toolq_e2e    Client.call(bash `true`) through Redis and a worker subprocess

and writes everything to bench/out/bench_docker_exec-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import docker

from toolq.producer import Client
from toolq.schemas import TrajectorySpec
from toolq.worker.backends.base import Backend
from toolq.worker.backends.docker import DockerBackend
from toolq.worker.backends.local import LocalBackend
from toolq.worker.embedded import EmbeddedRedis
from toolq.worker.settings import WorkerSettings

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
WORKER_CODE = """
import asyncio, logging, sys
from toolq.worker.service import serve
from toolq.worker.settings import WorkerSettings
logging.basicConfig(level=logging.WARNING)
asyncio.run(serve(WorkerSettings(redis_url=sys.argv[1], namespace=sys.argv[2],
    backend="docker", default_image=sys.argv[3], slots=2)))
"""


def summarize(samples_ms: list[float]) -> dict[str, float]:
    """p50 / p99 / mean / min / max of latencies in milliseconds."""
    ordered = sorted(samples_ms)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    return {
        "n": len(ordered),
        "p50_ms": round(pct(50), 3),
        "p99_ms": round(pct(99), 3),
        "mean_ms": round(statistics.fmean(ordered), 3),
        "min_ms": round(ordered[0], 3),
        "max_ms": round(ordered[-1], 3),
    }


def timed(fn: Callable[[], Any], calls: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


# -- (a) docker exec per call -------------------------------------------------
def bench_exec(image: str, calls: int) -> dict[str, list[float]]:
    client = docker.from_env()
    box = client.containers.run(
        image, ["sleep", "infinity"], detach=True, network_mode="none", labels={"toolq.bench": "1"}
    )
    try:

        def sdk() -> None:
            exec_id = client.api.exec_create(box.id, ["sh", "-c", "true"])["Id"]
            client.api.exec_start(exec_id)

        def cli() -> None:
            subprocess.run(["docker", "exec", box.id, "sh", "-c", "true"], check=True)

        return {"exec_sdk": timed(sdk, calls), "exec_cli": timed(cli, calls)}
    finally:
        box.remove(force=True)


# -- (c) the agent over its attached stream ------------------------------------
async def bench_agent_async(
    backend: Backend, calls: int, prefix: str = "agent"
) -> dict[str, list[float]]:
    slot = await backend.acquire("bench", TrajectorySpec())
    try:
        out: dict[str, list[float]] = {}
        for label, op, fields in (
            (f"{prefix}_ping", "ping", {}),
            (
                f"{prefix}_bash",
                "call",
                {"tool": "bash", "args": {"command": "true"}, "timeout_s": 30},
            ),
        ):
            for _ in range(3):
                await slot.channel.request(op, slot=slot.name, **fields)
            samples = []
            for _ in range(calls):
                start = time.perf_counter()
                reply = await slot.channel.request(op, slot=slot.name, **fields)
                samples.append((time.perf_counter() - start) * 1000)
                assert reply.get("ok"), reply
            out[label] = samples
        return out
    finally:
        await backend.release(slot)
        await backend.shutdown()


# -- (b) end to end through Redis -----------------------------------------------
def bench_e2e(image: str, calls: int) -> dict[str, list[float]]:
    ns = f"bench{uuid.uuid4().hex[:8]}"
    with EmbeddedRedis() as server:
        worker = subprocess.Popen([sys.executable, "-c", WORKER_CODE, server.url, ns, image])
        try:
            with Client(server.url, ns) as client:
                client.open("t")

                def call() -> None:
                    r = client.call("t", "bash", {"command": "true"}, wait_s=60)
                    assert r.ok, r

                call()  # first call waits for the container to start
                samples = timed(call, calls)
                client.close("t")
                return {"toolq_e2e": samples}
        finally:
            worker.terminate()  # SIGTERM: graceful shutdown removes its containers
            worker.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per toolq path")
    parser.add_argument("--exec-calls", type=int, default=50, help="calls per docker exec path")
    parser.add_argument("--image", default=os.environ.get("TOOLQ_TEST_IMAGE", "toolq-sandbox:test"))
    args = parser.parse_args()

    samples: dict[str, list[float]] = {}
    samples.update(bench_exec(args.image, args.exec_calls))
    settings = WorkerSettings(backend="docker", default_image=args.image, namespace="bench")
    samples.update(asyncio.run(bench_agent_async(DockerBackend(settings), args.calls)))
    # The same agent as a local subprocess: what the container stream adds.
    samples.update(asyncio.run(bench_agent_async(LocalBackend(), args.calls, "local")))
    samples.update(bench_e2e(args.image, args.calls))
    stats = {name: summarize(s) for name, s in samples.items()}
    base = stats["exec_sdk"]["p50_ms"]
    ratios = {f"exec_sdk_p50/{k}_p50": round(base / v["p50_ms"], 1) for k, v in stats.items()}

    print(f"{'path':<12} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}  exec_sdk p50 / p50")
    for name, s in stats.items():
        ratio = base / s["p50_ms"]
        print(
            f"{name:<12} {s['n']:>5} {s['p50_ms']:>9.2f} {s['p99_ms']:>9.2f} "
            f"{s['mean_ms']:>9.2f}  {ratio:>6.1f}x"
        )

    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, f"bench_docker_exec-{time.strftime('%Y%m%d-%H%M%S')}.json")
    info = docker.from_env().version()
    with open(path, "w") as fh:
        json.dump(
            {
                "args": vars(args),
                "host": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "engine": info.get("Version"),
                    "api": info.get("ApiVersion"),
                },
                "stats": stats,
                "ratios": ratios,
                "samples_ms": samples,
            },
            fh,
            indent=1,
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
