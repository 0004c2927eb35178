"""Hostile code and hostile input stay inside their slot; the worker keeps serving.

Tests that the local backend can pass too run on both backends (``backend``);
the limits only a container enforces (pids, memory, disk, network) run on Docker.
The module ends by checking that no container of its Docker namespaces is left.
"""

from __future__ import annotations

import base64
import io
import tarfile
from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import TEST_RUNTIME, require_docker
from tests.helpers import bridge_gateway, count_procs, unique_sleep, wait_for
from tests.test_reliability import field_names, field_values
from toolq.producer import Client
from toolq.schemas import Keys
from toolq.worker.embedded import EmbeddedRedis

IGNORE_TERM = "trap '' TERM INT HUP"  # inherited by what the shell runs next


@pytest.fixture
def on(backend: str, ns: str, docker_namespaces: set[str]) -> str:
    """The parametrised backend, its namespace checked for leaks when it is Docker."""
    if backend == "docker":
        docker_namespaces.add(ns)
    return backend


@pytest.fixture
def docker_only(ns: str, docker_namespaces: set[str]) -> str:
    require_docker()
    docker_namespaces.add(ns)
    return "docker"


def short_id(slot: str) -> str:
    return slot.split(":", 1)[0]


# --------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------


def test_paths_and_symlinks_cannot_leave_the_workspace(on, start_worker, client: Client):
    start_worker(on)
    client.open("t")
    made = client.call(
        "t",
        "bash",
        {
            "command": "ln -s / rootlink && ln -s /etc/passwd pw && ln -s .. up && mkdir -p in"
            " && ln -s ../rootlink in/deep && echo inside > ok.txt"
        },
    )
    assert made.ok, made
    outside = [
        ("read_file", {"path": "/etc/passwd"}),
        ("read_file", {"path": "../../../../etc/passwd"}),
        ("read_file", {"path": "pw"}),
        ("read_file", {"path": "rootlink/etc/passwd"}),
        ("read_file", {"path": "in/deep/etc/passwd"}),
        ("write_file", {"path": "up/escaped.txt", "content": "x"}),
        ("write_file", {"path": "rootlink/tmp/escaped.txt", "content": "x"}),
        ("write_file", {"path": "../escaped.txt", "content": "x"}),
        ("edit_file", {"path": "pw", "old": "root", "new": "toor"}),
        ("list_files", {"path": "rootlink"}),
        ("list_files", {"path": ".."}),
        ("archive", {"path": "up"}),
        ("str_replace_editor", {"command": "view", "path": "/etc/passwd"}),
        ("str_replace_editor", {"command": "create", "path": "/tmp/x", "file_text": "x"}),
    ]
    for tool, args in outside:
        r = client.call("t", tool, args)
        assert not r.ok and r.error_code == "path_outside_workspace", (tool, args, r)
    # symlinks are listed and archived as links, never followed out
    listing = client.call("t", "list_files", {"path": ".", "recursive": True})
    assert listing.ok and listing.data is not None
    paths = {e["path"]: e["type"] for e in listing.data["entries"]}
    assert paths["rootlink"] == "symlink" and paths["in/deep"] == "symlink"
    assert not any(p.startswith(("rootlink/", "up/", "in/deep/")) for p in paths)
    packed = client.call("t", "archive", {"path": "."})
    assert packed.ok, packed
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(packed.output))) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
    assert members["rootlink"].issym() and members["pw"].issym() and members["up"].issym()
    assert not any(name.startswith(("rootlink/", "up/", "in/deep/")) for name in members)
    assert client.call("t", "read_file", {"path": "ok.txt"}).output == "inside\n"


def test_a_workdir_outside_the_workspace_fails_the_trajectory(on, start_worker, client: Client):
    start_worker(on)
    client.open("t", {"workdir": "../../etc"})
    r = client.call("t", "bash", {"command": "pwd"})
    assert not r.ok and r.error_code in ("sandbox_error", "trajectory_ended"), r
    rec = wait_for(lambda: (x := client.record("t")) and x.status.final and x)
    assert rec.status.value == "failed" and "outside the workspace" in (rec.reason or ""), rec


