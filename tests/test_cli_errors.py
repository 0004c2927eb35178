"""The `toolq` command fails well: one line, no traceback, a documented exit status
(0 ok, 1 the tool failed or nothing to act on, 2 usage, 3 infrastructure, 124 a
wait timed out). Run as real processes against a real Redis."""

from __future__ import annotations

import socket

import pytest

from tests.test_cli import cli_env, run, worker_proc  # noqa: F401  (fixtures)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.parametrize("command", [["open", "t"], ["close", "t"], ["runs"], ["status"]])
def test_redis_down_is_one_line_and_exit_3(cli_env, command):  # noqa: F811
    env = dict(cli_env, TOOLQ_REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0")
    r = run(command, env)
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "Redis" in one_line_error(r.stderr)


def test_debug_shows_the_traceback(cli_env):  # noqa: F811
    env = dict(cli_env, TOOLQ_REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0")
    r = run(["--debug", "open", "t"], env)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_bad_url_scheme_is_a_usage_error(cli_env):  # noqa: F811
    r = run(["open", "t"], dict(cli_env, TOOLQ_REDIS_URL="http://127.0.0.1:6379"))
    assert r.returncode == 2, (r.returncode, r.stderr)
    one_line_error(r.stderr)


def test_a_spec_typo_is_named_and_refused(cli_env):  # noqa: F811
    r = run(["open", "t", "--spec", '{"imgae": "x", "limits": {"memroy_mb": 5}}'], cli_env)
    assert r.returncode == 2, (r.returncode, r.stderr)
    line = one_line_error(r.stderr)
    assert "imgae" in line and "limits.memroy_mb" in line


def test_an_invalid_limit_is_a_usage_error_naming_it(cli_env):  # noqa: F811
    r = run(["open", "t", "--spec", '{"limits": {"memory_mb": 1}}'], cli_env)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "limits.memory_mb" in one_line_error(r.stderr)


@pytest.mark.parametrize("command", ["close", "cancel", "show"])
def test_unknown_trajectories_fail_alike(cli_env, command):  # noqa: F811
    r = run([command, "never-opened"], cli_env)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "never-opened" in one_line_error(r.stderr)


def test_call_without_a_worker_says_so_and_times_out_with_124(cli_env):  # noqa: F811
    r = run(["call", "t", "bash", '{"command": "true"}', "--wait", "1"], cli_env)
    assert r.returncode == 124, (r.returncode, r.stderr)
    assert "no worker is alive" in r.stderr
    assert "no worker is alive" in one_line_error(r.stderr)


def test_tools_without_a_worker_says_why_the_list_is_empty(cli_env):  # noqa: F811
    r = run(["tools", "--format", "openai"], cli_env)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.returncode, r.stdout)
    assert "no worker has started" in r.stderr


def test_tools_only_an_unknown_name_is_a_usage_error(cli_env, worker_proc):  # noqa: F811
    r = run(["tools", "--only", "bash", "--only", "no_such"], cli_env)
    assert r.returncode == 2 and "no_such" in one_line_error(r.stderr), r.stderr
    listed = run(["tools", "--only", "bash"], cli_env)
    assert listed.returncode == 0 and listed.stdout.startswith("bash"), listed.stdout


def test_call_exit_status_follows_the_tool(cli_env, worker_proc):  # noqa: F811
    assert run(["call", "t", "bash", '{"command": "true"}'], cli_env).returncode == 0
    failed = run(["call", "t", "bash", '{"command": "exit 3"}'], cli_env)
    assert failed.returncode == 1 and "no worker" not in failed.stderr


def test_a_bad_log_level_is_a_usage_error(cli_env):  # noqa: F811
    r = run(["worker", "--backend", "local", "--log-level", "LOUD"], cli_env)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_an_unreachable_docker_engine_is_one_line_and_exit_3(cli_env, tmp_path):  # noqa: F811
    env = dict(cli_env, DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    r = run(["worker", "--backend", "docker"], env)
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "Docker" in one_line_error(r.stderr)


def test_the_python_client_gives_up_on_a_redis_that_stays_down():
    """One layer of retries, about 15-30 s in all: an error, not a hang."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from toolq.producer import Client

    client = Client(f"redis://127.0.0.1:{closed_port()}/0", "gone")
    with pytest.raises(RedisConnectionError):
        client.open("t")
