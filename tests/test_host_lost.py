"""A whole host lost: a worker killed together with its own Docker engine (a
second dockerd standing in for a second host), while a worker on another
engine takes its trajectories over. Every call is answered once: the calls the
lost host was running with ``worker_lost`` (``infra``), the rest run on the
survivor, in a new container of its own engine (nothing of the dead one is
adopted; the trajectory is told its sandbox was reset)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from tests.conftest import TEST_IMAGE, require_docker
from tests.engine2 import SecondEngine
from tests.helpers import TOOLQ, wait_for
from toolq.producer import Client
from toolq.schemas import Keys

TRAJS = ("h0", "h1", "h2")


def docker_worker(redis_url: str, ns: str, worker_id: str, docker_host: str, logs: Path) -> Any:
    env = dict(
        os.environ,
        TOOLQ_REDIS_URL=redis_url,
        TOOLQ_NAMESPACE=ns,
        TOOLQ_WORKER_ID=worker_id,
        DOCKER_HOST=docker_host,
    )
    log = open(logs / f"{worker_id}.log", "wb")  # noqa: SIM115 - closed with the process
    argv = [*TOOLQ, "worker", "--backend", "docker", "--image", TEST_IMAGE]
    argv += ["--heartbeat-s", "0.3", "--dead-after-s", "2", "--shutdown-grace-s", "5"]
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    r = redis.Redis.from_url(redis_url)
    wait_for(
        lambda: r.zscore(Keys(ns).workers, worker_id) is not None or proc.poll() is not None,
        what=f"worker {worker_id} to register",
    )
    assert proc.poll() is None, (logs / f"{worker_id}.log").read_text()
    return proc


def test_a_host_lost_with_its_worker_is_taken_over_on_another_host(
    redis_url: str, ns: str, tmp_path: Path, dc: Any, docker_namespaces: set[str]
):
    require_docker()
    docker_namespaces.add(ns)
    main_engine = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    docker0 = os.path.exists("/sys/class/net/docker0")  # the first engine's bridge stays
    with SecondEngine(TEST_IMAGE) as engine2, Client(redis_url, ns) as client:
        lost_host = docker_worker(redis_url, ns, "lost-host", engine2.url, tmp_path)
        survivor = None
        try:
            first = {}
            for t in TRAJS:
                client.open(t)
                first[t] = client.call(t, "bash", {"command": "echo here > f"}, wait_s=120)
                assert first[t].ok and first[t].worker == "lost-host", first[t]
            on_engine2 = {c["Id"][:12] for c in engine2.client.api.containers()}
            assert {first[t].slot.split(":")[0] for t in TRAJS} <= on_engine2
            survivor = docker_worker(redis_url, ns, "survivor", main_engine, tmp_path)
            running = {t: client.submit(t, "bash", {"command": "sleep 600"}) for t in TRAJS}
            after = {
                t: client.submit(t, "bash", {"command": "cat f 2>/dev/null || echo gone"})
                for t in TRAJS
            }
            wait_for(
                lambda: (
                    sum("sleep 600" in str(c.top()) for c in engine2.client.containers.list())
                    == len(TRAJS)
                ),
                what="the calls to run on the host to be lost",
            )
            # At once, as a host dies: the worker must not see its sandboxes go first.
            lost_host.send_signal(signal.SIGSTOP)
            engine2.lose()
            lost_host.send_signal(signal.SIGKILL)
            lost_host.wait()

            for t in TRAJS:
                lost = client.result(t, running[t], wait_s=120)
                assert lost.error_code == "worker_lost" and lost.infra, lost
                moved = client.result(t, after[t], wait_s=120)
                assert moved.ok and moved.worker == "survivor", moved
                assert moved.output == "gone\n" and moved.slot_reset, moved  # a new sandbox
                assert dc.containers.get(moved.slot.split(":")[0])  # on the survivor's engine
            events = redis.Redis.from_url(redis_url)
            for t in TRAJS:
                results = Counter(
                    f[b"call_id"].decode()
                    for _, f in events.xrange(Keys(ns).events(t))
                    if f.get(b"type") == b"result"
                )
                ids = [first[t].call_id, running[t], after[t]]
                assert all(results[c] == 1 for c in ids), (t, results)
        finally:
            for proc in (lost_host, survivor):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(60)
    assert os.path.exists("/sys/class/net/docker0") == docker0
    assert not [i for i in os.listdir("/sys/class/net") if i.startswith("tqe2")]