# --------------------------------------------------------------------------
# output floods
# --------------------------------------------------------------------------


def test_output_floods_are_capped_and_counted(on, start_worker, client: Client):
    start_worker(on)
    client.open("t", {"limits": {"max_output_bytes": 4096}})
    client.open("bystander")
    total = 50_000_000
    flood = client.call("t", "bash", {"command": f"head -c {total} /dev/zero | tr '\\0' x"})
    assert flood.ok and flood.truncated and flood.output_bytes == total, flood.error
    assert len(flood.output.encode()) < 4096 + 100  # head + tail + the omission note
    garbage = client.call("t", "shell", {"command": "head -c 5000000 /dev/urandom"})
    assert garbage.ok and garbage.truncated and garbage.output_bytes >= 5_000_000
    assert len(garbage.output) < 8192
    big = client.call("t", "bash", {"command": f"head -c {total} /dev/zero > big; echo made"})
    assert big.output == "made\n", big
    read = client.call("t", "read_file", {"path": "big"})
    assert read.ok and read.truncated and len(read.output) <= 4096, read.error
    assert client.call("bystander", "bash", {"command": "echo fine"}).output == "fine\n"


# --------------------------------------------------------------------------
# processes that ignore SIGTERM
# --------------------------------------------------------------------------


@pytest.fixture
def two_in_one(on, start_worker, client: Client) -> tuple[str, str]:
    """Trajectories ``a`` and ``b`` that see each other's processes (packed on Docker)."""
    start_worker(on, slots_per_container=2)
    client.open("a")
    client.open("b")
    ra = client.call("a", "bash", {"command": "true"})
    rb = client.call("b", "bash", {"command": "true"})
    if on == "docker":
        assert short_id(ra.slot) == short_id(rb.slot)  # b watches a's container
    return "a", "b"


def test_term_ignoring_processes_die_on_timeout(two_in_one, client: Client):
    a, b = two_in_one
    tag = unique_sleep()
    r = client.call(a, "bash", {"command": f"{IGNORE_TERM}; sleep {tag}", "timeout_s": 2})
    assert r.timed_out and r.error_code == "timeout", r
    wait_for(lambda: count_procs(client, b, tag) == 0, what="the bash call's process to die")

    tag = unique_sleep()
    handler = (
        "import signal, time\n"
        "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
        "    signal.signal(s, lambda *_: print('ignored', flush=True))\n"
        f"time.sleep({tag})\n"
    )
    client.call(a, "write_file", {"path": "stubborn.py", "content": handler})
    r = client.call(a, "shell", {"command": f"python3 stubborn.py {tag}", "timeout_s": 2})
    assert r.timed_out, r
    wait_for(lambda: count_procs(client, b, tag) == 0, what="the shell call's process to die")
    r = client.call(a, "shell", {"command": f"{IGNORE_TERM}; sleep {tag}", "timeout_s": 2})
    assert r.timed_out, r
    wait_for(lambda: count_procs(client, b, tag) == 0, what="the session's process to die")
    assert client.call(a, "shell", {"command": "echo back"}).output == "back\n"


def test_term_ignoring_background_tasks_are_killed_by_bg_stop_and_close(two_in_one, client: Client):
    a, b = two_in_one
    tag = unique_sleep()
    started = client.call(a, "bg_start", {"command": f"{IGNORE_TERM}; sleep {tag}"})
    assert started.ok and started.data, started
    wait_for(lambda: count_procs(client, b, tag) == 1, what="the task to start")
    stopped = client.call(a, "bg_stop", {"task_id": started.data["task_id"]})
    assert stopped.ok, stopped
    wait_for(lambda: count_procs(client, b, tag) == 0, what="bg_stop to kill it")

    tag = unique_sleep()
    assert client.call(a, "bg_start", {"command": f"{IGNORE_TERM}; sleep {tag}"}).ok
    wait_for(lambda: count_procs(client, b, tag) == 1, what="the task to start")
    client.close(a)
    wait_for(lambda: count_procs(client, b, tag) == 0, what="the close to kill it")


