"""Docker backend: sticky slots in long-lived containers, one agent process each.

A container runs ``sleep infinity`` (under docker-init, which reaps orphans) and
one agent process started by a single ``docker exec`` whose stdin/stdout stay
attached: every tool call is a JSON line over that stream (~2 ms), never a new
``docker exec`` (~70 ms).

- The spec picks image, env, workdir and limits; the worker's ``max_*``
  settings cap them. Containers get no network unless the spec asks for it
  (and ``allow_network`` permits), a memory limit without swap, a pids limit,
  no capabilities, ``no-new-privileges``, and run the agent as the image's
  non-root user (the image's ``USER``, else ``sandbox``, else uid 1000, else root).
- ``slots_per_container > 1`` packs trajectories of the same image and limits
  into one container (workspaces ``/workspace/<slot>``; the container's limits
  are the per-trajectory limits times the slots it holds). Packed slots share
  a uid and a kernel: they are separated by workspace path, not by a security
  boundary. With one slot per container the workspace is ``/workspace``.
- ``disk_mb`` (or the worker's ``max_disk_mb``) makes ``/workspace`` a tmpfs of
  that size: writes beyond it fail with "No space left on device". A tmpfs is
  memory: its pages are charged to the container's memory cgroup, so the
  container's memory limit is ``memory_mb + disk_mb`` and processes keep their
  ``memory_mb``. Without it the workspace lives in the container's writable
  layer, bounded only by the host's disk (overlay2 has no per-container quota
  unless its backing filesystem is xfs with pquota).
- ``warm_pool`` containers of the default image and limits are kept started.
- Containers are labelled ``toolq.managed``, ``toolq.ns``, ``toolq.worker`` and
  ``toolq.traj`` (empty for warm and packed ones).

Hand-over: ``release(keep=True)`` (a worker stopping while another is alive, or
one that lost its trajectory to another) leaves a trajectory's container
running and only ends its agent (stdin EOF: it kills its processes and exits);
a SIGKILLed worker's containers keep running the same way. The next owner's
``acquire`` finds the running container labelled with the trajectory and
*adopts* it: a fresh agent, the same ``/workspace``, so files survive (running
processes, shell sessions and background tasks do not). Warm and packed
containers carry no trajectory label and are not kept.

Sweeps (at start and every ``sweep_s``) remove this namespace's containers
that nobody will use again: those of dead workers without a trajectory label,
stopped ones, and kept ones whose trajectory has ended, lost its record, went
idle past its ``idle_timeout_s`` while pending, or runs in another container
now. A kept container of a pending or running trajectory waits for adoption.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
import os
import re
import socket
import tarfile
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from toolq.schemas import FINAL_STATUSES, TrajectorySpec

from ..channel import LINE_LIMIT_BYTES, AgentChannel, ChannelClosedError
from ..settings import WorkerSettings
from .base import Backend, SandboxError, Slot, TrajState

log = logging.getLogger("toolq.worker.docker")

AGENT_SOURCE_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "agent.py")
AGENT_PATH = "/opt/toolq/agent.py"  # inside the container
WORKSPACE = "/workspace"
LABEL_MANAGED = "toolq.managed"
LABEL_NS = "toolq.ns"
LABEL_WORKER = "toolq.worker"
LABEL_TRAJ = "toolq.traj"
LABEL_POOL = "toolq.pool"  # "warm" for containers started ahead of demand

READY_TIMEOUT_S = 60.0  # agent start (python3 import time on a loaded host)
INIT_TIMEOUT_S = 30.0
DROP_TIMEOUT_S = 10.0
FAILED_REFILL_PAUSE_S = 5.0
DIAG_BYTES = 4096

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
    disk_mb: int | None = None  # /workspace as a tmpfs of this size; None: the writable layer


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
        disk_mb=_capped(limits.disk_mb, settings.max_disk_mb),
    )


def _capped(wanted: int | None, cap: int | None) -> int | None:
    """``wanted`` capped by ``cap``; either may be unset (``cap`` alone applies too)."""
    if wanted and cap:
        return min(wanted, cap)
    return wanted or cap


@dataclass(frozen=True)
class SandboxUser:
    """Who the agent runs as, and who owns ``/workspace``."""

    uid: int
    gid: int

    @property
    def spec(self) -> str:
        return f"{self.uid}:{self.gid}"


def pick_user(passwd: str, image_user: str = "") -> SandboxUser:
    """The image's non-root ``USER``, else ``sandbox``, else uid 1000, else root."""
    entries: dict[str, tuple[int, int]] = {}
    for line in passwd.splitlines():
        parts = line.split(":")
        if len(parts) >= 4 and parts[2].isdigit() and parts[3].isdigit():
            entries[parts[0]] = (int(parts[2]), int(parts[3]))
    name, _, group = image_user.partition(":")
    if name and name not in ("root", "0"):
        if name.isdigit():
            uid = int(name)
            gid = (
                int(group)
                if group.isdigit()
                else next((g for u, g in entries.values() if u == uid), uid)
            )
            return SandboxUser(uid, gid)
        if name in entries:
            return SandboxUser(*entries[name])
    if "sandbox" in entries:
        return SandboxUser(*entries["sandbox"])
    for uid, gid in entries.values():
        if uid == 1000:
            return SandboxUser(uid, gid)
    return SandboxUser(0, 0)


