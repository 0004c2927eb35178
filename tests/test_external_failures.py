"""External tools when things break: RQ hosts and toolq workers killed for real,
timeouts that mean one thing, infrastructure failures marked as such."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Worker as RQWorker

from tests.helpers import TOOLQ, wait_for, worker_process
from toolq.producer import Client

ROOT_DIR = str(Path(__file__).parent.parent)
TOOLS = "tests.fixtures_tools"


class RqHost:
    """A `toolq rq-worker` in a process group of its own (so a host crash kills it all)."""

    def __init__(self, url: str, log: Path, *extra: str) -> None:
        self.name = f"rq-{uuid.uuid4().hex[:8]}"
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([ROOT_DIR, os.environ.get("PYTHONPATH", "")]),
            TOOLQ_REDIS_URL=url,
        )
        cmd = [*TOOLQ, "rq-worker", "--tools", TOOLS, "--name", self.name, *extra]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=out, start_new_session=True
            )
        conn = redis.Redis.from_url(url)
        wait_for(
            lambda: any(w.name == self.name for w in RQWorker.all(connection=conn)),
            what=f"rq worker {self.name} to register ({log})",
        )

    def crash(self) -> None:
        """kill -9 of the worker, its work horse and its scheduler: a host crash.

        (The work horse runs in a process group of its own: each is killed.)
        """
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture
def rq_host(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., RqHost]]:
    hosts: list[RqHost] = []

    def start(*extra: str) -> RqHost:
        hosts.append(RqHost(redis_url, tmp_path / f"rq-{len(hosts)}.log", *extra))
        return hosts[-1]

    yield start
    for host in hosts:
        host.stop()


def test_a_crashed_rq_host_costs_the_timeout_not_minutes(
    rq_host: Any, start_worker: Any, client: Client, tmp_path: Path
):
    host = rq_host()
    start_worker("local", tools_modules=(TOOLS,))
    client.open("t")
    marker, release = tmp_path / "started", tmp_path / "release"
    stuck = client.submit(
        "t", "block", {"marker": str(marker), "release": str(release)}, timeout_s=2
    )
    behind = client.submit("t", "add", {"a": 1, "b": 2})
    wait_for(marker.exists, what="the job to start")
    host.crash()
    lost = client.result("t", stuck, timeout_s=60)  # timeout + 10 s grace at most
    assert not lost.ok and lost.error_code == "external_lost", lost
    assert "did not fail" in (lost.error or "")
    rq_host()  # the operator starts another RQ worker
    assert client.result("t", behind, timeout_s=60).data == {"sum": 3}


def test_a_killed_toolq_worker_s_external_call_is_adopted(
    rq_host: Any, redis_url: str, ns: str, client: Client, tmp_path: Path
):
    rq_host()
    extra = ("--tools", TOOLS)
    owner = worker_process(redis_url, ns, "owner", *extra, log_dir=str(tmp_path))
    log = tmp_path / "lines"
    try:
        client.open("t")
        assert client.call("t", "add", {"a": 0, "b": 0}).worker == "owner"
        survivor = worker_process(redis_url, ns, "survivor", *extra, log_dir=str(tmp_path))
        slow = client.submit("t", "append_line", {"path": str(log), "line": "1", "pause_s": 4})
        nxt = client.submit("t", "append_line", {"path": str(log), "line": "2"})
        wait_for(lambda: client.redis.exists(f"rq:job:tq__{ns}__t__{slow}"), what="the job")
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    try:
        adopted = client.result("t", slow, timeout_s=60)
        assert adopted.ok and adopted.worker == "survivor", adopted  # its job, adopted
        assert client.result("t", nxt, timeout_s=60).ok
        assert log.read_text() == "1\n2\n"  # ran once each, in order
    finally:
        survivor.send_signal(signal.SIGTERM)
        survivor.wait(60)


def test_timeouts_follow_one_rule(rq_host: Any, start_worker: Any, client: Client, tmp_path):
    rq_host()
    start_worker("local", tools_modules=(TOOLS,))
    client.open("t", {"limits": {"call_timeout_s": 2}})
    line = {"path": str(tmp_path / "f"), "line": "x"}
    # the tool's own timeout (1 s) lowers the call's (6 s)
    r = client.call("t", "slow", {"seconds": 3}, timeout_s=6)
    assert r.error_code == "timeout", r
    # the trajectory's call_timeout_s (2 s) applies to external tools too
    r = client.call("t", "append_line", {**line, "pause_s": 4})
    assert r.error_code == "timeout", r
    # fractions of a second hold (RQ counts whole seconds)
    r = client.call("t", "append_line", {**line, "pause_s": 1.7}, timeout_s=1.2)
    assert r.error_code == "timeout", r
    assert "timed out after 1.2s" in (r.error or ""), r  # as asked, not RQ's whole 2 s
    assert client.call("t", "append_line", {**line, "pause_s": 0.1}, timeout_s=1.2).ok


def test_strict_arguments_and_oversized_dicts(rq_host, start_worker, client: Client):
    rq_host()
    start_worker("local", tools_modules=(TOOLS,))
    client.open("t", {"limits": {"max_output_bytes": 1024}})
    for bad in ({"a": "3", "b": 2}, {"a": True, "b": 2}):
        r = client.call("t", "add", bad)
        assert r.error_code == "invalid_args", (bad, r)
    small = client.call("t", "big_dict", {"n": 3})
    assert small.data == {"key0": 0, "key1": 1, "key2": 2} and not small.truncated
    big = client.call("t", "big_dict", {"n": 1000})
    assert big.ok and big.truncated and big.data is None and big.output_bytes > 1024


def test_the_rq_scheduler_dies_with_its_worker(rq_host: Any):
    # a queue of its own: its scheduler lock is free, so this worker runs a scheduler
    host = rq_host("--queue", f"sched-{uuid.uuid4().hex[:8]}")
    children = wait_for(lambda: _children(host.proc.pid), what="the scheduler process")
    os.kill(host.proc.pid, signal.SIGKILL)  # the worker only, not its group
    host.proc.wait(30)
    wait_for(lambda: not any(_alive(pid) for pid in children), what="the scheduler to end")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _descendants(pid: int) -> list[int]:
    found = _children(pid)
    for child in list(found):
        found += _descendants(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_cli_refuses_a_huge_number_cleanly(redis_url: str, ns: str):
    env = dict(os.environ, TOOLQ_REDIS_URL=redis_url, TOOLQ_NAMESPACE=ns)
    args = '{"a": ' + "1" * 5000 + ', "b": 1}'
    proc = subprocess.run(
        [sys.executable, "-m", "toolq.producer.cli", "call", "t", "add", args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "not valid JSON" in proc.stderr
