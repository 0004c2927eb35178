"""Redis Cluster with replicas: a master killed with kill -9 under load, its
replica promoted after the node timeout. Every call runs once and gets one
result; no worker takes another's trajectories over because neither could
reach the failed master (the heartbeats live on one master: here, that one)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
from redis.crc import key_slot

from tests.helpers import wait_for, worker_process
from tests.test_cluster import KEEP_EVENTS, N_TRAJ, Load, check_exactly_once
from toolq.schemas import Keys
from toolq.worker.embedded_cluster import EmbeddedCluster


class Progress:
    """Samples each trajectory's answered calls, to see who stalled and for how long."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), self.load.each_done()))
            time.sleep(0.05)

    def longest_stall_s(self, traj: str, since: float) -> float:
        """The longest time ``traj`` answered no call, from ``since`` on."""
        longest, last_t, last_n = 0.0, since, None
        for t, done in self.samples:
            if t < since:
                continue
            if last_n is None or done[traj] != last_n:
                longest = max(longest, t - last_t)
                last_t, last_n = t, done[traj]
        return longest


# 15 s is Redis's default cluster-node-timeout: a failover that outlasts the
# clients' retries and the workers' dead_after unless both ride it out.
@pytest.mark.parametrize(
    ("victim_of", "node_timeout_ms"),
    [("heartbeats", 2000), ("calls", 2000), ("heartbeats", 15_000)],
)
def test_a_master_killed_under_load_fails_over_to_its_replica(
    victim_of: str, node_timeout_ms: int, ns: str, tmp_path: Path
):
    with EmbeddedCluster(masters=3, replicas=1, node_timeout_ms=node_timeout_ms) as cluster:
        url = cluster.url
        extra = ("--slots", str(N_TRAJ), *KEEP_EVENTS)
        workers = [worker_process(url, ns, f"w{i}", *extra, log_dir=str(tmp_path)) for i in (1, 2)]
        load = Load(url, ns, tmp_path)
        # The master of the heartbeats (while it fails over, no worker can beat), or
        # another one, which holds calls streams only.
        beats = cluster.owner_of(key_slot(Keys(ns).workers.encode()))
        victim = beats if victim_of == "heartbeats" else (beats + 1) % cluster.masters
        progress = Progress(load)
        try:
            for t in load.threads:
                t.start()
            wait_for(lambda: load.done() > 40, what="load")
            killed_at = time.monotonic()
            cluster.kill(victim)
            promoted = cluster.wait_promoted(victim)
            before = load.each_done()
            wait_for(lambda: load.all_moved_since(before, 5), what="load after the failover")
        finally:
            load.stop.set()
            progress.stop.set()
            for t in load.threads:
                t.join(180)
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                w.wait(60)
        assert promoted != victim and promoted >= cluster.masters  # a replica took over
        # A new client starts from a live node: the killed one may be the URL's own.
        live_url = f"redis+cluster://127.0.0.1:{cluster.nodes[promoted].port}/0"
        check_exactly_once(load, live_url, ns)
        assert set(load.outcomes) == {"ok"}, load.outcomes  # no worker_lost: nothing taken over
        logs = "".join((tmp_path / f"w{i}.log").read_text() for i in (1, 2))
        assert "declared dead" not in logs
        stalls = {t: round(progress.longest_stall_s(t, killed_at), 1) for t in load.submitted}
        print(f"longest stall per trajectory after the kill (s): {stalls}")
