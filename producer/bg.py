"""Background tasks, client side: task state read straight from Redis.

A worker keeps one hash per task, ``<ns>:{T}:bg:<task>`` (``schemas.BgTask``:
status, exit code, output tails and byte counts), updated while the task runs,
and the sorted set ``<ns>:{T}:bg`` of the trajectory's task ids by start time.
When a task ends it also appends ``{type: bg, task_id, status}`` to the
trajectory's events stream, which ``wait_task`` blocks on. Starting and stopping
tasks are ordinary tool calls (``bg_start``, ``bg_stop``).

``Client`` and ``AsyncClient`` delegate their ``bg_*`` methods here.
"""

from __future__ import annotations

import time
from typing import Any

import redis
import redis.asyncio as aioredis

from toolq.schemas import BgTask, Keys, check_part, check_traj_id

#: Statuses a task never leaves.
FINAL_STATUSES = frozenset(["completed", "failed", "stopped", "lost"])


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def parse_task(fields: dict[Any, Any]) -> BgTask | None:
    """A task from its hash fields; None for a missing (or expired) hash."""
    return BgTask.from_fields(fields) if fields else None


def task_key(keys: Keys, traj_id: str, task_id: str) -> str:
    """The task's hash key, after checking both ids."""
    check_traj_id(traj_id)
    check_part(task_id, "task id")
    return keys.bg(traj_id, task_id)


def is_final(task: BgTask | None) -> bool:
    """True when there is nothing more to wait for."""
    return task is None or task.status in FINAL_STATUSES


def ended_event_seen(reply: Any, task_id: str) -> tuple[str | None, bool]:
    """Walk an XREAD reply: (new cursor, whether a bg event of ``task_id`` is in it)."""
    cursor, seen = None, False
    for _stream, entries in reply or []:
        for entry_id, fields in entries:
            cursor = _s(entry_id)
            if _field(fields, "type") == "bg" and _field(fields, "task_id") == task_id:
                seen = True
    return cursor, seen


def _field(fields: dict[Any, Any], name: str) -> str:
    return _s(fields.get(name.encode(), fields.get(name, "")))


# ------------------------------------------------------------------- sync
def list_tasks(r: redis.Redis, keys: Keys, traj_id: str) -> list[BgTask]:
    """Every task of a trajectory, oldest first."""
    check_traj_id(traj_id)
    ids = r.zrange(keys.bg_index(traj_id), 0, -1)
    pipe = r.pipeline(transaction=False)
    for task_id in ids:
        pipe.hgetall(keys.bg(traj_id, _s(task_id)))
    return [t for t in (parse_task(f) for f in pipe.execute()) if t is not None]


def get_task(r: redis.Redis, keys: Keys, traj_id: str, task_id: str) -> BgTask | None:
    """One task, or None if unknown."""
    return parse_task(r.hgetall(task_key(keys, traj_id, task_id)))


def wait_task(
    r: redis.Redis, keys: Keys, traj_id: str, task_id: str, wait_s: float
) -> BgTask | None:
    """The task once it has ended, or as it is after ``wait_s`` seconds."""
    key = task_key(keys, traj_id, task_id)
    events = keys.events(traj_id)
    pipe = r.pipeline(transaction=False)
    pipe.xrevrange(events, count=1)
    pipe.hgetall(key)
    last, fields = pipe.execute()
    cursor = _s(last[0][0]) if last else "0-0"
    task = parse_task(fields)
    deadline = time.monotonic() + wait_s
    while not is_final(task):
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            break
        reply = r.xread({events: cursor}, count=100, block=left_ms)
        new_cursor, seen = ended_event_seen(reply, task_id)
        cursor = new_cursor or cursor
        if seen or new_cursor is None:
            task = parse_task(r.hgetall(key))
    return task


# ------------------------------------------------------------------ async
async def list_tasks_async(r: aioredis.Redis, keys: Keys, traj_id: str) -> list[BgTask]:
    """See ``list_tasks``."""
    check_traj_id(traj_id)
    ids = await r.zrange(keys.bg_index(traj_id), 0, -1)
    pipe = r.pipeline(transaction=False)
    for task_id in ids:
        pipe.hgetall(keys.bg(traj_id, _s(task_id)))
    return [t for t in (parse_task(f) for f in await pipe.execute()) if t is not None]


async def get_task_async(
    r: aioredis.Redis, keys: Keys, traj_id: str, task_id: str
) -> BgTask | None:
    """See ``get_task``."""
    return parse_task(await r.hgetall(task_key(keys, traj_id, task_id)))


async def wait_task_async(
    r: aioredis.Redis, keys: Keys, traj_id: str, task_id: str, wait_s: float
) -> BgTask | None:
    """See ``wait_task``."""
    key = task_key(keys, traj_id, task_id)
    events = keys.events(traj_id)
    pipe = r.pipeline(transaction=False)
    pipe.xrevrange(events, count=1)
    pipe.hgetall(key)
    last, fields = await pipe.execute()
    cursor = _s(last[0][0]) if last else "0-0"
    task = parse_task(fields)
    deadline = time.monotonic() + wait_s
    while not is_final(task):
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            break
        reply = await r.xread({events: cursor}, count=100, block=left_ms)
        new_cursor, seen = ended_event_seen(reply, task_id)
        cursor = new_cursor or cursor
        if seen or new_cursor is None:
            task = parse_task(await r.hgetall(key))
    return task
