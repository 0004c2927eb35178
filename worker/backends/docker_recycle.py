"""Recycling: an ended trajectory's container goes back to the pool, verified.

With ``recycle_containers`` on, a container whose last slot ended may serve
the next trajectory instead of being removed, once a reset has brought it back
to how it started. Whatever ran in it as the sandbox user controls everything
that user can touch, including what a check run inside would report; so the
worker checks from the engine's side, and runs in the container only fresh
execs of files the sandbox user cannot have changed:

1. the old agent's stream is closed; the container is renamed
   ``<name>-recycled`` (its labels still name its first trajectory, which must
   never adopt it);
2. ``kill`` (``docker_reset.py`` in a fresh exec as the sandbox user): SIGKILL
   every process of that user, however it detached;
3. the engine's process list (``top``) may show nothing but the container's
   init and its command, which run as root (the sandbox user cannot start a
   root process: no capabilities, ``no-new-privileges``);
4. ``clean`` (a fresh exec, now that nothing else runs) empties the workspace
   and the shared-memory mounts the engine's diff cannot see (``/dev/shm``,
   ``/dev/mqueue``) and reports what is left there and any System V IPC
   object; when the engine's filesystem diff, against the baseline taken when
   the container was fresh, names paths the trajectory added (``/tmp/x``,
   ``~/.cache``), ``clean`` runs again and deletes them too;
5. the diff again must equal the baseline exactly: a changed, chmod-ed or
   deleted image file (``~/.bashrc``), or anything ``clean`` could not delete,
   rejects the container;
6. a fresh agent (its file copied in again, a new exec) must say ready, after
   it copied the image's home back into the home tmpfs (``--seed-home``): its
   environment is the container's, as on the first day.

A rejected container is removed. Outcomes are counted by the backend's
observer: recycled (with the seconds it took), or rejected with a reason in
``REJECT_REASONS``. All of it runs in a background task that releasing the
slot only starts: the trajectory's end and the worker's loop never wait for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..settings import WorkerSettings
from .docker_box import RECYCLED_SUFFIX, WORKSPACE, Box, BoxConfig, Started
from .docker_engine import Engine

log = logging.getLogger("toolq.worker.docker")

RESET_SCRIPT_PATH = os.path.join(os.path.dirname(__file__), "docker_reset.py")
REJECT_REASONS = ("processes", "filesystem", "leftovers", "agent", "error")
RESET_TIMEOUT_S = 60.0
QUIET_TIMEOUT_S = 10.0  # for killed processes to be reaped
MAX_ADDED_PATHS = 500  # more top-level paths added outside the workspace: not worth it
KIND_ADDED = 1  # the engine's diff: 0 changed, 1 added, 2 deleted
SHOWN_CHARS = 300


class Rejected(Exception):
    """A container that must not be reused, and why (one of ``REJECT_REASONS``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Recycler:
    """Resets and verifies containers for the pool (``recycle``), one per task."""

    def __init__(
        self,
        engine: Engine,
        settings: WorkerSettings,
        connect: Callable[[Box, Started], Awaitable[None]],
    ) -> None:
        """``connect`` attaches to a started agent's exec and waits for it to be ready."""
        self.engine = engine
        self.settings = settings
        self._connect = connect
        self._sem = asyncio.Semaphore(max(1, settings.start_concurrency))
        self._root_images: set[str] = set()
        with open(RESET_SCRIPT_PATH) as fh:
            self._script = fh.read()

    def wants(self, box: Box, pool_config: BoxConfig) -> bool:
        """May ``box`` be reset for the pool? Recycling on, a container this worker
        started (with a baseline) for the pool's config, alive, tools not run as root."""
        if not self.settings.recycle_containers or box.baseline is None or box.adopted:
            return False
        if box.config != pool_config or not box.ready or box.dead:
            return False
        image = box.config.image
        user = self.engine.known_user(image)
        if user is not None and user.uid == 0 and image not in self._root_images:
            self._root_images.add(image)
            log.warning("image %s runs tools as root: its containers are not recycled", image)
        return user is not None and user.uid != 0

    async def recycle(self, box: Box) -> float:
        """Reset and verify ``box``, then start a fresh agent in it; the seconds it took.

        Raises ``Rejected`` when the container must not be reused.
        """
        started_s = time.monotonic()
        await detach(box)
        async with self._sem:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.reset, box), RESET_TIMEOUT_S)
            except Rejected:
                raise
            except Exception as exc:  # the engine failed or timed out: no verdict, no reuse
                raise Rejected("error", describe(exc)) from exc
        try:
            # A home tmpfs was emptied with the rest: the new agent fills it as new again.
            got = await asyncio.to_thread(self.engine.attach_agent, box, True)
            await self._connect(box, got)
        except Exception as exc:
            raise Rejected("agent", describe(exc)) from exc
        return time.monotonic() - started_s

    # ------------------------------------------------ blocking (in a thread)
    def reset(self, box: Box) -> None:
        """Kill, clean and verify ``box`` (steps 1-5); raises ``Rejected``."""
        assert box.baseline is not None
        self._rename(box)
        self._run_script(box, "kill")
        self._wait_quiet(box)
        report = self._run_script(box, "clean", WORKSPACE)
        now = self.engine.fs_changes(box.cid)  # ~0.2 s of the engine's time: once if we can
        added = added_paths(box.baseline, now)
        if added:  # files outside the workspace: delete them, look again
            report = self._run_script(box, "clean", WORKSPACE, *added)
            now = self.engine.fs_changes(box.cid)
        if now != box.baseline:
            raise Rejected("filesystem", describe_changes(box.baseline, now))
        if report.get("left") or report.get("ipc") or report.get("errors"):
            raise Rejected("leftovers", json.dumps(report)[:SHOWN_CHARS])

    def _rename(self, box: Box) -> None:
        if not box.name.endswith(RECYCLED_SUFFIX):
            self.engine.api.rename(box.cid, box.name + RECYCLED_SUFFIX)
            box.name += RECYCLED_SUFFIX

    def _run_script(self, box: Box, *args: str) -> dict[str, Any]:
        """Run ``docker_reset.py`` in a fresh exec as the sandbox user; its report."""
        api = self.engine.api
        argv = ["python3", "-I", "-S", "-c", self._script, *args]
        user = self.engine.sandbox_user(box)
        exec_id = api.exec_create(box.cid, argv, user=user.spec, workdir="/")["Id"]
        out = bytes(api.exec_start(exec_id))
        code = api.exec_inspect(exec_id).get("ExitCode")
        lines = out.decode("utf-8", "replace").strip().splitlines()
        report: Any = None
        if code == 0 and lines:
            try:
                report = json.loads(lines[-1])
            except ValueError:
                report = None
        if not isinstance(report, dict) or "error" in report:
            raise Rejected("error", f"reset {args[0]} failed (exit {code}): {out[-200:]!r}")
        return report

    def _wait_quiet(self, box: Box) -> None:
        """Until the engine lists no process but the container's init and its command."""
        deadline = time.monotonic() + QUIET_TIMEOUT_S
        while True:
            others = self._other_processes(box.cid)
            if not others:
                return
            if time.monotonic() > deadline:
                raise Rejected("processes", "; ".join(others)[:SHOWN_CHARS])
            time.sleep(0.1)

    def _other_processes(self, cid: str) -> list[str]:
        """Processes not of the init's user (root), as the engine's ``ps`` lists them."""
        api = self.engine.api
        state = api.inspect_container(cid).get("State") or {}
        if not state.get("Running"):
            raise Rejected("error", f"the container is {state.get('Status')}")
        listed = api.top(cid, ps_args="-o pid,uid,stat,args")
        titles, rows = listed.get("Titles") or [], listed.get("Processes") or []
        pid_at, uid_at = titles.index("PID"), titles.index("UID")
        init_uid = next((r[uid_at] for r in rows if r[pid_at] == str(state.get("Pid"))), None)
        return [" ".join(r) for r in rows if init_uid is None or r[uid_at] != init_uid]


