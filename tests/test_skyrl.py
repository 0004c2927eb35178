"""SkyRL-Gym on toolq (``toolq.integrations.skyrl``): the tool group through
SkyRL's own ``BaseTextEnv._execute_tool``, and the ``toolq/bash`` environment made
with ``skyrl_gym.make``, against the real skyrl-gym package, a real Redis and a
real worker (local backend)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
import redis
import skyrl_gym
from omegaconf import OmegaConf
from skyrl_gym.envs.base_text_env import BaseTextEnv

from tests.helpers import redis_client, wait_for, worker_process
from toolq.integrations.skyrl import ENV_ID, ToolqToolGroup
from toolq.integrations.skyrl_env import ToolqBashEnv
from toolq.producer import Client, ToolqError, spec_wait_s
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


def make_env(
    redis_url: str, ns: str, check: str, client: Client | None = None, **extras: Any
) -> ToolqBashEnv:
    """The example env as SkyRL makes it: by id, with an omegaconf config section."""
    config = OmegaConf.create(
        {
            "redis_url": redis_url,
            "namespace": ns,
            "spec": {"limits": {"idle_timeout_s": 300}, "labels": {"from": "config"}},
            "other_key": 1,  # meant for another env: ignored
        }
    )
    extras = {"reward_spec": {"check": check}, **extras}
    env = skyrl_gym.make(ENV_ID, env_config=config, extras=extras, client=client)
    assert isinstance(env, ToolqBashEnv)
    return env


def tool(name: str, args: str) -> str:
    """An action in the env's format: one tool call, JSON arguments."""
    return f"I will call {name}.\n<tool><{name}>{args}</{name}></tool>"


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
    assert group.execute_tool("terminal", {"command": "echo alias"}) == "alias\n"  # not listed
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
    # by default a call may take as long as the spec lets it run, and then some
    long = ToolqToolGroup(client, "g-long", {"limits": {"max_call_timeout_s": 900}})
    assert long.wait_s == spec_wait_s(long.trajectory.spec) == 900 + 60


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


@contextmanager
def refusing_writes(redis_url: str) -> Iterator[None]:
    """Redis refuses every write (OOM, maxmemory 1) in the block: a failing close."""
    r = redis_client(redis_url)
    r.config_set("maxmemory", 1)
    try:
        yield
    finally:
        r.config_set("maxmemory", 0)


def test_a_close_that_fails_can_be_retried_and_an_expired_one_is_no_error(
    start_worker, client, redis_url, ns
):
    start_worker("local")
    group = ToolqToolGroup(client, "g-close")
    assert group.execute_tool("bash", {"command": "echo up"}) == "up\n"
    with refusing_writes(redis_url), pytest.raises(redis.OutOfMemoryError):
        group.close()
    assert status_of(client, "g-close") == "running"
    group.close()  # the same group closes it once Redis takes writes again
    wait_for(lambda: status_of(client, "g-close") == "completed", what="the retried close")

    gone = ToolqToolGroup(client, "g-expired")
    gone.open()
    redis_client(redis_url).delete(Keys(ns).traj("g-expired"))  # as when its record expires
    gone.close()  # nothing to free: no error
    assert not gone.opened


def test_an_env_closes_its_client_even_when_the_trajectorys_close_fails(
    start_worker, client, redis_url, ns
):
    start_worker("local")
    env = make_env(redis_url, ns, check="true")  # its own client
    _, info = env.init([])
    assert env.step(tool("bash", '{"command": "echo hi"}'))["metadata"]["error_code"] is None
    connection = str(env.client.redis.client_id())
    with refusing_writes(redis_url), pytest.raises(redis.OutOfMemoryError):
        env.close()
    r = redis_client(redis_url)
    wait_for(lambda: connection not in {c["id"] for c in r.client_list()}, what="its client")
    client.cancel(info["traj_id"])  # the close failed: free the sandbox


