"""Redis Cluster: a real 3-master cluster from the same redis-server binary.

The core and lifecycle tests run on it too (``redis_kinds``); these are the
failures particular to a cluster: a worker killed under load, a master
restarted, and the operator's views (status, metrics) on one.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from redis.crc import key_slot

from tests.helpers import TOOLQ, redis_client, wait_for, worker_process
from toolq.producer import AsyncClient, Client
from toolq.producer.cli import main
from toolq.producer.config import ClusterNodeError
from toolq.schemas import FINAL_STATUSES, Keys
from toolq.worker.embedded_cluster import EmbeddedCluster

N_TRAJ = 8
# Every result event is kept, so that the tests can count them all.
KEEP_EVENTS = ("--events-maxlen", "1000000", "--events-after-end", "1000000")


class Load:
    """Agent loops with call ids, counting outcomes; every call appends to a log."""

    def __init__(self, url: str, ns: str, logs: Path) -> None:
        self.url, self.ns, self.logs = url, ns, logs
        self.stop = threading.Event()
        self.submitted: dict[str, list[str]] = {}
        self.outcomes: Counter[str] = Counter()
        self.per_traj: Counter[str] = Counter()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self.agent, args=(f"c{i}",)) for i in range(N_TRAJ)]

    def agent(self, traj: str) -> None:
        try:
            with Client(self.url, self.ns) as c:
                c.open(traj)
                ids = self.submitted.setdefault(traj, [])
                i = 0
                while not self.stop.is_set():
                    call_id = f"{traj}-{i}"
                    ids.append(call_id)
                    cmd = f"echo {call_id} >> {self.logs / traj}.log"
                    r = c.call(traj, "bash", {"command": cmd}, call_id=call_id, wait_s=120)
                    self.outcomes["ok" if r.ok else str(r.error_code)] += 1
                    self.per_traj[traj] += 1
                    i += 1
                c.close(traj)
        except BaseException as exc:
            self.errors.append(exc)

    def done(self) -> int:
        return sum(self.outcomes.values())

    def each_done(self) -> dict[str, int]:
        return {f"c{i}": self.per_traj[f"c{i}"] for i in range(N_TRAJ)}

    def all_moved_since(self, before: dict[str, int], calls: int) -> bool:
        return all(n >= before[t] + calls for t, n in self.each_done().items())


def check_exactly_once(load: Load, url: str, ns: str) -> None:
    r, keys = redis_client(url), Keys(ns)
    assert not load.errors, load.errors[:3]
    for traj, ids in load.submitted.items():
        events = Counter(
            f[b"call_id"].decode()
            for _, f in r.xrange(keys.events(traj))
            if f.get(b"type") == b"result"
        )
        assert all(events[c] == 1 for c in ids), [(c, events[c]) for c in ids if events[c] != 1]
        log = load.logs / f"{traj}.log"
        ran = log.read_text().split() if log.exists() else []
        assert len(ran) == len(set(ran)), f"{traj}: a call ran twice"
    assert set(load.outcomes) <= {"ok", "worker_lost"}, load.outcomes


def test_trajectories_spread_over_every_master(redis_cluster: EmbeddedCluster, ns: str):
    slots = {key_slot(Keys(ns).calls(f"c{i}").encode()) for i in range(N_TRAJ)}
    per_master = 16384 // len(redis_cluster.nodes)
    assert len({s // per_master for s in slots}) == len(redis_cluster.nodes)  # all three in play


def test_a_worker_killed_under_load_on_a_cluster(
    redis_cluster: EmbeddedCluster, ns: str, tmp_path: Path
):
    url = redis_cluster.url
    extra = ("--slots", str(N_TRAJ), *KEEP_EVENTS)
    dying = worker_process(url, ns, "dying", *extra, log_dir=str(tmp_path))
    survivor = worker_process(url, ns, "survivor", *extra, log_dir=str(tmp_path))
    load = Load(url, ns, tmp_path)
    try:
        for t in load.threads:
            t.start()
        wait_for(lambda: load.done() > 40, what="load")
        dying.send_signal(signal.SIGKILL)
        dying.wait()
        before = load.each_done()
        # Every trajectory, the dead worker's included, moves on under the survivor.
        wait_for(lambda: load.all_moved_since(before, 5), what="load after the kill")
    finally:
        load.stop.set()
        for t in load.threads:
            t.join(180)
        survivor.send_signal(signal.SIGTERM)
        survivor.wait(60)
    check_exactly_once(load, url, ns)


def test_a_master_restarted_under_load_loses_nothing(ns: str, tmp_path: Path):
    with EmbeddedCluster(masters=3, appendonly=True) as cluster:
        url = cluster.url
        extra = ("--slots", str(N_TRAJ), *KEEP_EVENTS)
        worker = worker_process(url, ns, "w", *extra, log_dir=str(tmp_path))
        load = Load(url, ns, tmp_path)
        try:
            for t in load.threads:
                t.start()
            for master in (1, 2):
                before = load.done()
                wait_for(lambda n=before: load.done() > n + 30, what="load")
                cluster.restart(master, down_s=0.5)
            after = load.each_done()
            wait_for(lambda: load.all_moved_since(after, 5), what="load after the restarts")
        finally:
            load.stop.set()
            for t in load.threads:
                t.join(180)
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
        check_exactly_once(load, url, ns)
        r = redis_client(url)
        statuses = {(r.hget(Keys(ns).traj(t), "status") or b"").decode() for t in load.submitted}
        assert statuses <= FINAL_STATUSES


@pytest.mark.redis_kinds("cluster")
def test_async_waits_across_slots_and_the_operators_views(
    redis_kind, start_worker, redis_url: str, ns: str
):
    handle = start_worker("local", slots=12, metrics_port=0)

    async def main_() -> list[str]:
        async with AsyncClient(redis_url, ns) as c:
            trajs = [f"a{i}" for i in range(12)]
            for t in trajs:
                await c.open(t)
            results = await asyncio.gather(
                *(c.call(t, "bash", {"command": f"echo {t}"}) for t in trajs for _ in range(3))
            )
            for t in trajs:
                await c.close(t)
            return [r.output for r in results]

    outs = asyncio.run(main_())
    assert outs == [f"a{i}\n" for i in range(12) for _ in range(3)]
    status = CliRunner().invoke(
        main, ["--redis-url", redis_url, "--namespace", ns, "status", "--json"]
    )
    assert status.exit_code == 0, status.output
    assert '"alive": true' in status.output
    from tests.test_metrics import scrape, value

    assert handle.worker is not None
    samples = scrape(handle.worker.observer.port)  # type: ignore[attr-defined]
    assert value(samples, "toolq_redis_round_trips_total") > 0
    assert value(samples, "toolq_calls_total", tool="bash", outcome="ok") == 36


def test_external_tools_on_a_cluster_use_a_plain_redis_for_rq(
    redis_cluster: EmbeddedCluster, redis_server, ns: str, tmp_path: Path
):
    from tests.conftest import WorkerThread
    from tests.test_external_failures import RqHost
    from toolq.worker.external_runner import ExternalToolsError
    from toolq.worker.settings import WorkerSettings

    tools = ("tests.fixtures_tools",)
    fields = {"namespace": ns, "backend": "local", "tools_modules": tools, "block_ms": 200}
    with pytest.raises(ExternalToolsError, match="does not support Redis Cluster"):
        WorkerThread(WorkerSettings(redis_url=redis_cluster.url, **fields))
    refused = subprocess.run(
        [*TOOLQ, "--redis-url", redis_cluster.url, "rq-worker", "--tools", tools[0]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "does not support Redis Cluster" in refused.stderr
    rq = RqHost(redis_server.url, tmp_path / "rq.log")
    worker = WorkerThread(
        WorkerSettings(redis_url=redis_cluster.url, rq_redis_url=redis_server.url, **fields)
    )
    try:
        with Client(redis_cluster.url, ns) as c:
            c.open("t")
            assert c.call("t", "add", {"a": 2, "b": 3}).data == {"sum": 5}
            assert c.call("t", "bash", {"command": "echo sandbox"}).output == "sandbox\n"
    finally:
        worker.stop()
        rq.stop()


def test_a_plain_url_of_a_cluster_node_says_to_use_redis_cluster(
    redis_cluster: EmbeddedCluster, ns: str
):
    node = f"127.0.0.1:{redis_cluster.nodes[0].port}"
    plain = f"redis://{node}/0"
    hint = r"redis\+cluster://127\.0\.0\.1:\d+"
    # most keys live on the other masters: MOVED
    with Client(plain, ns) as c, pytest.raises(ClusterNodeError, match=hint):
        for i in range(20):
            c.open(f"p{i}")
    opened = [
        CliRunner().invoke(main, ["--redis-url", plain, "--namespace", ns, "open", f"p{i}"])
        for i in range(20)
    ]
    refused = [r for r in opened if r.exit_code != 0]
    assert refused and all("node of a Redis Cluster" in r.output for r in refused)
    assert all(r.exit_code == 2 for r in refused)  # a usage error
    worker = subprocess.run(
        [*TOOLQ, "--redis-url", plain, "worker", "--backend", "local"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 2, worker.stderr
    assert f"redis+cluster://{node}" in worker.stderr