async def detach(box: Box) -> None:
    """End the box's agent (stdin EOF: it kills what it runs and exits)."""
    channel, stream = box.channel, box.stream
    box.channel = box.stream = None
    if channel is not None:
        await channel.close()
    if stream is not None:
        stream.close()


def added_paths(baseline: frozenset[tuple[str, int]], now: frozenset[tuple[str, int]]) -> list[str]:
    """The top-most paths added since the baseline (deleting one deletes what is under it)."""
    added = {path for path, kind in now - baseline if kind == KIND_ADDED}
    tops = sorted(p for p in added if not any(parent in added for parent in parents(p)))
    if len(tops) > MAX_ADDED_PATHS:
        raise Rejected("filesystem", f"{len(tops)} paths added outside the workspace")
    return tops


def parents(path: str) -> list[str]:
    """``/a/b/c`` -> ``['/a', '/a/b']``."""
    parts = path.rstrip("/").split("/")
    return ["/".join(parts[:i]) for i in range(2, len(parts))]


def describe_changes(baseline: frozenset[tuple[str, int]], now: frozenset[tuple[str, int]]) -> str:
    """``changed /home/sandbox/.bashrc, added /tmp/x, ...`` (what differs from the baseline)."""
    kinds = {0: "changed", 1: "added", 2: "deleted"}
    differs = [f"{kinds.get(k, k)} {p}" for p, k in sorted(now - baseline)]
    differs += [f"no longer {kinds.get(k, k)}: {p}" for p, k in sorted(baseline - now)]
    more = f" (+{len(differs) - 10} more)" if len(differs) > 10 else ""
    return ", ".join(differs[:10]) + more


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
