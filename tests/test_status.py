"""``toolq status``: two live workers, one dead one, backlog, states, error rate."""

from __future__ import annotations

import json
import time

from click.testing import CliRunner

from tests.helpers import wait_for
from toolq.producer import Client
from toolq.producer.cli import main
from toolq.producer.status import collect
from toolq.schemas import Keys, WorkerInfo


def _write_dead_worker(client: Client, ns: str, age_s: float) -> None:
    """A worker that stopped beating ``age_s`` ago (its hash not expired yet)."""
    keys = Keys(ns)
    beat_ms = int((time.time() - age_s) * 1000)
    info = WorkerInfo(
        worker="ghost-1",
        host="old-host",
        backend="docker",
        version="0.0.9",
        slots_total=8,
        slots_used=3,
        heartbeat_ms=beat_ms,
    )
    client.redis.zadd(keys.workers, {"ghost-1": beat_ms})
    client.redis.hset(keys.worker("ghost-1"), mapping=info.to_fields())


def _status(redis_url: str, ns: str, *args: str) -> str:
    args_ = ["--redis-url", redis_url, "--namespace", ns, "status", *args]
    result = CliRunner().invoke(main, args_)
    assert result.exit_code == 0, result.output
    return result.output


def test_status_shows_live_and_dead_workers(start_worker, client: Client, redis_url, ns):
    # Live workers take over (and forget) a worker dead for longer than their own
    # dead_after_s; a long one keeps the ghost visible while status looks at it.
    a = start_worker("local", slots=1, dead_after_s=600)
    b = start_worker("local", slots=2, dead_after_s=600)
    _write_dead_worker(client, ns, age_s=120)
    client.open("busy")  # takes one slot of one worker
    assert client.call("busy", "bash", {"command": "true"}).ok
    assert not client.call("busy", "bash", {"command": "exit 2"}).ok
    client.open("done")
    assert client.call("done", "bash", {"command": "true"}).ok
    client.close("done")
    wait_for(lambda: collect(client.redis, Keys(ns)).trajectories["completed"] == 1)
    wait_for(lambda: collect(client.redis, Keys(ns)).calls.calls == 3)
    wait_for(lambda: sum(w.slots_used for w in collect(client.redis, Keys(ns)).alive) == 1)

    data = json.loads(_status(redis_url, ns, "--json"))
    rows = {w["worker"]: w for w in data["workers"]}
    assert set(rows) == {a.worker.id, b.worker.id, "ghost-1"}
    assert rows[a.worker.id]["alive"] and rows[b.worker.id]["alive"]
    assert rows[a.worker.id]["backend"] == "local" and rows[a.worker.id]["version"] == "0.1.0"
    assert (rows[a.worker.id]["slots_total"], rows[b.worker.id]["slots_total"]) == (1, 2)
    assert rows[a.worker.id]["heartbeat_age_s"] < 15
    ghost = rows["ghost-1"]
    assert not ghost["alive"] and ghost["heartbeat_age_s"] >= 120
    assert (ghost["backend"], ghost["slots_used"]) == ("docker", 3)
    assert (data["workers_alive"], data["workers_dead"]) == (2, 1)
    assert (data["slots_used"], data["slots_total"]) == (1, 3)  # the dead one's slots excluded
    assert data["trajectories"]["running"] == 1 and data["trajectories"]["completed"] == 1
    assert data["calls"]["calls"] == 3 and data["calls"]["failed"] == 1
    assert data["calls"]["errors"] == {"exit_status": 1}
    assert abs(data["calls"]["error_rate"] - 1 / 3) < 1e-3

    text = _status(redis_url, ns)
    assert "2 alive, 1 dead" in text
    assert "slots 1/3 used" in text
    ghost_line = next(line for line in text.splitlines() if "ghost-1" in line)
    assert "DEAD" in ghost_line and "old-host" in ghost_line
    live_lines = [line for line in text.splitlines() if a.worker.id in line or b.worker.id in line]
    assert len(live_lines) == 2 and all("alive" in line for line in live_lines)
    assert "1 failed (33.3%)" in text and "exit_status 1" in text


def test_status_shows_the_backlog_and_watch_refreshes(start_worker, client, redis_url, ns):
    start_worker("local", slots=1)
    client.open("holder")
    assert client.call("holder", "bash", {"command": "true"}).ok
    client.open("waiting-1")
    client.open("waiting-2")
    time.sleep(0.05)  # lets the oldest waiting age be non-zero
    status = collect(client.redis, Keys(ns))
    assert status.backlog.pending == 2
    assert status.backlog.oldest_traj == "waiting-1"
    assert status.backlog.oldest_age_s > 0
    assert status.trajectories["pending"] == 2 and status.trajectories["running"] == 1

    out = _status(redis_url, ns, "--watch", "--interval", "0.05", "--count", "3")
    assert out.count("BACKLOG  2 trajectories waiting for a slot") == 3
    assert "(waiting-1)" in out
    lines = _status(redis_url, ns, "--watch", "--json", "--interval", "0.05", "--count", "2")
    docs = [json.loads(line) for line in lines.splitlines()]
    assert [d["backlog"]["pending"] for d in docs] == [2, 2]


def test_status_of_an_empty_namespace(client: Client, redis_url, ns):
    text = _status(redis_url, ns)
    assert "0 alive, 0 dead" in text
    assert "BACKLOG  0 trajectories" in text
    assert "0 answered, 0 failed (0.0%)" in text
