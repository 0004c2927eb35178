"""Shared fixtures: a real redis-server, workers on real backends, clients.

Nothing is mocked. Docker tests need an engine and the test image (built by
``.ci/build-sandbox-image``); with ``TOOLQ_REQUIRE_DOCKER=1`` a missing engine
fails the run instead of skipping.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import hypothesis  # noqa: F401  (see below)
import pytest

from toolq.producer import AsyncClient, Client
from toolq.worker.embedded import EmbeddedRedis
from toolq.worker.embedded_cluster import EmbeddedCluster
from toolq.worker.service import connect, docker_available, make_backend
from toolq.worker.settings import WorkerSettings
from toolq.worker.worker import Worker

# hypothesis is imported here, at collection, on purpose: its pytest plugin would
# otherwise import it lazily at session end, and pytest's assertion rewriter then
# parses it with CPython 3.11.7's AST state, which threaded runs can leave broken
# (gh-106905): "SystemError: AST constructor recursion depth mismatch".

TEST_IMAGE = os.environ.get("TOOLQ_TEST_IMAGE", "toolq-sandbox:test")
NOPYTHON_IMAGE = os.environ.get("TOOLQ_TEST_NOPYTHON_IMAGE", "toolq-nopython:test")
REQUIRE_DOCKER = os.environ.get("TOOLQ_REQUIRE_DOCKER") == "1"
# The Docker runtime the tests' workers use (``runsc``: every Docker test under gVisor;
# CI runs the sandbox-abuse and tool suites so). Worker processes read TOOLQ_RUNTIME.
TEST_RUNTIME = os.environ.get("TOOLQ_TEST_RUNTIME", "runc")
if TEST_RUNTIME != "runc":
    os.environ["TOOLQ_RUNTIME"] = TEST_RUNTIME


def docker_ready() -> bool:
    """True when an engine answers, the test image exists and the test runtime is registered."""
    if not docker_available():
        return False
    import docker

    try:
        engine = docker.from_env()
        engine.images.get(TEST_IMAGE)
        return TEST_RUNTIME in (engine.info().get("Runtimes") or {})
    except Exception:
        return False


_DOCKER_READY: bool | None = None


def require_docker() -> None:
    """Skip (or, in CI, fail) a test that needs the Docker engine."""
    global _DOCKER_READY
    if _DOCKER_READY is None:
        _DOCKER_READY = docker_ready()
    if not _DOCKER_READY:
        msg = (
            f"no Docker engine, no image {TEST_IMAGE} or no runtime {TEST_RUNTIME} "
            "(run .ci/start-docker and .ci/build-sandbox-image)"
        )
        if REQUIRE_DOCKER:
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One real redis-server for the session; tests isolate by namespace."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[EmbeddedCluster]:
    """One real 3-master Redis Cluster for the session (same redis-server binary)."""
    with EmbeddedCluster(masters=3) as cluster:
        yield cluster


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``redis_kinds`` run against one Redis and against a Redis Cluster."""
    marker = metafunc.definition.get_closest_marker("redis_kinds")
    if marker is not None and "redis_kind" in metafunc.fixturenames:
        metafunc.parametrize("redis_kind", marker.args, indirect=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "redis_kinds(*kinds): run the test on each kind ('single', 'cluster')"
    )


@pytest.fixture
def redis_kind(request: pytest.FixtureRequest) -> str:
    """``single`` unless the test is marked ``redis_kinds``."""
    return str(getattr(request, "param", "single"))


@pytest.fixture
def redis_url(redis_kind: str, request: pytest.FixtureRequest) -> str:
    if redis_kind == "cluster":
        cluster: EmbeddedCluster = request.getfixturevalue("redis_cluster")
        return cluster.url
    server: EmbeddedRedis = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
def ns() -> str:
    """A fresh key namespace per test, so tests never see each other's keys."""
    return f"tq{uuid.uuid4().hex[:10]}"


class WorkerThread:
    """A real worker running its own event loop in a thread."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.worker: Worker | None = None
        self.thread = threading.Thread(target=self._run, name="worker", daemon=True)
        self.thread.start()
        if not self.started.wait(120):
            raise RuntimeError("worker did not start")
        if self.error:
            raise self.error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:
            self.error = exc
            self.started.set()

    async def _main(self) -> None:
        redis = connect(self.settings.redis_url or "")
        self.worker = Worker(self.settings, redis, make_backend(self.settings))
        task = asyncio.create_task(self.worker.run())
        ready = asyncio.create_task(self.worker.ready.wait())
        await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
        if task.done() and not task.cancelled():  # it failed to start: say so before started
            self.error = task.exception()
        self.started.set()
        await task
        await redis.aclose()

    def run(self, coro: Any, timeout_s: float = 60) -> Any:
        """Run a coroutine on the worker's loop (e.g. to poke its backend)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self, timeout_s: float = 60) -> None:
        if self.thread.is_alive() and self.worker is not None:
            self.loop.call_soon_threadsafe(self.worker.stop)
        self.thread.join(timeout_s)


@pytest.fixture(params=["local", "docker"])
def backend(request: pytest.FixtureRequest) -> str:
    """Parametrise a test over both backends (Docker ones need the engine)."""
    if request.param == "docker":
        require_docker()
    return str(request.param)


@pytest.fixture
def start_worker(redis_url: str, ns: str) -> Iterator[Callable[..., WorkerThread]]:
    """Factory: ``start_worker(backend="local", slots=4, **settings)``."""
    started: list[WorkerThread] = []

    def start(backend: str = "local", **overrides: Any) -> WorkerThread:
        fields: dict[str, Any] = {
            "slots": 4,
            "block_ms": 200,
            "default_image": TEST_IMAGE,
            "heartbeat_s": 0.5,
            "runtime": TEST_RUNTIME,
        }
        fields.update(overrides)
        settings = WorkerSettings(redis_url=redis_url, namespace=ns, backend=backend, **fields)
        handle = WorkerThread(settings)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


@pytest.fixture
def aof_redis() -> Iterator[EmbeddedRedis]:
    """A Redis of the test's own that keeps an AOF: restarting it loses nothing."""
    with EmbeddedRedis(appendonly=True) as server:
        yield server


@pytest.fixture
def aof_worker(aof_redis: EmbeddedRedis, ns: str) -> Iterator[WorkerThread]:
    """A local-backend worker on ``aof_redis``, with fast heartbeats."""
    settings = WorkerSettings(
        redis_url=aof_redis.url, namespace=ns, backend="local", slots=8, block_ms=200,
        heartbeat_s=0.5,
    )  # fmt: skip
    handle = WorkerThread(settings)
    yield handle
    handle.stop()


@pytest.fixture
def client(redis_url: str, ns: str) -> Iterator[Client]:
    with Client(redis_url, ns) as c:
        yield c


@pytest.fixture
def aclient_factory(redis_url: str, ns: str) -> Callable[[], AsyncClient]:
    return lambda: AsyncClient(redis_url, ns)


@pytest.fixture(scope="module")
def docker_namespaces() -> Iterator[set[str]]:
    """Namespaces a module's Docker tests ran in; none may keep a container afterwards."""
    namespaces: set[str] = set()
    yield namespaces
    if namespaces:
        from tests.helpers import containers_left

        left = containers_left(namespaces)
        assert not left, f"containers left behind: {left}"


@pytest.fixture(scope="module")
def dc() -> Any:
    """A docker-py client."""
    import docker

    return docker.from_env()
