"""SkyRL-Gym on toolq: a ``ToolGroup`` whose tools run in one toolq trajectory.

    from toolq.producer import Client
    from toolq.integrations.skyrl import ToolqToolGroup

    group = ToolqToolGroup(Client(), "episode-17", {"image": "python:3.12-slim"})
    env.init_tool_groups([group])                        # in a BaseTextEnv
    env._execute_tool("toolq", "bash", [{"command": "ls"}])  # the output, as text
    group.close()                                        # frees the sandbox

The group's tools are the ones workers publish (``bash``, ``shell``,
``read_file``, ``write_file``, ...), less those the spec's policy refuses,
discovered from Redis when the group is made. A tool takes one argument, a dict
(or JSON text, as a model wrote it), or keywords. What it returns is what the
model reads: the output, then ``[error_code] error`` when the call failed.
Failures never raise: the worker's error codes and the client's own
(``toolq.producer.model_calls.CLIENT_ERRORS``: ``wait_timeout``,
``redis_unreachable``, ...) come back as that text, so one bad call never ends
a rollout. ``last`` holds the latest call's ``ToolOutcome`` (its code, and
``infra`` when toolq, not the model, is to blame: a trainer masks such rollouts).

Importing this module registers the example environment ``toolq/bash``
(``toolq.integrations.skyrl_env.ToolqBashEnv``) with ``skyrl_gym``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

import skyrl_gym
from skyrl_gym.tools.core import ToolGroup

from toolq.producer import (
    Client,
    Result,
    ToolqError,
    TrajectoryEnded,
    TrajectorySpec,
    UnknownTrajectory,
    spec_wait_s,
)
from toolq.producer.model_calls import CLIENT_FAILURES, client_failure, result_text
from toolq.producer.tools import openai_spec, permitted

__all__ = ["ENV_ID", "ToolOutcome", "ToolqToolGroup"]

#: The example environment's id in skyrl_gym's registry.
ENV_ID = "toolq/bash"


@dataclass(frozen=True)
class ToolOutcome:
    """One tool call as the environment sees it."""

    tool: str
    observation: str  #: what the model reads
    error_code: str | None = None  #: None when the call succeeded
    infra: bool = False  #: toolq, not the model, is to blame (mask, don't train on it)
    result: Result | None = None  #: None when no result came back (a client-side failure)


def outcome_of(tool: str, result: Result) -> ToolOutcome:
    """A result as an outcome (its text is what ``run_openai`` would send a model)."""
    code = None if result.ok else (result.error_code or "failed")
    return ToolOutcome(tool, result_text(result), code, result.infra, result)


def failure(tool: str, exc: BaseException) -> ToolOutcome:
    """A client-side failure (``model_calls.client_failure``) as an outcome:
    ``[code] message``, like a result's error."""
    failed = client_failure(exc)
    return ToolOutcome(tool, failed.text, failed.code, failed.infra)


class ToolqToolGroup(ToolGroup):
    """A SkyRL-Gym ``ToolGroup`` bound to one toolq trajectory.

    The trajectory opens at ``open()`` (or the first call) with ``spec`` and
    closes at ``close()``. ``wait_s`` bounds each call's wait for its result;
    by default it is the longest a call may run (the spec's
    ``max_call_timeout_s``) plus a margin, so a missing result means toolq is
    in trouble, not that a command ran long. Raises ``ToolqError`` when no
    worker has published tools in the client's namespace.
    """

    def __init__(
        self,
        client: Client,
        traj_id: str,
        spec: TrajectorySpec | dict[str, Any] | None = None,
        *,
        name: str = "toolq",
        wait_s: float | None = None,
    ) -> None:
        self.trajectory = client.trajectory(traj_id, spec)
        policy = self.trajectory.spec or TrajectorySpec()
        # the client's own default (a minute past the call's timeout argument) knows
        # neither the spec's limits nor a tool's timeout_s argument
        self.wait_s = spec_wait_s(policy) if wait_s is None else wait_s
        self.opened = False
        self.last: ToolOutcome | None = None
        super().__init__(name)
        published = client.tools()
        if not published:
            raise ToolqError(
                f"no tools published in namespace {client.keys.ns!r}: start a toolq worker there"
            )
        self.tool_infos = permitted(published, policy)
        for info in self.tool_infos:
            self._tool_registry[info.name] = self._bound(info.name)

    @property
    def traj_id(self) -> str:
        """The id of the group's trajectory."""
        return self.trajectory.traj_id

    def _bound(self, tool: str) -> Any:
        return lambda *args, **kwargs: self.call(tool, *args, **kwargs)

    # ----------------------------------------------------------- lifecycle
    def open(self) -> str:
        """Open the trajectory (see ``Client.open``); returns its status."""
        status = self.trajectory.open()
        self.opened = True
        return status

    def close(self) -> None:
        """Close the trajectory after its calls, freeing its sandbox; a no-op when it
        was never opened, has ended by itself (a limit, say) or expired. A close
        that fails raises, and ``close`` may be called again."""
        if not self.opened:
            return
        with contextlib.suppress(TrajectoryEnded, UnknownTrajectory):
            self.trajectory.close()
        self.opened = False

    # --------------------------------------------------------------- calls
    def execute_tool(self, name: str, *args: Any, **kwargs: Any) -> str:
        """SkyRL's entry point (``BaseTextEnv._execute_tool`` calls it). A name the
        group does not list (an alias, a blocked or unknown tool) is sent to toolq
        as well: the worker's answer (``unknown_tool``, ``tool_blocked``) is the
        observation, where SkyRL's own groups would raise."""
        tool = self.get_tool(name)
        if tool is None:
            return self.call(name, *args, **kwargs)
        return str(tool(*args, **kwargs))

    def call(self, tool: str, args: Any = None, /, **kwargs: Any) -> str:
        """Run one call and return what the model reads; ``last`` keeps its outcome.

        ``args`` is a dict, JSON text (text that is no JSON object is answered
        ``invalid_args``), or None with the arguments as keywords.
        """
        self.last = self.run(tool, _arguments(args, kwargs))
        return self.last.observation

    def run(self, tool: str, args: dict[str, Any] | str | None) -> ToolOutcome:
        """Run one call in the trajectory (opening it first if need be)."""
        try:
            if not self.opened:
                self.open()
            result = self.trajectory.call(tool, args, wait_s=self.wait_s)
        except CLIENT_FAILURES as exc:
            return failure(tool, exc)
        return outcome_of(tool, result)

    def tool_specs(self) -> list[dict[str, Any]]:
        """OpenAI function specs of the group's tools (for a prompt or a chat template)."""
        return [openai_spec(t) for t in self.tool_infos]


def _arguments(args: Any, kwargs: dict[str, Any]) -> dict[str, Any] | str | None:
    if kwargs:
        if args is not None:
            raise TypeError(
                "give the arguments as one dict (or JSON text) or as keywords, not both"
            )
        return kwargs
    if args is None or isinstance(args, dict | str):
        return args
    return json.dumps(args)  # a list or a number the model wrote: the worker says invalid_args


if ENV_ID not in skyrl_gym.registry:  # importing this module again must not fail
    skyrl_gym.register(id=ENV_ID, entry_point="toolq.integrations.skyrl_env:ToolqBashEnv")