def test_term_ignoring_call_dies_on_cancel(two_in_one, client: Client):
    a, b = two_in_one
    tag = unique_sleep()
    running = client.submit(a, "bash", {"command": f"{IGNORE_TERM}; sleep {tag}"})
    wait_for(lambda: count_procs(client, b, tag) == 1, what="the call to run")
    client.cancel(a)
    r = client.result(a, running, timeout_s=30)
    assert r.error_code == "cancelled", r
    wait_for(lambda: count_procs(client, b, tag) == 0, what="the cancel to kill it")
    assert client.call(b, "bash", {"command": "echo unharmed"}).output == "unharmed\n"


# --------------------------------------------------------------------------
# container limits (Docker)
# --------------------------------------------------------------------------


def test_fork_bomb_is_contained_and_others_are_served(docker_only, start_worker, client, dc):
    start_worker(docker_only)
    client.open("bomb", {"limits": {"pids": 64}})
    client.open("bystander")
    assert client.call("bystander", "bash", {"command": "true"}).ok
    first = client.call("bomb", "bash", {"command": "true"})
    box = dc.containers.get(short_id(first.slot))
    bombing = client.submit(
        "bomb", "bash", {"command": "b() { b | b & }; b; sleep 30", "timeout_s": 8}
    )
    wait_for(lambda: len(box.top()["Processes"]) > 32, what="the bomb to go off")
    during = client.call("bystander", "bash", {"command": "echo served"})
    assert during.ok and during.output == "served\n", during
    r = client.result("bomb", bombing, timeout_s=60)
    assert r.timed_out and "Resource temporarily unavailable" in r.output, r
    host = box.attrs["HostConfig"]
    if TEST_RUNTIME == "runsc":  # gVisor's kernel counts the processes (see docker_runtime.py)
        assert {u["Name"]: u["Hard"] for u in host["Ulimits"]}["nproc"] == 64, host
        assert host["PidsLimit"] > 64, host  # the host's backstop, for the sandbox's threads
    else:
        assert host["PidsLimit"] == 64, host
    after = client.call("bomb", "bash", {"command": "echo alive"})
    assert after.ok and after.output == "alive\n" and after.slot == first.slot, after


def test_memory_hogs_are_killed_inside_the_slot(docker_only, start_worker, client):
    start_worker(docker_only)
    # a small workspace cap: its tmpfs is charged on top of memory_mb (see README)
    client.open("hog", {"limits": {"memory_mb": 64, "disk_mb": 16}})
    client.open("bystander")
    hog = "python3 -c \"x = [b'x' * (1 << 20) for _ in range(512)]; print('survived')\""
    if TEST_RUNTIME == "runsc":
        return gvisor_memory_hog(client, hog)
    for tool in ("bash", "shell"):
        r = client.call("hog", tool, {"command": hog})
        assert not r.ok and "survived" not in r.output, (tool, r)
    task = client.call("hog", "bg_start", {"command": hog})
    assert task.ok and task.data
    done = client.call("hog", "bg_output", {"task_id": task.data["task_id"], "block": True})
    assert "survived" not in done.output and done.data and done.data["status"] == "failed"
    after = client.call("hog", "bash", {"command": "echo alive"})
    assert after.ok and after.output == "alive\n" and not after.slot_reset, after
    assert client.call("bystander", "bash", {"command": "echo fine"}).output == "fine\n"


def gvisor_memory_hog(client: Client, hog: str) -> None:
    """Under gVisor the memory limit is the whole sandbox's and its kernel kills no
    process: a hog takes its own sandbox down (``sandbox_lost``, the engine says
    OOM), the trajectory goes on in a fresh one, the bystander never notices."""
    r = client.call("hog", "bash", {"command": hog})
    assert r.error_code == "sandbox_lost" and "survived" not in r.output, r
    after = client.call("hog", "bash", {"command": "echo alive"})
    assert after.ok and after.output == "alive\n" and after.slot_reset, after
    assert client.call("bystander", "bash", {"command": "echo fine"}).output == "fine\n"


