"""A second Docker engine on this host, and task images in a local registry, for
``bench/images.py``.

The second engine stands in for a second host: its own ``dockerd`` with its own
data root, exec root, pid file and socket, and a bridge of its own with no
iptables rules (``--bridge=<its own> --iptables=false``), so it never touches
the first engine's bridge or rules. Never ``--bridge=none``: with it dockerd
deletes the host's ``docker0``, and with it the first engine's network.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections import Counter
from typing import Any

import docker

SECOND_SOCKET = "/run/toolq-bench-docker2.sock"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0


class SecondEngine:
    """``with SecondEngine(storage_driver) as url: ...``: a ``dockerd`` of its own,
    holding ``image`` (loaded from the first engine), removed with its data at exit."""

    def __init__(self, image: str, storage_driver: str = "overlay2") -> None:
        self.image, self.driver = image, storage_driver
        self.url = f"unix://{SECOND_SOCKET}"
        self.root = ""
        self.bridge = f"tqb2{os.getpid() % 100000:05d}"  # an interface name: <= 15 chars
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> str:
        if os.path.exists(SECOND_SOCKET):
            raise RuntimeError(f"{SECOND_SOCKET} exists: is another benchmark's dockerd running?")
        self.root = tempfile.mkdtemp(prefix="toolq-bench-docker2-", dir="/var/tmp")
        subnet = f"10.198.{os.getpid() % 250}"
        for argv in (
            ["ip", "link", "add", self.bridge, "type", "bridge"],
            ["ip", "addr", "add", f"{subnet}.1/24", "dev", self.bridge],
            ["ip", "link", "set", self.bridge, "up"],
        ):
            subprocess.run(argv, check=True, capture_output=True)
        flags = [
            f"--data-root={self.root}/data",
            f"--exec-root={self.root}/exec",
            f"--pidfile={self.root}/docker.pid",
            f"-H={self.url}",
            f"--storage-driver={self.driver}",
            f"--bridge={self.bridge}",
            "--iptables=false",
            "--ip-masq=false",
        ]
        log = open(os.path.join(self.root, "dockerd.log"), "wb")
        # Its own session: a Ctrl-C of the benchmark does not kill it before the cleanup.
        self.proc = subprocess.Popen(
            ["dockerd", *flags], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        try:
            self._wait_ready()
            load = f"docker save {self.image} | docker -H {self.url} load -q"
            subprocess.run(["sh", "-ec", load], check=True, capture_output=True)
        except BaseException:
            self.__exit__()
            raise
        return self.url

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(Exception):
                client = docker.DockerClient(base_url=self.url, timeout=5)
                client.ping()
                client.close()
                return
            time.sleep(0.2)
        with open(os.path.join(self.root, "dockerd.log")) as fh:
            tail = fh.read()[-2000:]
        raise RuntimeError(f"the second dockerd did not answer:\n{tail}")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # dockerd stops its containers and its containerd
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.root:
            # A mount left behind (a killed dockerd) would make the removal fail.
            with open("/proc/mounts") as fh:
                mounts = [line.split()[1] for line in fh if self.root in line]
            for mount in sorted(mounts, key=len, reverse=True):
                subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
            shutil.rmtree(self.root, ignore_errors=True)
            if os.path.exists(self.root):
                raise RuntimeError(f"could not remove the second engine's data: {self.root}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SECOND_SOCKET)
        subprocess.run(["ip", "link", "delete", self.bridge], check=False, capture_output=True)


def build_task_images(
    dc: Any, registry: Any, base: str, count: int, layer_mb: int, prefix: str
) -> list[str]:
    """``count`` task images in ``registry``: ``base`` plus a distinct ``layer_mb`` MiB
    layer each (``/opt/task_blob``, random bytes). None is left on ``dc``'s engine."""
    user = dc.images.get(base).attrs["Config"].get("User") or "root"
    names = []
    for i in range(count):
        dockerfile = (
            f"FROM {base}\nUSER root\n"
            f"RUN head -c {layer_mb}M /dev/urandom > /opt/task_blob\nUSER {user}\n"
        ).encode()
        context = io.BytesIO()
        with tarfile.open(fileobj=context, mode="w") as tar:
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(dockerfile)
            tar.addfile(info, io.BytesIO(dockerfile))
        context.seek(0)
        local = f"{prefix}{i}:1"
        dc.images.build(
            fileobj=context, custom_context=True, tag=local, network_mode="none", rm=True,
            forcerm=True, pull=False,
        )  # fmt: skip
        names.append(registry.push(dc, local, local))
        dc.images.remove(local)
    return names


def remove_images(client: Any, names: list[str]) -> None:
    """Untag every one of ``names`` the engine holds (its layers go with the last tag)."""
    for name in names:
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(name)


def remove_containers(client: Any, ns: str) -> list[str]:
    """Force-remove the containers of toolq namespace ``ns``; returns their names."""
    names = []
    for container in client.containers.list(all=True, filters={"label": f"toolq.ns={ns}"}):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
            names.append(container.name)
    return names


def held(client: Any, names: set[str]) -> set[str]:
    """Which of ``names`` the engine holds now."""
    return {t for image in client.images.list() for t in image.tags if t in names}


class Pulls:
    """Counts the engine's pulls of ``names`` from its live event stream, from
    construction to ``stop()`` (the engine keeps only its last 256 events, far fewer
    than a run makes, so they are read as they come)."""

    def __init__(self, client: Any, names: set[str]) -> None:
        self.names, self.counts = names, Counter[str]()
        self.stream = client.events(filters={"type": "image", "event": "pull"}, decode=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):  # the stream closed
            for event in self.stream:
                name = event.get("Actor", {}).get("ID") or event.get("id", "")
                if name in self.names:
                    self.counts[name] += 1

    def stop(self) -> Counter[str]:
        """Stop counting (a moment after the last pull: events arrive asynchronously)."""
        time.sleep(1.0)
        self.stream.close()
        self.thread.join(10)
        return self.counts


def layers_bytes(client: Any) -> int:
    """The engine's image layer bytes (``docker system df``), what the image budget holds."""
    return int(client.df().get("LayersSize") or 0)
