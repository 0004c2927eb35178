"""SWE-ReX on toolq: a runtime and a deployment whose sandboxes are toolq trajectories.

    from toolq.integrations.swerex import ToolqDeployment

    deployment = ToolqDeployment(redis_url="redis://queue:6379/0",
                                 spec={"image": "python:3.12", "limits": {"call_timeout_s": 120}})
    await deployment.start()                       # opens a trajectory, waits for its sandbox
    runtime = deployment.runtime                   # a swerex AbstractRuntime
    await runtime.create_session(CreateBashSessionRequest())
    obs = await runtime.run_in_session(BashAction(command="ls", check="silent"))
    await deployment.stop()                        # closes the trajectory

A deployment is one trajectory (start opens it, stop closes it); a bash session
is a ``shell`` session of it; ``execute`` is a ``bash`` call; files go through
``read_file``/``write_file``. ``docs/integrations.md`` (SWE-ReX) has the full map,
the paths and the exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from swerex.deployment.abstract import AbstractDeployment
from swerex.deployment.hooks.abstract import CombinedDeploymentHook, DeploymentHook
from swerex.exceptions import DeploymentNotStartedError, DeploymentStartupError
from swerex.runtime.abstract import IsAliveResponse
from swerex.utils.log import get_logger

from toolq.producer import AsyncClient, AsyncTrajectory, TrajectoryEnded, UnknownTrajectory
from toolq.schemas import TRAJ_ID_PATTERN, TrajectorySpec

from .swerex_errors import PathOutsideWorkspaceError, ToolqRuntimeError, UnsupportedActionError
from .swerex_runtime import ToolqRuntime

__all__ = [
    "PathOutsideWorkspaceError",
    "ToolqDeployment",
    "ToolqDeploymentConfig",
    "ToolqRuntime",
    "ToolqRuntimeError",
    "UnsupportedActionError",
]


class ToolqDeploymentConfig(BaseModel):
    """Configuration of a ``ToolqDeployment``: where toolq is and what to open."""

    redis_url: str | None = None
    """toolq's Redis; None: ``TOOLQ_REDIS_URL``, else a local ``toolq worker``'s embedded one."""
    namespace: str | None = None
    """toolq's key namespace (the workers'); None: ``TOOLQ_NAMESPACE``, else ``toolq``."""
    trajectory_id: str | None = Field(None, pattern=rf"^{TRAJ_ID_PATTERN}$")
    """The trajectory to open; None: ``<trajectory_prefix>-<random hex>``."""
    trajectory_prefix: str = Field("swerex", pattern=r"^[A-Za-z0-9._:-]{1,100}$")
    spec: TrajectorySpec = Field(default_factory=TrajectorySpec)
    """The trajectory spec: image, env, workdir, limits, tool policy, labels."""
    workspace_root: str = "/workspace"
    """The absolute path that stands for the workspace in file requests."""
    startup_timeout_s: float = Field(180.0, gt=0)
    """How long ``start`` waits for a worker to start the sandbox."""
    wait_slack_s: float = Field(60.0, gt=0)
    """How long a call may wait beyond its own timeout (queueing) before ``WaitTimeout``."""

    type: Literal["toolq"] = "toolq"
    """Discriminator for (de)serialization/CLI, as swe-rex's configs have. Do not change."""

    model_config = ConfigDict(extra="forbid")

    def get_deployment(self) -> ToolqDeployment:
        """A deployment of this configuration (not started: see ``start``)."""
        return ToolqDeployment.from_config(self)


