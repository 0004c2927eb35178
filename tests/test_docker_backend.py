"""Docker backend through Redis: isolation, limits, losses, warm pool, cleanup.

Every test drives a real worker on the real engine with the test image; the
module ends by checking that no container of its namespaces is left.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.conftest import NOPYTHON_IMAGE, TEST_IMAGE, require_docker
from tests.helpers import LABELS, bridge_gateway, missing, wait_for
from toolq.producer import Client
from toolq.schemas import Keys


@pytest.fixture(autouse=True)
def docker_ns(ns: str, docker_namespaces: set[str]) -> str:
    require_docker()
    docker_namespaces.add(ns)
    return ns


def containers(dc: Any, ns: str, **labels: str) -> list[Any]:
    """This namespace's toolq containers (optionally with more label values);
    one removed while being listed (a short-lived probe, say) is left out."""
    import docker

    wanted = [LABELS, f"toolq.ns={ns}"] + [f"{k}={v}" for k, v in labels.items()]
    found = []
    for sparse in dc.containers.list(all=True, sparse=True, filters={"label": wanted}):
        try:
            found.append(dc.containers.get(sparse.id))
        except docker.errors.NotFound:
            continue
    return found


def container_of(dc: Any, slot: str) -> Any:
    """The container behind a result's ``slot`` (``<short id>:<slot name>``)."""
    return dc.containers.get(slot.split(":", 1)[0])


# --------------------------------------------------------------------------
# isolation and defaults
# --------------------------------------------------------------------------


def test_packed_trajectories_share_a_container_but_not_files(start_worker, client: Client, dc):
    start_worker("docker", slots_per_container=2)
    client.open("a")
    client.open("b")
    assert client.call("a", "write_file", {"path": "notes/x.txt", "content": "alpha"}).ok
    ra = client.call("a", "bash", {"command": "cat notes/x.txt; echo; pwd"})
    assert ra.output.splitlines()[0] == "alpha"
    assert client.call("b", "read_file", {"path": "notes/x.txt"}).error_code == "not_found"
    rb = client.call("b", "bash", {"command": "ls notes 2>&1; pwd"})
    assert rb.exit_code == 0 and "No such file" in rb.output
    # one container, two workspaces
    assert ra.slot.split(":")[0] == rb.slot.split(":")[0] and ra.slot != rb.slot
    assert ra.output.splitlines()[1] != rb.output.splitlines()[1]
    assert client.call("a", "read_file", {"path": "notes/x.txt"}).output == "alpha"
    # closing one keeps the other's container and files
    client.close("b")
    assert client.call("a", "bash", {"command": "cat notes/x.txt"}).output == "alpha"


def test_safe_defaults_and_worker_caps(start_worker, client: Client, dc):
    start_worker("docker", max_memory_mb=256, max_pids=100)
    client.open("t", {"limits": {"memory_mb": 100_000, "pids": 100_000, "cpus": 0.5}})
    r = client.call(
        "t",
        "bash",
        {"command": "id -u; pwd; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status"},
    )
    assert r.ok, r
    lines = r.output.split()
    assert lines[0] == "1000"  # the image's `sandbox` user, not root
    assert lines[1] == "/workspace"
    assert "0000000000000000" in lines and lines[-1] == "1"  # no capabilities, no-new-privs
    host = container_of(dc, r.slot).attrs["HostConfig"]
    # capped, no swap; the default workspace cap (a tmpfs) is charged on top
    assert host["Memory"] == (256 + 2048) * 1024 * 1024 == host["MemorySwap"]
    assert "size=2048m" in host["Tmpfs"]["/workspace"]
    assert host["PidsLimit"] == 100
    assert host["NanoCpus"] == 500_000_000
    assert host["NetworkMode"] == "none"
    assert host["CapDrop"] == ["ALL"] and "no-new-privileges" in host["SecurityOpt"]
    labels = container_of(dc, r.slot).labels
    assert labels["toolq.traj"] == "t" and labels["toolq.ns"] == client.keys.ns


