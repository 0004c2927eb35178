"""Local backend: the agent runs as a subprocess on the worker's host.

Not a sandbox: tool calls run as the worker's user, with its network, its
files and no memory, CPU or process limits. Use it for development, trusted
code and machines without a Docker engine. It says so: a warning when it
starts, and every trajectory's record lists the spec fields it does not
enforce (``unenforced``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable

from toolq.schemas import TrajectorySpec

from ..channel import AgentChannel
from .agent_app import agent_file
from .base import Backend, SandboxError, Slot

log = logging.getLogger("toolq.worker.local")

_STREAM_LIMIT = 256 * 1024 * 1024

#: What an operator reads at worker start (and ``toolq demo`` prints).
NOT_A_SANDBOX = (
    "the local backend is not a sandbox: tool calls run as plain subprocesses of "
    "this host, as the worker's user, with its network and files; spec limits "
    "network, memory_mb, cpus, pids, disk_mb, image and runtime are not enforced"
)


def unenforced(spec: TrajectorySpec) -> list[str]:
    """The fields of ``spec`` that ask for something the local backend does not do.

    Time, call-count, output and tool-policy limits are enforced (by the worker
    and the agent); isolation is not: there is no container to limit.
    """
    limits = spec.limits
    asked = {
        "image": spec.image is not None,  # the host's python3 runs the agent
        "runtime": spec.runtime is not None,  # no container: no runtime (gVisor) either
        "limits.network": not limits.network,  # the host's network is reachable
        "limits.cpus": limits.cpus is not None,
        "limits.memory_mb": limits.memory_mb is not None,
        "limits.pids": limits.pids is not None,
        "limits.disk_mb": limits.disk_mb is not None,
    }
    return [name for name, is_asked in asked.items() if is_asked]


class LocalBackend(Backend):
    """One agent subprocess per slot; workspaces under ``base_dir``."""

    name = "local"

    def __init__(self, base_dir: str | None = None) -> None:
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="toolq-local-")
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._seq = itertools.count(1)

    #: The spec fields a trajectory's record flags as not enforced here.
    unenforced = staticmethod(unenforced)

    async def start(self) -> None:
        """Say what this backend is, once, where operators look."""
        log.warning("%s (workspaces under %s)", NOT_A_SANDBOX, self.base_dir)

    async def acquire(self, traj_id: str, spec: TrajectorySpec) -> Slot:
        slot_id = f"local-{next(self._seq)}"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-u",
            agent_file(),  # the zipapp a container gets
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=_STREAM_LIMIT,
            start_new_session=True,  # a Ctrl-C to the worker must not hit tools
        )
        assert proc.stdin is not None and proc.stdout is not None
        stdin = proc.stdin

        def write(data: bytes) -> Awaitable[None] | None:  # see channel.Write
            if stdin.transport.is_closing():  # a dead agent: fail the channel now
                raise ConnectionResetError("agent stdin is closed")
            stdin.write(data)
            return stdin.drain() if stdin.transport.get_write_buffer_size() else None

        channel = AgentChannel(proc.stdout, write, self.on_event, name=slot_id)
        self._procs[slot_id] = proc
        root = os.path.join(self.base_dir, slot_id)
        try:
            await asyncio.wait_for(channel.ready, 30)
            reply = await channel.request(
                "init", slot=slot_id, root=root, env=spec.env, workdir=spec.workdir
            )
        except Exception as exc:
            await self._stop(slot_id, channel)
            raise SandboxError(f"local agent failed to start: {exc}") from exc
        if not reply.get("ok"):
            await self._stop(slot_id, channel)
            raise SandboxError(str(reply.get("error")))
        return Slot(slot_id, slot_id, reply["root"], channel, sandbox_id=str(proc.pid))

    async def release(self, slot: Slot, *, keep: bool = False) -> None:
        if slot.channel.alive:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(slot.channel.request("drop", slot=slot.name), 10)
        await self._stop(slot.slot_id, slot.channel)
        shutil.rmtree(slot.root, ignore_errors=True)

    async def _stop(self, slot_id: str, channel: AgentChannel) -> None:
        proc = self._procs.pop(slot_id, None)
        await channel.close()
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        except asyncio.CancelledError:  # still reap the agent, then stop as asked
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        finally:
            _close_transport(proc)

    async def shutdown(self) -> None:
        for slot_id in list(self._procs):
            proc = self._procs.pop(slot_id)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            _close_transport(proc)
        shutil.rmtree(self.base_dir, ignore_errors=True)


def _close_transport(proc: asyncio.subprocess.Process) -> None:
    # Nobody reads the agent's stdout once its channel is closed, so asyncio
    # would keep the transport until garbage collection (after the loop closed).
    transport = getattr(proc, "_transport", None)
    if transport is not None:
        transport.close()