def payload_tar(user: SandboxUser, workspace: bool = True) -> bytes:
    """The agent file plus (``workspace``) a ``/workspace`` owned by the sandbox user, as one tar.

    An adopted container gets the agent only (a newer worker may bring a newer
    one): its workspace is there already.
    """
    with open(AGENT_SOURCE_PATH, "rb") as fh:
        agent = fh.read()
    now_s = int(time.time())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(AGENT_PATH.lstrip("/"))
        info.size, info.mode, info.mtime = len(agent), 0o644, now_s
        tar.addfile(info, io.BytesIO(agent))  # parents are created by the engine
        if workspace:
            ws = tarfile.TarInfo(WORKSPACE.lstrip("/"))
            ws.type, ws.mode, ws.mtime = tarfile.DIRTYPE, 0o755, now_s
            ws.uid, ws.gid = user.uid, user.gid  # applied to an existing /workspace too
            tar.addfile(ws)
    return buf.getvalue()


def no_python_message(image: str, detail: str) -> str:
    return f"image {image} has no python3 on PATH: the toolq agent needs Python >= 3.8 ({detail})"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:60]


def _api_message(exc: Exception) -> str:
    return str(getattr(exc, "explanation", None) or exc)


def _labels(container: dict[str, Any]) -> dict[str, str]:
    return container.get("Labels") or {}


def _awaits_adoption(
    container: dict[str, Any], states: dict[str, TrajState] | None, now_s: float
) -> bool:
    """Should a left-over container stay, for its trajectory's next owner to adopt?

    Yes while it runs and its trajectory may still come for it: pending (not
    idle past its ``idle_timeout_s``), or running with its last slot in this
    container (adopted, or being adopted) or not set yet. ``states`` None means
    the worker cannot tell: nothing waits.
    """
    traj = _labels(container).get(LABEL_TRAJ)
    if not traj or states is None or container.get("State") != "running":
        return False
    state = states.get(traj)
    if state is None or state.status in FINAL_STATUSES:
        return False  # ended, or its record is gone
    if state.status == "pending":
        return now_s - state.last_activity_ms / 1000.0 <= state.idle_timeout_s
    return not state.slot or state.slot.startswith(container["Id"][:12] + ":")


# --------------------------------------------------------------------------
# the attached exec stream
# --------------------------------------------------------------------------


