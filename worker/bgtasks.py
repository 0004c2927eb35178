"""Background tasks, worker side: the agent's ``bg`` events become fenced writes.

The in-sandbox agent runs the tasks and reports each one as an event
``{"event": "bg", "slot": <slot name>, "task": {...}}`` when it starts, at most
every 0.5 s while its output grows, and when it ends. ``BgRecorder`` maps the
slot to its trajectory and has the writer record the task (``lua.BG_WRITE``:
its hash, its index entry and, when it ends, an ``Event(type="bg")``). A final
status is never overwritten, so a late event cannot turn a stopped task back
into a running or completed one. When a slot goes away (trajectory ended,
sandbox lost, worker killed and its trajectory taken over) tasks still
``running`` in Redis are marked ``lost`` (``lua.BG_LOST``): nobody is left to
report on them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from toolq.schemas import BgTask, InvalidIdError, check_part

from .backends.base import Slot
from .metrics import Observer
from .state import Traj
from .writer import Writer

log = logging.getLogger("toolq.worker.bg")

# The agent stops tasks with SIGTERM, SIGKILL after 0.5 s, then reports them.
STOP_TIMEOUT_S = 10.0


class BgRecorder:
    """Records background-task state as the agents report it."""

    def __init__(
        self,
        writer: Writer,
        traj_for_slot: Callable[[str], Traj | None],
        observer: Observer,
    ) -> None:
        self.writer = writer
        self.traj_for_slot = traj_for_slot
        self.observer = observer
        # Slot -> (trajectory, epoch), remembered from a task's first event: the
        # final events of a drop arrive after the worker has detached the slot.
        self._slots: dict[str, tuple[str, str]] = {}
        # Trajectory -> the task ids recorded for it (BG_LOST declares their keys).
        self._tasks: dict[str, set[str]] = {}
        self._marking: set[asyncio.Task[None]] = set()

    def on_event(self, msg: dict[str, Any]) -> None:
        """Record one ``bg`` event; a malformed one is logged and dropped."""
        slot, task = msg.get("slot"), msg.get("task")
        owner = self._owner(slot) if isinstance(slot, str) else None
        if owner is None or not isinstance(task, dict):
            log.warning("bg event for an unknown slot or without a task: %.200r", msg)
            return
        traj_id, epoch = owner
        try:
            record = BgTask.model_validate({**task, "traj": traj_id})
            check_part(record.task_id, "task id")
        except (ValidationError, InvalidIdError) as exc:
            log.warning("malformed bg event from slot %s: %s", slot, exc)
            return
        self._tasks.setdefault(traj_id, set()).add(record.task_id)
        written = self.writer.bg_write(
            traj_id, epoch, record.task_id, record.started_ms, record.status, record.to_fields()
        )
        written.add_done_callback(lambda fut: self._observe(fut, record.status))

    def _owner(self, slot: str) -> tuple[str, str] | None:
        if slot not in self._slots:
            traj = self.traj_for_slot(slot)
            if traj is None:
                return None
            self._slots[slot] = (traj.traj_id, traj.epoch)
        return self._slots[slot]

    def _observe(self, fut: asyncio.Future[Any], status: str) -> None:
        outcome = fut.result()
        outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
        if outcome == "new":
            self.observer.bg_task_changed("running")
        if outcome in ("new", "ok") and status != "running":
            self.observer.bg_task_changed(status)

    async def stop_tasks(self, slot: Slot) -> None:
        """Before a slot is released: have its agent stop its tasks and report them.

        Backends may remove a sandbox without telling its agent; this makes
        every backend end a trajectory's tasks as ``stopped``. Only slots that
        ever ran a task pay the round trip (the agent's ``cancel`` op).
        """
        if slot.name not in self._slots or not slot.channel.alive:
            return
        try:
            await asyncio.wait_for(slot.channel.request("cancel", slot=slot.name), STOP_TIMEOUT_S)
        except Exception as exc:  # lost on the way: slot_gone marks what is left
            log.warning("stopping the background tasks of slot %s failed: %s", slot.name, exc)

    def slot_gone(self, traj: Traj, slot_name: str) -> None:
        """The slot's agent is gone: its trajectory's running tasks are lost.

        Call it after the slot was released, so the final states its agent
        reported are queued first.
        """
        self._slots.pop(slot_name, None)
        self.tasks_lost(traj)

    def tasks_lost(self, traj: Traj) -> None:
        """Mark ``traj``'s tasks still ``running`` in Redis as ``lost``: at once
        those this worker recorded (queued behind their last writes), then, once
        its index is read, any other (a previous owner's)."""
        known = self._tasks.pop(traj.traj_id, set())
        if known:
            self.writer.bg_lost(traj.traj_id, traj.epoch, known).add_done_callback(self._lost)
        task = asyncio.get_running_loop().create_task(self._others_lost(traj, known))
        self._marking.add(task)
        task.add_done_callback(self._marking.discard)

    async def _others_lost(self, traj: Traj, known: set[str]) -> None:
        try:
            others = await self.writer.bg_tasks(traj.traj_id) - known
            if others:
                done = self.writer.bg_lost(traj.traj_id, traj.epoch, others)
                await done
                self._lost(done)
        except Exception as exc:  # logged: those tasks stay `running` in Redis
            log.warning("marking the tasks of %s lost failed: %s", traj.traj_id, exc)

    def _lost(self, fut: asyncio.Future[Any]) -> None:
        count = fut.result() if not fut.cancelled() and fut.exception() is None else 0
        for _ in range(count if isinstance(count, int) and count > 0 else 0):
            self.observer.bg_task_changed("lost")
