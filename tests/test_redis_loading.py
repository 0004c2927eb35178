"""A restarted Redis that takes seconds to load its data answers ``LOADING``
(redis-py's ``BusyLoadingError``) meanwhile: clients and workers wait for it
(``LOADING_WAIT_S``) on top of their retry budget for an unreachable Redis."""

from __future__ import annotations

import threading
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import WorkerThread
from toolq.producer import Client
from toolq.producer.drive import LOADING_WAIT_S
from toolq.worker.embedded import EmbeddedRedis
from toolq.worker.settings import WorkerSettings

# 20,000 keys of 1 kB, loaded at 0.25 ms each: about 5 s of LOADING (Redis
# answers between every 2 MB it loads).
JUNK_KEYS = 20_000
LOAD_DELAY_US = 250


def slow_loading_redis() -> EmbeddedRedis:
    server = EmbeddedRedis(
        appendonly=True,
        extra_args=[
            "--key-load-delay",
            str(LOAD_DELAY_US),
            "--enable-debug-command",
            "local",
            "--rdbcompression",
            "no",
        ],
    )
    r = redis.Redis(port=server.port)
    r.execute_command("DEBUG", "POPULATE", JUNK_KEYS, "junk", 1000)
    r.bgrewriteaof()  # the junk goes into the AOF's RDB preamble, which loads slowly
    deadline = time.monotonic() + 60
    while (
        r.info("persistence")["aof_rewrite_in_progress"]
        or r.info("persistence")["aof_rewrite_scheduled"]
    ):
        assert time.monotonic() < deadline, "the AOF rewrite did not finish"
        time.sleep(0.1)
    r.close()
    return server


def test_clients_and_a_worker_wait_out_a_redis_loading_its_data(ns: str):
    assert LOADING_WAIT_S >= 60
    server = slow_loading_redis()
    worker = WorkerThread(
        WorkerSettings(
            redis_url=server.url, namespace=ns, backend="local", slots=4, block_ms=200,
            heartbeat_s=0.3,
        )
    )  # fmt: skip
    outcomes: list[str] = []
    loading_seen = threading.Event()
    try:
        # A budget of 3 retries (about a second) for an unreachable Redis: far
        # less than the loading, which must not use it up.
        with Client(server.url, ns, retries=3) as c:
            c.open("t")
            assert c.call("t", "bash", {"command": "true"}).ok

            def agent() -> None:
                try:
                    for i in range(6):
                        r = c.call("t", "bash", {"command": f"sleep 0.5; echo {i}"}, wait_s=120)
                        outcomes.append(r.output.strip() if r.ok else str(r.error_code))
                except Exception as exc:  # the defect: BusyLoadingError reaches the caller
                    outcomes.append(repr(exc))

            def watch() -> None:  # sees the LOADING state that the others wait out
                probe = redis.Redis(port=server.port, socket_timeout=5, retry=Retry(NoBackoff(), 0))
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    try:
                        probe.get("x")  # PING is answered while loading; GET is not
                        if loading_seen.is_set():
                            return
                    except redis.BusyLoadingError:
                        loading_seen.set()
                    except redis.ConnectionError:
                        pass
                    time.sleep(0.02)

            thread = threading.Thread(target=agent)
            thread.start()
            time.sleep(0.3)  # its first call is running: the client is blocked in its wait
            watcher = threading.Thread(target=watch)
            watcher.start()
            server.restart(timeout_s=120)
            watcher.join(130)
            thread.join(180)
            assert loading_seen.is_set(), "the restarted Redis never answered LOADING"
            assert outcomes == [str(i) for i in range(6)], outcomes
            assert c.call("t", "bash", {"command": "echo after"}).output == "after\n"
    finally:
        worker.stop()
        server.stop()