# ------------------------------------------------------------ the example env
def test_an_episode_through_skyrl_gym_make(start_worker, client, redis_url, ns):
    start_worker("local")
    env = make_env(redis_url, ns, check="grep -qx 42 answer.txt")
    prompt = [{"role": "user", "content": "Write 42 to answer.txt, then say <done/>."}]
    first, info = env.init(prompt)
    assert first == prompt and set(info["tools"]) >= SANDBOX_TOOLS
    traj_id = info["traj_id"]
    assert traj_id.startswith("skyrl-")
    assert status_of(client, traj_id) in ("pending", "running")

    out = env.step(tool("bash", '{"command": "echo 41 > answer.txt; cat answer.txt"}'))
    assert not out["done"] and out["reward"] == 0.0
    assert out["observations"] == [{"role": "user", "content": "<observation>41\n</observation>"}]
    assert out["metadata"] == {
        "traj_id": traj_id,
        "tool": "bash",
        "error_code": None,
        "infra": False,
    }

    out = env.step("Let me think about it.")  # no tool call: said so, and the episode goes on
    assert not out["done"] and out["metadata"]["error_code"] == "no_tool_call"
    assert "<tool><NAME>" in out["observations"][0]["content"]

    out = env.step(tool("bash", "{not json}"))
    assert not out["done"] and out["metadata"]["error_code"] == "invalid_args"
    assert "[invalid_args]" in out["observations"][0]["content"]

    out = env.step(tool("edit_file", '{"path": "answer.txt", "old": "41", "new": "42"}'))
    assert not out["done"] and out["metadata"]["error_code"] is None

    out = env.step("Done. <done/>")
    assert out["done"] and out["reward"] == 1.0 and out["observations"] == []
    assert out["metadata"]["check"]["error_code"] is None
    env.close()
    wait_for(lambda: status_of(client, traj_id) == "completed", what="the close")
    env.close()  # a second close is no error


def test_a_failed_check_and_the_turn_limit(start_worker, client, redis_url, ns):
    start_worker("local")
    env = make_env(redis_url, ns, check="test -f never.txt", max_turns=2)
    _, info = env.init([])
    assert not env.step(tool("bash", '{"command": "echo one > once.txt"}'))["done"]
    # the last turn's call still runs, then the episode ends with the check's verdict
    out = env.step(tool("bash", '{"command": "cat once.txt >> twice.txt"}'))
    assert out["done"] and out["reward"] == 0.0
    assert out["metadata"]["check"]["error_code"] == "exit_status"
    assert "[exit_status]" in out["metadata"]["check"]["output"]
    record = client.record(info["traj_id"])
    # two actions, then the check's policy entry and the check, all in the episode's trajectory
    assert record is not None and record.calls_total == 4 and record.step == "check"
    env.close()
    wait_for(lambda: status_of(client, info["traj_id"]) == "completed", what="the close")


def test_the_check_runs_even_when_the_episodes_policy_blocks_bash(
    start_worker, client, redis_url, ns
):
    start_worker("local")
    env = skyrl_gym.make(
        ENV_ID,
        env_config={"spec": {"blocked_tools": ["bash", "shell"]}},
        extras={"reward_spec": {"check": "grep -q yes out.txt"}},
        client=client,  # a shared client: the env leaves it open
    )
    _, info = env.init([])
    assert "bash" not in info["tools"]
    out = env.step(tool("bash", '{"command": "echo yes > out.txt"}'))
    assert out["metadata"]["error_code"] == "tool_blocked"
    env.step(tool("write_file", '{"path": "out.txt", "content": "yes"}'))
    assert env.step("All set. <done>")["reward"] == 1.0
    env.close()
    assert client.record(info["traj_id"]) is not None  # the shared client still works


def test_an_episode_needs_a_check_command(start_worker, redis_url, ns):
    start_worker("local")
    with pytest.raises(ValueError, match="reward_spec"):
        skyrl_gym.make(ENV_ID, env_config={"redis_url": redis_url, "namespace": ns}, extras={})


def test_eight_envs_in_parallel_each_get_their_own_trajectory(start_worker, client, redis_url, ns):
    start_worker("local", slots=8)

    def episode(i: int) -> tuple[str, str, float]:
        spec = {"labels": {"episode": str(i)}}  # over the config's labels
        shared = client if i % 2 else None  # half of them share one client across threads
        env = make_env(redis_url, ns, check=f"grep -qx {i} me.txt", client=shared, spec=spec)
        try:
            _, info = env.init([])
            env.step(tool("write_file", f'{{"path": "me.txt", "content": "{i}\\n"}}'))
            seen = env.step(tool("bash", '{"command": "cat me.txt"}'))["observations"][0]
            return info["traj_id"], seen["content"], env.step("<done/>")["reward"]
        finally:
            env.close()

    with ThreadPoolExecutor(8) as pool:
        episodes = list(pool.map(episode, range(8)))
    assert len({traj_id for traj_id, _, _ in episodes}) == 8
    for i, (traj_id, seen, reward) in enumerate(episodes):
        assert seen == f"<observation>{i}\n</observation>"  # its own sandbox, nobody else's
        assert reward == 1.0
        wait_for(lambda t=traj_id: status_of(client, t) == "completed", what=f"{traj_id} closed")
        record = client.record(traj_id)
        assert record is not None and record.spec is not None
        assert record.spec.labels == {"episode": str(i)}
        assert record.spec.limits.idle_timeout_s == 300
