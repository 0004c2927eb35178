"""Redis Cluster: one master frozen (SIGSTOP) or killed (kill -9), with a node
timeout long enough that nothing fails over. Only the trajectories whose slots
live on that master may stall: the others keep answering calls, their worker's
lease holds (issue 32, item 2). After SIGCONT (or a restart from its AOF) every
call has run once and has one result."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from redis.crc import key_slot

from tests.helpers import wait_for, worker_process
from tests.test_cluster import KEEP_EVENTS, N_TRAJ, Load, check_exactly_once
from toolq.schemas import Keys
from toolq.worker.embedded_cluster import EmbeddedCluster

CALLS_WHILE_FROZEN = 10  # each healthy trajectory answers this many while the master is stopped


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_a_master_down_stalls_only_its_own_trajectories(how: str, ns: str, tmp_path: Path):
    cluster = EmbeddedCluster(masters=3, replicas=0, node_timeout_ms=120_000, appendonly=True)
    with cluster:
        keys = Keys(ns)
        # Not the heartbeats' master: this is about calls, not leases.
        beats = cluster.owner_of(key_slot(keys.workers.encode()))
        victim = (beats + 1) % cluster.masters
        trajs = [f"c{i}" for i in range(N_TRAJ)]
        on_victim = {
            t for t in trajs if cluster.owner_of(key_slot(keys.calls(t).encode())) == victim
        }
        healthy = [t for t in trajs if t not in on_victim]
        assert on_victim and healthy  # both kinds in play
        extra = ("--slots", str(N_TRAJ), *KEEP_EVENTS)
        workers = [
            worker_process(cluster.url, ns, f"w{i}", *extra, log_dir=str(tmp_path)) for i in (1, 2)
        ]
        load = Load(cluster.url, ns, tmp_path)
        down = cluster.nodes[victim].proc
        try:
            for t in load.threads:
                t.start()
            wait_for(lambda: load.all_moved_since(dict.fromkeys(trajs, 0), 3), what="load")
            if how == "stopped":
                os.kill(down.pid, signal.SIGSTOP)
            else:
                cluster.kill(victim)
            down_at = time.monotonic()
            try:
                before = load.each_done()
                wait_for(
                    lambda: all(
                        load.each_done()[t] >= before[t] + CALLS_WHILE_FROZEN for t in healthy
                    ),
                    timeout_s=60,
                    what="calls of the trajectories on the healthy masters",
                )
                print(f"healthy trajectories moved on in {time.monotonic() - down_at:.1f} s")
            finally:
                if how == "stopped":
                    os.kill(down.pid, signal.SIGCONT)
                else:  # from its AOF: kill -9 loses no acknowledged write
                    cluster.killed.discard(victim)
                    cluster.restart(victim)
            before = load.each_done()
            wait_for(lambda: load.all_moved_since(before, 3), what="load after SIGCONT")
        finally:
            load.stop.set()
            for t in load.threads:
                t.join(180)
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                w.wait(60)
        check_exactly_once(load, cluster.url, ns)
        assert set(load.outcomes) == {"ok"}, load.outcomes  # no worker_lost: no lease lapsed
        logs = "".join((tmp_path / f"w{i}.log").read_text() for i in (1, 2))
        assert "lease lapsed" not in logs and "declared dead" not in logs
