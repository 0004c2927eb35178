"""Which Docker runtime a container runs under, and what each runtime can do.

A spec may ask for a runtime (``spec.runtime``) among those the worker allows
(``runtime``, its default, and ``allowed_runtimes``); one it does not allow is
refused when the trajectory opens. The runtime is part of a container's
``BoxConfig``, so packed slots, the warm pool and recycled containers never
mix runtimes, and a trajectory adopts only a container of its own runtime.

gVisor (``runsc``) is registered with ``runtimeArgs: ["--network=none"]``:
without it, a ``--network=none`` container does not start ("cannot run with
network enabled in root network namespace"), and with it a sandbox has no
network at all, even on a bridge (measured: "No route to host"). So a spec
asking for network under a runtime registered with ``--network=none`` is
refused, with that reason, rather than given a network that is not there.

Under gVisor the pids limit is the sandbox kernel's: every sandbox process
costs the host ~10 threads (ptrace platform: 38 for an idle sandbox, +~9 per
``sleep``), and a sandbox whose host pids cgroup is full dies whole ("urpc
method containerManager.WaitPID failed: EOF") instead of failing the fork. So
a gVisor container gets ``RLIMIT_NPROC`` = ``pids`` (counted by gVisor's own
kernel, for this sandbox only: a fork bomb gets EAGAIN and the sandbox lives)
and a host pids limit ``GVISOR_HOST_PIDS_PER_PROCESS`` times larger, plus the
sandbox's own threads, as a backstop. (Under runc ``RLIMIT_NPROC`` would count
every container's processes of the same uid: not used there.)

gVisor containers are never recycled (``NO_RECYCLING``): the reset is verified
from the engine's side, and the engine cannot see into a gVisor sandbox.
"""

from __future__ import annotations

import os
from typing import Any

from toolq.schemas import ErrorCode, TrajectorySpec

from ..settings import WorkerSettings
from .base import SandboxError

#: The registration argument that takes a gVisor sandbox's network away.
NO_NETWORK_ARG = "--network=none"
#: Host pids per sandbox process under gVisor (measured ~10 on ptrace; margin for threads).
GVISOR_HOST_PIDS_PER_PROCESS = 16
GVISOR_HOST_PIDS_BASE = 256  # the Sentry's and the gofer's own threads (38 measured idle)


#: Why a gVisor container is not recycled (measured with runsc 20221219 on Docker 20.10).
NO_RECYCLING = (
    "gVisor containers are not recycled: a reset is verified from the engine's side, "
    "and the engine cannot see into a gVisor sandbox (its process list, docker top, "
    "shows host processes under the sandbox's own pids; its filesystem diff misses "
    "writes to the sandbox's own /tmp tmpfs): every such container is removed at its end"
)


class RuntimeRefused(SandboxError):
    """A spec's runtime (or its network under that runtime) this worker will not run."""

    code = ErrorCode.BAD_REQUEST


def pick_runtime(spec: TrajectorySpec, settings: WorkerSettings) -> str:
    """The runtime ``spec`` runs under: its own if the worker allows it, else the
    worker's default; ``RuntimeRefused`` for one the worker does not allow."""
    runtime = spec.runtime or settings.runtime
    allowed = settings.runtimes()
    if runtime not in allowed:
        raise RuntimeRefused(
            f"the spec asks for runtime {runtime!r}, which this worker does not allow "
            f"(allowed_runtimes: {', '.join(sorted(allowed))})"
        )
    return runtime


def engine_runtimes(info: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """The runtimes an engine has registered (``docker info``): their path, then arguments."""
    runtimes = info.get("Runtimes") or {}
    return {
        str(name): (
            str((entry or {}).get("path") or name),
            *(str(a) for a in (entry or {}).get("runtimeArgs") or ()),
        )
        for name, entry in runtimes.items()
    }


def is_gvisor(runtime: str, registered: dict[str, tuple[str, ...]]) -> bool:
    """Does ``runtime`` run gVisor (its registered binary, or its name, is runsc)?"""
    path = (registered.get(runtime) or (runtime,))[0]
    return "runsc" in (os.path.basename(path), runtime)


def pids_options(pids: int, gvisor: bool) -> dict[str, Any]:
    """The create options that cap a container at ``pids`` processes (see above)."""
    if not gvisor:
        return {"pids_limit": pids}
    from docker.types import Ulimit

    return {
        "pids_limit": pids * GVISOR_HOST_PIDS_PER_PROCESS + GVISOR_HOST_PIDS_BASE,
        "ulimits": [Ulimit(name="nproc", soft=pids, hard=pids)],
    }


def unregistered(settings: WorkerSettings, registered: dict[str, tuple[str, ...]]) -> list[str]:
    """The runtimes this worker allows that the engine does not know."""
    return sorted(r for r in settings.runtimes() if r not in registered)


def check_network(runtime: str, network: bool, registered: dict[str, tuple[str, ...]]) -> None:
    """Refuse network under a runtime registered without one (``NO_NETWORK_ARG``)."""
    if network and NO_NETWORK_ARG in registered.get(runtime, ())[1:]:
        raise RuntimeRefused(
            f"the spec asks for network access, but runtime {runtime!r} is registered with "
            f"{NO_NETWORK_ARG} (gVisor needs it to run network-less containers): its "
            "sandboxes have no network at all; ask for another runtime (e.g. runc) to get one"
        )
