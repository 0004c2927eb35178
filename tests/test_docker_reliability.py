"""Docker backend reliability: a trajectory keeps its container across worker crashes and
restarts, and containers nobody will use again do not leak.

Workers that crash or stop are real ``toolq worker`` processes; the survivor is a
worker thread. The module ends by checking that no container of its namespaces is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import TEST_IMAGE, require_docker
from tests.helpers import LABELS, TOOLQ, wait_for
from toolq.producer import Client
from toolq.schemas import Keys, TrajectorySpec

FAST = {"heartbeat_s": 0.3, "dead_after_s": 2.0}  # takeovers within seconds


@pytest.fixture(autouse=True)
def docker_ns(ns: str, docker_namespaces: set[str]) -> str:
    require_docker()
    docker_namespaces.add(ns)
    return ns


def containers(dc: Any, ns: str) -> list[dict[str, Any]]:
    """This namespace's toolq containers, as the engine lists them (no inspect per container:
    safe while a sweep removes some)."""
    return list(dc.api.containers(all=True, filters={"label": [LABELS, f"toolq.ns={ns}"]}))


def container_ids(dc: Any, ns: str) -> set[str]:
    return {c["Id"] for c in containers(dc, ns)}


def short_id(slot: str) -> str:
    """The container part of a result's ``slot`` (``<short id>:<slot name>``)."""
    return slot.split(":", 1)[0]


