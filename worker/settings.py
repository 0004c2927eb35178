"""Worker settings: one object whose fields are the worker's knobs.

Every field can be set by a ``toolq worker`` flag or a ``TOOLQ_<FIELD>``
environment variable (see ``toolq worker --help``).
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from toolq.schemas import DEFAULT_IMAGE


def default_worker_id() -> str:
    host = socket.gethostname().split(".")[0] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _opt(default: Any, help: str, **cli: Any) -> Any:
    """A settings field with its ``toolq worker`` help (and flag/env overrides)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class WorkerSettings:
    """Everything a worker needs to know; defaults suit one host.

    ``toolq worker`` has a flag for every field but the two the ``toolq`` group
    takes (``--redis-url``, ``--namespace``): ``--field-name``, environment
    variable ``TOOLQ_FIELD_NAME`` unless the field says otherwise.
    """

    redis_url: str | None = _opt(None, "Redis URL.", cli=False)
    rq_redis_url: str | None = _opt(
        None,
        "Redis for external tools' RQ jobs [default: the worker's Redis]; RQ does not "
        "run on Redis Cluster, so a cluster deployment names a plain Redis here.",
    )
    namespace: str = _opt("toolq", "Key prefix.", cli=False)
    backend: str = _opt(
        "auto",
        "auto: Docker when an engine answers and has the image (--image), else local "
        "(saying why at start); docker: Docker only; local: no sandbox.",
        choices=("auto", "local", "docker"),
    )
    slots: int = _opt(16, "Trajectories served at once.")
    worker_id: str = field(
        default_factory=default_worker_id,
        metadata={"help": "Stable worker id [default: host-pid-random]."},
    )
    block_ms: int = _opt(1000, "Longest a read blocks when nothing is waiting.")
    read_ahead: int = _opt(32, "Calls read ahead per trajectory, at most.")
    read_ahead_bytes: int = _opt(
        64 * 1024 * 1024, "Call entry bytes read ahead over all trajectories, at most."
    )
    heartbeat_s: float = _opt(2.0, "Seconds between heartbeats.")
    dead_after_s: float = _opt(
        15.0, "A worker silent this long is dead; its trajectories are taken over."
    )
    result_ttl_s: int = _opt(3600, "How long results are kept.")
    retention_s: int = _opt(24 * 3600, "How long ended trajectories' records and events are kept.")
    events_maxlen: int = _opt(64, "Cap of each trajectory's events stream (approximate).")
    events_after_end: int = _opt(16, "Events an ended trajectory keeps (exact).")
    shutdown_grace_s: float = _opt(30.0, "On SIGTERM, how long running calls may finish.")
    max_call_timeout_s: float = _opt(3600.0, "Cap over every call's timeout.")
    max_entry_bytes: int = _opt(16 * 1024 * 1024, "Larger call entries are refused.")
    max_output_bytes: int = _opt(
        16 * 1024 * 1024, "Cap over every spec's max_output_bytes (output kept per call)."
    )
    # snapshots (kept in Redis, so any worker of the fleet can open from them)
    snapshot_max_bytes: int = _opt(
        128 * 1024 * 1024, "Largest snapshot (compressed); a larger workspace is refused."
    )
    snapshot_ttl_s: float = _opt(3600.0, "How long a snapshot is kept when it asks for no TTL.")
    snapshot_max_ttl_s: float = _opt(7 * 24 * 3600.0, "Cap over every snapshot's TTL.")
    snapshot_timeout_s: float = _opt(300.0, "Longest a workspace may take to pack or unpack.")
    default_image: str = _opt(
        DEFAULT_IMAGE, "Default sandbox image.", flag="--image", env="TOOLQ_IMAGE"
    )
    workspace_dir: str | None = _opt(None, "Local backend's workspace root.")
    tools_modules: tuple[str, ...] = _opt(
        (), "Module registering extra tools (repeatable).", flag="--tools", env="TOOLQ_TOOLS"
    )
    # docker backend
    docker_host: str | None = _opt(None, "Docker engine URL (default: DOCKER_HOST or local).")
    warm_pool: int = _opt(0, "Containers kept started for the default image.")
    start_concurrency: int = _opt(4, "Container starts at once, at most.")
    slots_per_container: int = _opt(1, "Same-image trajectories packed per container.")
    runtime: str = _opt(
        "runc",
        "Docker runtime of specs that name none (e.g. runsc: gVisor, a user-space kernel "
        "between tools and the host; the engine must have it registered).",
    )
    allowed_runtimes: tuple[str, ...] = _opt(
        (),
        "Runtimes a spec may ask for (repeatable, or comma-separated) [default: --runtime "
        "only]; a spec asking for another is refused at open.",
    )
    recycle_containers: bool = _opt(
        False,
        "Reuse the container of an ended trajectory (its last slot, default image and "
        "limits only) after a reset the worker verifies from the engine: no process "
        "left, workspace empty, filesystem as new; a container that fails is removed. "
        "Off: every trajectory gets a fresh container.",
    )
    max_memory_mb: int = _opt(8192, "Cap over every spec's memory_mb.")
    max_cpus: float = _opt(4.0, "Cap over every spec's cpus.")
    max_pids: int = _opt(4096, "Cap over every spec's pids.")
    allow_network: bool = _opt(True, "May a spec turn the sandbox network on.")
    max_disk_mb: int | None = _opt(
        None, "Every workspace is a tmpfs of at most this size (counts as memory)."
    )
    default_disk_mb: int = _opt(
        2048,
        "Docker workspace size cap (MiB) for specs that set no disk_mb: /workspace is a "
        "tmpfs of this size (counts as memory). 0: no cap (the container's writable layer).",
    )
    sweep_s: float = _opt(30.0, "How often containers dead workers left are looked at.")
    exchange_dir: str | None = _opt(
        None,
        "Directory shared with the Docker engine's host through which a fork's copies on "
        "this worker get their files (each container mounts its own part read-only); "
        "'' turns it off [default: /dev/shm/toolq-exchange when the engine runs on this host].",
    )
    # task images (docs/images.md)
    image_aware: bool = _opt(
        True,
        "An open goes first to a worker whose engine holds (or is pulling) its image; "
        "the others leave it to that worker for --image-claim-delay-s unless it is full.",
    )
    image_claim_delay_s: float = _opt(
        1.0, "How long a worker without an open's image leaves it to a holder with room."
    )
    image_refresh_s: float = _opt(
        5.0, "How often the engine's images are listed, published and held to the budget."
    )
    image_pulls: int = _opt(
        2, "Image pulls at once on this worker's engine, at most (prefetches and on demand)."
    )
    prefetch: bool = _opt(
        True, "Pull the images of waiting opens ahead (one worker of the fleet per image)."
    )
    image_budget_bytes: int | None = _opt(
        None,
        "Image layer bytes on the engine, at most: least recently used task images are "
        "removed (never one in use or being pulled, never the default image). None: no budget.",
    )
    image_warm_pool: int = _opt(
        0,
        "Idle containers kept started for task images (all together), shared out by each "
        "image's opens in the last --image-warm-window-s; 0: none.",
    )
    image_warm_window_s: float = _opt(
        300.0, "How far back the opens that size the task images' warm pools are counted."
    )
    # metrics
    metrics_port: int | None = _opt(None, "Serve Prometheus metrics on this port (0: any).")
    metrics_host: str = _opt("0.0.0.0", "Bind address of the metrics server.")

    def runtimes(self) -> frozenset[str]:
        """The Docker runtimes a spec may ask for: the allow-list plus the default."""
        named = {r.strip() for item in self.allowed_runtimes for r in item.split(",")}
        return frozenset(r for r in named | {self.runtime} if r)
