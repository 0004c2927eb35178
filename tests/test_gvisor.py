"""gVisor (the ``runsc`` runtime) through Redis: a spec asks for it, the worker's
allow-list decides, containers of different runtimes never mix, and everything
toolq does works inside a user-space kernel.

Real workers, the real engine with runsc registered (``.ci/start-docker``), the
test image. The sandbox-abuse and tool suites also run whole under runsc in CI
(``TOOLQ_TEST_RUNTIME=runsc``, see ``.ci/test``); this module runs on every pass.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import tarfile
import time
import uuid
from typing import Any

import pytest

from tests.conftest import require_docker
from tests.helpers import wait_for
from tests.test_docker_reliability import FAST, short_id, worker_process  # noqa: F401 - fixture
from toolq.producer import Client
from toolq.worker.backends.base import SandboxError

GVISOR = {"runtime": "runsc"}


@pytest.fixture(autouse=True)
def docker_ns(ns: str, docker_namespaces: set[str], dc: Any) -> str:
    require_docker()
    if "runsc" not in (dc.info().get("Runtimes") or {}):
        message = "runtime runsc is not registered with the engine (.ci/start-docker does it)"
        if os.environ.get("TOOLQ_REQUIRE_DOCKER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    docker_namespaces.add(ns)
    return ns


def runtime_of(dc: Any, slot: str) -> str:
    return str(dc.api.inspect_container(short_id(slot))["HostConfig"]["Runtime"])


def ended(client: Client, traj: str) -> Any:
    wait_for(
        lambda: (r := client.record(traj)) is not None and r.status.value != "pending"
        and r.status.value != "running",
        what=f"{traj} to end",
    )  # fmt: skip
    return client.record(traj)


def sh(client: Client, traj: str, command: str, **args: Any) -> str:
    result = client.call(traj, "bash", {"command": command, **args})
    assert result.ok, result
    return result.output


# --------------------------------------------------------------------------
# the setting
# --------------------------------------------------------------------------


def test_a_runtime_the_worker_does_not_allow_is_refused_at_open(start_worker, client: Client):
    start_worker("docker", runtime="runc")  # no allow-list: runc only
    client.open("g", GVISOR)
    rec = ended(client, "g")  # at open: no call was ever submitted
    assert rec.status.value == "failed" and rec.calls_total == 0, rec
    assert "'runsc'" in (rec.reason or "") and "allowed_runtimes" in (rec.reason or ""), rec
    late = client.call("g", "bash", {"command": "true"})
    assert late.error_code == "trajectory_ended", late
    client.open("plain")  # the worker is unharmed
    assert sh(client, "plain", "echo fine") == "fine\n"


def test_network_under_gvisor_is_refused_with_the_reason(start_worker, client: Client):
    start_worker("docker", allowed_runtimes=("runsc",))
    client.open("g", {**GVISOR, "limits": {"network": True}})
    rec = ended(client, "g")
    assert rec.status.value == "failed", rec
    assert "--network=none" in (rec.reason or "") and "no network" in (rec.reason or ""), rec
    client.open("runc-net", {"limits": {"network": True}})  # runc still gives one
    assert sh(client, "runc-net", "echo up") == "up\n"


def test_a_worker_allowing_an_unregistered_runtime_does_not_start(start_worker):
    with pytest.raises(SandboxError, match=r"not-a-runtime.*not registered"):
        start_worker("docker", allowed_runtimes=("not-a-runtime",))


def test_packed_and_warm_containers_never_mix_runtimes(start_worker, client: Client, dc, ns: str):
    start_worker("docker", allowed_runtimes=("runsc",), slots_per_container=2, warm_pool=1)
    for traj, spec in [("r1", {}), ("g1", GVISOR), ("r2", {}), ("g2", GVISOR)]:
        client.open(traj, spec)
    slots = {t: client.call(t, "bash", {"command": "uname -r"}) for t in ("r1", "g1", "r2", "g2")}
    assert all(r.ok for r in slots.values()), slots
    boxes = {t: short_id(r.slot) for t, r in slots.items()}
    assert boxes["r1"] == boxes["r2"] != boxes["g1"] == boxes["g2"], boxes  # packed by runtime
    assert runtime_of(dc, slots["r1"].slot) == "runc"
    assert runtime_of(dc, slots["g1"].slot) == "runsc"
    assert slots["g1"].output == "4.4.0\n" != slots["r1"].output  # gVisor's kernel says so
    # the warm pool holds the worker's default runtime only
    warm = dc.api.containers(filters={"label": ["toolq.pool=warm", f"toolq.ns={ns}"]})
    assert warm and all(c["Labels"]["toolq.runtime"] == "runc" for c in warm), warm


# --------------------------------------------------------------------------
# everything works under gVisor
# --------------------------------------------------------------------------


def targz(files: dict[str, bytes]) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


def test_every_tool_sessions_tasks_uploads_forks_and_cancel_under_gvisor(
    start_worker, client: Client, dc
):
    start_worker("docker", allowed_runtimes=("runsc",))
    client.open("g", GVISOR)
    first = client.call("g", "bash", {"command": "echo hi > a.txt; uname -r"})
    assert first.ok and first.output == "4.4.0\n" and runtime_of(dc, first.slot) == "runsc"
    # file tools
    wrote = client.call("g", "write_file", {"path": "d/b.txt", "content": "one\ntwo\n"})
    assert wrote.ok, wrote
    read = client.call("g", "read_file", {"path": "d/b.txt"})
    assert read.ok and "two" in read.output, read
    edit = client.call(
        "g", "str_replace_editor",
        {"command": "str_replace", "path": "d/b.txt", "old_str": "two", "new_str": "three"},
    )  # fmt: skip
    assert edit.ok, edit
    # a reply larger than a pipe's 64 KiB (gVisor's writes to the exec's pipe are short)
    blob = os.urandom(300_000)
    content = base64.b64encode(blob).decode()
    assert client.call(
        "g", "write_file", {"path": "big", "content": content, "encoding": "base64"}
    ).ok
    big = client.call("g", "read_file", {"path": "big", "encoding": "base64"})
    assert big.ok and base64.b64decode(big.output) == blob, big.error
    # an upload (the unpack tool `toolq upload` drives)
    up = client.call("g", "unpack", {"data": targz({"up/x.txt": b"uploaded\n"}), "path": "."})
    assert up.ok, up
    assert sh(client, "g", "cat d/b.txt up/x.txt") == "one\nthree\nuploaded\n"
    # a shell session keeps its state between calls
    assert client.call("g", "shell", {"command": "cd d && export K=v"}).ok
    kept = client.call("g", "shell", {"command": "echo $K; pwd"})
    assert kept.ok and kept.output == "v\n/workspace/d\n", kept
    # a background task runs, and bg_stop kills it
    tag = f"sleep 7{uuid.uuid4().int % 10**5}"
    task = client.call("g", "bg_start", {"command": f"echo started; {tag}"})
    assert task.ok and task.data, task
    wait_for(lambda: tag in sh(client, "g", "ps -eo args"), what="the task to run")
    assert client.bg_stop("g", task.data["task_id"]).ok
    wait_for(lambda: tag not in sh(client, "g", "ps -eo args"), what="bg_stop to kill it")
    # a fork: each copy is its own gVisor sandbox, with the files
    forked = client.fork("g", ["f1", "f2"])
    assert forked.ok, forked
    for copy in ("f1", "f2"):
        got = client.call(copy, "bash", {"command": "cat a.txt up/x.txt"})
        assert got.ok and got.output == "hi\nuploaded\n", got
        assert runtime_of(dc, got.slot) == "runsc" and short_id(got.slot) != short_id(first.slot)
    # cancel: the running call is answered at once, the trajectory ends
    running = client.submit("g", "bash", {"command": "sleep 600"})
    wait_for(lambda: "sleep 600" in processes(dc, first.slot), what="the call to run")
    asked = time.monotonic()
    client.cancel("g")
    cancelled = client.result("g", running, timeout_s=60)
    took_s = time.monotonic() - asked
    print(f"cancel answered in {took_s:.3f} s under gVisor")  # measured, not asserted
    assert cancelled.error_code == "cancelled", cancelled
    assert ended(client, "g").status.value == "cancelled"  # and its sandbox goes with it


def processes(dc: Any, slot: str) -> str:
    """The sandbox's processes, by ``ps`` inside it: under gVisor the engine's own list
    (``docker top``) shows host processes with the sandbox's pids."""
    return str(dc.containers.get(short_id(slot)).exec_run(["ps", "-eo", "args"]).output.decode())


