"""Regressions found in review: each scenario once lost a call, ran one twice or hung."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import redis

from tests.helpers import unique_sleep, worker_process
from toolq.producer import Client
from toolq.schemas import GROUP, Keys, OpenRequest
from toolq.worker.embedded import EmbeddedRedis


def test_a_result_that_cannot_be_encoded_does_not_stop_the_writer(start_worker, client: Client):
    start_worker("local")
    client.open("t")
    odd = client.call("t", "write_file", {"path": "a\udc80.txt", "content": "x"})
    assert odd.call_id  # answered, whatever the tool made of the name
    client.open("other")
    assert client.call("other", "bash", {"command": "echo next"}).output == "next\n"
    assert client.call("t", "bash", {"command": "echo same"}).output == "same\n"


def test_a_redis_stall_longer_than_dead_after_does_not_make_workers_take_each_other_over(ns):
    with EmbeddedRedis() as server, Client(server.url, ns) as client:
        workers = [worker_process(server.url, ns, f"w{i}", "--slots", "1") for i in range(2)]
        try:
            for t in ("a", "b"):
                client.open(t)
                assert client.call(t, "bash", {"command": "true"}).ok
            ids = {t: client.submit(t, "bash", {"command": "sleep 4; echo done"}) for t in "ab"}
            time.sleep(0.5)
            os.kill(server.proc.pid, signal.SIGSTOP)  # Redis stalls longer than dead_after_s
            time.sleep(3)
            os.kill(server.proc.pid, signal.SIGCONT)
            for t, call_id in ids.items():
                r = client.result(t, call_id, timeout_s=30)
                assert r.ok and r.output == "done\n", (t, r.error_code, r.error)
        finally:
            for w in workers:
                w.send_signal(signal.SIGTERM)
                w.wait(60)


def test_a_worker_restarted_under_the_same_id_serves_its_trajectories_again(
    client: Client, redis_url, ns
):
    first = worker_process(redis_url, ns, "stable-1")
    client.open("t")
    assert client.call("t", "bash", {"command": "true"}).worker == "stable-1"
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = worker_process(redis_url, ns, "stable-1")
    try:
        r = client.call("t", "bash", {"command": "echo back"}, wait_s=30)
        assert r.ok and r.output == "back\n"
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(60)


def test_entries_delivered_again_are_not_run_twice(start_worker, client: Client, redis_url, ns):
    start_worker("local")
    client.open("t")
    for i in range(3):
        assert client.call("t", "bash", {"command": f"echo run{i} >> log"}).ok
    # what a failover to a lagging replica looks like: the group forgets its progress
    redis.Redis.from_url(redis_url).xgroup_setid(Keys(ns).calls("t"), GROUP, "0")
    time.sleep(1.0)
    log = client.call("t", "read_file", {"path": "log"}).output.split()
    assert log == ["run0", "run1", "run2"]


def test_open_requests_a_dead_worker_read_are_served(start_worker, client: Client, redis_url, ns):
    r = redis.Redis.from_url(redis_url)
    keys = Keys(ns)
    r.xgroup_create(keys.open, GROUP, id="0", mkstream=True)
    client.open("orphan")
    r.xreadgroup(GROUP, "ghost", {keys.open: ">"}, count=10)  # read, then "died"
    r.zadd(keys.workers, {"ghost": 1})  # a heartbeat from long ago
    start_worker("local", heartbeat_s=0.2, dead_after_s=1)
    assert client.call("orphan", "bash", {"command": "echo served"}, wait_s=30).ok
    assert OpenRequest  # the re-queued request is an ordinary open request


def test_sigterm_leaves_queued_calls_to_the_next_owner(client: Client, redis_url, ns):
    leaving = worker_process(redis_url, ns, "leaving", "--shutdown-grace-s", "10")
    client.open("t")
    assert client.call("t", "bash", {"command": "true"}).worker == "leaving"
    running = client.submit("t", "bash", {"command": "sleep 1; echo first"})
    queued = client.submit("t", "bash", {"command": "echo second"})
    time.sleep(0.3)
    stopper = threading.Thread(target=lambda: (leaving.send_signal(signal.SIGTERM), leaving.wait()))
    stopper.start()
    stopper.join(60)
    heir = worker_process(redis_url, ns, "heir")
    try:
        first = client.result("t", running, timeout_s=30)
        second = client.result("t", queued, timeout_s=30)
        assert first.ok and first.worker == "leaving"
        assert second.ok and second.output == "second\n" and second.worker == "heir"
    finally:
        heir.send_signal(signal.SIGTERM)
        heir.wait(60)


def test_a_bad_workdir_fails_only_its_trajectory(start_worker, client: Client):
    start_worker("local")
    client.open("ok")
    client.open("bad", {"workdir": "a\x00b"})
    r = client.call("bad", "bash", {"command": "true"})
    assert r.error_code in ("sandbox_error", "trajectory_ended")
    assert client.call("ok", "bash", {"command": "echo alive"}).output == "alive\n"


def test_background_leftovers_of_bash_die_with_the_trajectory(start_worker, client: Client):
    start_worker("local")
    client.open("t")
    nap = unique_sleep()
    assert client.call("t", "bash", {"command": f"sleep {nap} & echo started"}).ok
    assert subprocess.run(["pgrep", "-f", f"sleep {nap}"], capture_output=True).returncode == 0
    client.close("t")
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-f", f"sleep {nap}"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the leftover outlived its trajectory"
        time.sleep(0.1)
