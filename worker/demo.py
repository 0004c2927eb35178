"""``toolq demo``: several agent-like trajectories against a live worker."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from typing import Any

import click

from toolq.producer import AsyncClient, Result

from .embedded import EmbeddedRedis
from .service import connect, docker_available, make_backend
from .settings import WorkerSettings
from .worker import Worker

SCRIPT = """\
import json, sys
n = int(sys.argv[1])
primes = [p for p in range(2, n) if all(p % d for d in range(2, int(p ** 0.5) + 1))]
json.dump({"n": n, "count": len(primes), "last": primes[-1]}, open("out.json", "w"))
print(f"{len(primes)} primes below {n}")
"""


def pick_backend(choice: str, image: str) -> str:
    """Docker only when an engine answers and the sandbox image is there."""
    if choice != "auto":
        return choice
    if not docker_available():
        return "local"
    import docker

    try:
        docker.from_env().images.get(image)
        return "docker"
    except Exception:
        return "local"


async def agent_loop(
    client: AsyncClient, traj: str, rounds: int, done: list[Result], tick: Any
) -> None:
    """What an agent does: write a program, run it, read what it wrote, repeat."""
    await client.open(traj)
    steps: list[tuple[str, dict[str, Any]]] = [
        ("write_file", {"path": "primes.py", "content": SCRIPT})
    ]
    for i in range(rounds):
        n = 2000 + 500 * i
        steps += [
            ("bash", {"command": f"python3 primes.py {n}"}),
            ("read_file", {"path": "out.json"}),
            ("bash", {"command": "ls -la && wc -c out.json"}),
        ]
    for tool, args in steps:
        result = await client.call(traj, tool, args, timeout_s=30)
        done.append(result)
        tick()
    await client.close(traj)


async def _demo(
    url: str, namespace: str, trajectories: int, rounds: int, backend: str, image: str
) -> bool:
    settings = WorkerSettings(
        redis_url=url,
        namespace=namespace,
        backend=backend,
        slots=trajectories,
        block_ms=500,
        default_image=image,
    )
    worker = Worker(settings, connect(url), make_backend(settings))
    worker_task = asyncio.create_task(worker.run())
    client = AsyncClient(url, namespace)
    total = trajectories * (1 + 3 * rounds)
    done: list[Result] = []
    run_id = uuid.uuid4().hex[:6]
    click.echo(
        f"toolq demo: {trajectories} trajectories x {1 + 3 * rounds} calls on the "
        f"{worker.backend.name} backend, Redis {url}"
    )
    started = time.monotonic()
    with click.progressbar(length=total, label="tool calls") as bar:
        await asyncio.gather(
            *(
                agent_loop(client, f"demo-{run_id}-{i}", rounds, done, lambda: bar.update(1))
                for i in range(trajectories)
            )
        )
    elapsed_s = time.monotonic() - started
    worker.stop()
    await worker_task
    await client.redis.aclose()
    return summarize(done, elapsed_s)


def summarize(done: list[Result], elapsed_s: float) -> bool:
    failures = [r for r in done if not r.ok]
    lat = sorted(r.queued_ms + r.run_ms for r in done)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0
    click.echo(
        f"calls: {len(done)}  failures: {len(failures)}  "
        f"latency p50: {statistics.median(lat) if lat else 0:.1f} ms  p99: {p99:.1f} ms  "
        f"throughput: {len(done) / elapsed_s:.1f} calls/s"
    )
    sample = next((r for r in done if r.tool == "bash" and "primes" in r.output), None)
    if sample:
        click.echo(f"sample output ({sample.traj}): {sample.output.strip()}")
    for r in failures[:5]:
        click.echo(f"failed: {r.traj} {r.tool}: {r.error_code}: {r.error}", err=True)
    return not failures and bool(done)


def run_demo(
    url: str | None, namespace: str, trajectories: int, rounds: int, backend: str, image: str
) -> bool:
    """Run the demo; with no URL, on a private embedded Redis."""
    backend = pick_backend(backend, image)
    if url:
        return asyncio.run(_demo(url, namespace, trajectories, rounds, backend, image))
    with EmbeddedRedis() as embedded:
        return asyncio.run(_demo(embedded.url, namespace, trajectories, rounds, backend, image))