class ToolqDeployment(AbstractDeployment):
    """A SWE-ReX deployment whose lifetime is one toolq trajectory: ``start`` opens
    it and waits until a worker has started its sandbox, ``stop`` closes it."""

    def __init__(
        self,
        *,
        logger: logging.Logger | None = None,
        client: AsyncClient | None = None,
        **kwargs: Any,
    ) -> None:
        """``kwargs``: the fields of ``ToolqDeploymentConfig``. ``client``: an
        ``AsyncClient`` to share with other deployments of the same event loop (its
        ``redis_url`` and ``namespace`` then apply); without, every operation
        connects on its own (see ``ToolqRuntime``)."""
        self._config = ToolqDeploymentConfig(**kwargs)
        self._client = client
        self.logger = logger or get_logger("rex-deploy")
        self._hooks = CombinedDeploymentHook()
        self._runtime: ToolqRuntime | None = None
        self.trajectory_id = self._config.trajectory_id or (
            f"{self._config.trajectory_prefix}-{uuid.uuid4().hex[:16]}"
        )

    @classmethod
    def from_config(cls, config: ToolqDeploymentConfig) -> ToolqDeployment:
        """A deployment of ``config`` (each operation connects on its own)."""
        return cls(**config.model_dump(exclude={"type"}))

    def add_hook(self, hook: DeploymentHook) -> None:
        """Add a SWE-ReX deployment hook: ``start`` reports its steps to it (opening
        the trajectory, waiting for the sandbox)."""
        self._hooks.add_hook(hook)

    async def is_alive(self, *, timeout: float | None = None) -> IsAliveResponse:
        """Whether its trajectory is open (False before ``start`` and after ``stop``)."""
        if self._runtime is None:
            return IsAliveResponse(is_alive=False, message="Runtime is None.")
        return await self._runtime.is_alive(timeout=timeout)

    async def start(self) -> None:
        """Open the trajectory and wait (``startup_timeout_s``) for its sandbox;
        ``DeploymentStartupError`` if it does not come up (the trajectory is cancelled)
        or its id is taken: open already (left alone) or used before."""
        config = self._config
        runtime = ToolqRuntime(
            self.trajectory_id,
            spec=config.spec,
            redis_url=config.redis_url,
            namespace=config.namespace,
            client=self._client,
            workspace_root=config.workspace_root,
            wait_slack_s=config.wait_slack_s,
            logger=self.logger,
        )
        async with runtime.connected() as trajectory:
            await self._open(trajectory)
        self._runtime = runtime
        self.logger.info("toolq trajectory %s started", self.trajectory_id)

    async def _open(self, trajectory: AsyncTrajectory) -> None:
        self._hooks.on_custom_step("Opening toolq trajectory")
        try:
            status = await trajectory.open()
        except TrajectoryEnded as exc:
            raise DeploymentStartupError(str(exc)) from exc
        if status != "new":  # someone else's: neither joined nor cancelled
            raise DeploymentStartupError(
                f"trajectory {trajectory.traj_id!r} is open already ({status}): a deployment "
                "starts a trajectory of its own, under an id not used before"
            )
        self._hooks.on_custom_step("Waiting for the sandbox")
        try:
            await wait_for_sandbox(trajectory, self._config.startup_timeout_s)
        except BaseException:
            await trajectory.cancel()  # so that no worker starts it later
            raise

    async def stop(self) -> None:
        """Close the trajectory after its calls (its sandbox and shell sessions are
        freed)."""
        runtime, self._runtime = self._runtime, None
        if runtime is None:
            return
        # A trajectory that ended by itself (a limit, a cancel) has nothing to free.
        async with runtime.connected() as trajectory:
            with contextlib.suppress(TrajectoryEnded, UnknownTrajectory):
                await trajectory.close()

    def __del__(self) -> None:
        # swe-rex's own __del__ runs stop() in a fresh event loop, where a shared
        # client cannot work: say what becomes of the trajectory instead.
        if getattr(self, "_runtime", None) is not None:
            self.logger.warning(
                "ToolqDeployment of trajectory %s dropped without stop(): its worker ends "
                "it after the spec's limits.idle_timeout_s",
                self.trajectory_id,
            )

    @property
    def runtime(self) -> ToolqRuntime:
        """The runtime; ``DeploymentNotStartedError`` before ``start``."""
        if self._runtime is None:
            raise DeploymentNotStartedError()
        return self._runtime


async def wait_for_sandbox(trajectory: AsyncTrajectory, timeout_s: float) -> None:
    """Wait until a worker has started the trajectory's sandbox (its record names
    one); ``DeploymentStartupError`` if the trajectory ends first or time runs out."""
    deadline = time.monotonic() + timeout_s
    pause_s = 0.02
    while True:
        record = await trajectory.record()
        if record is not None and record.status.final:
            raise DeploymentStartupError(
                f"trajectory {trajectory.traj_id!r} {record.status.value}: {record.reason}"
            )
        if record is not None and record.sandbox:
            return
        if time.monotonic() >= deadline:
            status = record.status.value if record is not None else "unknown"
            raise DeploymentStartupError(
                f"no sandbox for trajectory {trajectory.traj_id!r} after {timeout_s}s "
                f"(status {status}): is a toolq worker serving namespace "
                f"{trajectory.client.keys.ns!r}?"
            )
        await asyncio.sleep(pause_s)
        pause_s = min(pause_s * 2, 0.5)
