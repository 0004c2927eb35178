"""``toolq worker`` and ``toolq demo`` (added to the ``toolq`` group)."""

from __future__ import annotations

import logging
from typing import Any

import click

from .settings import WorkerSettings


@click.command("worker")
@click.option(
    "--backend",
    type=click.Choice(["auto", "local", "docker"]),
    default="auto",
    envvar="TOOLQ_BACKEND",
    show_default=True,
    help="auto: Docker when an engine answers, else local [env TOOLQ_BACKEND].",
)
@click.option(
    "--slots",
    type=int,
    default=16,
    envvar="TOOLQ_SLOTS",
    show_default=True,
    help="Trajectories served at once [env TOOLQ_SLOTS].",
)
@click.option("--worker-id", envvar="TOOLQ_WORKER_ID", default=None, help="Stable worker id.")
@click.option(
    "--image",
    "default_image",
    envvar="TOOLQ_IMAGE",
    default="toolq-sandbox:latest",
    show_default=True,
    help="Default sandbox image [env TOOLQ_IMAGE].",
)
@click.option(
    "--warm-pool",
    type=int,
    envvar="TOOLQ_WARM_POOL",
    default=0,
    show_default=True,
    help="Containers kept started for the default image.",
)
@click.option(
    "--start-concurrency",
    type=int,
    envvar="TOOLQ_START_CONCURRENCY",
    default=4,
    show_default=True,
    help="Container starts at once, at most.",
)
@click.option(
    "--slots-per-container",
    type=int,
    envvar="TOOLQ_SLOTS_PER_CONTAINER",
    default=1,
    show_default=True,
    help="Same-image trajectories packed per container.",
)
@click.option(
    "--workspace-dir",
    envvar="TOOLQ_WORKSPACE_DIR",
    default=None,
    help="Local backend's workspace root.",
)
@click.option(
    "--tools",
    "tools_modules",
    multiple=True,
    envvar="TOOLQ_TOOLS",
    help="Module registering extra tools (repeatable).",
)
@click.option(
    "--metrics-port",
    type=int,
    envvar="TOOLQ_METRICS_PORT",
    default=None,
    help="Serve Prometheus metrics on this port.",
)
@click.option(
    "--metrics-host",
    envvar="TOOLQ_METRICS_HOST",
    default="0.0.0.0",
    show_default=True,
    help="Address the metrics server binds [env TOOLQ_METRICS_HOST].",
)
@click.option(
    "--heartbeat-s",
    type=float,
    envvar="TOOLQ_HEARTBEAT_S",
    default=2.0,
    show_default=True,
    help="Seconds between heartbeats.",
)
@click.option(
    "--dead-after-s",
    type=float,
    envvar="TOOLQ_DEAD_AFTER_S",
    default=15.0,
    show_default=True,
    help="A worker silent this long is dead; its trajectories are taken over.",
)
@click.option(
    "--shutdown-grace-s",
    type=float,
    envvar="TOOLQ_SHUTDOWN_GRACE_S",
    default=30.0,
    show_default=True,
    help="On SIGTERM, how long running calls may finish.",
)
@click.option("--log-level", envvar="TOOLQ_LOG_LEVEL", default="INFO", show_default=True)
@click.pass_context
def worker(ctx: click.Context, /, log_level: str, worker_id: str | None, **opts: Any) -> None:
    """Run a worker until SIGTERM/SIGINT.

    Without TOOLQ_REDIS_URL it starts an embedded Redis that local `toolq`
    commands find on their own.
    """
    from .service import run_worker

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    obj = ctx.find_root().obj or {}
    settings = WorkerSettings(
        redis_url=obj.get("redis_url"), namespace=obj.get("namespace", "toolq"), **opts
    )
    if worker_id:
        settings.worker_id = worker_id
    settings.tools_modules = tuple(opts["tools_modules"])
    run_worker(settings)


@click.command("demo")
@click.option("--trajectories", type=int, default=8, show_default=True)
@click.option(
    "--rounds", type=int, default=5, show_default=True, help="Write-run-read rounds per trajectory."
)
@click.option(
    "--backend", type=click.Choice(["auto", "local", "docker"]), default="auto", show_default=True
)
@click.pass_context
def demo(ctx: click.Context, trajectories: int, rounds: int, backend: str) -> None:
    """Run a small realistic workload end to end and print a summary."""
    from .demo import run_demo

    obj = ctx.find_root().obj or {}
    ok = run_demo(
        obj.get("redis_url"), obj.get("namespace", "toolq"), trajectories, rounds, backend
    )
    ctx.exit(0 if ok else 1)
