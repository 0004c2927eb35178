"""The backend interface: *where* tool calls run. *What* runs is the agent's job.

A backend hands out slots. A slot is one workspace served by one in-sandbox
agent (a container for Docker, a subprocess for local); several slots may share
one agent when packing is on.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from toolq.schemas import ErrorCode, TrajectorySpec

from ..channel import AgentChannel, EventHandler
from ..metrics import Observer


class SandboxError(RuntimeError):
    """A slot could not be started (bad image, no python3, engine error)."""

    #: The error code the trajectory's waiting calls are answered with.
    code = ErrorCode.SANDBOX_ERROR


@dataclass
class Slot:
    """One trajectory's workspace and the agent that serves it."""

    slot_id: str  # unique in the worker, shown in results (`slot`)
    name: str  # the agent's name for the workspace; unique in the worker too
    root: str  # workspace path as the agent sees it
    channel: AgentChannel
    sandbox_id: str = ""  # container id / process id
    adopted: bool = False  # True when it reuses a workspace a previous owner left
    #: The emulators of its terminals (``worker/terminals.py``): they go with the agent.
    terminals: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrajState:
    """What a trajectory's record says, for a backend deciding about a left-over sandbox."""

    status: str  # pending | running | a final status
    owner: str = ""
    slot: str = ""  # the slot id of its last slot (``Slot.slot_id``)
    last_activity_ms: int = 0
    idle_timeout_s: float = 900.0


class Backend(abc.ABC):
    """Starts and stops sandboxes; the worker never looks inside one."""

    name: str = "abstract"
    #: Called with every unsolicited agent message (``{"event": ..., "slot": ...}``);
    #: the worker sets it before ``start()``. Backends pass it to each AgentChannel.
    on_event: EventHandler | None = None
    #: Lifecycle hooks (``container_started(seconds)``, ``container_removed()``,
    #: ``container_lost()``); the worker sets its metrics observer before ``start()``.
    observer: Observer = Observer()
    #: Returns every registered worker id -> its last heartbeat (unix ms); the
    #: worker sets it before ``start()`` so a backend can find dead workers' sandboxes.
    worker_heartbeats: Callable[[], Awaitable[dict[str, int]]] | None = None
    #: Returns the records of the given trajectories (missing records left out); the
    #: worker sets it before ``start()`` so a backend can keep sandboxes that wait for
    #: a trajectory's next owner and remove those of ended ones.
    trajectory_states: Callable[[list[str]], Awaitable[dict[str, TrajState]]] | None = None

    #: The engine's images (``docker_images.EngineImages``) where the backend has
    #: images; None: every open is alike to it (``worker/images.py`` stays off).
    images: Any = None

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Prepare (e.g. remove sandboxes left by dead workers)."""

    @abc.abstractmethod
    async def acquire(self, traj_id: str, spec: TrajectorySpec) -> Slot:
        """Start (or reuse) a sandbox and create the trajectory's workspace."""

    @abc.abstractmethod
    async def release(self, slot: Slot, *, keep: bool = False) -> None:
        """Delete the workspace and stop the sandbox when no slot uses it.

        ``keep=True`` hands the sandbox over (worker restart) instead: where the
        backend can, it leaves it for the trajectory's next owner to adopt.
        """

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop everything this backend started."""
