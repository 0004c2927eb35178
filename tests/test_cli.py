"""The `toolq` command line, run as real processes against a real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from tests.helpers import TOOLQ
from toolq.schemas import Keys


def run(
    args: list[str], env: dict[str, str], timeout_s: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(TOOLQ + args, env=env, capture_output=True, text=True, timeout=timeout_s)


def wait_for_worker(url: str, ns: str, timeout_s: float = 30) -> None:
    r = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if r.zcard(Keys(ns).workers):
            return
        time.sleep(0.1)
    raise AssertionError("worker did not register")


@pytest.fixture
def cli_env(redis_url: str, ns: str, tmp_path) -> dict[str, str]:
    env = dict(
        os.environ, TOOLQ_REDIS_URL=redis_url, TOOLQ_NAMESPACE=ns, XDG_RUNTIME_DIR=str(tmp_path)
    )
    return env


@pytest.fixture
def worker_proc(cli_env: dict[str, str], redis_url: str, ns: str) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(
        [*TOOLQ, "worker", "--backend", "local", "--slots", "4"],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_worker(redis_url, ns)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_call_prints_json_and_exit_status(cli_env, worker_proc):
    ok = run(["call", "t1", "bash", '{"command":"echo hi"}'], cli_env)
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["output"] == "hi\n" and result["ok"] is True
    assert {"ok", "output", "exit_code", "error_code", "error"} <= set(result)
    failed = run(["call", "t1", "bash", '{"command":"exit 4"}'], cli_env)
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["exit_code"] == 4
    assert run(["call", "t1", "bash", "{not json"], cli_env).returncode == 2
    assert run(["call", "bad id!", "bash", "{}"], cli_env).returncode == 2
    closed = run(["close", "t1"], cli_env)
    assert closed.returncode == 0 and json.loads(closed.stdout)["traj"] == "t1"


def test_open_with_spec_and_policy(cli_env, worker_proc):
    spec = json.dumps({"blocked_tools": ["write_file"], "env": {"GREETING": "hello"}})
    assert run(["open", "t2", "--spec", spec], cli_env).returncode == 0
    r = run(["call", "t2", "bash", '{"command":"echo $GREETING"}'], cli_env)
    assert json.loads(r.stdout)["output"] == "hello\n"
    blocked = run(["call", "t2", "write_file", '{"path":"a","content":"b"}'], cli_env)
    assert blocked.returncode == 1
    assert json.loads(blocked.stdout)["error_code"] == "tool_blocked"


def test_sigterm_shuts_down_cleanly_and_hands_back(cli_env, worker_proc, redis_url, ns):
    assert run(["call", "t3", "bash", '{"command":"true"}'], cli_env).returncode == 0
    worker_proc.send_signal(signal.SIGTERM)
    assert worker_proc.wait(60) == 0
    r = redis.Redis.from_url(redis_url)
    keys = Keys(ns)
    assert r.zcard(keys.workers) == 0
    assert r.hget(keys.traj("t3"), "status") == b"pending"  # handed back, not lost
    assert r.hget(keys.traj("t3"), "owner") == b""


def test_embedded_redis_is_found_by_clients(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TOOLQ_REDIS_URL",)}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    proc = subprocess.Popen(
        [*TOOLQ, "worker", "--backend", "local"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        state = tmp_path / f"toolq-{os.getuid()}" / "embedded-redis.json"
        deadline = time.monotonic() + 30
        while not state.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        url = json.loads(state.read_text())["url"]
        wait_for_worker(url, "toolq")
        r = run(["call", "emb", "bash", '{"command":"echo embedded"}'], env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["output"] == "embedded\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert not state.exists()  # the embedded Redis went away with its worker


def test_no_redis_is_a_usage_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TOOLQ_REDIS_URL"}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    r = run(["call", "t", "bash", "{}"], env)
    assert r.returncode == 2 and "TOOLQ_REDIS_URL" in r.stderr


def test_demo_runs_on_embedded_redis(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TOOLQ_REDIS_URL"}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    r = run(["demo", "--trajectories", "3", "--rounds", "2", "--backend", "local"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "calls: 21  failures: 0" in r.stdout