def test_gvisor_containers_are_not_recycled(start_worker, client: Client, dc, ns: str):
    start_worker("docker", runtime="runsc", recycle_containers=True, slots=2)
    client.open("a")
    first = client.call("a", "bash", {"command": "echo x > /tmp/x; uname -r"})
    assert first.ok and first.output == "4.4.0\n", first
    client.close("a")
    wait_for(
        lambda: not dc.api.containers(all=True, filters={"id": short_id(first.slot)}),
        what="its container to be removed, not recycled",
    )
    client.open("b")
    # bash's test, not ls: coreutils' statx says EINVAL on gVisor's tmpfs
    second = client.call("b", "bash", {"command": "test -e /tmp/x && echo left || echo clean"})
    assert second.output == "clean\n" and short_id(second.slot) != short_id(first.slot)


def test_a_killed_workers_gvisor_container_is_adopted_and_its_tasks_are_lost(
    worker_process,  # noqa: F811 - the fixture
    start_worker,
    client: Client,
    dc,
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setenv("TOOLQ_ALLOWED_RUNTIMES", "runsc")  # the dying worker's process
    dying = worker_process("dying")
    client.open("g", GVISOR)
    first = client.call("g", "bash", {"command": "echo kept > notes.txt"})
    assert first.ok and first.worker == "dying" and runtime_of(dc, first.slot) == "runsc"
    task = client.call("g", "bg_start", {"command": "while true; do sleep 0.2; done"})
    assert task.ok and task.data, task
    start_worker("docker", allowed_runtimes=("runsc",), **FAST)
    dying.send_signal(signal.SIGKILL)
    dying.wait()
    after = client.call("g", "bash", {"command": "cat notes.txt", "timeout_s": 30})
    assert after.ok and after.output == "kept\n" and after.worker != "dying", after
    assert short_id(after.slot) == short_id(first.slot) and not after.slot_reset  # adopted
    wait_for(
        lambda: client.bg_get("g", task.data["task_id"]).status == "lost",
        what="the task marked lost",
    )
