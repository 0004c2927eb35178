"""Background tasks, worker side: the agent's ``bg`` events become Redis writes.

The in-sandbox agent runs the tasks and reports each one as an event
``{"event": "bg", "slot": <slot name>, "task": {...}}`` when it starts, at most
every 0.5 s while its output grows, and when it ends. ``BgRecorder`` maps the
slot to its trajectory and writes the task's hash ``Keys.bg(T, task)``, its
entry in ``Keys.bg_index(T)`` and, when it ends, an ``Event(type="bg")`` on
``Keys.events(T)``. A final status is never overwritten, so a late event cannot
turn a stopped task back into a running or completed one. When a slot goes away
(trajectory ended, sandbox lost), tasks still ``running`` in Redis are marked
``lost``: nobody is left to report on them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError

from toolq.schemas import BgTask, InvalidIdError, Keys, check_part

from .backends.base import Slot
from .metrics import Observer

log = logging.getLogger("toolq.worker.bg")

BG_FINAL_LUA = "local final = {completed=1, failed=1, stopped=1, lost=1}\n"

# KEYS: bg hash, bg index, events
# ARGV: retention_ms, events_maxlen, task_id, started_ms, status, then field/value pairs
# Writes the task unless its recorded status is final already; on a final
# status also appends a bg event. Returns 'new', 'ok' or 'final' (ignored).
WRITE_TASK = (
    BG_FINAL_LUA
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if st and final[st] then return 'final' end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], 'NX', ARGV[4], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
if final[ARGV[5]] then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'v', '1', 'type', 'bg',
             'task_id', ARGV[3], 'status', ARGV[5])
end
if st then return 'ok' end
return 'new'
"""
)

# KEYS: bg hash, events
# ARGV: events_maxlen, task_id, now_ms
# Marks a task that is still running as lost. Returns 1 if it did.
MARK_LOST = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'lost', 'ended_ms', ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'v', '1', 'type', 'bg',
           'task_id', ARGV[2], 'status', 'lost')
return 1
"""

WRITE_ATTEMPTS = 3
# The agent stops tasks with SIGTERM, SIGKILL after 0.5 s, then reports them.
STOP_TIMEOUT_S = 10.0


class BgRecorder:
    """Writes background-task state to Redis as the agents report it."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        traj_of_slot: Callable[[str], str | None],
        retention_s: int,
        events_maxlen: int,
        observer: Observer | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.traj_of_slot = traj_of_slot
        self.retention_ms = retention_s * 1000
        self.events_maxlen = events_maxlen
        self.observer = observer or Observer()
        # Slot -> trajectory, remembered from a task's first event: the final
        # events of a drop arrive after the worker has detached the slot.
        self._slots: dict[str, str] = {}
        self._write = redis.register_script(WRITE_TASK)
        self._lost = redis.register_script(MARK_LOST)

    async def on_event(self, msg: dict[str, Any]) -> None:
        """Record one ``bg`` event; a malformed one is logged and dropped."""
        slot, task = msg.get("slot"), msg.get("task")
        traj_id = self._traj(slot) if isinstance(slot, str) else None
        if traj_id is None or not isinstance(task, dict):
            log.warning("bg event for an unknown slot or without a task: %.200r", msg)
            return
        try:
            record = BgTask.model_validate({**task, "traj": traj_id})
            check_part(record.task_id, "task id")
        except (ValidationError, InvalidIdError) as exc:
            log.warning("malformed bg event from slot %s: %s", slot, exc)
            return
        try:
            await self._record(record)
        except Exception:  # the agent channel runs this handler: it must not break it
            log.exception("recording background task %s failed", record.task_id)

    def _traj(self, slot: str) -> str | None:
        if slot not in self._slots:
            traj_id = self.traj_of_slot(slot)
            if traj_id is None:
                return None
            self._slots[slot] = traj_id
        return self._slots[slot]

    async def _record(self, task: BgTask) -> None:
        fields = task.to_fields()
        args = [
            self.retention_ms,
            self.events_maxlen,
            task.task_id,
            task.started_ms,
            task.status,
            *(x for kv in fields.items() for x in kv),
        ]
        keys = [
            self.keys.bg(task.traj, task.task_id),
            self.keys.bg_index(task.traj),
            self.keys.events(task.traj),
        ]
        outcome = await self._attempt(lambda: self._write(keys=keys, args=args))
        outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
        if outcome == "new":
            self.observer.bg_task_changed("running")
        if outcome in ("new", "ok") and task.status != "running":
            self.observer.bg_task_changed(task.status)

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

    async def slot_gone(self, traj_id: str, slot_name: str, now_ms: int) -> int:
        """The slot's agent is gone: mark the trajectory's running tasks lost.

        Call it after the slot was released, so the final states its agent
        reported are in Redis already. Returns how many tasks were marked.
        """
        self._slots.pop(slot_name, None)
        ids = await self._attempt(lambda: self.redis.zrange(self.keys.bg_index(traj_id), 0, -1))
        marked = 0
        for raw in ids or []:
            task_id = raw.decode() if isinstance(raw, bytes) else str(raw)
            keys = [self.keys.bg(traj_id, task_id), self.keys.events(traj_id)]
            args: list[str | int] = [self.events_maxlen, task_id, now_ms]
            if await self._attempt(functools.partial(self._lost, keys=keys, args=args)):
                marked += 1
                self.observer.bg_task_changed("lost")
        return marked

    async def _attempt(self, fn: Callable[[], Any]) -> Any:
        """Run a Redis write a few times; bg state is a snapshot, the next one repairs it.

        Bounded, because the agent channel waits for this handler.
        """
        delay_s = 0.05
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return await fn()
            except RedisError as exc:
                if attempt == WRITE_ATTEMPTS:
                    log.warning("background task write failed (%s); giving up", exc)
                    return None
                await asyncio.sleep(delay_s)
                delay_s *= 2
        return None
