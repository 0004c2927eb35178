"""Worker settings: one object whose fields are the worker's knobs.

Every field can be set by a ``toolq worker`` flag or a ``TOOLQ_<FIELD>``
environment variable (see ``toolq worker --help``).
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field


def default_worker_id() -> str:
    host = socket.gethostname().split(".")[0] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class WorkerSettings:
    """Everything a worker needs to know; defaults suit one host."""

    redis_url: str | None = None
    namespace: str = "toolq"
    backend: str = "auto"  # auto | local | docker
    slots: int = 16
    worker_id: str = field(default_factory=default_worker_id)
    block_ms: int = 1000  # longest a read blocks when nothing is waiting
    batch_max: int = 512  # entries per stream per read, at most
    heartbeat_s: float = 2.0
    dead_after_s: float = 15.0  # a worker whose heartbeat is older is dead
    result_ttl_s: int = 24 * 3600
    retention_s: int = 7 * 24 * 3600  # ended trajectories' records expire after this
    events_maxlen: int = 10_000
    shutdown_grace_s: float = 30.0
    max_call_timeout_s: float = 3600.0  # cap over every spec
    max_entry_bytes: int = 16 * 1024 * 1024  # larger entries are refused
    default_image: str = "toolq-sandbox:latest"
    workspace_dir: str | None = None  # local backend's workspace root
    tools_modules: tuple[str, ...] = ()
    # docker backend
    docker_host: str | None = None
    warm_pool: int = 0  # started containers kept ready for the default image
    start_concurrency: int = 4  # container starts at once, at most
    slots_per_container: int = 1
    max_memory_mb: int = 8192
    max_cpus: float = 4.0
    max_pids: int = 4096
    allow_network: bool = True  # may a spec turn the network on
    max_disk_mb: int | None = None  # when set, every workspace is a tmpfs of at most this size
    sweep_s: float = 30.0  # how often containers dead workers left are looked at
    # metrics
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