def test_disk_fill_stops_at_the_workspace_cap_and_the_slot_keeps_working(
    docker_only, start_worker, client, dc
):
    start_worker(docker_only)
    client.open("t", {"limits": {"disk_mb": 16, "memory_mb": 128}})
    fill = client.call("t", "bash", {"command": "dd if=/dev/zero of=big bs=1M count=64"})
    assert not fill.ok and "No space left on device" in fill.output, fill
    more = client.call("t", "write_file", {"path": "more.txt", "content": "y" * (1 << 20)})
    assert more.error_code == "limit_exceeded" and "disk_mb" in (more.error or ""), more
    after = client.call(
        "t", "bash", {"command": "rm big; echo ok > small; cat small; df -m /workspace | tail -1"}
    )
    assert after.ok and after.output.startswith("ok\n"), after
    assert after.output.split()[2] == "16"  # df: filesystem, 1M-blocks, ...: a 16 MiB tmpfs
    host = dc.containers.get(short_id(after.slot)).attrs["HostConfig"]
    assert host["Memory"] == (128 + 16) * 1024 * 1024  # files are charged on top of memory_mb
    assert "size=16m" in host["Tmpfs"]["/workspace"]
    owner = client.call(  # python's stat: gVisor's statx on a tmpfs says EINVAL to coreutils
        "t",
        "bash",
        {
            "command": "python3 -c 'import os, pwd; print(pwd.getpwuid(os.stat(\".\").st_uid)[0])'"
            "; id -un"
        },
    )
    assert owner.output.split()[0] == owner.output.split()[1] == "sandbox", owner


def test_disk_mb_bounds_tmp_var_tmp_and_home_too(docker_only, start_worker, client, dc):
    start_worker(docker_only)
    client.open("t", {"limits": {"disk_mb": 16, "memory_mb": 128}})
    # The home keeps what the image has there (the tmpfs is seeded at start).
    owners = "import os, pwd; [print(pwd.getpwuid(os.stat(p).st_uid)[0]) for p in ('.', '.bashrc')]"
    home = client.call("t", "bash", {"command": f'cd ~ && pwd && python3 -c "{owners}"'})
    assert home.ok and home.output == "/home/sandbox\nsandbox\nsandbox\n", home
    # (under gVisor toolq makes no home tmpfs; README)
    homes = ("/home/sandbox",) if TEST_RUNTIME == "runc" else ()
    for place in ("/tmp", "/var/tmp", *homes):  # 1 GiB asked: 16 MiB land, in memory
        fill = client.call(
            "t", "bash", {"command": f"dd if=/dev/zero of={place}/big bs=1M count=1024"}
        )
        assert not fill.ok and "No space left on device" in fill.output, (place, fill)
        size = client.call("t", "bash", {"command": f"df -m {place} | tail -1"})
        assert size.output.split()[1] == "16", size
    slot = client.call("t", "bash", {"command": "true"}).slot
    # The container's writable layer (what `docker ps -s` shows) took none of it.
    (listed,) = dc.api.containers(all=True, size=True, filters={"id": short_id(slot)})
    size_rw = listed.get("SizeRw") or 0
    assert size_rw < 4 * 1024 * 1024, size_rw
    cleared = client.call(
        "t", "bash", {"command": "rm -f /tmp/big /var/tmp/big ~/big; echo ok > /tmp/f; cat /tmp/f"}
    )
    assert cleared.output == "ok\n", cleared


def test_the_worker_caps_every_workspace(docker_only, start_worker, client):
    start_worker(docker_only, max_disk_mb=8)
    client.open("t", {"limits": {"disk_mb": 1000}})
    client.open("u")
    for traj in ("t", "u"):
        fill = client.call(traj, "bash", {"command": "dd if=/dev/zero of=big bs=1M count=32"})
        assert "No space left on device" in fill.output, (traj, fill)
        size = client.call(traj, "bash", {"command": "df -m /workspace | tail -1"})
        assert size.output.split()[1] == "8", size


