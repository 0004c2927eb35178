"""``toolq demo``: several agent-like trajectories against a live worker.

The one producer module that runs a worker too: as a command of the ``toolq``
CLI it dispatches to ``toolq.worker`` (imported when the command runs, so a
producer-only install still loads the CLI).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
import uuid
from typing import Any

import click

from toolq.schemas import DEFAULT_IMAGE, Result

from .aclient import AsyncClient

SCRIPT = """\
import json, sys
n = int(sys.argv[1])
primes = [p for p in range(2, n) if all(p % d for d in range(2, int(p ** 0.5) + 1))]
json.dump({"n": n, "count": len(primes), "last": primes[-1]}, open("out.json", "w"))
print(f"{len(primes)} primes below {n}")
"""


def pick_backend(choice: str, image: str) -> tuple[str, str]:
    """``(backend, why)``: Docker only when an engine answers and the sandbox image
    is there; ``why`` says why ``auto`` chose local ('' otherwise)."""
    from toolq.worker.service import docker_unavailable, image_fix, image_missing

    if choice != "auto":
        return choice, ""
    why = docker_unavailable()
    if why is not None:
        return "local", f"no Docker engine answered ({why})"
    if image_missing(image):
        return "local", f"the Docker engine has no image {image} (fix: {image_fix(image)})"
    return "docker", ""


def warn_local(why: str) -> None:
    """Say plainly, before anything runs, that the local backend is no sandbox."""
    from toolq.worker.backends.local import NOT_A_SANDBOX

    # The backend logs the same warning when it starts; with no logging set up
    # Python would print it again, in the middle of the progress bar.
    logging.getLogger("toolq.worker.local").addHandler(logging.NullHandler())
    if why:
        click.secho(f"warning: backend auto chose local: {why}", fg="yellow", err=True)
    click.secho(f"warning: {NOT_A_SANDBOX}", fg="yellow", err=True)


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
    from toolq.worker.service import connect, make_backend
    from toolq.worker.settings import WorkerSettings
    from toolq.worker.worker import Worker

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
    from toolq.worker.embedded import EmbeddedRedis

    backend, why = pick_backend(backend, image)
    if backend == "local":
        warn_local(why)
    if url:
        return asyncio.run(_demo(url, namespace, trajectories, rounds, backend, image))
    with EmbeddedRedis() as embedded:
        return asyncio.run(_demo(embedded.url, namespace, trajectories, rounds, backend, image))


@click.command("demo")
@click.option("--trajectories", type=int, default=8, show_default=True)
@click.option(
    "--rounds", type=int, default=5, show_default=True, help="Write-run-read rounds per trajectory."
)
@click.option(
    "--backend", type=click.Choice(["auto", "local", "docker"]), default="auto", show_default=True
)
@click.option(
    "--image",
    envvar="TOOLQ_IMAGE",
    default=DEFAULT_IMAGE,
    show_default=True,
    help="Sandbox image (auto picks Docker only when it is present).",
)
@click.pass_context
def demo(ctx: click.Context, trajectories: int, rounds: int, backend: str, image: str) -> None:
    """Run a small realistic workload end to end and print a summary.

    Self-contained: it runs its own worker, and its own Redis unless
    TOOLQ_REDIS_URL names one; nothing else needs to be started (it needs the
    worker package, `pip install 'toolq[worker]'`). Each trajectory writes a
    program, runs it, reads what it wrote, lists its workspace, a few rounds.
    Exit status 0 when every call succeeded.
    """
    obj = ctx.find_root().obj or {}
    ok = run_demo(
        obj.get("redis_url"), obj.get("namespace", "toolq"), trajectories, rounds, backend, image
    )
    ctx.exit(0 if ok else 1)
