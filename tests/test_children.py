"""Child trajectories through Redis: a spec that names a parent is refused
(`limit_exceeded`, with the reason) when the parent has ended, is at its
max_depth or has max_children open children; cancelling the parent cancels its
children. On one Redis and on a Redis Cluster, where parent and child live on
different hash slots."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers import TOOLQ, redis_client, unique_sleep, wait_for
from toolq.producer import AsyncClient, Client, LimitExceeded, children, ops
from toolq.schemas import Keys, TrajectorySpec, lua

pytestmark = pytest.mark.redis_kinds("single", "cluster")


def child(parent: str, **limits: int) -> dict[str, Any]:
    return {"parent": parent, "limits": limits}


def status_of(client: Client, traj: str) -> str | None:
    rec = client.record(traj)
    return rec.status.value if rec else None


def wait_status(client: Client, traj: str, status: str, timeout_s: float = 60) -> None:
    wait_for(lambda: status_of(client, traj) == status, timeout_s, f"{traj} {status}")


def refused(client: Client, traj: str, spec: dict[str, Any]) -> str:
    """Open ``traj``, which must be refused; returns the reason (nothing was created)."""
    with pytest.raises(LimitExceeded) as info:
        client.open(traj, spec)
    assert str(info.value) == f"limit_exceeded: {info.value.reason}"
    assert client.record(traj) is None, "a refused child has no record"
    return info.value.reason


def places(redis_url: str, ns: str, parent: str) -> set[str]:
    """The children holding a place in the parent's children hash."""
    return {k.decode() for k in redis_client(redis_url).hkeys(Keys(ns).children(parent))}


def sleeping(needle: str) -> bool:
    """A process of ours (the local backend runs calls on this host) runs ``sleep needle``."""
    ps = subprocess.run(["pgrep", "-f", f"sleep {needle}"], capture_output=True, text=True)
    return bool(ps.stdout.strip())


# ------------------------------------------------------------ refusals
def test_refused_when_the_parent_is_unknown_or_has_ended(client: Client):
    assert "does not exist" in refused(client, "c0", child("nobody"))
    client.open("p")
    client.cancel("p")  # pending: cancelled at once
    assert refused(client, "c1", child("p")) == "parent p has ended (cancelled)"


def test_refused_past_the_parents_max_depth_and_depth_inherits(client: Client):
    client.open("root", {"limits": {"max_depth": 2}})
    assert client.open("c1", child("root", max_depth=5)) == "new"
    assert client.open("c2", child("c1")) == "new"
    records = {t: client.record(t) for t in ("root", "c1", "c2")}
    assert [(r.depth, r.max_depth, r.parent) for r in records.values() if r] == [
        (0, 2, None),
        (1, 2, "root"),  # its own 5, capped by the parent's 2
        (2, 2, "c1"),
    ]
    reason = refused(client, "c3", child("c2"))
    assert reason == "depth 3 would pass the max_depth (2) of parent c2"
    # A child's own smaller max_depth binds its children.
    client.open("shallow", child("root", max_depth=1))
    assert "max_depth (1)" in refused(client, "deeper", child("shallow"))
    client.open("leaf-only", {"limits": {"max_depth": 0}})
    assert "max_depth (0)" in refused(client, "none", child("leaf-only"))


def test_max_children_counts_only_open_children(start_worker, client: Client, redis_url, ns):
    start_worker("local", slots=4)
    client.open("p", {"limits": {"max_children": 2}})
    client.open("a", child("p"))
    client.open("b", child("p"))
    assert refused(client, "c", child("p")) == "parent p has 2 open children (max_children 2)"
    client.close("a")
    wait_status(client, "a", "completed")
    assert client.open("c", child("p")) == "new", "a closed child frees its place"
    assert places(redis_url, ns, "p") == {"b", "c"}
    # The children hash expires with its trajectory.
    client.close("p")
    wait_status(client, "p", "completed")
    assert redis_client(redis_url).pttl(Keys(ns).children("p")) > 0


def test_an_open_retried_after_a_lost_reply_counts_once(client: Client, redis_url, ns):
    r, keys = redis_client(redis_url), Keys(ns)
    client.open("p", {"limits": {"max_children": 1}})
    # The reservation went through but its reply was lost: the opener tries again.
    reply = r.eval(
        lua.RESERVE_CHILD, 2, keys.traj("p"), keys.children("p"), "c1", int(time.time() * 1000)
    )
    assert reply[0] == b"ok"
    assert client.open("c1", child("p")) == "new"
    assert client.open("c1", child("p")) == "pending"  # and once more: a no-op
    assert places(redis_url, ns, "p") == {"c1"}
    assert "max_children 1" in refused(client, "c2", child("p"))


def test_a_crashed_openers_place_is_freed_after_a_minute(client: Client, redis_url, ns):
    r, keys = redis_client(redis_url), Keys(ns)
    client.open("p", {"limits": {"max_children": 1}})
    r.hset(keys.children("p"), "fresh", int(time.time() * 1000))  # an open under way
    assert "max_children 1" in refused(client, "c", child("p"))
    r.hset(keys.children("p"), "fresh", int(time.time() * 1000) - 61_000)  # its opener died
    assert client.open("c", child("p")) == "new"
    assert places(redis_url, ns, "p") == {"c"}


