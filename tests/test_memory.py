"""What a call leaves in Redis: entries released once answered, events capped,
indexes pruned, consumers gone with their worker. (Bytes per call are measured
by ``bench/capacity.py``; these tests check the mechanisms, on both kinds.)"""

from __future__ import annotations

import pytest

from tests.helpers import redis_client, wait_for
from toolq.producer import Client
from toolq.schemas import GROUP, Keys

pytestmark = pytest.mark.redis_kinds("single", "cluster")


def test_answered_calls_leave_their_stream_and_events_stay_capped(
    redis_kind, start_worker, client: Client, redis_url: str, ns: str
):
    start_worker("local", events_maxlen=8, events_after_end=4)
    r, keys = redis_client(redis_url), Keys(ns)
    client.open("t")
    for _ in range(150):
        assert client.call("t", "bash", {"command": "true"}).ok
    assert r.xlen(keys.calls("t")) == 0  # every answered entry was deleted
    assert r.xlen(keys.events("t")) <= 8 + 100  # MAXLEN ~ trims whole stream nodes
    client.close("t")
    wait_for(lambda: client.record("t").status.value == "completed", what="the end")
    wait_for(lambda: r.xlen(keys.events("t")) <= 4, what="events cut to the last few")
    assert not r.exists(keys.calls("t"))
    for key in (keys.traj("t"), keys.events("t")):
        assert r.pttl(key) > 0, key


def test_the_worker_prunes_the_runs_index(
    redis_kind, start_worker, client: Client, redis_url: str, ns: str
):
    handle = start_worker("local")
    r, keys = redis_client(redis_url), Keys(ns)
    client.open("kept")
    r.zadd(keys.runs, {"expired-long-ago": 1})  # its record is gone
    assert handle.run(handle.worker.fleet.prune_runs()) == 1
    assert [m.decode() for m in r.zrange(keys.runs, 0, -1)] == ["kept"]


def test_a_stopped_worker_leaves_no_consumer_behind(
    redis_kind, start_worker, client: Client, redis_url: str, ns: str
):
    handle = start_worker("local")
    r, keys = redis_client(redis_url), Keys(ns)
    client.open("t")
    assert client.call("t", "bash", {"command": "true"}).ok
    worker_id = handle.settings.worker_id
    consumers = [c["name"].decode() for c in r.xinfo_consumers(keys.open, GROUP)]
    assert worker_id in consumers
    handle.stop()
    consumers = [c["name"].decode() for c in r.xinfo_consumers(keys.open, GROUP)]
    assert worker_id not in consumers
    assert not r.exists(keys.wake(worker_id)) and not r.exists(keys.wake(worker_id, "t"))
