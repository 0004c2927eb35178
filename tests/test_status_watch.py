"""``toolq status --watch`` rides out a Redis restart: the refreshes Redis does
not answer show one line, the next ones show the deployment again, Ctrl-C ends
it with exit 0 and no traceback. Run as a real process against a real Redis
that is stopped and started again under it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable

from click.testing import CliRunner

from tests.helpers import TOOLQ, wait_for
from tests.test_cli_errors import closed_port
from toolq.producer.cli import main
from toolq.schemas import Keys, WorkerInfo
from toolq.worker.embedded import EmbeddedRedis

DOWN = "Redis unreachable"


class Output:
    """Everything a process writes, gathered by a thread so the test never blocks."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_for(self, check: Callable[[str], bool], what: str) -> None:
        """Until ``check(text so far)``; a generous deadline, for a loaded machine."""
        wait_for(lambda: check(self.text), timeout_s=120, what=f"{what} in:\n{self.text[-3000:]}")

    def join(self) -> None:
        self._thread.join(30)


def _beat(url: str, ns: str, worker_id: str) -> None:
    """A worker heartbeat, written straight into Redis (no worker process needed)."""
    from tests.helpers import redis_client

    r = redis_client(url)
    now_ms = int(time.time() * 1000)
    info = WorkerInfo(worker=worker_id, host="h", backend="docker", heartbeat_ms=now_ms)
    r.zadd(Keys(ns).workers, {worker_id: now_ms})
    r.hset(Keys(ns).worker(worker_id), mapping=info.to_fields())
    r.close()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _after_down(text: str) -> str:
    """What the command printed after the first refresh Redis did not answer."""
    return text.split(DOWN, 1)[1] if DOWN in text else ""


def test_watch_rides_out_a_redis_restart(ns: str, tmp_path):
    server = EmbeddedRedis()  # its own server: the session's one stays up for others
    port = server.port
    _beat(server.url, ns, "w-before")
    env = dict(
        os.environ,
        TOOLQ_REDIS_URL=server.url,
        TOOLQ_NAMESPACE=ns,
        XDG_RUNTIME_DIR=str(tmp_path),
    )
    proc = subprocess.Popen(
        [*TOOLQ, "status", "--watch", "--interval", "0.2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A test run in the background of a shell inherits SIGINT ignored, and a
        # Python started so never raises KeyboardInterrupt: give it Ctrl-C back.
        preexec_fn=_default_sigint,
    )
    out = Output(proc)
    try:
        out.wait_for(lambda text: "w-before" in text, "the first refresh")
        server.stop()
        out.wait_for(lambda text: DOWN in text, "the unreachable line")
        server = EmbeddedRedis(port=port)  # back on the same port, empty (no AOF)
        _beat(server.url, ns, "w-after")
        out.wait_for(lambda text: "w-after" in _after_down(text), "a refresh after the restart")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            server.stop()
    out.join()
    assert proc.returncode == 0, out.text[-3000:]
    assert "Traceback" not in out.text
    down_line = next(line for line in out.lines if DOWN in line)
    assert "retrying every 0.2s" in down_line and "last answer" in down_line
    assert "WORKERS  1 alive" in _after_down(out.text)


def test_watch_shows_a_redis_that_is_down_from_the_start(ns: str):
    url = f"redis://127.0.0.1:{closed_port()}/0"
    args = ["--redis-url", url, "--namespace", ns, "status", "--watch", "--interval", "0.01"]
    result = CliRunner().invoke(main, [*args, "--count", "2"])
    assert result.exit_code == 0, result.output
    downs = [line for line in result.output.splitlines() if line.strip()]
    assert len(downs) == 2 and all(DOWN in line for line in downs), result.output

    result = CliRunner().invoke(main, [*args, "--json", "--count", "2"])
    assert result.exit_code == 0, result.output
    docs = [json.loads(line) for line in result.output.splitlines()]
    assert len(docs) == 2 and all(doc["error"].startswith(DOWN) for doc in docs)
