"""A trajectory's slot from start to release: the sandbox, the workspace, the record.

``SlotKeeper.start`` acquires a slot from the backend (a trajectory opened from
a snapshot first gets the snapshot's spec, then its files), says in the record
what serves it now, and flags a workspace that was lost (``slot_reset`` in the
next result). ``release`` ends its background tasks, then the sandbox.
"""

from __future__ import annotations

import json
import logging
import socket
import time

from .backends.base import Backend
from .bgtasks import BgRecorder
from .metrics import Observer
from .snapshots import SnapshotMissing, Snapshots
from .state import Traj, now_ms
from .writer import Writer

log = logging.getLogger("toolq.worker.slots")

HOST = socket.gethostname()


class SlotKeeper:
    """Starts and releases the slots of the trajectories a worker owns."""

    def __init__(
        self,
        backend: Backend,
        snapshots: Snapshots,
        writer: Writer,
        bg: BgRecorder,
        observer: Observer,
    ) -> None:
        self.backend = backend
        self.snapshots = snapshots
        self.writer = writer
        self.bg = bg
        self.observer = observer

    async def start(self, traj: Traj) -> None:
        """Start the trajectory's slot (again, after a loss). Raises ``SandboxError``
        (whose ``code`` answers the waiting calls) when it cannot."""
        if traj.slot is not None:  # lost while idle: replace it
            self.observer.slot_lost()
            await self.release(traj)
            traj.slot_lost = True
        if traj.slot_lost:  # say so in the next result
            traj.slot_reset, traj.slot_lost = True, False
        started = time.monotonic()
        await self._resolve_snapshot(traj)
        traj.slot = await self.backend.acquire(traj.traj_id, traj.spec)
        self.observer.slot_started(time.monotonic() - started)
        copied_via = ""
        if traj.spec.snapshot and not traj.slot.adopted:  # a new workspace: its files
            acquired = time.monotonic()
            copied_via = await self.snapshots.restore(traj.slot, traj.spec.snapshot, self.backend)
            log.debug(
                "%s: slot in %.2fs, files (%s) in %.2fs",
                traj.traj_id,
                acquired - started,
                copied_via,
                time.monotonic() - acquired,
            )
        if traj.previous_owner and not traj.slot.adopted:
            traj.slot_reset = True  # the previous owner's workspace is gone
        # Calls that came while the slot started waited behind its start, not for a
        # worker (toolq_slot_start_seconds has that): behind_ms counts it, so the
        # wait for toolq (queued_ms - behind_ms, ToolqSlowQueue) does not.
        traj.free_since_ms = max(traj.free_since_ms, now_ms())
        traj.previous_owner = None
        # The record says what serves it now (container labels name only who started it).
        slot = traj.slot
        unenforced = self._unenforced(traj)
        fields = {"slot": slot.slot_id, "host": HOST, "sandbox": slot.sandbox_id}
        if copied_via:  # how this workspace got its snapshot's files (the record says)
            fields["copied_via"] = copied_via
        self.writer.set_fields(traj, **fields, unenforced=unenforced)

    def prestart(self, traj: Traj, count: int) -> None:
        """Start sandboxes for ``count`` trajectories like ``traj`` that will open soon
        (a fork's copies), where the backend can (Docker)."""
        hook = getattr(self.backend, "prestart", None)
        if hook is not None and count > 0:
            hook(traj.spec, count)

    async def _resolve_snapshot(self, traj: Traj) -> None:
        """Opened from a snapshot: run with its spec under the opener's (once; the
        record keeps the result, so a next owner finds it resolved)."""
        if traj.spec.snapshot is None or traj.spec_resolved:
            return
        try:
            traj.spec = await self.snapshots.resolve(traj.spec)
        except SnapshotMissing:
            if traj.previous_owner:  # resolved by an earlier owner; its files may be here
                return
            raise
        traj.spec_resolved = True
        self.writer.set_fields(traj, spec=traj.spec.model_dump_json(exclude_none=True))

    def _unenforced(self, traj: Traj) -> str:
        """The record's ``unenforced``: spec fields this backend does not enforce, as a
        JSON list ('' when it enforces all). Written at every slot start, so a
        trajectory that moved to another backend's worker says what holds now."""
        # A backend that cannot enforce everything says what (LocalBackend.unenforced).
        check = getattr(self.backend, "unenforced", None)
        fields = list(check(traj.spec)) if check is not None else []
        return json.dumps(fields) if fields else ""

    async def release(self, traj: Traj, keep: bool = False) -> None:
        """Release the trajectory's sandbox; its background tasks end with it."""
        slot, traj.slot = traj.slot, None
        if slot is None:
            return
        if not traj.dropped:
            await self.bg.stop_tasks(slot)  # reported stopped before the sandbox goes
        try:
            await self.backend.release(slot, keep=keep)
        except Exception:
            log.exception("releasing slot %s failed", slot.slot_id)
        if not traj.dropped:  # tasks still running in Redis had nobody left to report them
            self.bg.slot_gone(traj, slot.name)