class ExecStream(asyncio.Protocol):
    """Docker's multiplexed exec stream, demultiplexed for an AgentChannel.

    With ``tty=False`` the engine wraps output in frames: an 8-byte header
    (stream type, 3 zero bytes, big-endian payload size) then the payload.
    Stdout payload feeds ``reader``; stderr lines go to the log. Writes go
    to the socket unframed (they are the agent's stdin).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.reader = asyncio.StreamReader(limit=LINE_LIMIT_BYTES)
        self.transport: asyncio.Transport | None = None
        self.stdout_head = bytearray()  # first bytes, to explain an agent that never starts
        self.stderr_tail = bytearray()
        self._buf = bytearray()
        self._stderr_line = bytearray()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.closed = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, sock: socket.socket, leftover: bytes, name: str) -> ExecStream:
        """Wrap a connected, hijacked socket (plus bytes already read from it)."""
        stream = cls(name)
        await asyncio.get_running_loop().create_connection(lambda: stream, sock=sock)
        if leftover:
            stream.data_received(leftover)
        return stream

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.reader.set_transport(transport)  # lets a full reader pause the socket

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= 8:
            size = int.from_bytes(buf[4:8], "big")
            if len(buf) < 8 + size:
                break
            kind, payload = buf[0], bytes(buf[8 : 8 + size])
            del buf[: 8 + size]
            if kind == 1:
                self._stdout(payload)
            elif kind == 2:
                self._stderr(payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reader.feed_eof()
        self._can_write.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- demultiplexed streams
    def _stdout(self, payload: bytes) -> None:
        if len(self.stdout_head) < DIAG_BYTES:
            self.stdout_head += payload[: DIAG_BYTES - len(self.stdout_head)]
        self.reader.feed_data(payload)

    def _stderr(self, payload: bytes) -> None:
        self.stderr_tail += payload
        del self.stderr_tail[:-DIAG_BYTES]
        self._stderr_line += payload
        *lines, rest = self._stderr_line.split(b"\n")
        self._stderr_line = bytearray(rest[-DIAG_BYTES:])
        for line in lines:
            log.warning("%s agent stderr: %s", self.name, line.decode("utf-8", "replace"))

    # -- writing
    async def write(self, data: bytes) -> None:
        """Send bytes to the agent's stdin (waits while the socket buffer is full)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("exec stream is closed")
        self.transport.write(data)
        await self._can_write.wait()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def diagnostics(self) -> str:
        """What the stream said before it ended (an engine error, a traceback)."""
        text = (bytes(self.stdout_head) + b"\n" + bytes(self.stderr_tail)).decode(
            "utf-8", "replace"
        )
        return " ".join(text.split())[-1000:]


def hijacked_socket(raw: Any) -> tuple[socket.socket, bytes]:
    """Own docker-py's exec socket: a dup of it, plus bytes its HTTP reader buffered.

    The dup leaves docker-py's objects free to be closed without ending the
    stream; the buffered bytes (normally none) are output the agent already sent.
    """
    sock = getattr(raw, "_sock", raw)
    if not isinstance(sock, socket.socket) or sock.__class__ is not socket.socket:
        with contextlib.suppress(Exception):
            raw.close()
        raise SandboxError(
            "the attached exec stream needs a unix:// or tcp:// docker_host (not TLS or ssh)"
        )
    response = getattr(raw, "_response", None)
    sock.setblocking(False)  # shared by the dup; asyncio wants it anyway
    leftover = b""
    with contextlib.suppress(Exception):  # a non-blocking peek returns only what is buffered
        leftover = bytes(response.raw._fp.fp.peek() or b"") if response is not None else b""
    own = sock.dup()
    for obj in (response, raw, sock):
        with contextlib.suppress(Exception):
            obj.close()  # type: ignore[union-attr]
    return own, leftover


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


