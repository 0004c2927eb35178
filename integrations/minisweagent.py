"""mini-swe-agent on toolq: an environment whose commands are calls of one trajectory.

    # mini.yaml, or -c on the `mini` command line
    environment:
      environment_class: toolq.integrations.minisweagent.ToolqEnvironment
      redis_url: redis://queue:6379/0
      image: python:3.12
      timeout: 60

One environment is one toolq trajectory: it opens at construction (and waits
for its sandbox, as mini-swe-agent's ``DockerEnvironment`` waits for its
container) and closes at ``cleanup``. Each ``execute`` is one ``bash`` call in
that sticky sandbox (a fresh shell per command, as mini-swe-agent runs them),
so files persist from one command to the next and nothing pays a ``docker
exec``. The result is the dict mini-swe-agent's environments return
(``output``, ``returncode``, ``exception_info``), and a first output line
``COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT`` submits, as theirs do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shlex
import time
import uuid
from typing import Any

from minisweagent.exceptions import Submitted
from minisweagent.utils.serialize import recursive_merge
from pydantic import BaseModel, ConfigDict, Field

from toolq.producer import Client, TrajectoryEnded, UnknownTrajectory, spec_wait_s
from toolq.producer.model_calls import CLIENT_FAILURES
from toolq.schemas import TRAJ_ID_PATTERN, Result, TrajectorySpec

__all__ = ["ToolqEnvironment", "ToolqEnvironmentConfig"]

#: The first output line that submits (mini-swe-agent's environments look for it).
SUBMIT_LINE = "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"


class ToolqEnvironmentConfig(BaseModel):
    """``environment:`` of a mini-swe-agent config naming ``ToolqEnvironment``."""

    model_config = ConfigDict(extra="forbid")

    redis_url: str | None = None
    """toolq's Redis; None: ``TOOLQ_REDIS_URL``, else a local ``toolq worker``'s embedded one."""
    namespace: str = "toolq"
    image: str | None = None
    """The sandbox image (the spec's ``image``); None: the spec's, else the workers' default."""
    cwd: str = ""
    """Where commands run: a path in the workspace or an absolute one; "": the working
    directory (the spec's ``workdir``, else the workspace)."""
    env: dict[str, str] = {}
    """Environment variables of the sandbox (added to the spec's ``env``)."""
    forward_env: list[str] = []
    """Variables of this process's environment to set in the sandbox too, when set
    (``env`` wins on a conflict), as mini-swe-agent's ``DockerEnvironment`` does."""
    timeout: int = 30
    """Each command's timeout, in seconds (capped by the spec's ``max_call_timeout_s``)."""
    spec: dict[str, Any] = {}
    """The rest of the trajectory spec: limits, network, labels, ..."""
    trajectory_id: str | None = Field(None, pattern=rf"^{TRAJ_ID_PATTERN}$")
    """The trajectory to open; None: ``<trajectory_prefix>-<random hex>``."""
    trajectory_prefix: str = Field("mini", pattern=r"^[A-Za-z0-9._:-]{1,100}$")
    startup_timeout_s: float = Field(180.0, gt=0)
    """How long the constructor waits for a worker to start the sandbox."""
    wait_slack_s: float = Field(60.0, gt=0)
    """How long a command may wait for its result beyond its own timeout (queueing)."""

    def trajectory_spec(self) -> TrajectorySpec:
        """The trajectory's spec: ``spec`` with ``image`` and the environment variables."""
        forwarded = {k: v for k in self.forward_env if (v := os.environ.get(k)) is not None}
        spec = dict(self.spec)
        spec["env"] = {**spec.get("env", {}), **forwarded, **self.env}
        if self.image is not None:
            spec["image"] = self.image
        return TrajectorySpec.model_validate(spec)


class ToolqEnvironment:
    """mini-swe-agent's ``Environment`` protocol on one toolq trajectory."""

    def __init__(
        self,
        *,
        config_class: type[ToolqEnvironmentConfig] = ToolqEnvironmentConfig,
        logger: logging.Logger | None = None,
        **kwargs: Any,
    ) -> None:
        self.logger = logger or logging.getLogger("minisweagent.environment")
        self.config = config_class(**kwargs)
        self.spec = self.config.trajectory_spec()
        self.trajectory_id = self.config.trajectory_id or (
            f"{self.config.trajectory_prefix}-{uuid.uuid4().hex[:16]}"
        )
        self.client: Client | None = Client(self.config.redis_url, self.config.namespace)
        try:
            self._open()
        except BaseException:
            self.client.redis.close()
            self.client = None
            raise

    def _open(self) -> None:
        assert self.client is not None
        status = self.client.open(self.trajectory_id, self.spec)
        if status != "new":
            raise RuntimeError(f"trajectory {self.trajectory_id!r} is open already ({status})")
        deadline = time.monotonic() + self.config.startup_timeout_s
        pause_s = 0.02
        while True:  # wait for the sandbox, as DockerEnvironment waits for its container
            record = self.client.record(self.trajectory_id)
            if record is not None and record.status.final:
                why = f"{record.status.value}: {record.reason}"
                raise RuntimeError(f"trajectory {self.trajectory_id!r} {why}")
            if record is not None and record.sandbox:
                self.logger.info("toolq trajectory %s has its sandbox", self.trajectory_id)
                return
            if time.monotonic() >= deadline:
                self.client.cancel(self.trajectory_id)
                raise RuntimeError(
                    f"no sandbox for trajectory {self.trajectory_id!r} after "
                    f"{self.config.startup_timeout_s}s: is a toolq worker serving namespace "
                    f"{self.config.namespace!r}?"
                )
            time.sleep(pause_s)
            pause_s = min(pause_s * 2, 0.5)

    def execute(
        self, action: dict[str, Any], cwd: str = "", *, timeout: int | None = None
    ) -> dict[str, Any]:
        """Run ``action["command"]`` with bash in the sandbox; mini-swe-agent's result
        dict. A timeout, a failure of toolq or of Redis is ``returncode`` -1 with the
        reason in ``exception_info`` (and ``extra``), as mini-swe-agent reports its own."""
        command = str(action.get("command", ""))
        timeout_s = timeout or self.config.timeout
        where = cwd or self.config.cwd
        script = f"cd -- {shlex.quote(where)} || exit 1\n{command}" if where else command
        try:
            result = self._call(script, timeout_s)
        except CLIENT_FAILURES as exc:
            output = _failed("", f"{type(exc).__name__}: {exc}", type(exc).__name__, str(exc))
        else:
            output = _result_dict(result, command, timeout_s)
        self._check_finished(output)
        return output

    def _call(self, script: str, timeout_s: float) -> Result:
        if self.client is None:
            raise RuntimeError("the environment was cleaned up")
        wait_s = spec_wait_s(self.spec, timeout_s, margin_s=self.config.wait_slack_s)
        return self.client.call(
            self.trajectory_id, "bash", {"command": script}, timeout_s=timeout_s, wait_s=wait_s
        )

    def _check_finished(self, output: dict[str, Any]) -> None:
        """Raise ``Submitted`` when the output's first line asks to submit."""
        lines = output.get("output", "").lstrip().splitlines(keepends=True)
        if lines and lines[0].strip() == SUBMIT_LINE and output["returncode"] == 0:
            submission = "".join(lines[1:])
            raise Submitted(
                {
                    "role": "exit",
                    "content": submission,
                    "extra": {"exit_status": "Submitted", "submission": submission},
                }
            )

    def get_template_vars(self, **kwargs: Any) -> dict[str, Any]:
        """The config, the platform and ``kwargs``, for the prompt templates."""
        merged: dict[str, Any] = recursive_merge(
            self.config.model_dump(), platform.uname()._asdict(), kwargs
        )
        return merged

    def serialize(self) -> dict[str, Any]:
        """What mini-swe-agent saves of the environment in a trajectory file."""
        return {
            "info": {
                "config": {
                    "environment": self.config.model_dump(mode="json"),
                    "environment_type": f"{self.__class__.__module__}.{self.__class__.__name__}",
                    "toolq_trajectory": self.trajectory_id,
                }
            }
        }

    def cleanup(self) -> None:
        """Close the trajectory (its sandbox is freed) after the commands sent."""
        client, self.client = self.client, None
        if client is None:
            return
        with contextlib.suppress(TrajectoryEnded, UnknownTrajectory, *CLIENT_FAILURES):
            client.close(self.trajectory_id)
        client.redis.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.cleanup()


def _result_dict(result: Result, command: str, timeout_s: float) -> dict[str, Any]:
    if result.timed_out:
        why = f"Command '{command}' timed out after {timeout_s:g} seconds"
        return _failed(result.output, why, "TimeoutExpired", why)
    if result.error_code not in (None, "exit_status"):
        why = f"toolq {result.error_code}: {result.error}"
        return _failed(result.output, why, "ToolqError", why)
    code = result.exit_code if result.exit_code is not None else -1
    return {"output": result.output, "returncode": code, "exception_info": ""}


def _failed(output: str, why: str, kind: str, detail: str) -> dict[str, Any]:
    return {
        "output": output,
        "returncode": -1,
        "exception_info": f"An error occurred while executing the command: {why}",
        "extra": {"exception_type": kind, "exception": detail},
    }
