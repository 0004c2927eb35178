"""Ownership is fenced: a worker stalled past dead_after (SIGSTOP) and resumed
(SIGCONT) loses nothing, runs nothing twice and ends nothing it no longer owns.

Three real `toolq worker` processes serve two dozen trajectories under load:
sixteen agent loops (call, wait, call) and eight that submit bursts of calls.
Each call appends its id to a log outside the workspace, so executions are
counted. The busiest worker is stopped until its trajectories are taken over,
then continued; twice more with whichever worker is busiest then.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path

import redis

from tests.helpers import wait_for, worker_process
from toolq.producer import Client
from toolq.schemas import FINAL_STATUSES, Keys

LOOPS, BURSTS, BURST = 16, 8, 10
WORKERS, SLOTS = 3, 10
STALLS = 3
# Every result event is kept, so that the test can count them all.
KEEP_EVENTS = ("--events-maxlen", "1000000", "--events-after-end", "1000000")


class Load:
    """Agents that call until told to stop; every call id they submit is kept."""

    def __init__(self, url: str, ns: str, logs: Path) -> None:
        self.url, self.ns, self.logs = url, ns, logs
        self.stop = threading.Event()
        self.submitted: dict[str, list[str]] = {}
        self.outcomes: dict[str, str] = {}
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        names = [(f"loop{i}", False) for i in range(LOOPS)] + [
            (f"burst{i}", True) for i in range(BURSTS)
        ]
        self.threads = [threading.Thread(target=self.agent, args=n) for n in names]

    def command(self, traj: str, call_id: str) -> dict[str, str]:
        return {"command": f"echo {call_id} >> {self.logs / traj}.log; sleep 0.02"}

    def agent(self, traj: str, burst: bool) -> None:
        try:
            with Client(self.url, self.ns) as c:
                c.open(traj)
                ids = self.submitted.setdefault(traj, [])
                i = 0
                while not self.stop.is_set():
                    batch = [f"{traj}-{i + k}" for k in range(BURST if burst else 1)]
                    i += len(batch)
                    ids += batch
                    for cid in batch:
                        c.submit(traj, "bash", self.command(traj, cid), call_id=cid)
                    for cid in batch:
                        r = c.result(traj, cid, timeout_s=90)
                        with self.lock:
                            self.outcomes[cid] = "ok" if r.ok else str(r.error_code)
                c.close(traj)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.errors.append(exc)


def owners(r: redis.Redis, keys: Keys, trajs: list[str]) -> dict[str, str]:
    return {t: (r.hget(keys.traj(t), "owner") or b"").decode() for t in trajs}


def results_so_far(load: Load) -> int:
    with load.lock:
        return len(load.outcomes)


def test_a_stalled_worker_loses_nothing_and_runs_nothing_twice(tmp_path: Path, ns: str):
    from toolq.worker.embedded import EmbeddedRedis

    logs = tmp_path / "exec"
    logs.mkdir()
    with EmbeddedRedis() as server:
        url, keys = server.url, Keys(ns)
        r = redis.Redis.from_url(url)
        workers = {
            f"w{i}": worker_process(
                url, ns, f"w{i}", "--slots", str(SLOTS), *KEEP_EVENTS, log_dir=str(tmp_path)
            )
            for i in range(WORKERS)
        }
        load = Load(url, ns, logs)
        stalled: list[str] = []
        try:
            for t in load.threads:
                t.start()
            wait_for(lambda: len(load.submitted) == LOOPS + BURSTS, what="every agent to open")
            trajs = sorted(load.submitted)
            for _ in range(STALLS):
                wait_for(
                    lambda: all(owners(r, keys, trajs).values()), what="all trajectories owned"
                )
                held = Counter(owners(r, keys, trajs).values())
                victim = held.most_common(1)[0][0]
                before = results_so_far(load)
                workers[victim].send_signal(signal.SIGSTOP)
                stalled.append(victim)
                wait_for(
                    lambda victim=victim: victim not in owners(r, keys, trajs).values(),
                    what=f"{victim}'s trajectories to be taken over",
                )
                workers[victim].send_signal(signal.SIGCONT)
                wait_for(lambda n=before: results_so_far(load) > n + 50, what="load to go on")
        finally:
            for proc in workers.values():
                proc.send_signal(signal.SIGCONT)
            load.stop.set()
            for t in load.threads:
                t.join(180)
        assert not load.errors, load.errors
        wait_for(
            lambda: all(
                (r.hget(keys.traj(t), "status") or b"").decode() in FINAL_STATUSES
                for t in load.submitted
            ),
            what="every trajectory to end",
        )
        for proc in workers.values():
            proc.send_signal(signal.SIGTERM)
        for proc in workers.values():
            try:
                assert proc.wait(60) == 0
            except subprocess.TimeoutExpired:
                proc.kill()
                raise

        calls = [cid for ids in load.submitted.values() for cid in ids]
        outcomes = Counter(load.outcomes[c] for c in calls)
        print(f"\nfencing: {len(calls)} calls, stalled {stalled}, outcomes {dict(outcomes)}")
        assert len(calls) > 300  # the load really ran through the stalls
        assert set(load.outcomes) == set(calls)
        assert set(outcomes) <= {"ok", "worker_lost"}, outcomes
        # Only the call running when its worker stopped may be lost: one per trajectory per stall.
        assert outcomes["worker_lost"] <= STALLS * (LOOPS + BURSTS)

        for traj, ids in load.submitted.items():
            events = Counter(
                f[b"call_id"].decode()
                for _, f in r.xrange(keys.events(traj))
                if f.get(b"type") == b"result"
            )
            assert all(events[c] == 1 for c in ids), [(c, events[c]) for c in ids if events[c] != 1]
            assert all(r.exists(keys.result(traj, c)) for c in ids)
            ran = (logs / f"{traj}.log").read_text().split()
            assert len(ran) == len(set(ran)), (
                f"{traj}: calls run twice: {Counter(ran) - Counter(set(ran))}"
            )
            order = {c: i for i, c in enumerate(ids)}
            assert [order[c] for c in ran] == sorted(order[c] for c in ran), f"{traj} out of order"
            assert {c for c in ids if load.outcomes[c] == "ok"} <= set(ran)
            status = (r.hget(keys.traj(traj), "status") or b"").decode()
            assert status == "completed", (
                f"{traj} ended {status}: {r.hget(keys.traj(traj), 'reason')}"
            )


def test_a_worker_is_declared_dead_inside_redis_and_learns_it(redis_url: str, ns: str):
    """The judgement is atomic (a worker that beat since a stale read stays alive),
    and the worker declared dead is told so by its next heartbeat."""
    from toolq.schemas import lua

    r, workers = redis.Redis.from_url(redis_url), Keys(ns).workers
    seconds, micros = r.time()
    now_ms = seconds * 1000 + micros // 1000

    def beat(worker: str, at_ms: int, force: str = "0") -> int:
        return int(r.eval(lua.BEAT, 1, workers, worker, at_ms, force))

    def declare(worker: str) -> int:
        return int(r.eval(lua.DECLARE_DEAD, 1, workers, worker, 15_000))

    assert beat("alive", now_ms) == 1 and beat("stalled", now_ms - 60_000) == 1
    assert declare("alive") == 0  # its heartbeat is fresh: whatever a stale read said
    assert declare("nobody") == 0
    declared_ms = declare("stalled")
    assert declared_ms >= now_ms
    assert r.zscore(workers, "stalled") == -declared_ms
    assert declare("stalled") == declared_ms  # a second judge gets the same time
    assert beat("stalled", now_ms + 1) == 0  # it comes back: told, not beaten
    assert r.zscore(workers, "stalled") == -declared_ms
    assert int(r.eval(lua.FORGET_DEAD, 1, workers, "alive")) == 0
    assert beat("stalled", now_ms + 2, force="1") == 1  # it starts over
    assert int(r.eval(lua.FORGET_DEAD, 1, workers, "stalled")) == 0  # back: not forgotten
    assert r.zscore(workers, "stalled") == now_ms + 2


def test_a_worker_declared_dead_while_stopped_hands_back_and_serves_again(tmp_path: Path, ns: str):
    """Declared dead while stopped, and no takeover yet (the judge stopped there):
    once continued, the worker learns it from its heartbeat, hands its
    trajectory back under a new ownership epoch, and the trajectory goes on."""
    from toolq.schemas import lua
    from toolq.worker.embedded import EmbeddedRedis

    with EmbeddedRedis() as server:
        url, keys = server.url, Keys(ns)
        r = redis.Redis.from_url(url)
        worker = worker_process(url, ns, "w", log_dir=str(tmp_path))
        try:
            with Client(url, ns) as c:
                c.open("t")
                assert c.call("t", "bash", {"command": "echo 1"}, wait_s=60).output == "1\n"
                epoch = int(r.hget(keys.traj("t"), "epoch") or 0)
                worker.send_signal(signal.SIGSTOP)
                try:  # the worker's own dead_after_s is 2 s
                    wait_for(
                        lambda: int(r.eval(lua.DECLARE_DEAD, 1, keys.workers, "w", 2000)) > 0,
                        what="the stopped worker's heartbeat to be older than dead_after_s",
                    )
                finally:
                    worker.send_signal(signal.SIGCONT)
                wait_for(
                    lambda: (
                        int(r.hget(keys.traj("t"), "epoch") or 0) > epoch
                        and r.hget(keys.traj("t"), "owner") == b"w"
                    ),
                    what="the trajectory handed back and claimed again",
                )
                assert (r.zscore(keys.workers, "w") or -1) > 0  # it beats again
                again = c.call("t", "bash", {"command": "echo 2"}, wait_s=60)
                assert again.output == "2\n", again
                c.close("t")
                wait_for(lambda: r.hget(keys.traj("t"), "status") == b"completed", what="the close")
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(60) == 0
    assert "declared dead" in (tmp_path / "w.log").read_text()
