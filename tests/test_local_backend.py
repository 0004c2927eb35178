"""The local backend says what it is: not a sandbox.

At worker start (a warning in the log), when ``auto`` falls back to it (a
warning saying why), in ``toolq demo``, in the worker's heartbeat record
(``backend``, which ``toolq status`` shows), and in every trajectory's record:
the spec fields it does not enforce (``unenforced``). Real Redis, real
workers, the real ``toolq`` command.
"""

from __future__ import annotations

import logging
import os
import subprocess

import pytest

from tests.conftest import require_docker
from tests.helpers import TOOLQ, redis_client, wait_for
from toolq.producer import Client
from toolq.schemas import Keys, TrajectorySpec, WorkerInfo
from toolq.worker.backends.local import LocalBackend, unenforced
from toolq.worker.service import make_backend
from toolq.worker.settings import WorkerSettings

ISOLATION = ["limits.network", "limits.cpus", "limits.memory_mb", "limits.pids"]


def test_worker_start_warns_and_its_heartbeat_names_the_backend(
    start_worker, redis_url: str, ns: str, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="toolq.worker")
    handle = start_worker("local")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("local backend is not a sandbox" in m for m in warnings), warnings
    key = Keys(ns).worker(handle.worker.id)
    fields = wait_for(lambda: redis_client(redis_url).hgetall(key), what="a heartbeat")
    assert WorkerInfo.from_fields(fields).backend == "local"  # what `toolq status` shows


def test_auto_without_a_docker_engine_warns_why(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="toolq.worker")
    # Nothing listens on port 1: a real connection refused, as with no engine.
    settings = WorkerSettings(backend="auto", docker_host="tcp://127.0.0.1:1")
    assert isinstance(make_backend(settings), LocalBackend)
    (record,) = [r for r in caplog.records if "backend=auto" in r.getMessage()]
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "no Docker engine answered at tcp://127.0.0.1:1" in message
    assert "not a sandbox" in message


def test_what_the_local_backend_does_not_enforce():
    assert unenforced(TrajectorySpec()) == ISOLATION  # the defaults ask for isolation
    spec = TrajectorySpec.model_validate(
        {"image": "python:3.12", "limits": {"network": True, "disk_mb": 100}}
    )
    assert unenforced(spec) == [
        "image",
        "limits.cpus",
        "limits.memory_mb",
        "limits.pids",
        "limits.disk_mb",
    ]
    bare = {"network": True, "cpus": None, "memory_mb": None, "pids": None}
    assert unenforced(TrajectorySpec.model_validate({"limits": bare})) == []


def test_the_record_flags_limits_the_local_backend_ignores(start_worker, client: Client):
    start_worker("local")
    client.open("flagged", {"limits": {"network": False, "memory_mb": 256}})
    assert client.call("flagged", "bash", {"command": "true"}).ok
    record = wait_for(lambda: client.record("flagged"), what="the record")
    assert record.unenforced == ISOLATION
    # Network on is what the host gives anyway: only the other limits are flagged.
    client.open("online", {"limits": {"network": True}})
    assert client.call("online", "bash", {"command": "true"}).ok
    record = client.record("online")
    assert record is not None and record.unenforced == ISOLATION[1:]
    client.close("flagged")
    client.close("online")


def test_a_docker_record_flags_nothing(start_worker, client: Client, docker_namespaces, ns: str):
    require_docker()
    docker_namespaces.add(ns)
    start_worker("docker")
    client.open("boxed", {"limits": {"network": False, "memory_mb": 256}})
    assert client.call("boxed", "bash", {"command": "true"}).ok
    record = client.record("boxed")
    assert record is not None and record.unenforced is None and record.slot
    client.close("boxed")
    wait_for(lambda: (r := client.record("boxed")) and r.status.final, what="the close")


def test_demo_says_the_local_backend_is_not_a_sandbox(redis_url: str, ns: str):
    env = dict(os.environ, TOOLQ_REDIS_URL=redis_url, TOOLQ_NAMESPACE=ns)
    demo = ["demo", "--trajectories", "1", "--rounds", "1", "--backend", "local"]
    r = subprocess.run([*TOOLQ, *demo], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: the local backend is not a sandbox" in r.stderr
    assert r.stderr.count("not a sandbox") == 1  # said once, not again by the log
