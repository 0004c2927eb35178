"""``toolq rq-worker``: an RQ worker that runs toolq's external tools.

It loads the tools modules once, before RQ forks a work horse per job, and
runs RQ's scheduler too (retries with ``retry_interval_s`` need it). A plain
``rq worker`` works as well: ``TOOLQ_TOOLS=mypkg.tools rq worker toolq
--with-scheduler --url redis://...``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
from typing import Any

import click

PR_SET_PDEATHSIG = 1  # prctl(2)


def run_rq_worker(
    redis_url: str,
    queues: list[str],
    tools_modules: list[str],
    *,
    simple: bool = False,
    burst: bool = False,
    name: str | None = None,
    log_level: str = "INFO",
) -> None:
    """Serve ``queues`` (default: every queue the loaded external tools use)."""
    import redis
    import rq.worker.base
    from rq import SimpleWorker, Worker

    from .external import set_registry
    from .registry import load_registry

    # RQ forks its scheduler; one that outlived a killed worker would keep the
    # scheduler lock (and with it every retry) to itself.
    base: Any = rq.worker.base
    base.RQScheduler = scheduler_class(base.RQScheduler)

    registry = load_registry(tools_modules)
    set_registry(registry)
    # Work horses started another way than fork (SpawnWorker) load from here.
    os.environ["TOOLQ_TOOLS"] = " ".join(tools_modules)
    names = queues or sorted({t.queue for t in registry.tools.values() if t.external})
    worker_class = SimpleWorker if simple else Worker
    worker = worker_class(names or ["toolq"], connection=redis.Redis.from_url(redis_url), name=name)
    worker.work(burst=burst, with_scheduler=True, logging_level=log_level.upper())


def scheduler_class(base: Any) -> Any:
    """RQ's scheduler, made to end with the worker that forked it, even a killed one."""

    def work(self: Any) -> None:
        die_with_parent()
        base.work(self)

    return type("ToolqScheduler", (base,), {"work": work})


def die_with_parent() -> None:
    """Have the kernel send SIGTERM when the parent process dies (Linux)."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


@click.command("rq-worker")
@click.option(
    "--tools",
    "tools_modules",
    multiple=True,
    envvar="TOOLQ_TOOLS",
    help="Module registering external tools (repeatable) [env TOOLQ_TOOLS].",
)
@click.option(
    "--queue",
    "queues",
    multiple=True,
    help="RQ queue to serve (repeatable; default: the queues of the loaded tools).",
)
@click.option("--simple", is_flag=True, help="Run jobs in this process (no fork per job).")
@click.option("--burst", is_flag=True, help="Exit once the queues are empty.")
@click.option("--name", default=None, help="RQ worker name.")
@click.option("--log-level", envvar="TOOLQ_LOG_LEVEL", default="INFO", show_default=True)
@click.pass_context
def rq_worker(
    ctx: click.Context,
    tools_modules: tuple[str, ...],
    queues: tuple[str, ...],
    simple: bool,
    burst: bool,
    name: str | None,
    log_level: str,
) -> None:
    """Run an RQ worker for external tools (needs the same --tools as `toolq worker`).

    With --simple a job that must be stopped (its trajectory was cancelled)
    runs to its end; the call is answered `cancelled` at once either way.
    """
    from toolq.schemas.local import NoRedisError, redis_target, resolve_redis_url

    obj = ctx.find_root().obj or {}
    try:
        url = resolve_redis_url(obj.get("redis_url"))
    except NoRedisError as exc:
        raise click.UsageError(str(exc)) from None
    if redis_target(url)[1]:
        raise click.UsageError(
            "RQ does not support Redis Cluster: run `toolq rq-worker` against a plain Redis "
            "and give the toolq workers the same one with --rq-redis-url"
        )
    run_rq_worker(
        url,
        list(queues),
        list(tools_modules),
        simple=simple,
        burst=burst,
        name=name,
        log_level=log_level,
    )
