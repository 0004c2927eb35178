"""What a toolq container is: its configuration, user, payload and labels.

Pure data and functions (no engine calls): ``box_config`` turns a spec into
the container's limits, capped by the worker's maxima; ``pick_user`` chooses
who the agent runs as; ``payload_tar`` is what is copied in; ``Box`` is one
container as the backend tracks it.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import socket
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any

from toolq.schemas import DEFAULT_IMAGE, FINAL_STATUSES, TrajectorySpec

from ..channel import AgentChannel
from ..settings import WorkerSettings
from .agent_app import agent_zipapp
from .base import SandboxError, TrajState
from .docker_runtime import pick_runtime
from .docker_stream import ExecStream

AGENT_PATH = "/opt/toolq/agent.pyz"  # inside the container: agent_app.agent_zipapp()
WORKSPACE = "/workspace"
# With ``disk_mb``, tmpfs mounts of that size like the workspace: the directories
# every user may write to in any image (the sandbox user's home is not among
# them: a tmpfs would hide what the image keeps there).
SCRATCH = ("/tmp", "/var/tmp")


def home_mount(user: SandboxUser) -> str:
    """The sandbox user's home when ``disk_mb`` makes it a tmpfs too ('' when not:
    root's, none, or already inside a bounded mount). The tmpfs would hide what
    the image keeps there, so the agent copies that in as it starts (``--seed-home``)."""
    home = os.path.normpath(user.home) if user.home.startswith("/") else ""
    covered = (WORKSPACE, *SCRATCH)
    if (
        user.uid == 0
        or home in ("", "/")
        or any(home == m or home.startswith(m + "/") for m in covered)
    ):
        return ""
    return home


LABEL_MANAGED = "toolq.managed"
LABEL_NS = "toolq.ns"
LABEL_WORKER = "toolq.worker"
LABEL_TRAJ = "toolq.traj"
LABEL_POOL = "toolq.pool"  # "warm" for containers started ahead of demand
LABEL_RUNTIME = "toolq.runtime"  # a trajectory adopts only a container of its runtime
# Appended to a container's name when it is first recycled: its labels (set at
# create) still name its first trajectory, which must never adopt it.
RECYCLED_SUFFIX = "-recycled"

READY_TIMEOUT_S = 60.0  # agent start (python3 import time on a loaded host)
#: An agent that copies the image's home in first (--seed-home) gets this much more
#: time to say ready per byte of the home's tar (a slow unpack on a loaded host).
SEED_BYTES_PER_S = 5_000_000
INIT_TIMEOUT_S = 30.0
DROP_TIMEOUT_S = 10.0
FAILED_REFILL_PAUSE_S = 5.0
#: An open that takes a warm container has the pool topped up this much later, not
#: at once: a burst of opens (a fork's copies unpacking their files, a wave of
#: trajectories' first calls) does not share the two cores with the containers that
#: refill it (a fork into 8: 0.74-0.83 s with the refill at once, 0.59-0.64 s with it
#: 1.5 s later; bench/notes.md).
REFILL_DELAY_S = 1.0

SLEEP_COMMAND = ["sleep", "infinity"]
# PID 1 when docker-init is missing (or `sleep infinity` is not supported): it
# must reap orphans, or killed tool processes pile up as zombies against the
# pids limit.
PYTHON_INIT = (
    "import os, signal\n"
    "def reap(*_):\n"
    "    try:\n"
    "        while os.waitpid(-1, os.WNOHANG)[0] > 0: pass\n"
    "    except ChildProcessError: pass\n"
    "signal.signal(signal.SIGCHLD, reap)\n"
    "signal.signal(signal.SIGTERM, lambda *_: os._exit(0))\n"
    "while True: signal.pause()\n"
)
PYTHON_INIT_COMMAND = ["python3", "-c", PYTHON_INIT]

# --------------------------------------------------------------------------
# container configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class BoxConfig:
    """What a container is started with; trajectories with equal configs may share one."""

    image: str
    cpus: float
    memory_mb: int
    pids: int
    network: bool
    disk_mb: int | None = None  # /workspace, /tmp, /var/tmp as tmpfs of this size each
    runtime: str = "runc"  # the Docker runtime (runsc: gVisor); never mixed in one pool


def box_config(spec: TrajectorySpec, settings: WorkerSettings) -> BoxConfig:
    """The container config a spec asks for, capped by the worker's maxima."""
    limits = spec.limits
    if limits.network and not settings.allow_network:
        raise SandboxError("the spec asks for network access but this worker has allow_network off")
    return BoxConfig(
        image=spec.image or settings.default_image,
        cpus=min(limits.cpus or settings.max_cpus, settings.max_cpus),
        memory_mb=min(limits.memory_mb or settings.max_memory_mb, settings.max_memory_mb),
        pids=min(limits.pids or settings.max_pids, settings.max_pids),
        network=limits.network,
        disk_mb=_capped(limits.disk_mb or settings.default_disk_mb or None, settings.max_disk_mb),
        runtime=pick_runtime(spec, settings),
    )


def _capped(wanted: int | None, cap: int | None) -> int | None:
    """``wanted`` capped by ``cap``; either may be unset (``cap`` alone applies too)."""
    if wanted and cap:
        return min(wanted, cap)
    return wanted or cap


@dataclass(frozen=True)
class SandboxUser:
    """Who the agent runs as, and who owns ``/workspace``; ``home``: its home
    directory in the image's /etc/passwd ('' when it has none)."""

    uid: int
    gid: int
    home: str = ""

    @property
    def spec(self) -> str:
        return f"{self.uid}:{self.gid}"


