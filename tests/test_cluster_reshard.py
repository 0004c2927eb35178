"""Redis Cluster resharding: a trajectory's slot moves to another master while
its calls are submitted, run, cancelled and ended.

While a slot migrates, Redis serves a script on the old node only if every key
it declares is there, and redirects it (``ASK``, then ``TRYAGAIN`` until the
move is done) otherwise; a key the script touches without declaring it fails
the script halfway ("non local key"). So every script declares every key it
touches, and clients and workers send a redirected script again.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
from redis.crc import key_slot

from tests.helpers import redis_client, wait_for, worker_process
from tests.test_cluster import KEEP_EVENTS, N_TRAJ, Load, check_exactly_once
from toolq.producer import Client
from toolq.schemas import Keys
from toolq.worker.embedded_cluster import EmbeddedCluster


def slot_of(ns: str, traj: str) -> int:
    return int(key_slot(Keys(ns).traj(traj).encode()))


def later(seconds: float, fn, *args) -> threading.Thread:  # type: ignore[no-untyped-def]
    def run() -> None:
        time.sleep(seconds)
        fn(*args)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def move_later(cluster: EmbeddedCluster, ns: str, traj: str) -> threading.Thread:
    """Start moving ``traj``'s slot to the next master: every key stays on the
    old node for a second, then they move."""
    slot = slot_of(ns, traj)
    to = (cluster.owner_of(slot) + 1) % len(cluster.nodes)
    source = cluster.begin_move(slot, to)
    return later(1.0, cluster.finish_move, slot, source, to)


@pytest.mark.redis_kinds("cluster")
def test_submits_and_a_cancel_while_the_slot_migrates(
    redis_kind, redis_cluster: EmbeddedCluster, start_worker, redis_url: str, ns: str
):
    cluster = redis_cluster
    start_worker("local")
    with Client(redis_url, ns) as c, Client(redis_url, f"{ns}-idle") as idle:
        c.open("r")
        assert c.call("r", "bash", {"command": "true"}).ok  # its events stream exists
        c.open("e")
        c.close("e")
        wait_for(lambda: c.record("e").status.value == "completed", what="e ended")
        for traj, call_id in (("r", "during"), ("e", "late")):
            mover = move_later(cluster, ns, traj)
            try:
                c.submit(traj, "bash", {"command": f"echo {call_id}"}, call_id=call_id)
            finally:
                mover.join()
        assert c.result("r", "during", timeout_s=30).output == "during\n"
        late = c.result("e", "late", timeout_s=10)
        assert late.error_code == "trajectory_ended", late  # written on the new node
        # No worker serves this namespace: the cancel script answers the calls itself.
        idle.open("m")
        for call_id in ("q1", "q2"):
            idle.submit("m", "bash", {"command": "true"}, call_id=call_id)
        mover = move_later(cluster, f"{ns}-idle", "m")
        try:
            assert idle.cancel("m") == "cancelled"
        finally:
            mover.join()
        for call_id in ("q1", "q2"):
            assert idle.result("m", call_id, timeout_s=10).error_code == "cancelled"


def test_a_reshard_under_load_runs_every_call_once(ns: str, tmp_path: Path):
    with EmbeddedCluster(masters=3) as cluster:
        url = cluster.url
        extra = ("--slots", str(N_TRAJ), *KEEP_EVENTS)
        workers = [worker_process(url, ns, f"w{i}", *extra, log_dir=str(tmp_path)) for i in (1, 2)]
        load = Load(url, ns, tmp_path)
        slots = sorted({slot_of(ns, f"c{i}") for i in range(N_TRAJ)})
        moved: list[int] = []

        def reshard() -> None:  # every trajectory's slot moves to the next master
            for slot in slots:
                to = (cluster.owner_of(slot) + 1) % len(cluster.nodes)
                moved.append(cluster.move_slot(slot, to, 10, pause_s=0.005, hold_s=0.3))

        r = redis_client(url)
        try:
            for t in load.threads:
                t.start()
            wait_for(lambda: load.done() > 40, what="load")
            before = load.each_done()
            reshard()  # while calls are submitted and answered
            wait_for(lambda: load.all_moved_since(before, 3), what="load after the reshard")
            mover = threading.Thread(target=reshard)
            mover.start()
            load.stop.set()  # the trajectories close (and end) while their slots move
            for t in load.threads:
                t.join(180)
            mover.join(180)

            def statuses() -> set[str]:
                found = (r.hget(Keys(ns).traj(t), "status") for t in load.submitted)
                return {(status or b"").decode() for status in found}

            wait_for(lambda: statuses() == {"completed"}, what="every trajectory ended")
        finally:
            load.stop.set()
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                w.wait(60)
        assert len(moved) == 2 * len(slots) and all(n > 0 for n in moved)
        check_exactly_once(load, url, ns)
        assert set(load.outcomes) == {"ok"}, load.outcomes
        logs = "".join((tmp_path / f"w{i}.log").read_text() for i in (1, 2))
        assert "non local key" not in logs
