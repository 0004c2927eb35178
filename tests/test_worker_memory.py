"""The worker's memory under a flood of junk: bounded by its settings, and back
near its baseline after the flood (``worker/memory.py``)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from tests.helpers import redis_client, wait_for, worker_process
from toolq.producer import Client
from toolq.schemas import Keys
from toolq.worker.embedded import EmbeddedRedis

FLOOD = 4000
JUNK_BYTES = 120_000  # a tool name: answered unknown_tool, its name echoed (cut) in the error


def rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


def test_a_flood_of_junk_entries_leaves_the_worker_near_its_baseline(ns: str, tmp_path: Path):
    with EmbeddedRedis() as server:
        worker = worker_process(server.url, ns, "w", "--slots", "8", log_dir=str(tmp_path))
        r, keys = redis_client(server.url), Keys(ns)
        trajs = [f"t{i}" for i in range(8)]
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_mb(worker.pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        try:
            with Client(server.url, ns) as c:
                for t in trajs:
                    c.open(t)
                    assert c.call(t, "bash", {"command": "true"}).ok
                baseline = rss_mb(worker.pid)
                sampler.start()
                junk = "x" * JUNK_BYTES
                pipe = r.pipeline(transaction=False)
                for i in range(FLOOD):
                    fields = {"tool": junk, "args": "{}", "call_id": f"j{i}"}
                    pipe.xadd(keys.calls(trajs[i % len(trajs)]), fields)
                    if i % 100 == 99:
                        pipe.execute()
                pipe.execute()
                wait_for(
                    lambda: sum(r.xlen(keys.calls(t)) for t in trajs) == 0,
                    timeout_s=300,
                    what="the flood answered",
                )
                assert c.result("t0", "j0").error_code == "unknown_tool"
                # Held: the read-ahead (64 MiB) and the replay journal (64 MiB), not the flood.
                assert peak[0] < baseline + 300, (baseline, peak[0])
                wait_for(
                    lambda: rss_mb(worker.pid) < baseline + 50,
                    timeout_s=60,
                    what=f"the worker back near its baseline ({baseline} MB)",
                )
                assert c.call("t0", "bash", {"command": "echo fine"}).output == "fine\n"
        finally:
            done.set()
            if sampler.is_alive():
                sampler.join()
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
