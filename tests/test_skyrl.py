"""SkyRL-Gym on toolq (``toolq.integrations.skyrl``): the tool group through
SkyRL's own ``BaseTextEnv._execute_tool``, against the real skyrl-gym package, a
real Redis and a real worker (local backend)."""

from __future__ import annotations

import signal

import pytest
from skyrl_gym.envs.base_text_env import BaseTextEnv

from tests.helpers import redis_client, wait_for, worker_process
from toolq.integrations.skyrl import ToolqToolGroup
from toolq.producer import Client, ToolqError
from toolq.schemas import Keys
from toolq.worker.embedded import EmbeddedRedis

SANDBOX_TOOLS = {"bash", "shell", "read_file", "write_file", "edit_file", "list_files"}


def skyrl_env(*groups: ToolqToolGroup) -> BaseTextEnv:
    """SkyRL's own base environment, with the groups as its tools."""
    env = BaseTextEnv()
    env.init_tool_groups(list(groups))
    return env


def status_of(client: Client, traj_id: str) -> str:
    record = client.record(traj_id)
    assert record is not None, traj_id
    return record.status.value


# ---------------------------------------------------------------- the tool group
def test_the_groups_tools_are_the_published_ones_and_run_through_skyrl(start_worker, client):
    start_worker("local")
    group = ToolqToolGroup(client, "g-tools")
    env = skyrl_env(group)
    published = {t.name for t in client.tools()}
    assert set(group.get_tool_names()) == published  # discovered, not a fixed list
    assert published >= SANDBOX_TOOLS
    assert env.tool_to_toolgroup["bash"] == "toolq"
    assert {s["function"]["name"] for s in group.tool_specs()} == published

    # SkyRL's path: _execute_tool(group, tool, positional args); a dict, JSON text or keywords
    wrote = env._execute_tool("toolq", "write_file", [{"path": "a.txt", "content": "hello\n"}])
    assert group.last is not None and group.last.error_code is None, wrote
    assert env._execute_tool("toolq", "read_file", ['{"path": "a.txt"}']) == "hello\n"
    assert group.execute_tool("bash", command="wc -c < a.txt").strip() == "6"
    assert "a.txt" in group.get_tool("list_files")({"path": "."})
    with pytest.raises(TypeError, match="not both"):  # the caller's bug, not the model's
        group.execute_tool("bash", {"command": "true"}, command="false")
    group.close()
    wait_for(lambda: status_of(client, "g-tools") == "completed", what="the close")


def test_state_persists_across_calls_in_one_trajectory(start_worker, client):
    start_worker("local")
    group = ToolqToolGroup(client, "g-state")
    env = skyrl_env(group)
    assert group.open() == "new"
    env._execute_tool("toolq", "shell", [{"command": "mkdir -p sub && cd sub && export X=41"}])
    assert env._execute_tool(
        "toolq", "shell", [{"command": "echo $((X + 1)) $(basename $PWD)"}]
    ) == ("42 sub\n")
    env._execute_tool("toolq", "bash", [{"command": "echo kept > sub/f"}])
    assert env._execute_tool("toolq", "read_file", [{"path": "sub/f"}]) == "kept\n"
    record = client.record("g-state")
    assert record is not None and record.calls_total == 4  # one trajectory served them all
    group.close()


