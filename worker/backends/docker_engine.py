"""The Docker engine calls the backend makes, all blocking (run them in a thread).

``Engine`` creates, provisions, starts and removes containers and starts the
agent's exec; it remembers what it learned about images (their sandbox user)
and the engine (docker-init, CPUs).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tarfile
from typing import Any

from ..settings import WorkerSettings
from .base import SandboxError
from .docker_box import (
    AGENT_PATH,
    LABEL_MANAGED,
    LABEL_NS,
    LABEL_POOL,
    LABEL_RUNTIME,
    LABEL_TRAJ,
    LABEL_WORKER,
    PYTHON_INIT_COMMAND,
    SCRATCH,
    SLEEP_COMMAND,
    WORKSPACE,
    Box,
    SandboxUser,
    Started,
    api_message,
    home_mount,
    image_fix,
    no_python_message,
    payload_tar,
    pick_user,
)
from .docker_exchange import IN_DIR, Exchange
from .docker_runtime import engine_runtimes, is_gvisor, pids_options
from .docker_stream import hijacked_socket

log = logging.getLogger("toolq.worker.docker")


# The image's home, kept in the container's layer beside the agent, which unpacks
# it into the home's tmpfs as it starts (as the sandbox user, so its files become
# that user's: tarfile sets owners only as root).
HOME_TAR = "/opt/toolq/home.tar"


class Engine:
    """Blocking calls to one Docker engine."""

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
        self._users: dict[str, SandboxUser] = {}
        self._homes: dict[str, bytes | None] = {}  # image -> its sandbox user's home, a tar
        self._use_init = True
        self._baselines: dict[tuple[Any, ...], frozenset[tuple[str, int]]] = {}
        self.exchange: Exchange | None = None  # set by the backend's start (docker_exchange)
        self.runtimes: dict[str, tuple[str, ...]] = {}  # registered: path, then arguments

    def load_runtimes(self) -> dict[str, tuple[str, ...]]:
        """Ask the engine which runtimes it has (``docker info``); kept in ``runtimes``."""
        self.runtimes = engine_runtimes(self.api.info())
        return self.runtimes

    def start_container(self, box: Box) -> Started:
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
                home = self._read_home(box)  # the agent copies it in as it starts
                files = {HOME_TAR: home} if home else None
                self.api.put_archive(cid, "/", payload_tar(user, files=files))
                self.api.start(cid)
                # No baseline, no recycling: gVisor's insides are not the engine's to see.
                if self.settings.recycle_containers and not self.gvisor(box):
                    box.baseline = self._baseline(box, command)
                seed = self._seed_args(box)
                exec_id = self._agent_exec(cid, user, seed)
            except APIError as exc:
                retry = self._fallback(command, api_message(exc))
                if retry is None:
                    raise SandboxError(self._start_error(box, api_message(exc))) from exc
                self.remove_now(cid)
                command = retry
                continue
            sock, leftover = hijacked_socket(self.api.exec_start(exec_id, socket=True))
            return Started(cid, exec_id, sock, leftover, self._seed_size(seed, box))
        raise SandboxError(f"cannot start a container of {box.config.image}")

    def _baseline(self, box: Box, command: list[str]) -> frozenset[tuple[str, int]] | None:
        """The filesystem diff of a fresh container before its agent starts (None:
        the engine would not say, so the container will not be recycled).

        The same for every container of one image started the same way, so it is
        taken once (~0.2 s) per shape: a later cold start does not pay for it.
        """
        config = box.config
        key = (config.image, config.runtime, bool(config.disk_mb), tuple(command), self._use_init)
        if key not in self._baselines:
            try:
                self._baselines[key] = self.fs_changes(box.cid)
            except Exception as exc:  # never fail a start for the sake of a later reuse
                log.warning("no filesystem baseline for %s: %s", box.config.image, exc)
                return None
        return self._baselines[key]

    def gvisor(self, box: Box) -> bool:
        """Does ``box`` run under gVisor (see docker_runtime.py)?"""
        return is_gvisor(box.config.runtime, self.runtimes)

    def fs_changes(self, cid: str) -> frozenset[tuple[str, int]]:
        """The engine's diff of a container's writable layer: (path, kind) pairs,
        kind 0 changed, 1 added, 2 deleted. Tmpfs mounts are not in it."""
        return frozenset((str(c["Path"]), int(c["Kind"])) for c in self.api.diff(cid) or [])

    def known_user(self, image: str) -> SandboxUser | None:
        """The sandbox user of an image a container of which was started (else None)."""
        return self._users.get(image)

    def sandbox_user(self, box: Box) -> SandboxUser:
        """Who runs the agent and the tools in ``box`` (known since it started)."""
        return self._user(box.config.image, box.cid)

    def attach_agent(self, box: Box, seed_home: bool = False) -> Started:
        """Start a fresh agent in a running container (adopted, or recycled:
        ``seed_home``, its home tmpfs emptied with the rest)."""
        user = self._user(box.config.image, box.cid)
        self.api.put_archive(box.cid, "/", payload_tar(user, workspace=False))
        seed = self._seed_args(box) if seed_home else []
        exec_id = self._agent_exec(box.cid, user, seed)
        sock, leftover = hijacked_socket(self.api.exec_start(exec_id, socket=True))
        return Started(box.cid, exec_id, sock, leftover, self._seed_size(seed, box))

    def _seed_size(self, seed: list[str], box: Box) -> int:
        """The size of the home tar an agent started with ``seed`` copies in."""
        return len(self._homes.get(box.config.image) or b"") if seed else 0

    def _seed_args(self, box: Box) -> list[str]:
        """The agent's ``--seed-home`` arguments: the image's home tar (``HOME_TAR``,
        put beside it) and where it goes; none when there is nothing to seed."""
        home = self.home_of(box)
        if not home or not self._homes.get(box.config.image):
            return []
        return ["--seed-home", HOME_TAR, os.path.dirname(home)]

    def _agent_exec(self, cid: str, user: SandboxUser, seed: list[str] | None = None) -> str:
        """Create (not start) the agent's exec, stdin attached; ``seed``: its
        ``--seed-home`` arguments (it copies the home in before it says ready)."""
        created = self.api.exec_create(
            cid,
            ["python3", "-u", AGENT_PATH, *(seed or [])],
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
            size = f"size={config.disk_mb * per}m"
            tmpfs = {
                WORKSPACE: f"rw,exec,nosuid,nodev,{size},mode=0755,uid={user.uid},gid={user.gid}"
            }
            # The other places any user may write: bounded too, not the engine's disk.
            tmpfs.update({path: f"rw,exec,nosuid,nodev,{size},mode=1777" for path in SCRATCH})
            home = self.home_of(box)
            if home:  # seeded with the image's at start (the agent's --seed-home)
                tmpfs[home] = f"rw,exec,nosuid,nodev,{size},mode=0755,uid={user.uid},gid={user.gid}"
        exchange = self.exchange.binds(box.name) if self.exchange else None
        host_config = self.api.create_host_config(
            binds=exchange[1] if exchange else None,
            init=self._use_init or None,
            mem_limit=memory,
            memswap_limit=memory,  # equal: no swap
            nano_cpus=int(min(config.cpus * per, self._host_cpus()) * 1e9),
            **pids_options(config.pids * per, self.gvisor(box)),
            network_mode="bridge" if config.network else "none",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            tmpfs=tmpfs,
            runtime=config.runtime,
        )
        labels = {
            LABEL_MANAGED: "1",
            LABEL_NS: self.ns,
            LABEL_WORKER: self.settings.worker_id,
            LABEL_TRAJ: box.traj,
            LABEL_RUNTIME: config.runtime,
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
            # The init and its `sleep` run as root (without capabilities): the
            # sandbox user cannot signal them, so killing all its processes (a
            # recycle's reset) leaves the container running.
            user="0",
            volumes=[IN_DIR] if exchange else None,
        )
        if exchange:
            self.exchange.created(str(created["Id"]), exchange[0])  # type: ignore[union-attr]
        return str(created["Id"])

    def _pull(self, image: str) -> None:
        from docker.errors import APIError

        log.info("pulling image %s", image)
        try:
            self.api.pull(image)  # docker-py splits "repo:tag" itself
        except APIError as exc:
            raise SandboxError(
                f"image {image} not found and pull failed: {api_message(exc)}; "
                f"on the worker's host: {image_fix(image)}"
            ) from exc

    def _user(self, image: str, cid: str) -> SandboxUser:
        """The agent's user for an image (cached): read the image's /etc/passwd once."""
        if image not in self._users:
            image_user = (self.api.inspect_image(image).get("Config") or {}).get("User") or ""
            self._users[image] = pick_user(self._passwd(cid), image_user)
        return self._users[image]

    def home_of(self, box: Box) -> str:
        """The home tmpfs of ``box`` ('' when none): with ``disk_mb``, under runc (under
        gVisor a tmpfs lives inside the sandbox: the agent's ``--seed-home`` into one
        is not tried there)."""
        if not box.config.disk_mb or self.gvisor(box):
            return ""
        return home_mount(self._image_user(box.config.image))

    def _read_home(self, box: Box) -> bytes | None:
        """The image's home as a tar, read from a created container before its tmpfs
        hides it (once per image); None when there is nothing to seed. It goes beside
        the agent (``HOME_TAR``), which copies it in as it starts (``_seed_args``)."""
        from docker.errors import NotFound

        home = self.home_of(box)
        if not home:
            return None
        if box.config.image not in self._homes:
            try:
                chunks, _ = self.api.get_archive(box.cid, home)
                self._homes[box.config.image] = b"".join(chunks)
            except NotFound:  # the image has no such directory: an empty home
                self._homes[box.config.image] = None
        return self._homes[box.config.image]

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
            self.remove_now(str(probe["Id"]))

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

    def remove_now(self, cid: str) -> None:
        from docker.errors import APIError

        try:
            self.api.remove_container(cid, force=True)
        except APIError as exc:
            if getattr(exc, "status_code", None) != 404:
                log.warning("removing container %s failed: %s", cid[:12], api_message(exc))
        except Exception as exc:  # engine unreachable: a later start()'s sweep removes it
            log.warning("removing container %s failed: %s", cid[:12], exc)

    def log_loss(self, cid: str, name: str) -> None:
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
