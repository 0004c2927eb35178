"""Running a worker process: pick the backend, connect Redis, handle signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from toolq.schemas.local import ClusterNodeError, redis_target

from .backends.base import Backend
from .backends.docker_box import image_fix as image_fix  # (toolq demo imports it here)
from .backends.local import LocalBackend
from .embedded import EmbeddedRedis
from .settings import WorkerSettings
from .worker import Worker

log = logging.getLogger("toolq.worker")


def docker_unavailable(docker_host: str | None = None) -> str | None:
    """Why no Docker engine answers a ping (None: one does)."""
    try:
        import docker

        client = docker.DockerClient(base_url=docker_host) if docker_host else docker.from_env()
        try:
            return None if client.ping() else "the engine did not answer the ping"
        finally:
            client.close()
    except Exception as exc:  # no docker package, no socket, refused, TLS, ...
        return f"{type(exc).__name__}: {exc}"


def docker_available(docker_host: str | None = None) -> bool:
    """True when a Docker engine answers a ping."""
    return docker_unavailable(docker_host) is None


def image_missing(image: str, docker_host: str | None = None) -> bool:
    """True when the engine (which answers) does not have ``image`` locally."""
    import docker
    from docker.errors import ImageNotFound

    try:
        client = docker.DockerClient(base_url=docker_host) if docker_host else docker.from_env()
    except Exception:  # no engine: the backend itself says so when it starts
        return False
    try:
        client.images.get(image)
        return False
    except ImageNotFound:
        return True
    except Exception:
        return False
    finally:
        client.close()


def make_backend(settings: WorkerSettings) -> Backend:
    """The backend the settings ask for (``auto``: Docker if an engine answers and
    has the default image; else local, saying why and how to get the image)."""
    choice = settings.backend
    if choice == "auto":
        choice = _auto_backend(settings.docker_host, settings.default_image)
    elif choice == "docker" and image_missing(settings.default_image, settings.docker_host):
        # One line at start, before a call fails with sandbox_error on a pull.
        log.warning(
            "the Docker engine has no image %s: calls on the default image fail until "
            "it is there: %s",
            settings.default_image,
            image_fix(settings.default_image),
        )
    if choice == "local":
        return LocalBackend(settings.workspace_dir)
    if choice == "docker":
        from .backends.docker import DockerBackend

        backend: Backend = DockerBackend(settings)
        return backend
    raise ValueError(f"unknown backend {settings.backend!r} (auto, local or docker)")


def _auto_backend(docker_host: str | None, image: str) -> str:
    """``docker`` when an engine answers and has ``image``; else ``local``, with a
    warning saying why (and, for a missing image, the command that fixes it)."""
    why = docker_unavailable(docker_host)
    if why is None:
        if not image_missing(image, docker_host):
            return "docker"
        log.warning(
            "backend=auto: the Docker engine has no image %s, so this worker runs the "
            "local backend (no sandbox); for Docker sandboxes run: %s, then restart the worker",
            image,
            image_fix(image),
        )
        return "local"
    where = docker_host or os.environ.get("DOCKER_HOST") or "the default socket"
    log.warning(
        "backend=auto: no Docker engine answered at %s (%s); falling back to the local "
        "backend, which is not a sandbox (set --backend docker to refuse to start instead)",
        where,
        why[:300],
    )
    return "local"


def connect(url: str) -> aioredis.Redis:
    """The worker's Redis client: a Redis, or a Redis Cluster (``redis+cluster://``
    or ``TOOLQ_REDIS_CLUSTER=1``).

    No socket timeout: reads block for up to block_ms on purpose. No automatic
    retries on one Redis: a command redis-py re-sent after a broken connection
    could be applied twice (an XREADGROUP's entries delivered to nobody); the
    worker retries itself and catches up after errors. A cluster client keeps
    its own retries (MOVED, failovers); entries a retried read left in this
    worker's pending list are reclaimed within 30 s.
    """
    target, cluster = redis_target(url)
    common: dict[str, Any] = {
        "socket_timeout": None,
        "socket_connect_timeout": 30,
        "protocol": 2,
        "socket_keepalive": True,
        # redis-py 8 caps a pool at 100 connections and fails the 101st command at
        # once ("Too many connections"): hundreds of trajectories ending together
        # each hold one for a moment. Redis's own maxclients is the real bound.
        "max_connections": 10_000,
    }
    if cluster:
        client: Any = aioredis.RedisCluster.from_url(target, **common)
        return cast(aioredis.Redis, client)
    return aioredis.Redis.from_url(
        target, health_check_interval=30, retry=Retry(NoBackoff(), 0), **common
    )


async def refuse_cluster_node(redis: aioredis.Redis, url: str) -> None:
    """Raise ``ClusterNodeError`` when a plain Redis client talks to a cluster node
    (it would answer MOVED for most keys: say so at start, not in every retry)."""
    if isinstance(redis, aioredis.RedisCluster):
        return
    try:
        info = await redis.info("cluster")
    except RedisError:  # down, or INFO not allowed: the worker's own retries take over
        return
    if str(info.get("cluster_enabled", "0")) == "1":
        node = urlsplit(url).netloc.rpartition("@")[2]
        raise ClusterNodeError("INFO says cluster_enabled:1", node)


async def serve(settings: WorkerSettings, backend: Backend | None = None) -> None:
    """Run one worker until SIGTERM/SIGINT."""
    assert settings.redis_url
    redis = connect(settings.redis_url)
    try:
        await refuse_cluster_node(redis, settings.redis_url)
    except BaseException:
        await redis.aclose()
        raise
    worker = Worker(settings, redis, backend or make_backend(settings))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        await redis.aclose()


def run_worker(settings: WorkerSettings) -> None:
    """Blocking entry point of ``toolq worker``; starts an embedded Redis if needed."""
    embedded = None
    if not settings.redis_url:
        embedded = EmbeddedRedis()
        embedded.announce()
        settings.redis_url = embedded.url
        log.info("no TOOLQ_REDIS_URL: embedded Redis at %s (pid %d)", embedded.url, os.getpid())
    try:
        asyncio.run(serve(settings))
    finally:
        if embedded is not None:
            embedded.stop()
