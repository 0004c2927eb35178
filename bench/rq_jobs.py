"""RQ job functions of the baseline: one job per tool call, `docker exec` in the container.

Imported by the ``rq worker`` processes (``-P bench``). The Docker client and
Container objects are cached per process, which helps the baseline: with
SimpleWorker (no fork per job) each job is exec_create + exec_start +
exec_inspect, nothing more.
"""

from __future__ import annotations

from typing import Any

import docker

_client: Any = None
_containers: dict[str, Any] = {}


def _container(cid: str) -> Any:
    global _client
    if _client is None:
        _client = docker.from_env()
    if cid not in _containers:
        _containers[cid] = _client.containers.get(cid)
    return _containers[cid]


def exec_call(cid: str, argv: list[str], workdir: str) -> tuple[int, str]:
    """Run ``argv`` in the container; (exit code, output)."""
    res = _container(cid).exec_run(argv, workdir=workdir)
    return int(res.exit_code), res.output.decode("utf-8", "replace")


def upload(cid: str, directory: str, tar: bytes) -> tuple[int, str]:
    """Write files (a tar) into the container, as a user would for write_file."""
    ok = _container(cid).put_archive(directory, tar)
    return (0 if ok else 1), ""
