"""A second Docker engine on this machine, standing in for a second host.

Its own data root, exec root, socket, containerd and bridge: never
``--bridge=none``, with which dockerd deletes the host's ``docker0`` and so
the first engine's network. ``lose()`` ends it the way a host dies: dockerd,
its containerd, the shims and every container process killed at once, with
no chance to clean up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker


class SecondEngine:
    """``with SecondEngine(image) as engine:`` a dockerd at ``engine.url`` holding ``image``."""

    def __init__(self, image: str, start_timeout_s: float = 60.0) -> None:
        self.image = image
        self.dir = Path(tempfile.mkdtemp(prefix="toolq-engine2-", dir="/var/tmp"))
        self.url = f"unix://{self.dir}/docker.sock"
        self.bridge = f"tqe2{uuid.uuid4().hex[:8]}"  # an interface name: 15 characters at most
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: Any = None
        self.start_timeout_s = start_timeout_s

    def __enter__(self) -> SecondEngine:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        subnet = f"10.{200 + os.getpid() % 50}.{uuid.uuid4().int % 250}"
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{subnet}.1/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        log = open(self.dir / "dockerd.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                "dockerd",
                f"--data-root={self.dir}/data",
                f"--exec-root={self.dir}/exec",
                f"--pidfile={self.dir}/docker.pid",
                f"--host={self.url}",
                f"--bridge={self.bridge}",
                "--iptables=false",
                "--ip-masq=false",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                self.client = docker.DockerClient(base_url=self.url, timeout=120)
                self.client.ping()
                break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "the second dockerd did not start: "
                        + (self.dir / "dockerd.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.2)
        # The image, from the first engine (a host would pull it).
        first = docker.from_env(timeout=300)
        self.client.api.load_image(first.api.get_image(self.image))
        first.close()

    def lose(self) -> None:
        """Kill the engine and everything it runs at once, as when its host dies."""
        held = self.dir / "data" / "containers"  # every container the engine made
        cids = [p.name for p in held.iterdir()] if held.is_dir() else []
        pids = {p for cid in cids for p in _container_pids(cid)} | set(self._daemon_pids())
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)

    def _daemon_pids(self) -> list[int]:
        """dockerd, its containerd and the shims: their command lines name our directory."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if str(self.dir).encode() in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
        return found

    def close(self) -> None:
        """Stop the engine (if still up), kill what is left, unmount and remove it all."""
        if self.proc is not None and self.proc.poll() is None:
            if self.client is not None:
                for c in self.client.api.containers(all=True):
                    with contextlib.suppress(Exception):
                        self.client.api.remove_container(c["Id"], force=True)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.lose()  # whatever is left: a shim, a container process
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
        for mount in sorted(_mounts_under(self.dir), key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _container_pids(cid: str) -> list[int]:
    """A container's processes, from its cgroup (v1 cgroupfs or v2)."""
    for where in ("pids/docker", "memory/docker", "docker", "system.slice"):
        for name in (cid, f"docker-{cid}.scope"):
            procs = Path("/sys/fs/cgroup") / where / name / "cgroup.procs"
            with contextlib.suppress(OSError):
                return [int(p) for p in procs.read_text().split()]
    return []


def _mounts_under(root: Path) -> list[str]:
    with open("/proc/mounts") as fh:
        return [line.split()[1] for line in fh if line.split()[1].startswith(str(root))]
