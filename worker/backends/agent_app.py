"""The in-sandbox agent as one file: a zipapp built from ``toolq.worker.agent``.

A container gets one file (``put_archive``), and the local backend runs the
same one: ``python3 -u agent.pyz`` runs the archive's ``__main__.py``, which
starts the package's main loop (``start.run``: each module compiled once, as
a plain script would be). The archive is built in memory once per process from
the package's sources as they are on disk, with fixed timestamps and modes, so
the same sources always give the same bytes.
"""

from __future__ import annotations

import atexit
import functools
import io
import os
import shutil
import tempfile
import threading
import zipfile

#: The package's sources (``worker/agent/``), shipped as they are.
SOURCE_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "agent")
#: The package's name inside the archive (on its own there: no ``toolq`` around it).
PACKAGE = "toolq_agent"
MAIN = b"from toolq_agent.start import run\n\nrun()\n"  # the archive's __main__.py
# Zip's earliest date: a build's bytes depend on the sources only.
FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)

_local_lock = threading.Lock()
_local_path: str | None = None


def agent_sources() -> dict[str, bytes]:
    """The package's modules, ``{file name: bytes}``, by name (no caches)."""
    names = sorted(n for n in os.listdir(SOURCE_DIR) if n.endswith(".py"))
    sources = {}
    for name in names:
        with open(os.path.join(SOURCE_DIR, name), "rb") as fh:
            sources[name] = fh.read()
    return sources


@functools.lru_cache(maxsize=1)
def agent_zipapp() -> bytes:
    """The agent as a zipapp: ``__main__.py`` and ``toolq_agent/*.py``, stored
    uncompressed (it is small, and a python3 without zlib can still read it)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        members = {"__main__.py": MAIN}
        members.update((f"{PACKAGE}/{n}", data) for n, data in agent_sources().items())
        for name, data in members.items():
            info = zipfile.ZipInfo(name, FIXED_DATE_TIME)
            info.create_system = 3  # Unix, wherever the worker runs
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return buf.getvalue()


def agent_file() -> str:
    """The zipapp as a file of this host (for the local backend): written once per
    process into a directory of its own (mode 0700), removed at exit."""
    global _local_path
    with _local_lock:
        if _local_path is None or not os.path.exists(_local_path):
            directory = tempfile.mkdtemp(prefix="toolq-agent-")
            atexit.register(shutil.rmtree, directory, True)
            path = os.path.join(directory, "agent.pyz")
            with open(path, "wb") as fh:
                fh.write(agent_zipapp())
            _local_path = path
        return _local_path