# ------------------------------------------------------------- listing
def test_runs_parent_lists_the_children(client: Client, redis_url, ns, tmp_path):
    client.open("p")
    client.open("other")
    for name in ("c1", "c2"):
        client.open(name, child("p"))
    client.open("g1", child("c1"))
    assert sorted(r.traj for r in client.runs(parent="p")) == ["c1", "c2"]
    assert [r.traj for r in client.runs(parent="c1")] == ["g1"]

    async def listed() -> list[str]:
        async with AsyncClient(redis_url, ns) as ac:
            return sorted(r.traj for r in await ac.runs(parent="p"))

    assert asyncio.run(listed()) == ["c1", "c2"]

    env = {"TOOLQ_REDIS_URL": redis_url, "TOOLQ_NAMESPACE": ns, "XDG_RUNTIME_DIR": str(tmp_path)}
    out = toolq(env, "runs", "--parent", "p", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted((row["traj"], row["parent"], row["depth"]) for row in rows) == [
        ("c1", "p", 1),
        ("c2", "p", 1),
    ]
    # A refused open is exit 1 with one line naming the limit.
    client.cancel("p")
    out = toolq(env, "open", "c3", "--spec", json.dumps(child("p")))
    assert out.returncode == 1, (out.returncode, out.stderr)
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: limit_exceeded: parent p has ended (cancelled)"], out.stderr


def toolq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TOOLQ, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )


# ----------------------------------------------------- cancel cascades
def test_a_parent_cancelled_while_its_children_run(start_worker, client: Client):
    start_worker("local", slots=6)
    client.open("p")
    tree = {"c1": "p", "c2": "p", "g1": "c1"}  # child -> parent; g1 is a grandchild
    naps = {}
    for traj, parent in tree.items():
        client.open(traj, child(parent))
        naps[traj] = unique_sleep()
    calls = {t: client.submit(t, "bash", {"command": f"sleep {n}"}) for t, n in naps.items()}
    queued = client.submit("c2", "bash", {"command": "echo never"})
    for needle in naps.values():
        wait_for(lambda needle=needle: sleeping(needle), 60, f"sleep {needle} running")

    assert client.cancel("p") in ("requested", "cancelled")
    for traj, call_id in calls.items():
        assert client.result(traj, call_id, timeout_s=60).error_code == "cancelled", traj
    assert client.result("c2", queued, timeout_s=60).error_code == "cancelled"
    for traj in ("p", *tree):
        wait_status(client, traj, "cancelled")
    assert not any(sleeping(n) for n in naps.values()), "a cancelled child's sleep still runs"
    assert "has ended (cancelled)" in refused(client, "late", child("p"))


def test_a_parent_cancelled_while_children_are_opening(redis_url, ns, client: Client):
    """However opens and the cascading cancel interleave, no child stays open."""
    client.open("p", {"limits": {"max_children": 100}})
    names = [f"c{i}" for i in range(16)]
    opened = run_concurrently(
        redis_url, ns, names, lambda c, n: c.open(n, child("p")), also=lambda: client.cancel("p")
    )
    assert len(opened) == len(names)
    left_open = [n for n in names if status_of(client, n) not in (None, "cancelled")]
    assert not left_open, f"children left open after their parent's cancel: {left_open}"


@pytest.mark.parametrize("parent_state", ["pending", "running"])
@pytest.mark.parametrize("step", ["open", "recheck"])
def test_a_cancel_between_an_opens_steps_leaves_no_child_open(
    start_worker, client: Client, step: str, parent_state: str
):
    """The cascade and the open interleaved at each step where it matters: the
    parent's cancel lands after the child's place is reserved and before its record
    exists (the cascade cannot see it), or after the record (the cascade cancels it).
    A running parent's cancel is only requested when the open looks again."""
    client.open("p")
    if parent_state == "running":
        start_worker("local")
        wait_status(client, "p", "running")
    spec = TrajectorySpec.model_validate(child("p"))
    before = {
        "open": lambda cmd: cmd.script == lua.OPEN,
        "recheck": lambda cmd: cmd.name == "hmget",
    }
    with pytest.raises(LimitExceeded, match="while c was opening"):
        drive_interleaved(
            client,
            children.open_traj(client.keys, "c", spec, False),
            before[step],
            lambda: client.cancel("p"),
        )
    wait_status(client, "c", "cancelled")


def drive_interleaved(
    client: Client, op: ops.Op[Any], at: Callable[[ops.Cmd], bool], act: Callable[[], object]
) -> Any:
    """Drive a client operation, running ``act()`` once, before the first round trip
    that has a command matching ``at``."""
    request, acted = next(op), False
    try:
        while True:
            if not acted and any(at(cmd) for cmd in request):
                act()
                acted = True
            request = op.send(client._execute(request))
    except StopIteration as stop:
        assert acted
        return stop.value


def test_concurrent_opens_never_exceed_max_children(redis_url, ns, client: Client):
    client.open("p", {"limits": {"max_children": 3}})
    names = [f"c{i}" for i in range(12)]
    opened = run_concurrently(redis_url, ns, names, lambda c, n: c.open(n, child("p")))
    assert sum(v == "new" for v in opened.values()) == 3, opened
    assert sum(v == "refused" for v in opened.values()) == 9, opened
    assert places(redis_url, ns, "p") == {n for n, v in opened.items() if v == "new"}
    assert sum(client.record(n) is not None for n in names) == 3


def run_concurrently(
    redis_url: str,
    ns: str,
    names: list[str],
    act: Callable[[Client, str], str],
    also: Callable[[], object] | None = None,
) -> dict[str, str]:
    """``act(client, name)`` for every name at once, each thread with its own client
    (and ``also()`` in this thread at the same moment); a refusal is ``refused``."""
    start = threading.Barrier(len(names) + 1)
    out: dict[str, str] = {}

    def one(name: str) -> None:
        with Client(redis_url, ns) as c:
            start.wait()
            try:
                out[name] = act(c, name)
            except LimitExceeded:
                out[name] = "refused"

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    start.wait()
    if also is not None:
        also()
    for t in threads:
        t.join(60)
    return out