def test_errors_are_observations_with_their_code_and_the_episode_goes_on(
    start_worker, client, redis_url, ns
):
    start_worker("local")
    group = ToolqToolGroup(client, "g-errors")
    env = skyrl_env(group)
    cases = [  # (tool, args, code, text the observation carries)
        ("no_such_tool", {}, "unknown_tool", "no_such_tool"),
        ("bash", '{"command": "echo broken', "invalid_args", "JSON"),
        ("bash", {"command": 3}, "invalid_args", "command"),
        ("bash", ["ls"], "invalid_args", "JSON object"),
        ("read_file", {"path": "missing.txt"}, "not_found", "missing.txt"),
        ("bash", {"command": "echo partial; exit 3"}, "exit_status", "partial"),
        ("bash", {"command": "echo started; sleep 30", "timeout_s": 1}, "timeout", "started"),
    ]
    outcomes = []
    for name, args, code, text in cases:
        observation = env._execute_tool("toolq", name, [args])
        outcome = group.last
        assert outcome is not None and outcome.error_code == code, (name, observation)
        assert f"[{code}]" in observation and text in observation, observation
        assert not outcome.infra
        outcomes.append(outcome)
    # the trajectory is still there for the next call
    assert env._execute_tool("toolq", "bash", [{"command": "echo still here"}]) == "still here\n"

    # every call got exactly one result, in Redis
    record = client.record("g-errors")
    assert record is not None
    assert record.calls_submitted == record.calls_total == len(cases) + 1
    assert record.calls_failed == len(cases)
    r, keys = redis_client(redis_url), Keys(ns)
    for outcome in outcomes:
        assert outcome.result is not None
        assert r.exists(keys.result("g-errors", outcome.result.call_id))
    group.close()
    wait_for(lambda: status_of(client, "g-errors") == "completed", what="the close")
    after = group.execute_tool("bash", {"command": "echo late"})  # answered by toolq
    assert group.last is not None and group.last.error_code == "trajectory_ended", after

    # refused before any call (the client raises): the same kind of observation
    again = ToolqToolGroup(client, "g-errors")  # an id whose trajectory has ended
    assert again.execute_tool("bash", {"command": "true"}).startswith("[trajectory_ended]")
    child = ToolqToolGroup(client, "g-child", {"parent": "g-errors"})  # of an ended parent
    assert child.execute_tool("bash", {"command": "true"}).startswith("[limit_exceeded]")
    assert child.last is not None and not child.last.infra and child.last.result is None


def test_a_wait_that_runs_out_is_an_infra_observation(start_worker, client):
    start_worker("local")
    group = ToolqToolGroup(client, "g-wait", wait_s=0.5)
    slow = group.execute_tool("bash", {"command": "sleep 3; echo slow"})
    assert slow.startswith("[wait_timeout]"), slow
    assert group.last is not None and group.last.infra and group.last.result is None
    # the slow call still runs and gets its result; the next call queues behind it
    group.wait_s = 60
    assert group.execute_tool("bash", {"command": "echo next"}) == "next\n"
    group.close()


def test_the_spec_policy_shapes_the_tool_list_and_the_worker_enforces_it(start_worker, client):
    start_worker("local")
    spec = {"allowed_tools": ["read_file", "write_file", "terminal"], "blocked_tools": ["bash"]}
    group = ToolqToolGroup(client, "g-policy", spec)
    env = skyrl_env(group)
    # 'terminal' stands for bash, and block wins over allow
    assert sorted(group.get_tool_names()) == ["read_file", "write_file"]
    for name in ("bash", "terminal", "shell"):  # not listed: sent anyway, refused by the worker
        observation = env._execute_tool("toolq", name, [{"command": "echo no"}])
        assert observation.startswith("[tool_blocked]"), observation
    env._execute_tool("toolq", "write_file", [{"path": "ok.txt", "content": "yes"}])
    assert env._execute_tool("toolq", "read_file", [{"path": "ok.txt"}]) == "yes"
    group.close()


def test_no_worker_in_the_namespace_is_a_clear_error(client):
    with pytest.raises(ToolqError, match=r"no tools published .* start a toolq worker"):
        ToolqToolGroup(client, "g-none")


def test_an_unreachable_redis_is_an_infra_observation(ns):
    with EmbeddedRedis() as server:
        worker = worker_process(server.url, ns, "w-skyrl")
        try:
            with Client(server.url, ns, retries=0) as client:
                wait_for(client.tools, what="the worker to publish its tools")
                group = ToolqToolGroup(client, "g-redis")
                assert group.execute_tool("bash", {"command": "echo up"}) == "up\n"
                server.stop()
                observation = group.execute_tool("bash", {"command": "echo down"})
                assert observation.startswith("[redis_unreachable]"), observation
                assert group.last is not None and group.last.infra
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