def test_a_default_disk_cap_stops_one_trajectory_and_spares_the_others(
    docker_only, start_worker, client: Client
):
    start_worker(docker_only, default_disk_mb=8)  # no spec sets disk_mb
    client.open("hog")
    client.open("calm")
    fill = client.call("hog", "bash", {"command": "dd if=/dev/zero of=big bs=1M count=32"})
    assert not fill.ok and "No space left on device" in fill.output, fill
    write = client.call("hog", "write_file", {"path": "more", "content": "x" * 1_000_000})
    assert write.error_code == "limit_exceeded" and "disk_mb" in (write.error or ""), write
    calm = client.call("calm", "bash", {"command": "echo fine > f && cat f && df -m . | tail -1"})
    assert calm.ok and calm.output.startswith("fine\n"), calm  # its own, empty workspace
    assert client.call("hog", "bash", {"command": "rm big && echo freed"}).output == "freed\n"


@pytest.fixture
def gateway_redis(dc) -> Iterator[tuple[str, int]]:
    """A Redis the host serves on the Docker bridge gateway: what a sandbox could reach."""
    gateway = bridge_gateway(dc)
    with EmbeddedRedis(
        extra_args=["--bind", "127.0.0.1", gateway, "--protected-mode", "no"]
    ) as server:
        yield gateway, server.port


def test_sandboxes_cannot_reach_the_network_or_redis(
    docker_only, start_worker, client, gateway_redis, redis_url
):
    gateway, port = gateway_redis
    worker_port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
    start_worker(docker_only, allowed_runtimes=("runc",))
    client.open("off")
    # runc: gVisor's sandboxes have no network at all (test_gvisor refuses it there)
    client.open("on", {"runtime": "runc", "limits": {"network": True}})
    probe = (
        "python3 - <<'EOF'\n"
        "import socket\n"
        f"for host, port in [('{gateway}', {port}), ('127.0.0.1', {worker_port}),"
        f" ('{gateway}', {worker_port})]:\n"
        "    try:\n"
        "        s = socket.create_connection((host, port), timeout=5)\n"
        "        s.sendall(b'PING\\r\\n')\n"
        "        print(host, port, s.recv(100).decode().strip())\n"
        "    except OSError as exc:\n"
        "        print(host, port, 'failed', exc)\n"
        "EOF"
    )
    off = client.call("off", "bash", {"command": probe}).output.splitlines()
    assert all("failed" in line for line in off), off
    assert "unreachable" in off[0].lower() or "no route to host" in off[0].lower(), off
    on = client.call("on", "bash", {"command": probe}).output.splitlines()
    assert on[0].endswith("+PONG"), on  # the probe works: only the network is missing
    assert "failed" in on[1] and "failed" in on[2], on  # the worker's Redis listens on loopback
    dns = client.call("off", "bash", {"command": "getent hosts example.com || echo nodns"})
    assert dns.output.strip() == "nodns", dns
    # bash's stat, not ls's statx (EINVAL under gVisor)
    sock = client.call("off", "bash", {"command": "test -e /var/run/docker.sock || echo absent"})
    assert sock.output == "absent\n", sock


# --------------------------------------------------------------------------
# hostile input through Redis, on a Docker worker
# --------------------------------------------------------------------------


@pytest.fixture
def docker_garbage_target(docker_only, start_worker, client: Client, redis_url, ns):
    start_worker(docker_only, max_entry_bytes=4096)
    client.open("g")
    assert client.call("g", "bash", {"command": "true"}).ok
    return client, redis.Redis.from_url(redis_url), Keys(ns)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(fields=st.dictionaries(field_names, field_values, min_size=1, max_size=6))
def test_generated_garbage_on_a_docker_worker_gets_one_result_each(docker_garbage_target, fields):
    client, r, keys = docker_garbage_target
    # control entries would end the trajectory; a client call_id would rename the result
    fields = {k: v for k, v in fields.items() if k not in (b"type", "type", b"call_id")} or {
        "x": "y"
    }
    entry_id = r.xadd(keys.calls("g"), fields).decode()
    result = client.result("g", entry_id, timeout_s=30)
    assert result.call_id == entry_id
    assert result.ok or result.error_code
    rec = client.record("g")
    assert rec is not None and rec.status.value == "running", rec  # the slot survived it
