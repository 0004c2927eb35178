"""``toolq/bash``: a minimal SkyRL-Gym environment whose episodes run in toolq.

    import skyrl_gym
    import toolq.integrations.skyrl  # registers toolq/bash

    env = skyrl_gym.make(
        "toolq/bash",
        env_config={"redis_url": "redis://localhost:6379", "spec": {"image": "python:3.12-slim"}},
        extras={"reward_spec": {"check": "grep -q 42 answer.txt"}, "max_turns": 8},
    )
    prompt, info = env.init([{"role": "user", "content": "Write 42 to answer.txt."}])
    out = env.step('<tool><bash>{"command": "echo 42 > answer.txt"}</bash></tool>')
    out = env.step("<done/>")     # out["done"], out["reward"] == 1.0
    env.close()

An episode is one toolq trajectory (a fresh id, opened at ``init``, closed at
``close``). Each action may hold one tool call, in the layout of SkyRL's own
multi-tool example: ``<tool><NAME>ARGS</NAME></tool>``, ARGS being the JSON
object of NAME's arguments. Its observation is ``<observation>TEXT</observation>``,
TEXT being the tool's output, then ``[error_code] error`` when it failed. The
episode is done at ``<done/>`` or after ``max_turns`` actions (the action's
call runs first); then the reward is 1.0 when the check command (``extras
["reward_spec"]["check"]``, run with ``bash`` in the same sandbox, under a
policy that allows it) exits 0, else 0.0.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf
from skyrl_gym.envs.base_text_env import (
    BaseTextEnv,
    BaseTextEnvStepOutput,
    ConversationType,
)

from toolq.producer import Client
from toolq.producer.model_calls import CLIENT_FAILURES

from .skyrl import ToolOutcome, ToolqToolGroup

__all__ = ["ToolqBashEnv", "ToolqEnvConfig", "parse_action"]

#: ``<tool><NAME>ARGS</NAME></tool>``: the first one in an action is its call.
TOOL_CALL = re.compile(
    r"<tool>\s*<(?P<name>[A-Za-z0-9_.:-]+)>(?P<args>.*?)</(?P=name)>\s*</tool>", re.DOTALL
)
DONE = re.compile(r"<done\s*/?>")
NO_TOOL_CALL = (
    "[no_tool_call] no tool call found: write <tool><NAME>{JSON arguments}</NAME></tool>, "
    "or <done/> when finished"
)


@dataclass
class ToolqEnvConfig:
    """``env_config`` of ``toolq/bash`` (a dict, an omegaconf section or this)."""

    redis_url: str | None = None  #: default: TOOLQ_REDIS_URL
    namespace: str | None = None  #: default: TOOLQ_NAMESPACE, else toolq
    spec: dict[str, Any] = field(default_factory=dict)  #: every episode's trajectory spec
    traj_prefix: str = "skyrl"  #: trajectory ids are ``<prefix>-<random hex>``
    max_turns: int = 8  #: unless an episode's extras say otherwise
    wait_s: float | None = None  #: bound on each call's wait (see ToolqToolGroup)


def parse_action(action: str) -> tuple[str, str] | None:
    """The action's first tool call: (tool name, its arguments as JSON text), or None."""
    found = TOOL_CALL.search(action)
    return (found["name"], found["args"].strip()) if found else None


class ToolqBashEnv(BaseTextEnv):
    """One episode, one toolq trajectory; a toy reward from a check command.

    ``extras``: ``reward_spec.check`` (required), ``max_turns``, ``spec`` (merged
    over the config's spec, key by key). ``client``: a shared ``Client`` (one per
    env otherwise, closed with it).
    """

    def __init__(
        self,
        env_config: ToolqEnvConfig | Mapping[str, Any] | None = None,
        extras: Mapping[str, Any] | None = None,
        *,
        client: Client | None = None,
    ) -> None:
        super().__init__()
        config = _config(env_config)
        extras = _plain(extras or {})
        self.check_command = _check_command(extras)
        self.max_turns = int(extras.get("max_turns", config.max_turns))
        self.traj_id = f"{config.traj_prefix}-{uuid.uuid4().hex[:16]}"
        spec = {**config.spec, **extras.get("spec", {})}
        with ExitStack() as made:  # a client made here is closed if the group cannot be
            if client is None:
                client = made.enter_context(Client(config.redis_url, config.namespace))
            self.tools = ToolqToolGroup(client, self.traj_id, spec, wait_s=config.wait_s)
            self._resources = made.pop_all()  # close() releases them
        self.client = client
        self.init_tool_groups([self.tools])

    def init(self, prompt: ConversationType) -> tuple[ConversationType, dict[str, Any]]:
        """Open the trajectory (its sandbox starts while the model writes); the prompt
        goes back unchanged."""
        self.tools.open()
        return prompt, {"traj_id": self.traj_id, "tools": self.tools.get_tool_names()}

    def step(self, action: str) -> BaseTextEnvStepOutput:
        """Run the action's tool call (if any); its output is the observation. At
        ``<done/>`` or the last turn the episode ends, rewarded by the check command."""
        self.turns += 1
        done = DONE.search(action) is not None or self.turns >= self.max_turns
        call = parse_action(action)
        info: dict[str, Any] = {"traj_id": self.traj_id}
        observation = NO_TOOL_CALL
        if call is not None:
            text = self._execute_tool(self.tools.name, call[0], [call[1]])
            observation = f"<observation>{text}</observation>"
            info.update(_info(self.tools.last))
        elif not done:
            info["error_code"] = "no_tool_call"
        if done:
            return self._finish(info)
        return BaseTextEnvStepOutput(
            observations=[{"role": "user", "content": observation}],
            reward=0.0,
            done=False,
            metadata=info,
        )

    def _finish(self, info: dict[str, Any]) -> BaseTextEnvStepOutput:
        check = self._check()
        info["check"] = {"output": check.observation, **_info(check)}
        reward = 1.0 if check.error_code is None else 0.0
        return BaseTextEnvStepOutput(observations=[], reward=reward, done=True, metadata=info)

    def _check(self) -> ToolOutcome:
        """Run the check command with bash, whatever the episode's policy was: the
        model acts no more, so a policy entry may allow everything now."""
        with contextlib.suppress(*CLIENT_FAILURES):  # the check reports it as well
            self.tools.trajectory.set_policy(step="check")
        return self.tools.run("bash", {"command": self.check_command})

    def close(self) -> None:
        """Close the trajectory (after its calls) and the client the env made, that
        one even when the trajectory's close fails."""
        try:
            self.tools.close()
        finally:
            self._resources.close()


def _info(outcome: ToolOutcome | None) -> dict[str, Any]:
    if outcome is None:
        return {}
    return {"tool": outcome.tool, "error_code": outcome.error_code, "infra": outcome.infra}


def _plain(value: Any) -> Any:
    """omegaconf sections (how SkyRL passes configs) as plain dicts and lists."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def _config(env_config: ToolqEnvConfig | Mapping[str, Any] | None) -> ToolqEnvConfig:
    if isinstance(env_config, ToolqEnvConfig):
        return env_config
    given = dict(_plain(env_config or {}))
    # SkyRL hands every env the same kind of section: keys meant for others are ignored
    return ToolqEnvConfig(
        **{f.name: given[f.name] for f in fields(ToolqEnvConfig) if f.name in given}
    )


def _check_command(extras: Mapping[str, Any]) -> str:
    check = (extras.get("reward_spec") or {}).get("check")
    if not isinstance(check, str) or not check.strip():
        raise ValueError("toolq/bash needs extras['reward_spec']['check']: a bash command")
    return check
