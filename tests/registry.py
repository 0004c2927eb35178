"""A private image registry on 127.0.0.1 (Debian's ``docker-registry``), for pulls.

The Docker engine trusts plain-HTTP registries on 127.0.0.0/8 by default, so
images pushed here are pulled like any registry's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from typing import Any

from toolq.worker.embedded import free_port

BINARY = "/usr/bin/docker-registry"


class LocalRegistry:
    """``with LocalRegistry() as reg: reg.push(dc, image, "task-a:1")``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.dir = tempfile.mkdtemp(prefix="toolq-registry-")
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalRegistry:
        config = os.path.join(self.dir, "config.yml")
        with open(config, "w") as f:
            f.write(
                "version: 0.1\n"
                "log: {level: warn}\n"
                f"storage: {{filesystem: {{rootdirectory: {self.dir}/data}}}}\n"
                f"http: {{addr: '{self.host}'}}\n"
            )
        self.log = open(os.path.join(self.dir, "log"), "wb")
        self.proc = subprocess.Popen([BINARY, "serve", config], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"docker-registry did not start: see {self.dir}/log")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def push(self, dc: Any, source: str, name: str) -> str:
        """Push local image ``source`` as ``<registry>/<name>``, then drop the local tag
        (the engine must pull it to have it). Returns the full name."""
        full = f"{self.host}/{name}"
        repo, tag = full.rsplit(":", 1)
        dc.images.get(source).tag(repo, tag)
        said = dc.images.push(repo, tag)
        assert '"error"' not in said, said
        dc.images.remove(full)
        return full
