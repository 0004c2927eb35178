"""What a newcomer meets in the first hour (issue 33): settings that mean the same
everywhere, a wait that says at once when no worker serves it, Ctrl-C, exit
statuses and --help texts. Real processes, a real Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import subprocess
import uuid
import warnings
from pathlib import Path

import pytest
import redis

from tests.helpers import TOOLQ, wait_for
from tests.test_cli import cli_env, run, wait_for_worker, worker_proc  # noqa: F401
from tests.test_cli_errors import closed_port, one_line_error
from toolq.producer import AsyncClient, Client, WaitTimeout
from toolq.schemas import Keys

README = Path(__file__).resolve().parent.parent / "README.md"

# ------------------------------------------------------------- item 2: settings


def test_clients_honour_toolq_namespace_and_redis_url(redis_url, ns, monkeypatch):
    monkeypatch.setenv("TOOLQ_REDIS_URL", redis_url)
    monkeypatch.setenv("TOOLQ_NAMESPACE", ns)
    with Client() as c:
        assert c.keys.ns == ns
        c.open("env-t")
    assert redis.Redis.from_url(redis_url).exists(Keys(ns).traj("env-t"))
    assert AsyncClient().keys.ns == ns
    assert Client(namespace="other").keys.ns == "other"  # an argument still wins


def test_a_wait_with_no_worker_says_so_at_once_and_on_timeout(client, caplog):
    with caplog.at_level(logging.WARNING, logger="toolq.producer"):
        client.open("lonely")
        call_id = client.submit("lonely", "bash", {"command": "true"})
        with pytest.raises(WaitTimeout) as raised:
            client.result("lonely", call_id, 0.5)
    warned = [r.getMessage() for r in caplog.records if "no worker is alive" in r.getMessage()]
    assert len(warned) == 1 and client.keys.ns in warned[0], warned
    assert "no worker is alive" in str(raised.value)


def test_async_wait_with_no_worker_says_so(aclient_factory, caplog):
    async def wait() -> None:
        client = aclient_factory()
        await client.open("lonely")
        call_id = await client.submit("lonely", "bash", {"command": "true"})
        try:
            with pytest.raises(WaitTimeout, match="no worker is alive"):
                await client.result("lonely", call_id, 0.5)
        finally:
            await client.aclose()

    with caplog.at_level(logging.WARNING, logger="toolq.producer"):
        asyncio.run(wait())
    assert any("no worker is alive" in r.getMessage() for r in caplog.records)


def test_result_takes_wait_s_and_timeout_s_still_works(client):
    client.open("named")
    call_id = client.submit("named", "bash", {"command": "true"})
    with pytest.raises(WaitTimeout):
        client.result("named", call_id, wait_s=0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(WaitTimeout):
            client.result("named", call_id, timeout_s=0.2)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)


def test_worker_takes_redis_url_and_namespace_after_the_command(cli_env, redis_url, ns):  # noqa: F811
    env = {k: v for k, v in cli_env.items() if k not in ("TOOLQ_REDIS_URL", "TOOLQ_NAMESPACE")}
    proc = subprocess.Popen(
        [*TOOLQ, "worker", "--redis-url", redis_url, "--namespace", ns, "--backend", "local"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_worker(redis_url, ns, 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


# ------------------------------------------------------------- item 4: Ctrl-C


def test_ctrl_c_during_call_exits_130_and_says_the_call_runs_on(cli_env, worker_proc):  # noqa: F811
    nap = f"sleep 30.{uuid.uuid4().int % 10**6:06d}"  # a process of its own to look for
    proc = subprocess.Popen(
        [*TOOLQ, "call", "cc", "bash", json.dumps({"command": nap})],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The tool runs (its own process): the CLI had its submit's reply long before.
    running = ["pgrep", "-f", f"^{nap}$"]
    wait_for(lambda: subprocess.run(running, capture_output=True).returncode == 0, 60)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "still runs" in lines[0] and "Aborted" not in err, err
    result_cmd = re.search(r"`toolq (result [^`]+)`", lines[0])
    assert result_cmd and "`toolq cancel cc`" in lines[0], lines[0]
    assert run(["cancel", "cc"], cli_env).returncode == 0
    got = run(result_cmd.group(1).split(), cli_env)
    assert got.returncode == 1 and json.loads(got.stdout)["error_code"] == "cancelled"


# ------------------------------------------------------------- item 5: exit codes


def test_a_negative_wait_is_a_usage_error(cli_env):  # noqa: F811
    r = run(["call", "t", "bash", "{}", "--wait", "-1"], cli_env)
    assert r.returncode == 2, (r.returncode, r.stderr)


def test_a_db_index_out_of_range_is_a_usage_error(cli_env, redis_url):  # noqa: F811
    r = run(["open", "t"], dict(cli_env, TOOLQ_REDIS_URL=redis_url.rsplit("/", 1)[0] + "/999"))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "DB index" in one_line_error(r.stderr)


def test_a_label_without_equals_is_a_usage_error(cli_env):  # noqa: F811
    r = run(["runs", "--label", "k"], cli_env)
    assert r.returncode == 2 and "k=v" in r.stderr and "unexpected" not in r.stderr, r.stderr


def test_debug_keeps_the_exit_status(cli_env):  # noqa: F811
    env = dict(cli_env, TOOLQ_REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0")
    r = run(["--debug", "open", "t"], env)
    assert r.returncode == 3 and "Traceback" in r.stderr, (r.returncode, r.stderr)


def test_an_ended_trajectory_says_why_and_how_to_reuse_it_from_the_cli(cli_env):  # noqa: F811
    assert run(["open", "ended"], cli_env).returncode == 0
    assert run(["cancel", "ended"], cli_env).returncode == 0
    r = run(["open", "ended"], cli_env)
    assert r.returncode == 1
    line = one_line_error(r.stderr)
    assert "cancelled" in line and "toolq open ended --reuse" in line, line
    again = run(["open", "ended", "--reuse"], cli_env)
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "new", again.stderr


def test_fork_of_an_unknown_trajectory_names_it(cli_env):  # noqa: F811
    r = run(["fork", "never-was", "copy-1"], cli_env)
    assert r.returncode == 1, (r.returncode, r.stderr)
    line = one_line_error(r.stderr)
    assert "no trajectory never-was" in line and "bad_request" not in line, line


def test_worker_redis_url_after_the_command_is_no_usage_error(cli_env):  # noqa: F811
    r = run(["worker", "--redis-url", "http://x", "--backend", "local"], cli_env, timeout_s=60)
    assert "--rq-redis-url" not in r.stderr and "No such option" not in r.stderr, r.stderr


# ------------------------------------------------------------- item 6: --help


def help_of(*command: str) -> str:
    r = subprocess.run([*TOOLQ, *command, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_worker_help_lists_every_readme_setting():
    text = help_of("worker")
    readme = README.read_text().split("### Settings", 1)[1].split("###", 1)[0]
    for var in sorted(set(re.findall(r"TOOLQ_[A-Z_]+", readme))):
        assert var in text, var


def test_help_texts():
    assert "children" in help_of("cancel")
    assert "``" not in help_of("runs")
    call = help_of("call")
    assert call.count("[default:") >= 3, call
    demo = help_of("demo")
    assert "needs the worker)" not in demo and "own worker" in demo, demo


# ------------------------------------------------------------- item 7: operator view


def test_a_first_call_waiting_for_its_sandbox_is_not_a_wait_for_toolq(
    client, start_worker, docker_namespaces, ns
):
    """ToolqSlowQueue reads queued_ms - behind_ms: a container start is not in it."""
    from tests.conftest import require_docker

    require_docker()
    docker_namespaces.add(ns)
    start_worker("docker")
    client.open("cold")
    first = client.call("cold", "bash", {"command": "true"}, wait_s=120)
    second = client.call("cold", "bash", {"command": "true"}, wait_s=120)
    client.close("cold")
    assert first.ok and second.ok, (first, second)
    # The first call waited for the container: that wait is behind_ms, and what is
    # left (the read and start) is small next to it.
    assert first.behind_ms > 0, first
    assert first.queued_ms - first.behind_ms < first.behind_ms, first
    assert second.behind_ms <= second.queued_ms