@pytest.fixture
def host_listener(dc) -> Iterator[tuple[str, int]]:
    """A TCP server on the Docker bridge gateway that greets every connection."""
    gateway = bridge_gateway(dc)
    server = socket.socket()
    server.bind((gateway, 0))
    server.listen(8)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"hello-from-host")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield gateway, server.getsockname()[1]
    stop.set()
    thread.join(2)
    server.close()


def test_network_is_off_unless_the_spec_turns_it_on(start_worker, client: Client, host_listener):
    host, port = host_listener
    start_worker("docker")
    client.open("off")
    client.open("on", {"limits": {"network": True}})
    probe = (
        f"python3 -c \"import socket; s = socket.create_connection(('{host}', {port}), "
        'timeout=5); print(s.recv(100).decode())"'
    )
    ifaces = "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\\n' ' '"
    off = client.call("off", "bash", {"command": probe})
    assert not off.ok and "hello-from-host" not in off.output
    assert "unreachable" in off.output.lower(), off.output
    assert client.call("off", "bash", {"command": ifaces}).output.split() == ["lo"]
    on = client.call("on", "bash", {"command": probe})
    assert on.ok and on.output.strip() == "hello-from-host", on
    assert len(client.call("on", "bash", {"command": ifaces}).output.split()) > 1


def test_network_request_refused_when_the_worker_forbids_it(start_worker, client: Client):
    start_worker("docker", allow_network=False)
    client.open("t", {"limits": {"network": True}})
    r = client.call("t", "bash", {"command": "true"})
    # The slot starts at claim time: a call that arrives after that failure finds
    # the trajectory ended; the record says why.
    assert r.error_code in ("sandbox_error", "trajectory_ended"), r
    rec = wait_for(lambda: (x := client.record("t")) and x.status.final and x)
    assert rec.status.value == "failed" and "allow_network" in (rec.reason or ""), rec


# --------------------------------------------------------------------------
# limits hold and the slot survives
# --------------------------------------------------------------------------


def test_memory_hog_is_killed_and_the_slot_still_serves(start_worker, client: Client):
    start_worker("docker")
    # a small workspace cap: its tmpfs is charged on top of memory_mb (see README)
    client.open("t", {"limits": {"memory_mb": 64, "disk_mb": 16}})
    hog = client.call(
        "t", "bash", {"command": "python3 -c \"x = b'x' * (512 << 20); print('survived')\""}
    )
    assert not hog.ok and "survived" not in hog.output
    assert hog.exit_code in (137, -9), hog  # SIGKILL from the OOM killer
    assert "killed" in (hog.error or "").lower()
    after = client.call("t", "bash", {"command": "echo alive"})
    assert after.ok and after.output == "alive\n"
    assert after.slot == hog.slot and not after.slot_reset


def test_fork_bomb_is_contained_and_the_worker_keeps_serving(start_worker, client: Client):
    start_worker("docker")
    client.open("bomb", {"limits": {"pids": 64}})
    client.open("bystander")
    bomb = "bomb() { bomb | bomb & }; bomb; sleep 60"
    r = client.call("bomb", "bash", {"command": bomb, "timeout_s": 3})
    assert not r.ok and r.timed_out and r.error_code == "timeout", r
    assert "Resource temporarily unavailable" in r.output  # the pids limit held it
    after = client.call("bomb", "bash", {"command": "echo alive"})
    assert after.ok and after.output == "alive\n" and after.slot == r.slot
    assert client.call("bystander", "bash", {"command": "echo fine"}).output == "fine\n"


# --------------------------------------------------------------------------
# failures are reported
# --------------------------------------------------------------------------