def pick_user(passwd: str, image_user: str = "") -> SandboxUser:
    """The image's non-root ``USER``, else ``sandbox``, else uid 1000, else root."""
    entries: dict[str, tuple[int, int, str]] = {}
    for line in passwd.splitlines():
        parts = line.split(":")
        if len(parts) >= 4 and parts[2].isdigit() and parts[3].isdigit():
            home = parts[5] if len(parts) >= 6 else ""
            entries[parts[0]] = (int(parts[2]), int(parts[3]), home)
    name, _, group = image_user.partition(":")
    if name and name not in ("root", "0"):
        if name.isdigit():
            uid = int(name)
            gid = (
                int(group)
                if group.isdigit()
                else next((g for u, g, _h in entries.values() if u == uid), uid)
            )
            home = next((h for u, _g, h in entries.values() if u == uid), "")
            return SandboxUser(uid, gid, home)
        if name in entries:
            return SandboxUser(*entries[name])
    if "sandbox" in entries:
        return SandboxUser(*entries["sandbox"])
    for uid, gid, home in entries.values():
        if uid == 1000:
            return SandboxUser(uid, gid, home)
    return SandboxUser(0, 0)


def payload_tar(
    user: SandboxUser, workspace: bool = True, files: dict[str, bytes] | None = None
) -> bytes:
    """The agent (its zipapp) plus (``workspace``) a ``/workspace`` of the sandbox user
    and ``files`` (path -> bytes, readable by all), one tar.

    An adopted container gets the agent only (a newer worker may bring a newer
    one): its workspace is there already.
    """
    agent = agent_zipapp()
    now_s = int(time.time())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(AGENT_PATH.lstrip("/"))
        info.size, info.mode, info.mtime = len(agent), 0o644, now_s
        tar.addfile(info, io.BytesIO(agent))  # parents are created by the engine
        for path, data in (files or {}).items():
            extra = tarfile.TarInfo(path.lstrip("/"))
            extra.size, extra.mode, extra.mtime = len(data), 0o644, now_s
            tar.addfile(extra, io.BytesIO(data))
        if workspace:
            ws = tarfile.TarInfo(WORKSPACE.lstrip("/"))
            ws.type, ws.mode, ws.mtime = tarfile.DIRTYPE, 0o755, now_s
            ws.uid, ws.gid = user.uid, user.gid  # applied to an existing /workspace too
            tar.addfile(ws)
    return buf.getvalue()


def no_python_message(image: str, detail: str) -> str:
    return f"image {image} has no python3 on PATH: the toolq agent needs Python >= 3.8 ({detail})"


def image_fix(image: str) -> str:
    """The command that puts ``image`` on the engine."""
    if image == DEFAULT_IMAGE:
        return f"docker build -t {image} deploy/sandbox  (in a toolq checkout)"
    return f"docker pull {image}  (or build it)"


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:60]


def api_message(exc: Exception) -> str:
    return str(getattr(exc, "explanation", None) or exc)


def labels_of(container: dict[str, Any]) -> dict[str, str]:
    return container.get("Labels") or {}


def is_recycled(container: dict[str, Any]) -> bool:
    """Has this container (as the engine lists it) served more than its first trajectory?"""
    return any(str(n).endswith(RECYCLED_SUFFIX) for n in container.get("Names") or [])


def awaits_adoption(
    container: dict[str, Any], states: dict[str, TrajState] | None, now_s: float
) -> bool:
    """Should a left-over container stay, for its trajectory's next owner to adopt?

    Yes while it runs and its trajectory may still come for it: pending (not
    idle past its ``idle_timeout_s``), or running with its last slot in this
    container (adopted, or being adopted) or not set yet. ``states`` None means
    the worker cannot tell: nothing waits.
    """
    traj = labels_of(container).get(LABEL_TRAJ)
    if not traj or states is None or container.get("State") != "running":
        return False
    if is_recycled(container):
        return False  # its label names a trajectory it no longer holds
    state = states.get(traj)
    if state is None or state.status in FINAL_STATUSES:
        return False  # ended, or its record is gone
    if state.status == "pending":
        return now_s - state.last_activity_ms / 1000.0 <= state.idle_timeout_s
    return not state.slot or state.slot.startswith(container["Id"][:12] + ":")


# --------------------------------------------------------------------------
# containers
# --------------------------------------------------------------------------


@dataclass(eq=False)
class Box:
    """One container and the agent process that serves its slots."""

    name: str
    config: BoxConfig
    traj: str = ""  # the trajectory it was started for ("" for warm and packed ones)
    pool: str = ""  # label: "warm" (started ahead), "packed", or "" (one trajectory)
    cid: str = ""
    slots: set[str] = field(default_factory=set)
    used: bool = False  # has served a slot: never handed out as warm again
    adopted: bool = False  # a previous owner's container, with a fresh agent
    # The engine's filesystem diff (path, kind) of the fresh container, before its
    # agent started: what a recycled one must match (recycling on only).
    baseline: frozenset[tuple[str, int]] | None = None
    closing: bool = False
    boot: asyncio.Task[None] | None = None
    stream: ExecStream | None = None
    channel: AgentChannel | None = None
    started_at: float = field(default_factory=time.monotonic)

    @property
    def ready(self) -> bool:
        return (
            self.boot is not None
            and self.boot.done()
            and not self.boot.cancelled()
            and (self.boot.exception() is None)
        )

    @property
    def dead(self) -> bool:
        """Booted, but its agent stream has ended (container died or was killed)."""
        return self.ready and self.channel is not None and not self.channel.alive


@dataclass
class Started:
    """What the blocking boot hands back to the event loop."""

    cid: str
    exec_id: str
    sock: socket.socket
    leftover: bytes
    seed_bytes: int = 0  # the home tar its agent copies in before it says ready
