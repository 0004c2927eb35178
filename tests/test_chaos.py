"""Chaos: steady load while a worker is SIGKILLed, Redis restarts and a worker is SIGTERMed.

At the end every submitted call has exactly one result (one result hash, one
result event) and every trajectory has ended in a final state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter

import redis

from tests.helpers import TOOLQ
from toolq.producer import Client, WaitTimeout
from toolq.schemas import FINAL_STATUSES, Keys
from toolq.worker.embedded import EmbeddedRedis

N_TRAJ = 6
SLOTS = 4  # per worker: three workers' worth of capacity for six trajectories


def start_worker(url: str, ns: str, worker_id: str) -> subprocess.Popen:
    env = dict(os.environ, TOOLQ_REDIS_URL=url, TOOLQ_NAMESPACE=ns, TOOLQ_WORKER_ID=worker_id)
    cmd = [
        *TOOLQ,
        "worker",
        "--backend",
        "local",
        "--slots",
        str(SLOTS),
        "--heartbeat-s",
        "0.3",
        "--dead-after-s",
        "2",
        "--shutdown-grace-s",
        "5",
        # every result event is kept, so that the test can count them all
        "--events-maxlen",
        "1000000",
        "--events-after-end",
        "1000000",
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Load:
    """Agent-like loops: call, wait, call again, until told to stop."""

    def __init__(self, url: str, ns: str) -> None:
        self.url, self.ns = url, ns
        self.stop = threading.Event()
        self.submitted: dict[str, list[str]] = {}
        self.outcomes: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.agent, args=(f"c{i}",)) for i in range(N_TRAJ)]

    def agent(self, traj: str) -> None:
        with Client(self.url, self.ns) as c:
            c.open(traj)
            ids = self.submitted.setdefault(traj, [])
            i = 0
            while not self.stop.is_set():
                call_id = f"{traj}-{i}"
                ids.append(call_id)
                try:
                    r = c.call(traj, "bash", {"command": f"echo {i}"}, call_id=call_id, wait_s=90)
                    outcome = "ok" if r.ok else (r.error_code or "failed")
                except WaitTimeout:
                    outcome = "no_result"
                with self.lock:
                    self.outcomes[outcome] += 1
                i += 1
            c.close(traj)


def test_chaos_nothing_lost(ns):
    with EmbeddedRedis(appendonly=True) as server:
        url = server.url
        workers = {w: start_worker(url, ns, w) for w in ("w1", "w2")}
        load = Load(url, ns)
        try:
            for t in load.threads:
                t.start()
            time.sleep(3)
            workers["w1"].send_signal(signal.SIGKILL)  # crash mid-load
            workers["w1"].wait()
            workers["w3"] = start_worker(url, ns, "w3")
            time.sleep(4)
            server.restart(down_s=1.0)  # Redis goes away and comes back from its AOF
            time.sleep(4)
            workers["w2"].send_signal(signal.SIGTERM)  # a deploy: clean hand-over
            assert workers["w2"].wait(60) == 0
            workers["w4"] = start_worker(url, ns, "w4")
            time.sleep(3)
        finally:
            load.stop.set()
            for t in load.threads:
                t.join(180)
        r = redis.Redis.from_url(url)
        keys = Keys(ns)
        deadline = time.monotonic() + 60
        statuses: dict[str, str] = {}
        while time.monotonic() < deadline:
            statuses = {t: (r.hget(keys.traj(t), "status") or b"").decode() for t in load.submitted}
            if all(s in FINAL_STATUSES for s in statuses.values()):
                break
            time.sleep(0.2)
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)

        total = sum(len(v) for v in load.submitted.values())
        missing, doubled = [], []
        for traj, ids in load.submitted.items():
            events = Counter(
                f[b"call_id"].decode()
                for _, f in r.xrange(keys.events(traj))
                if f.get(b"type") == b"result"
            )
            for call_id in ids:
                if not r.exists(keys.result(traj, call_id)):
                    missing.append(call_id)
                if events[call_id] != 1:
                    doubled.append((call_id, events[call_id]))
        print(
            f"\nchaos: {N_TRAJ} trajectories, {total} calls, outcomes {dict(load.outcomes)}, "
            f"final states {Counter(statuses.values())}"
        )
        assert load.outcomes["no_result"] == 0
        assert not missing, f"calls without a result: {missing}"
        assert not doubled, f"calls without exactly one result event: {doubled}"
        assert all(s in FINAL_STATUSES for s in statuses.values()), statuses
        assert total > N_TRAJ * 10  # the load really ran through the chaos