@pytest.fixture
def worker_process(redis_url: str, ns: str, tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    """Factory: a real ``toolq worker --backend docker`` process, registered when returned."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(worker_id: str) -> subprocess.Popen[bytes]:
        env = dict(
            os.environ, TOOLQ_REDIS_URL=redis_url, TOOLQ_NAMESPACE=ns, TOOLQ_WORKER_ID=worker_id
        )
        log = open(tmp_path / f"{worker_id}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [
                *TOOLQ,
                "worker",
                "--backend",
                "docker",
                "--image",
                TEST_IMAGE,
                "--heartbeat-s",
                "0.3",
                "--dead-after-s",
                "2",
                "--shutdown-grace-s",
                "5",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        procs.append(proc)
        r = redis.Redis.from_url(redis_url)
        wait_for(
            lambda: r.zscore(Keys(ns).workers, worker_id) is not None or proc.poll() is not None,
            what=f"worker {worker_id} to register",
        )
        assert proc.poll() is None, (tmp_path / f"{worker_id}.log").read_text()
        return proc

    yield start
    for proc in procs:  # before the survivors stop: they must see nobody to hand over to
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def processes(container: Any) -> str:
    return "\n".join(" ".join(p) for p in container.top()["Processes"])


# --------------------------------------------------------------------------
# re-adoption
# --------------------------------------------------------------------------


def test_a_killed_workers_container_is_adopted_with_its_files(
    worker_process, start_worker, client: Client, dc, ns: str
):
    dying = worker_process("dying")
    client.open("t")
    first = client.call("t", "bash", {"command": "echo kept > notes.txt; mkdir -p d/e"})
    assert first.ok and first.worker == "dying", first
    box = dc.containers.get(short_id(first.slot))
    start_worker("docker", **FAST)
    running = client.submit("t", "bash", {"command": "sleep 4321"})
    wait_for(lambda: "sleep 4321" in processes(box), what="the call to run")
    dying.send_signal(signal.SIGKILL)
    dying.wait()

    lost = client.result("t", running, timeout_s=60)
    assert lost.error_code == "worker_lost", lost
    after = client.call("t", "bash", {"command": "cat notes.txt; ls d", "timeout_s": 30})
    assert after.ok and after.output == "kept\ne\n", after
    assert after.worker != "dying" and not after.slot_reset, after
    assert short_id(after.slot) == short_id(first.slot)  # the same container, adopted
    # the dead worker's agent saw its stream end and killed what it ran
    assert "sleep 4321" not in processes(box)
    assert container_ids(dc, ns) == {box.id}


def test_after_a_takeover_what_toolq_says_about_the_slot_is_true(
    worker_process, start_worker, client: Client, dc, ns: str
):
    dying = worker_process("dying")
    client.open("t")
    started = client.call("t", "bg_start", {"command": "while true; do echo tick; sleep 0.2; done"})
    assert started.ok and started.worker == "dying", started
    task_id = started.data["task_id"]
    wait_for(lambda: (t := client.bg_get("t", task_id)) and t.status == "running", what="task")
    box = dc.containers.get(short_id(started.slot))
    start_worker("docker", **FAST)
    dying.send_signal(signal.SIGKILL)
    dying.wait()
    after = client.call("t", "bash", {"command": "true", "timeout_s": 30})
    assert after.ok and after.worker != "dying" and short_id(after.slot) == box.id[:12], after
    # 1. the task died with the killed worker's agent: Redis says so, with an event
    wait_for(lambda: client.bg_get("t", task_id).status == "lost", what="the task marked lost")
    events = client.redis.xrange(client.keys.events("t"))
    lost = [f for _, f in events if f.get(b"type") == b"bg" and f.get(b"status") == b"lost"]
    assert [f[b"task_id"].decode() for f in lost] == [task_id]
    # 2. the record, not the label, says who serves it now, where, in which container
    rec = client.record("t")
    assert rec is not None and rec.owner == after.worker
    assert rec.host == socket.gethostname() and rec.sandbox == box.id
    assert box.labels["toolq.worker"] == "dying"  # labels name the worker that started it
    shown = subprocess.run(
        [*TOOLQ, "--namespace", ns, "show", "t"],
        env=dict(os.environ, TOOLQ_REDIS_URL=_url(client)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    doc = json.loads(shown.stdout)
    assert (doc["owner"], doc["host"], doc["sandbox"]) == (after.worker, rec.host, box.id)


def _url(client: Client) -> str:
    kw = client.redis.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def test_sigterm_hands_over_the_container_to_a_live_worker(
    worker_process, start_worker, client: Client, dc, ns: str
):
    leaving = worker_process("leaving")
    client.open("t")
    first = client.call("t", "write_file", {"path": "src/app.py", "content": "print(1)\n"})
    assert first.ok and first.worker == "leaving", first
    start_worker("docker", **FAST)
    leaving.send_signal(signal.SIGTERM)
    assert leaving.wait(60) == 0

    after = client.call("t", "bash", {"command": "cat src/app.py; pwd", "timeout_s": 30})
    assert after.ok and after.output == "print(1)\n/workspace\n", after
    assert after.worker != "leaving" and not after.slot_reset, after
    assert short_id(after.slot) == short_id(first.slot)
    assert len(containers(dc, ns)) == 1


def test_a_gone_container_means_a_reset_slot(
    worker_process, start_worker, client: Client, dc, ns: str
):
    dying = worker_process("dying")
    client.open("t")
    first = client.call("t", "bash", {"command": "echo lost > notes.txt"})
    assert first.ok and first.worker == "dying", first
    start_worker("docker", **FAST)
    dying.send_signal(signal.SIGKILL)
    dying.wait()
    dc.containers.get(short_id(first.slot)).remove(force=True)

    after = client.call("t", "bash", {"command": "ls; echo listed", "timeout_s": 30})
    assert after.ok and after.output == "listed\n", after  # a fresh, empty workspace
    assert after.slot_reset and short_id(after.slot) != short_id(first.slot), after
    again = client.call("t", "bash", {"command": "true"})
    assert again.ok and not again.slot_reset


def test_the_last_worker_to_leave_removes_its_containers(start_worker, client: Client, dc, ns: str):
    # Nobody is alive to adopt them: kept containers would wait for a worker that may never come.
    only = start_worker("docker", **FAST)
    client.open("t")
    first = client.call("t", "bash", {"command": "echo x > f"})
    assert first.ok
    only.stop()
    assert not containers(dc, ns)
    start_worker("docker", **FAST)
    after = client.call("t", "bash", {"command": "ls; echo listed", "timeout_s": 30})
    assert after.ok and after.output == "listed\n" and after.slot_reset, after


# --------------------------------------------------------------------------
# sweeps
# --------------------------------------------------------------------------


def test_sweeps_remove_left_overs_nobody_will_adopt_and_keep_the_rest(
    start_worker, client: Client, dc, ns: str, redis_url: str
):
    handle = start_worker("docker", sweep_s=0.3, **FAST)
    assert handle.worker is not None
    r = redis.Redis.from_url(redis_url)
    keys = Keys(ns)
    r.zadd(keys.workers, {"w-dead": int(time.time() * 1000) + 3_600_000})  # alive during set-up
    made: dict[str, Any] = {}

    def left_over(traj: str, start: bool = True) -> Any:
        labels = {
            "toolq.managed": "1",
            "toolq.ns": ns,
            "toolq.worker": "w-dead",
            "toolq.traj": traj,
        }
        c = dc.containers.create(TEST_IMAGE, ["sleep", "infinity"], labels=labels)
        if start:
            c.start()
        made[traj or "warm"] = c
        return c

    def record(traj: str, status: str, slot: str = "", idle_s: float = 900, age_s: float = 0):
        spec = TrajectorySpec.model_validate({"limits": {"idle_timeout_s": idle_s}})
        r.hset(
            keys.traj(traj),
            mapping={
                "status": status,
                "owner": "" if status == "pending" else "w-other",
                "slot": slot,
                "spec": spec.model_dump_json(),
                "last_activity_ms": int(time.time() * 1000 - age_s * 1000),
            },
        )

    try:
        record("waits", "pending", slot="0123456789ab:s1")
        record("adopted", "running", slot="")  # slot set below, once its container exists
        record("ended", "completed")
        record("moved", "running", slot="0123456789ab:s9")  # runs in another container now
        record("idle", "pending", idle_s=5, age_s=60)
        record("stopped", "pending")
        left_over("waits")
        adopted = left_over("adopted")
        r.hset(keys.traj("adopted"), "slot", f"{adopted.id[:12]}:s4")
        for traj in ("ended", "gone", "moved", "idle"):
            left_over(traj)
        left_over("stopped", start=False)
        left_over("")  # a warm container of a dead worker
        r.zadd(keys.workers, {"w-dead": int(time.time() * 1000) - 120_000})  # now it died

        removable = {"ended", "gone", "moved", "idle", "stopped", "warm"}
        ids = {name: c.id for name, c in made.items()}

        def present() -> set[str]:
            live = container_ids(dc, ns)
            return {name for name, cid in ids.items() if cid in live}

        wait_for(lambda: not present() & removable, what="the periodic sweep")
        assert present() == {"waits", "adopted"}
    finally:
        for c in made.values():
            with contextlib.suppress(Exception):
                c.remove(force=True)


def test_a_handed_over_container_whose_trajectory_ends_meanwhile_is_swept(
    start_worker, client: Client, dc, ns: str
):
    # The survivor runs a full worker's slots: it cannot claim the handed-back trajectory,
    # which is cancelled while it waits; its kept container must not stay forever.
    survivor = start_worker("docker", slots=1, sweep_s=0.3, **FAST)
    client.open("busy")
    assert client.call("busy", "bash", {"command": "true"}).worker == survivor.settings.worker_id
    leaving = start_worker("docker", **FAST)
    client.open("t")
    first = client.call("t", "bash", {"command": "echo x > f"})
    assert first.worker == leaving.settings.worker_id, first
    leaving.stop()
    kept = [c for c in containers(dc, ns) if c["Id"].startswith(short_id(first.slot))]
    assert len(kept) == 1 and kept[0]["State"] == "running"
    rec = client.record("t")
    assert rec is not None and rec.status.value == "pending"
    client.cancel("t")
    wait_for(
        lambda: kept[0]["Id"] not in container_ids(dc, ns),
        what="the sweep to remove the kept container",
    )
    assert client.call("busy", "bash", {"command": "echo still"}).output == "still\n"