class DockerBackend(Backend):
    """Slots in Docker containers, each served by one attached agent process."""

    name = "docker"

    def __init__(self, settings: WorkerSettings) -> None:
        import docker

        self.settings = settings
        self.ns = settings.namespace
        client = (
            docker.DockerClient(base_url=settings.docker_host)
            if settings.docker_host
            else docker.from_env()
        )
        self.api: Any = client.api
        self._ncpu: float | None = None
        self._start_sem = asyncio.Semaphore(max(1, settings.start_concurrency))
        self._boxes: list[Box] = []
        self._by_slot: dict[str, Box] = {}
        self._seq = itertools.count(1)
        self._tag = uuid.uuid4().hex[:6]
        self._users: dict[str, SandboxUser] = {}
        self._use_init = True
        self._removals: set[asyncio.Task[None]] = set()
        self._boots: set[asyncio.Task[None]] = set()
        self._refill_task: asyncio.Task[None] | None = None
        self._refill_failed_at = 0.0
        self._closing = False
        self._kept: set[str] = set()  # ids of containers this worker left for a next owner
        self._removing: set[str] = set()  # ids being removed: never adopted
        self._sweeper: asyncio.Task[None] | None = None
        self.default_config = box_config(TrajectorySpec(), settings)

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Remove containers nobody will use again, then fill the warm pool and keep sweeping."""
        try:
            await self.sweep()
        except Exception as exc:  # an engine hiccup must not stop the worker starting
            log.warning("could not sweep left-over containers: %s", exc)
        self._refill_soon()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="docker-sweep")

    async def shutdown(self) -> None:
        """Remove every container this backend started (waits for starts in flight).

        Containers handed over with ``release(keep=True)`` are not its own any more.
        """
        self._closing = True
        for task in (self._refill_task, self._sweeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await asyncio.gather(*self._boots, return_exceptions=True)
        await asyncio.sleep(0)  # let discarded boxes' done-callbacks schedule their removal
        channels = [b.channel for b in self._boxes if b.channel is not None]
        for box in list(self._boxes):
            self._discard(box)
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
        with contextlib.suppress(Exception):
            self.api.close()

    # -------------------------------------------------------------- sweeps
    async def _sweep_loop(self) -> None:
        """Sweep every ``sweep_s``: hand-overs nobody adopted must not leak forever."""
        while not self._closing:
            await asyncio.sleep(self.settings.sweep_s)
            try:
                await self.sweep()
            except Exception as exc:  # Redis or the engine away: try again next time
                log.warning("sweeping left-over containers failed: %s", exc)

    async def sweep(self) -> int:
        """Remove this namespace's containers nobody will use again; return how many.

        A container is looked at when its worker is dead (or it is one this
        worker handed over); it stays while its trajectory may still adopt it.
        """
        if self.worker_heartbeats is None:
            return 0
        beats = await self.worker_heartbeats()
        found = await asyncio.to_thread(
            self.api.containers,
            all=True,
            filters={"label": [f"{LABEL_MANAGED}=1", f"{LABEL_NS}={self.ns}"]},
        )
        now_s = time.time()
        mine = {b.cid for b in self._boxes}
        left = [c for c in found if c["Id"] not in mine and self._unattended(c, beats, now_s)]
        traj_ids = sorted({t for c in left if (t := _labels(c).get(LABEL_TRAJ))})
        states: dict[str, TrajState] | None = None
        if traj_ids and self.trajectory_states is not None:
            states = await self.trajectory_states(traj_ids)
        stale = [c for c in left if not _awaits_adoption(c, states, now_s)]
        for c in stale:
            labels = _labels(c)
            log.info(
                "removing left-over container %s (worker %s, trajectory %s, %s)",
                c["Id"][:12],
                labels.get(LABEL_WORKER) or "-",
                labels.get(LABEL_TRAJ) or "-",
                c.get("State") or "?",
            )
        await asyncio.gather(*(self._remove(c["Id"]) for c in stale))
        return len(stale)

    def _unattended(self, container: dict[str, Any], beats: dict[str, int], now_s: float) -> bool:
        """Not this worker's to serve and not a live worker's: a container to judge.

        Dead means a stale heartbeat, or none at all and older than
        ``dead_after_s`` (which spares containers a starting worker made before
        its first heartbeat). Our own are judged only once handed over.
        """
        owner = _labels(container).get(LABEL_WORKER, "")
        dead_after_s = self.settings.dead_after_s
        if owner == self.settings.worker_id:
            return container["Id"] in self._kept
        if owner in beats:
            return now_s - beats[owner] / 1000.0 > dead_after_s
        return now_s - float(container.get("Created") or now_s) > dead_after_s

    # ---------------------------------------------------------------- slots
    async def acquire(self, traj_id: str, spec: TrajectorySpec) -> Slot:
        """The trajectory's left-over container (adopted), else a packable, warm or new one."""
        config = box_config(spec, self.settings)
        if self.settings.slots_per_container == 1:
            adopted = await self._adopt(traj_id, config)
            if adopted is not None:
                try:
                    return await self._open_slot(adopted, spec)
                except SandboxError as exc:
                    log.warning("adopted container %s failed (%s): starting one", adopted.name, exc)
        box = self._pick(config) or self._new_box(config, traj_id)
        return await self._open_slot(box, spec)

    async def _open_slot(self, box: Box, spec: TrajectorySpec) -> Slot:
        """Create a workspace in ``box`` (booted or booting) and return its slot."""
        name = f"s{next(self._seq)}"
        box.slots.add(name)
        box.used = True
        self._refill_soon()
        try:
            channel = await self._wait_booted(box)
            root = WORKSPACE if self.settings.slots_per_container == 1 else f"{WORKSPACE}/{name}"
            reply = await asyncio.wait_for(
                channel.request("init", slot=name, root=root, env=spec.env, workdir=spec.workdir),
                INIT_TIMEOUT_S,
            )
            if not reply.get("ok"):
                raise SandboxError(f"workspace init failed: {reply.get('error')}")
        except (ChannelClosedError, asyncio.TimeoutError) as exc:
            self._release_name(box, name)
            raise SandboxError(f"container {box.name} did not answer init: {exc}") from exc
        except BaseException:
            self._release_name(box, name)
            raise
        slot = Slot(
            slot_id=f"{box.cid[:12]}:{name}",
            name=name,
            root=str(reply.get("root") or root),
            channel=channel,
            sandbox_id=box.cid,
            adopted=box.adopted,
        )
        self._by_slot[slot.slot_id] = box
        return slot

    async def release(self, slot: Slot, *, keep: bool = False) -> None:
        """Free a slot; the container goes with its last slot.

        ``keep=True`` leaves a trajectory's own container running for the next
        owner to adopt (warm and packed ones carry no trajectory label: removed).
        """
        box = self._by_slot.pop(slot.slot_id, None)
        if box is None:
            return
        box.slots.discard(slot.name)
        if keep and not box.slots and box.traj and not box.pool and box.ready and not box.dead:
            await self._hand_over(box)
        elif not box.slots:
            self._discard(box)
        elif box.channel is not None and box.channel.alive:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(box.channel.request("drop", slot=slot.name), DROP_TIMEOUT_S)

    async def _hand_over(self, box: Box) -> None:
        """Forget a container but leave it running; its agent ends on stdin EOF."""
        box.closing = True
        with contextlib.suppress(ValueError):
            self._boxes.remove(box)
        self._kept.add(box.cid)
        if box.channel is not None:
            await box.channel.close()
        if box.stream is not None:
            box.stream.close()
        log.info(
            "container %s (%s) kept for the next owner of %s", box.name, box.cid[:12], box.traj
        )

    def _release_name(self, box: Box, name: str) -> None:
        box.slots.discard(name)
        if not box.slots and box.used:
            self._discard(box)

    async def _may_have_left_over(self, traj_id: str) -> bool:
        """False for a trajectory that never had a slot: spares new ones an engine query."""
        if self.trajectory_states is None:
            return True
        try:
            state = (await self.trajectory_states([traj_id])).get(traj_id)
        except Exception:  # Redis hiccup: look anyway
            return True
        return state is None or bool(state.slot)

    async def _adopt(self, traj_id: str, config: BoxConfig) -> Box | None:
        """The running container a previous owner left for ``traj_id``, with a fresh agent."""
        if self._closing or not await self._may_have_left_over(traj_id):
            return None
        try:
            found = await asyncio.to_thread(
                self.api.containers,
                filters={
                    "label": [
                        f"{LABEL_MANAGED}=1",
                        f"{LABEL_NS}={self.ns}",
                        f"{LABEL_TRAJ}={traj_id}",
                    ],
                    "status": "running",
                },
            )
        except Exception as exc:  # the engine will answer the fresh start, or explain
            log.warning("could not look for %s's container: %s", traj_id, exc)
            return None
        taken = {b.cid for b in self._boxes} | self._removing
        found = [c for c in found if c["Id"] not in taken and not _labels(c).get(LABEL_POOL)]
        if not found:
            return None
        left = max(found, key=lambda c: float(c.get("Created") or 0))  # the newest
        names = left.get("Names") or [left["Id"][:12]]
        box = Box(
            name=str(names[0]).lstrip("/"),
            config=replace(config, image=str(left.get("Image") or config.image)),
            traj=traj_id,
            cid=left["Id"],
            used=True,
            adopted=True,
        )
        self._launch(box)
        try:
            await self._wait_booted(box)  # a failed boot removes the container
        except SandboxError as exc:
            log.warning("could not adopt container %s of %s: %s", box.name, traj_id, exc)
            return None
        self._kept.discard(box.cid)
        log.info("adopted container %s (%s) of %s", box.name, box.cid[:12], traj_id)
        return box

    def _pick(self, config: BoxConfig) -> Box | None:
        """A live container of this config with room: partly used first, then warm.

        Adopted ones hold one trajectory's workspace: never another's.
        """
        room = self.settings.slots_per_container
        candidates = []
        for box in list(self._boxes):
            if box.dead:
                self._discard(box)
            elif box.adopted:
                continue
            elif box.config == config and not box.closing and len(box.slots) < room:
                candidates.append(box)
        candidates.sort(key=lambda b: (not b.used, not b.ready))
        return candidates[0] if candidates else None

    # ----------------------------------------------------------- warm pool
    def _refill_soon(self) -> None:
        """Top the warm pool up in the background (one refill at a time)."""
        if self.settings.warm_pool <= 0 or self._closing:
            return
        if self._refill_task is not None and not self._refill_task.done():
            return
        if time.monotonic() - self._refill_failed_at < FAILED_REFILL_PAUSE_S:
            return
        self._refill_task = asyncio.create_task(self._refill(), name="docker-warm-pool")

    async def _refill(self) -> None:
        while not self._closing:
            idle = [
                b
                for b in self._boxes
                if not b.used and not b.closing and b.config == self.default_config
            ]
            missing = self.settings.warm_pool - len(idle)
            if missing <= 0:
                return
            boxes = [self._new_box(self.default_config, warm=True) for _ in range(missing)]
            results = await asyncio.gather(
                *(self._wait_booted(b) for b in boxes), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                self._refill_failed_at = time.monotonic()
                log.warning(
                    "warm pool: %d container(s) failed to start: %s", len(errors), errors[0]
                )
                return

    # ------------------------------------------------------------- booting
    def _new_box(self, config: BoxConfig, traj_id: str = "", warm: bool = False) -> Box:
        if self._closing:
            raise SandboxError("the worker is shutting down")
        name = f"toolq-{_safe_name(self.ns)}-{self._tag}-{next(self._seq)}"
        packed = self.settings.slots_per_container > 1
        pool = "warm" if warm else "packed" if packed else ""
        box = Box(name=name, config=config, traj="" if warm or packed else traj_id, pool=pool)
        self._launch(box)
        return box

    def _launch(self, box: Box) -> None:
        """Boot a box in the background (start it, or attach to an adopted one)."""
        box.boot = asyncio.create_task(self._boot(box), name=f"boot-{box.name}")
        self._boots.add(box.boot)
        box.boot.add_done_callback(self._boots.discard)
        self._boxes.append(box)

    async def _wait_booted(self, box: Box) -> AgentChannel:
        assert box.boot is not None
        await asyncio.shield(box.boot)  # one boot, many waiters: none may cancel it
        assert box.channel is not None
        return box.channel

    async def _boot(self, box: Box) -> None:
        """Start the container (unless adopted) and its agent; on failure remove it and
        raise SandboxError."""
        started_s = time.monotonic()
        try:
            if box.adopted:
                got = await asyncio.to_thread(self._attach_agent, box)
            else:
                async with self._start_sem:  # start storms slow the engine down for everyone
                    got = await asyncio.to_thread(self._start_container, box)
            box.cid = got.cid
            box.stream = await ExecStream.open(got.sock, got.leftover, box.name)
            box.channel = AgentChannel(box.stream.reader, box.stream.write, self.on_event, box.name)
            try:
                await asyncio.wait_for(asyncio.shield(box.channel.ready), READY_TIMEOUT_S)
            except (ChannelClosedError, asyncio.TimeoutError) as exc:
                raise SandboxError(
                    await self._explain_agent_failure(box, got.exec_id, exc)
                ) from exc
        except BaseException as exc:
            self._discard(box)
            if isinstance(exc, SandboxError | asyncio.CancelledError):
                raise
            raise SandboxError(f"cannot start a container of {box.config.image}: {exc}") from exc
        if not box.adopted:
            self.observer.container_started(time.monotonic() - started_s)
            log.info("container %s (%s) ready", box.name, box.cid[:12])

    async def _explain_agent_failure(self, box: Box, exec_id: str, exc: BaseException) -> str:
        assert box.stream is not None
        said = box.stream.diagnostics()
        image = box.config.image
        if "executable file not found" in said or "no such file" in said.lower():
            return no_python_message(image, said)
        exit_code = None
        with contextlib.suppress(Exception):
            exit_code = (await asyncio.to_thread(self.api.exec_inspect, exec_id)).get("ExitCode")
        if isinstance(exc, asyncio.TimeoutError):
            return f"the toolq agent in image {image} did not start within {READY_TIMEOUT_S:g}s"
        return f"the toolq agent failed to start in image {image} (exit code {exit_code}): {said}"

    # Blocking Docker calls (run in a thread) -------------------------------
    def _start_container(self, box: Box) -> Started:
        """Create, provision and start a container, then attach the agent's exec."""
        from docker.errors import APIError, ImageNotFound

        command = SLEEP_COMMAND if self._use_init else PYTHON_INIT_COMMAND
        for _attempt in range(3):
            try:
                cid = self._create(box, command)
            except ImageNotFound:
                self._pull(box.config.image)
                cid = self._create(box, command)
            box.cid = cid  # so that a failure below still removes it
            try:
                user = self._user(box.config.image, cid)
                self.api.put_archive(cid, "/", payload_tar(user))
                self.api.start(cid)
                exec_id = self._agent_exec(cid, user)
            except APIError as exc:
                retry = self._fallback(command, _api_message(exc))
                if retry is None:
                    raise SandboxError(self._start_error(box, _api_message(exc))) from exc
                self._remove_now(cid)
                command = retry
                continue
            sock, leftover = hijacked_socket(self.api.exec_start(exec_id, socket=True))
            return Started(cid, exec_id, sock, leftover)
        raise SandboxError(f"cannot start a container of {box.config.image}")

    def _attach_agent(self, box: Box) -> Started:
        """Start a fresh agent in an adopted (running) container."""
        user = self._user(box.config.image, box.cid)
        self.api.put_archive(box.cid, "/", payload_tar(user, workspace=False))
        exec_id = self._agent_exec(box.cid, user)
        sock, leftover = hijacked_socket(self.api.exec_start(exec_id, socket=True))
        return Started(box.cid, exec_id, sock, leftover)

    def _agent_exec(self, cid: str, user: SandboxUser) -> str:
        """Create (not start) the agent's exec, stdin attached."""
        created = self.api.exec_create(
            cid,
            ["python3", "-u", AGENT_PATH],
            stdin=True,
            stdout=True,
            stderr=True,
            tty=False,
            user=user.spec,
            workdir="/",
        )
        return str(created["Id"])

    def _fallback(self, command: list[str], message: str) -> list[str] | None:
        """The next command to try after a start error, or None to give up."""
        lowered = message.lower()
        if ("docker-init" in lowered or "init binary" in lowered) and self._use_init:
            self._use_init = False  # no docker-init on this engine: PID 1 reaps instead
            log.warning("docker-init unavailable (%s); using a python3 PID 1", message)
            return PYTHON_INIT_COMMAND
        sleep_failed = '"sleep"' in message or "is not running" in lowered
        if command == SLEEP_COMMAND and sleep_failed:
            return PYTHON_INIT_COMMAND  # no `sleep`, or one that rejects "infinity"
        return None

    def _start_error(self, box: Box, message: str) -> str:
        if '"python3"' in message and "not found" in message:
            return no_python_message(box.config.image, message)
        return f"cannot start a container of {box.config.image}: {message}"

    def _host_cpus(self) -> float:
        """CPUs of the engine's host: a container may not ask for more (packing multiplies)."""
        if self._ncpu is None:
            try:
                self._ncpu = float(self.api.info().get("NCPU") or os.cpu_count() or 1)
            except Exception:  # an engine that will not say: trust our own count
                self._ncpu = float(os.cpu_count() or 1)
        return self._ncpu

    def _create(self, box: Box, command: list[str]) -> str:
        config = box.config
        per = self.settings.slots_per_container
        # A tmpfs workspace is charged as memory: on top, so processes keep memory_mb.
        memory = f"{(config.memory_mb + (config.disk_mb or 0)) * per}m"
        tmpfs = None
        if config.disk_mb:
            user = self._image_user(config.image)  # the tmpfs is the sandbox user's from birth
            tmpfs = {
                WORKSPACE: f"rw,exec,nosuid,nodev,size={config.disk_mb * per}m,mode=0755,"
                f"uid={user.uid},gid={user.gid}"
            }
        host_config = self.api.create_host_config(
            init=self._use_init or None,
            mem_limit=memory,
            memswap_limit=memory,  # equal: no swap
            nano_cpus=int(min(config.cpus * per, self._host_cpus()) * 1e9),
            pids_limit=config.pids * per,
            network_mode="bridge" if config.network else "none",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            tmpfs=tmpfs,
        )
        labels = {
            LABEL_MANAGED: "1",
            LABEL_NS: self.ns,
            LABEL_WORKER: self.settings.worker_id,
            LABEL_TRAJ: box.traj,
        }
        if box.pool:
            labels[LABEL_POOL] = box.pool
        created = self.api.create_container(
            config.image,
            command=command,
            name=box.name,
            labels=labels,
            host_config=host_config,
            working_dir=WORKSPACE,
        )
        return str(created["Id"])

    def _pull(self, image: str) -> None:
        from docker.errors import APIError

        log.info("pulling image %s", image)
        try:
            self.api.pull(image)  # docker-py splits "repo:tag" itself
        except APIError as exc:
            raise SandboxError(
                f"image {image} not found and pull failed: {_api_message(exc)}"
            ) from exc

    def _user(self, image: str, cid: str) -> SandboxUser:
        """The agent's user for an image (cached): read the image's /etc/passwd once."""
        if image not in self._users:
            image_user = (self.api.inspect_image(image).get("Config") or {}).get("User") or ""
            self._users[image] = pick_user(self._passwd(cid), image_user)
        return self._users[image]

    def _image_user(self, image: str) -> SandboxUser:
        """The agent's user for an image before any container of it exists (a probe one)."""
        if image in self._users:
            return self._users[image]
        labels = {
            LABEL_MANAGED: "1",
            LABEL_NS: self.ns,
            LABEL_WORKER: self.settings.worker_id,
            LABEL_TRAJ: "",
        }
        probe = self.api.create_container(
            image,
            command=["true"],
            labels=labels,
            host_config=self.api.create_host_config(network_mode="none"),
        )
        try:
            return self._user(image, str(probe["Id"]))
        finally:
            self._remove_now(str(probe["Id"]))

    def _passwd(self, cid: str) -> str:
        from docker.errors import NotFound

        try:
            chunks, _ = self.api.get_archive(cid, "/etc/passwd")
            data = b"".join(chunks)
        except NotFound:
            return ""
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                fh = tar.extractfile(member) if member.isfile() else None
                if fh is not None:
                    return fh.read().decode("utf-8", "replace")
        return ""  # /etc/passwd is a symlink or missing: run as root

    def _remove_now(self, cid: str) -> None:
        from docker.errors import APIError

        try:
            self.api.remove_container(cid, force=True)
        except APIError as exc:
            if getattr(exc, "status_code", None) != 404:
                log.warning("removing container %s failed: %s", cid[:12], _api_message(exc))
        except Exception as exc:  # engine unreachable: a later start()'s sweep removes it
            log.warning("removing container %s failed: %s", cid[:12], exc)

    # ------------------------------------------------------------- removal
    def _discard(self, box: Box) -> None:
        """Forget a container and remove it in the background (shutdown waits)."""
        if box.closing:
            return
        box.closing = True
        with contextlib.suppress(ValueError):
            self._boxes.remove(box)
        if box.boot is not None and not box.boot.done():
            # Still starting (its acquire failed or was cancelled): remove it once started.
            box.boot.add_done_callback(lambda _: self._finish_discard(box))
        else:
            self._finish_discard(box)

    def _finish_discard(self, box: Box) -> None:
        lost = box.dead
        if box.stream is not None:
            box.stream.close()
        if lost:
            self.observer.container_lost()
        if box.cid:
            self._removing.add(box.cid)
            task = asyncio.create_task(self._remove(box.cid, box.name if lost else ""))
            self._removals.add(task)
            task.add_done_callback(self._removals.discard)

    async def _remove(self, cid: str, lost_name: str = "") -> None:
        self._removing.add(cid)
        try:
            if lost_name:
                await asyncio.to_thread(self._log_loss, cid, lost_name)
            await asyncio.to_thread(self._remove_now, cid)
        finally:
            self._removing.discard(cid)
            self._kept.discard(cid)
        self.observer.container_removed()

    def _log_loss(self, cid: str, name: str) -> None:
        """Say why a container died (OOM, killed, exited) before it is removed."""
        with contextlib.suppress(Exception):
            state = self.api.inspect_container(cid).get("State") or {}
            log.warning(
                "container %s lost: status=%s exit_code=%s oom_killed=%s error=%s",
                name,
                state.get("Status"),
                state.get("ExitCode"),
                state.get("OOMKilled"),
                state.get("Error") or "-",
            )