def test_killed_container_gives_sandbox_lost_then_a_fresh_slot(start_worker, client: Client, dc):
    start_worker("docker")
    client.open("t")
    first = client.call("t", "write_file", {"path": "marker", "content": "x"})
    assert first.ok
    box = container_of(dc, first.slot)
    running = client.submit("t", "bash", {"command": "sleep 30"})
    wait_for(
        lambda: any("sleep 30" in " ".join(p) for p in box.top()["Processes"]),
        what="the call to run",
    )
    box.kill()
    lost = client.result("t", running, timeout_s=30)
    assert not lost.ok and lost.error_code == "sandbox_lost", lost
    fresh = client.call("t", "bash", {"command": "ls; echo ok"})
    assert fresh.ok and fresh.output == "ok\n", fresh  # new workspace: marker is gone
    assert fresh.slot_reset and fresh.slot != first.slot
    again = client.call("t", "bash", {"command": "true"})
    assert again.ok and not again.slot_reset and again.slot == fresh.slot
    wait_for(lambda: not any(c.id == box.id for c in containers(dc, client.keys.ns)), 30)


def test_image_without_python3_is_a_clear_sandbox_error(start_worker, client: Client, dc):
    try:
        dc.images.get(NOPYTHON_IMAGE)
    except Exception:
        missing(f"no image {NOPYTHON_IMAGE} (run .ci/build-sandbox-image)")
    start_worker("docker")
    client.open("t", {"image": NOPYTHON_IMAGE})
    r = client.call("t", "bash", {"command": "true"})
    clear = f"image {NOPYTHON_IMAGE} has no python3"
    # The call normally waits for the container start (~0.3 s) and carries the error.
    assert r.error_code in ("sandbox_error", "trajectory_ended"), r
    assert r.error_code != "sandbox_error" or clear in (r.error or ""), r
    rec = wait_for(lambda: (x := client.record("t")) and x.status.final and x)
    assert rec.status.value == "failed" and clear in (rec.reason or ""), rec
    wait_for(lambda: not containers(dc, client.keys.ns), 30, "the failed container to go")


# --------------------------------------------------------------------------
# pool and cleanup
# --------------------------------------------------------------------------


def test_warm_pool_serves_an_open_and_refills(start_worker, client: Client, dc, ns: str):
    handle = start_worker("docker", warm_pool=1)
    warm = wait_for(
        lambda: [c for c in containers(dc, ns, **{"toolq.pool": "warm"}) if c.status == "running"],
        what="a warm container",
    )
    assert len(warm) == 1
    client.open("t")
    r = client.call("t", "bash", {"command": "echo served"})
    assert r.ok and r.slot.split(":")[0] == warm[0].id[:12]
    wait_for(
        lambda: [c for c in containers(dc, ns) if c.id != warm[0].id and c.status == "running"],
        what="the pool to refill",
    )
    handle.stop()
    assert not containers(dc, ns), "shutdown must remove in-use and warm containers"


def test_starting_worker_removes_containers_of_dead_workers(
    start_worker, client: Client, dc, ns: str, redis_url: str
):
    r = redis.Redis.from_url(redis_url)
    now_ms = int(time.time() * 1000)
    r.zadd(Keys(ns).workers, {"w-dead": now_ms - 120_000, "w-live": now_ms})

    def leftover(namespace: str, worker: str) -> Any:
        labels = {"toolq.managed": "1", "toolq.ns": namespace, "toolq.worker": worker}
        return dc.containers.create(TEST_IMAGE, ["sleep", "infinity"], labels=labels)

    dead = leftover(ns, "w-dead")
    live = leftover(ns, "w-live")
    elsewhere = leftover(ns + "x", "w-dead")  # another namespace is not ours to judge
    try:
        start_worker("docker")
        ids = {c.id for c in dc.containers.list(all=True, filters={"label": LABELS})}
        assert dead.id not in ids
        assert live.id in ids and elsewhere.id in ids
    finally:
        for c in (dead, live, elsewhere):
            with contextlib.suppress(Exception):
                c.remove(force=True)


def test_shutdown_while_containers_start_leaves_none(start_worker, client: Client, dc, ns: str):
    # One start at a time: the trajectories' slots are still starting when the worker stops.
    handle = start_worker("docker", warm_pool=2, start_concurrency=1)
    worker = handle.worker
    assert worker is not None
    client.open("a")
    client.open("b")
    wait_for(lambda: len(worker.owned) == 2, what="both trajectories to be claimed")
    handle.stop()
    assert not handle.thread.is_alive()
    assert not containers(dc, ns)
