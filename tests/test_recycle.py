"""Recycled containers: an ended trajectory's container serves the next one only
after a reset the worker verifies; a poisoned one is cleaned, or removed.

Real workers on the Docker backend, the real engine, everything through Redis;
each worker serves its metrics, which say when a reset has finished and how.
The module ends by checking that no container of its namespaces is left.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import require_docker
from tests.helpers import TOOLQ, count_procs, redis_client, unique_sleep, wait_for
from tests.test_metrics import metrics_port, scrape, value
from toolq.producer import Client
from toolq.schemas import Keys, Result
from toolq.worker.backends.base import TrajState
from toolq.worker.backends.docker_box import awaits_adoption
from toolq.worker.backends.docker_recycle import REJECT_REASONS, added_paths, parents
from toolq.worker.metrics import RECYCLE_REJECT_REASONS, WorkerMetrics
from toolq.worker.settings import WorkerSettings
from toolq.worker.tools import builtin_registry

# What a trajectory sees of its container's state: environment, files outside the
# workspace it may write, processes, System V IPC. A recycled container must show
# exactly what the same container showed when it was fresh.
PROBE = (
    "env | sort; find /workspace /tmp /var/tmp /dev/shm /dev/mqueue ~ -mindepth 1 | sort;"
    " stat -c '%n %a %U' /workspace ~ /tmp; md5sum ~/.bashrc; ps -eo user,args --sort=user,args;"
    " cat /proc/sysvipc/shm /proc/sysvipc/sem /proc/sysvipc/msg"
)


@pytest.fixture(autouse=True)
def docker_ns(ns: str, docker_namespaces: set[str]) -> str:
    require_docker()
    docker_namespaces.add(ns)
    return ns


@pytest.fixture
def recycling(start_worker: Callable[..., Any]) -> Callable[..., int]:
    """Start a Docker worker (recycling on unless told) and return its metrics port."""

    def start(**settings: Any) -> int:
        fields = {"recycle_containers": True, "metrics_port": 0, "metrics_host": "127.0.0.1"}
        return metrics_port(start_worker("docker", **{**fields, **settings}))

    return start


def container(result: Result) -> str:
    """The short id of the container a result ran in (its ``slot`` is ``<id>:<name>``)."""
    return result.slot.split(":", 1)[0]


def recycled(port: int) -> float:
    return value(scrape(port), "toolq_containers_recycled_total")


def rejected(port: int, reason: str) -> float:
    return value(scrape(port), "toolq_containers_recycle_rejected_total", reason=reason)


def one_result_each(redis_url: str, ns: str, traj: str, call_ids: list[str]) -> None:
    """Every call has a result record and exactly one result event."""
    r, keys = redis_client(redis_url), Keys(ns)
    events = Counter(
        f[b"call_id"].decode()
        for _, f in r.xrange(keys.events(traj))
        if f.get(b"type") == b"result"
    )
    assert all(r.exists(keys.result(traj, c)) for c in call_ids)
    assert [events[c] for c in call_ids] == [1] * len(call_ids), events


def failing_calls(client: Client, traj: str) -> list[str]:
    """Calls that fail on purpose (unknown tool, bad arguments, a timeout, an error)."""
    results = client.call_many(
        traj,
        [
            ("no-such-tool", {}),
            ("bash", {"command": 42}),
            ("bash", {"command": "sleep 30", "timeout_s": 1}),
            ("read_file", {"path": "/etc/passwd"}),
        ],
    )
    codes = [r.error_code for r in results]
    assert codes == ["unknown_tool", "invalid_args", "timeout", "path_outside_workspace"]
    return [r.call_id for r in results]


# --------------------------------------------------------------------------
# reuse
# --------------------------------------------------------------------------


@pytest.mark.parametrize("disk_mb", [2048, 0], ids=["workspace-tmpfs", "workspace-in-layer"])
def test_the_next_trajectory_gets_the_container_as_new(recycling, client: Client, dc, disk_mb):
    port = recycling(default_disk_mb=disk_mb)
    home_poisons = [  # a home tmpfs is emptied and refilled from the image: undone
        ("bash", {"command": "echo 'export POISON=1' >> ~/.bashrc && chmod 700 ~"}),
    ]
    client.open("first")
    fresh = client.call("first", "bash", {"command": PROBE})
    assert fresh.ok, fresh
    poison = client.call_many(
        "first",
        [
            ("write_file", {"path": "notes/a.txt", "content": "secret"}),
            ("shell", {"command": "export LEFT_BEHIND=poison; mkdir -p sub && cd sub"}),
            ("bash", {"command": "echo x > /tmp/scratch && echo y > /var/tmp/scratch"}),
            ("bash", {"command": "mkdir -p ~/.cache/tool && echo z > ~/.cache/tool/z"}),
            ("bash", {"command": "echo s > /dev/shm/shared; chmod 700 /workspace"}),
            ("bash", {"command": "echo 'export X=1' > /etc/profile.d/x.sh || echo refused"}),
            *(home_poisons if disk_mb else []),
            ("shell", {"command": "echo $LEFT_BEHIND; pwd"}),
        ],
    )
    assert all(p.ok for p in poison), poison
    assert "refused" in poison[5].output  # not the sandbox user's to write
    assert poison[-1].output == "poison\n/workspace/sub\n"
    client.close("first")
    wait_for(lambda: recycled(port) == 1, what="the container to be recycled")

    client.open("second")
    again = client.call("second", "bash", {"command": PROBE})
    assert container(again) == container(fresh)  # the same container...
    assert again.output == fresh.output  # ...as it was when new
    shell = client.call("second", "shell", {"command": "echo ${LEFT_BEHIND-unset}; pwd"})
    assert shell.output == "unset\n/workspace\n"
    assert client.call("second", "read_file", {"path": "notes/a.txt"}).error_code == "not_found"
    record = client.record("second")
    assert record is not None and record.sandbox.startswith(container(fresh))
    assert dc.containers.get(container(fresh)).name.endswith("-recycled")
    assert rejected(port, "filesystem") == 0


def test_processes_left_behind_are_killed_before_reuse(
    recycling, client: Client, redis_url: str, ns: str
):
    port = recycling()
    tag = unique_sleep()
    client.open("hostile")
    detached = [
        f"setsid sleep {tag} >/dev/null 2>&1 </dev/null &",
        f"nohup sleep {tag} >/dev/null 2>&1 &",
        f"( ( trap '' TERM HUP INT; sleep {tag} ) & ) >/dev/null 2>&1",  # double fork
        # respawns its sleep as soon as it is killed
        f"setsid bash -c 'trap \"\" TERM HUP; while true; do sleep {tag}; done'"
        " >/dev/null 2>&1 </dev/null &",
    ]
    calls = [("bash", {"command": c}) for c in detached]
    calls += [("shell", {"command": f"sleep {tag} &"}), ("bg_start", {"command": f"sleep {tag}"})]
    started = client.call_many("hostile", calls)
    assert all(s.ok for s in started), started
    ids = [s.call_id for s in started] + failing_calls(client, "hostile")
    wait_for(lambda: count_procs(client, "hostile", tag) >= 6, what="the processes to start")
    client.close("hostile")
    wait_for(lambda: recycled(port) == 1, what="the container to be recycled")

    client.open("next")
    first = client.call("next", "bash", {"command": "true"})
    assert container(first) == container(started[0])
    assert count_procs(client, "next", tag) == 0
    one_result_each(redis_url, ns, "hostile", ids)


def test_a_container_that_cannot_be_made_new_is_removed(
    recycling, client: Client, dc, redis_url: str, ns: str
):
    # disk_mb 0: the home is the image's own, in the container's layer, where the
    # engine's diff sees a change (a home tmpfs is emptied and refilled instead).
    port = recycling(default_disk_mb=0)
    poisons = {
        "rc": "echo 'export POISON=1' >> ~/.bashrc",  # an image file changed
        "home": "chmod 700 ~",  # an image directory's mode changed
        # a System V shared memory segment outlives its process
        "ipc": "python3 -c 'import ctypes; print(ctypes.CDLL(None).shmget(7, 4096, 0o1600))'",
    }
    used: dict[str, str] = {}
    for traj, command in poisons.items():
        client.open(traj)
        r = client.call(traj, "bash", {"command": command})
        assert r.ok, r
        used[traj] = container(r)
        ids = [r.call_id, *failing_calls(client, traj)]
        client.close(traj)
        one_result_each(redis_url, ns, traj, ids)
    wait_for(
        lambda: rejected(port, "filesystem") == 2 and rejected(port, "leftovers") == 1,
        what="all three to be rejected",
    )
    assert recycled(port) == 0
    client.open("after")
    after = client.call("after", "bash", {"command": "grep -c POISON ~/.bashrc; stat -c %a ~"})
    assert container(after) not in used.values()
    assert after.output == "0\n755\n"  # a fresh container: none of it
    wait_for(
        lambda: (
            not {c.id[:12] for c in dc.containers.list(all=True, sparse=True)} & set(used.values())
        ),
        what="the rejected containers to be removed",
    )


def test_an_open_during_a_reset_waits_for_it_or_starts_a_container(recycling, client: Client):
    # One slot: the next trajectory is claimed once the last one's slot is
    # released, while its container is being reset.
    port = recycling(slots=1, default_disk_mb=0)  # the home in the layer (see above)
    client.open("t1")
    r1 = client.call("t1", "bash", {"command": "echo one > f"})
    client.close("t1")
    client.open("t2")
    r2 = client.call("t2", "bash", {"command": "ls; echo 'export POISON=1' >> ~/.bashrc"})
    assert r1.ok and r2.ok and r2.output == ""
    assert container(r2) == container(r1)  # it waited for the reset
    client.close("t2")
    client.open("t3")  # t2's container is rejected: t3 gets a new one
    r3 = client.call("t3", "bash", {"command": "grep -c POISON ~/.bashrc"})
    assert r3.output == "0\n" and container(r3) != container(r2)
    assert recycled(port) == 1 and rejected(port, "filesystem") == 1


def test_packed_container_is_recycled_when_its_last_slot_ends(recycling, client: Client):
    port = recycling(slots_per_container=2)
    tag = unique_sleep()
    client.open("a")
    client.open("b")
    ra = client.call("a", "bash", {"command": f"setsid sleep {tag} >/dev/null 2>&1 </dev/null &"})
    rb = client.call("b", "write_file", {"path": "b.txt", "content": "b"})
    assert ra.ok and rb.ok and container(ra) == container(rb)

    def detached() -> bool:  # `sleep` exec'd: setsid has moved it out of a's process group
        ps = client.call("b", "bash", {"command": f"ps -eo args= | grep -c '^sleep {tag}$'"})
        return ps.output.strip() == "1"

    wait_for(detached, what="the leftover to leave a's process group")
    client.close("a")
    wait_for(lambda: (x := client.record("a")) and x.status.final, what="a to end")
    # b still runs in the container, with a's leftover: no reset while a slot is in use
    assert count_procs(client, "b", tag) == 1
    assert client.call("b", "read_file", {"path": "b.txt"}).output == "b"
    assert recycled(port) == 0
    client.close("b")
    wait_for(lambda: recycled(port) == 1, what="the container to be recycled")
    client.open("c")
    rc = client.call("c", "bash", {"command": "ls -A /workspace | wc -l"})
    assert container(rc) == container(ra)
    assert rc.output == "1\n"  # c's own workspace only
    assert count_procs(client, "c", tag) == 0


def test_stopping_the_worker_while_containers_are_reset_leaves_none(
    start_worker, client: Client, dc, ns: str
):
    handle = start_worker("docker", recycle_containers=True)
    for traj in ("a", "b"):
        client.open(traj)
        assert client.call(traj, "bash", {"command": "true"}).ok
        client.close(traj)
    wait_for(lambda: all((x := client.record(t)) and x.status.final for t in "ab"))
    handle.stop()  # their resets are running, or done: either way the worker removes them
    assert not handle.thread.is_alive()
    assert not dc.containers.list(all=True, filters={"label": f"toolq.ns={ns}"})


def test_a_recycled_container_is_never_adopted():
    container = {"Id": "c" * 64, "State": "running", "Labels": {"toolq.traj": "t"}}
    states = {"t": TrajState(status="running")}  # no slot recorded yet: would wait...
    assert awaits_adoption({**container, "Names": ["/toolq-ns-1"]}, states, 0.0)
    recycled_one = {**container, "Names": ["/toolq-ns-1-recycled"]}
    assert not awaits_adoption(recycled_one, states, 0.0)  # ...but it serves another now


# --------------------------------------------------------------------------
# the setting
# --------------------------------------------------------------------------


def test_with_the_setting_off_nothing_is_reused(recycling, client: Client, dc):
    assert WorkerSettings().recycle_containers is False  # the default
    port = recycling(recycle_containers=False)
    client.open("one")
    one = client.call("one", "bash", {"command": "true"})
    client.close("one")
    wait_for(
        lambda: (
            container(one) not in {c.id[:12] for c in dc.containers.list(all=True, sparse=True)}
        ),
        what="the container to be removed",
    )
    client.open("two")
    two = client.call("two", "bash", {"command": "true"})
    assert one.ok and two.ok and container(two) != container(one)
    assert recycled(port) == 0


def test_the_setting_is_a_flag_and_an_environment_variable():
    shown = subprocess.run(
        [*TOOLQ, "worker", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--recycle-containers / --no-recycle-containers" in shown
    assert "TOOLQ_RECYCLE_CONTAINERS" in shown


# --------------------------------------------------------------------------
# what the reset deletes
# --------------------------------------------------------------------------


def test_outcomes_are_counted_with_bounded_reasons():
    assert set(REJECT_REASONS) == set(RECYCLE_REJECT_REASONS)
    metrics = WorkerMetrics(WorkerSettings(), builtin_registry())
    metrics.container_recycled(0.5)
    metrics.container_recycle_rejected("filesystem")
    metrics.container_recycle_rejected("/tmp/made-up-by-a-trajectory")
    got = metrics.registry.get_sample_value
    assert got("toolq_containers_recycled_total") == 1
    assert got("toolq_container_recycle_seconds_sum") == 0.5
    rejected_total = "toolq_containers_recycle_rejected_total"
    assert got(rejected_total, {"reason": "filesystem"}) == 1
    assert got(rejected_total, {"reason": "other"}) == 1
    assert got(rejected_total, {"reason": "processes"}) == 0  # known reasons export 0


def test_only_the_top_most_added_paths_are_deleted():
    baseline = frozenset({("/opt", 0), ("/opt/toolq", 1)})
    now = baseline | {("/tmp", 0), ("/tmp/a", 1), ("/tmp/a/b", 1), ("/home/u/.cache", 1)}
    assert added_paths(baseline, now) == ["/home/u/.cache", "/tmp/a"]
    assert parents("/tmp/a/b") == ["/tmp", "/tmp/a"]
    many = baseline | {(f"/tmp/{i}", 1) for i in range(501)}
    with pytest.raises(Exception, match="501 paths added"):
        added_paths(baseline, many)
