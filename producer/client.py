"""toolq clients: open a trajectory, submit calls, wait for results, close.

``Client`` is synchronous, ``AsyncClient`` is the asyncio twin; both speak the
protocol in PROTOCOL.md and need only Redis (no docker, rq or prometheus).

    with Client("redis://localhost:6379") as c:
        c.open("t1")
        r = c.call("t1", "bash", {"command": "echo hi"})
        print(r.output)
        c.close("t1")
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from toolq.schemas import (
    BgTask,
    CallEntry,
    Keys,
    Result,
    ToolInfo,
    TrajectoryRecord,
    TrajectorySpec,
    lua,
)

from . import _protocol as p
from . import bg
from . import tools as tools_mod
from .config import resolve_redis_url

# Waits block in XREAD for as long as the caller asked: no socket read timeout
# (redis-py >= 8 defaults to 5 s), and RESP2 replies, which the parsing expects.
# Every wait holds a connection while it blocks, and one client may wait for
# hundreds of trajectories at once: redis-py's default pool stops at 100.
# Connecting includes the handshake, which a busy Redis or a starved event loop
# can delay for seconds: allow for a loaded machine.
CONNECT_KW: dict[str, Any] = {
    "socket_timeout": None,
    "socket_connect_timeout": 30,
    "protocol": 2,
    "max_connections": 10_000,
}


class ToolqError(Exception):
    """Base of the errors toolq clients raise."""


class WaitTimeout(ToolqError, TimeoutError):
    """No result arrived within the wait timeout (the call may still finish later)."""


class TrajectoryEnded(ToolqError):
    """The trajectory has already reached a final state."""


# Connection-level failures a client rides out (Redis restarting, failing over).
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
RETRIES = 20


def _backoff_s(attempt: int) -> float:
    return float(min(0.05 * 2**attempt, 2.0))


def _wait_timeout(timeout_s: float | None) -> float:
    return 60.0 if timeout_s is None else timeout_s


def _call_wait_s(timeout_s: float | None) -> float:
    # Leave room past the call's own timeout for queueing and slot start.
    return (timeout_s or 60.0) + 60.0


class Client:
    """Synchronous toolq client."""

    def __init__(
        self,
        redis_url: str | None = None,
        namespace: str = "toolq",
        redis_client: redis.Redis | None = None,
    ) -> None:
        self.redis = redis_client or redis.Redis.from_url(
            resolve_redis_url(redis_url), **CONNECT_KW
        )
        self.keys = Keys(namespace)
        self._open = self.redis.register_script(lua.OPEN)
        self._submit = self.redis.register_script(lua.SUBMIT)
        self._cancel = self.redis.register_script(lua.CANCEL)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.redis.close()

    def open(self, traj_id: str, spec: TrajectorySpec | dict[str, Any] | None = None) -> str:
        """Request a trajectory; returns its status (``new`` when just created).

        Opening an open trajectory again is a no-op; an ended one raises.
        """
        keys, args, entry = p.open_args(self.keys, traj_id, _spec(spec))
        status = p.s(self._open(keys=keys, args=args))
        if status == "new":
            pipe = self.redis.pipeline(transaction=False)
            pipe.zadd(self.keys.runs, {traj_id: args[1]}, nx=True)
            pipe.zadd(self.keys.pending, {traj_id: args[1]}, nx=True)
            pipe.xadd(self.keys.open, entry)
            pipe.execute()
        elif status not in ("pending", "running"):
            raise TrajectoryEnded(f"trajectory {traj_id} has ended ({status})")
        return status

    def submit(
        self,
        traj_id: str,
        tool: str,
        args: dict[str, Any] | None = None,
        *,
        call_id: str | None = None,
        timeout_s: float | None = None,
        idempotent: bool = False,
    ) -> str:
        """Append a tool call; returns its call id at once."""
        entry = p.make_call(tool, args, call_id, timeout_s, idempotent)
        keys, argv = p.submit_args(self.keys, traj_id, entry)
        entry_id = p.s(self._submit(keys=keys, args=argv))
        return call_id or entry_id

    def result(self, traj_id: str, call_id: str, timeout_s: float | None = 60.0) -> Result:
        """Wait up to ``timeout_s`` for a call's result; raises WaitTimeout."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrevrange(self.keys.events(traj_id), count=1)
        pipe.hgetall(self.keys.result(traj_id, call_id))
        cursor_reply, fields = pipe.execute()
        return self._wait(traj_id, call_id, p.last_event_id(cursor_reply), fields, timeout_s)

    def call(
        self,
        traj_id: str,
        tool: str,
        args: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        wait_s: float | None = None,
        call_id: str | None = None,
        idempotent: bool = False,
    ) -> Result:
        """Submit a call and wait for its result.

        With a ``call_id`` the submission is retried across Redis restarts
        (the worker runs a call id once); without one a lost connection raises.
        """
        entry = p.make_call(tool, args, call_id, timeout_s, idempotent)
        keys, argv = p.submit_args(self.keys, traj_id, entry)
        for attempt in range(RETRIES if call_id else 1):
            try:
                cursor, existing, entry_id = self._send_call(traj_id, call_id, (keys, argv))
                break
            except REDIS_DOWN:
                if not call_id or attempt == RETRIES - 1:
                    raise
                time.sleep(_backoff_s(attempt))
        cid = call_id or p.s(entry_id)
        wait = wait_s if wait_s is not None else _call_wait_s(timeout_s)
        return self._wait(traj_id, cid, cursor, existing, wait)

    def _send_call(
        self, traj_id: str, call_id: str | None, submit: tuple[list[str], list[Any]]
    ) -> tuple[str, Any, Any]:
        """One round trip: events cursor, existing result, submit (see ``p.queue_call``)."""
        for loaded in (False, True):
            pipe = self.redis.pipeline(transaction=False)
            p.queue_call(pipe, self.keys, traj_id, call_id, self._submit.sha, submit)
            try:
                return p.call_replies(pipe.execute(), call_id)
            except NoScriptError:  # a restarted Redis forgot the script: nothing was submitted
                if loaded:
                    raise
                self.redis.script_load(lua.SUBMIT)
        raise AssertionError("unreachable")

    def _wait(
        self, traj_id: str, call_id: str, cursor: str, fields: Any, timeout_s: float | None
    ) -> Result:
        found = p.parse_result(fields)
        deadline = time.monotonic() + _wait_timeout(timeout_s)
        events = self.keys.events(traj_id)
        errors = 0
        while found is None:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise WaitTimeout(f"no result for call {call_id} of {traj_id} yet")
            try:
                reply = self.redis.xread({events: cursor}, count=100, block=left_ms)
                new_cursor, hit, found = p.scan_result(reply, call_id)
                if found is None and (hit or new_cursor is None):  # seen, or timed out: look
                    found = p.parse_result(self.redis.hgetall(self.keys.result(traj_id, call_id)))
                cursor = new_cursor or cursor  # only once the look succeeded
            except REDIS_DOWN:  # Redis restarting: wait, then look again
                time.sleep(min(_backoff_s(errors), max(left_ms, 0) / 1000))
                errors += 1
        return found

    def close(self, traj_id: str) -> str:
        """Close after the calls already submitted; frees the slot. Returns the entry id."""
        return self._control(traj_id, "close")

    def cancel(self, traj_id: str) -> str:
        """Cancel now: kill what runs, answer what waits with ``cancelled``.

        Returns ``requested`` (its worker acts within a second), ``cancelled``
        (no worker owned it: done here) or ``ended`` (it had ended already).
        """
        keys, argv = p.cancel_args(self.keys, traj_id)
        outcome = p.s(self._cancel(keys=keys, args=argv))
        if outcome == "cancelled":
            self.redis.zrem(self.keys.pending, traj_id)
        return outcome

    def _control(self, traj_id: str, kind: str) -> str:
        keys, argv = p.submit_args(self.keys, traj_id, CallEntry(type=kind))
        return p.s(self._submit(keys=keys, args=argv))

    def trajectory(self, traj_id: str) -> TrajectoryRecord | None:
        """The trajectory record, or None if unknown (or expired)."""
        fields = self.redis.hgetall(self.keys.traj(traj_id))
        return TrajectoryRecord.from_fields(fields) if fields else None

    def runs(
        self,
        status: str | None = None,
        label: dict[str, str] | list[str] | None = None,
        limit: int = 100,
    ) -> list[TrajectoryRecord]:
        """Trajectories, newest first, filtered by status and labels (``k=v``)."""
        labels = p.parse_labels(label)
        found: list[TrajectoryRecord] = []
        for start in range(0, 10**9, p.RUNS_PAGE):
            ids = self.redis.zrevrange(self.keys.runs, start, start + p.RUNS_PAGE - 1)
            if not ids:
                break
            pipe = self.redis.pipeline(transaction=False)
            for traj_id in ids:
                pipe.hgetall(self.keys.traj(p.s(traj_id)))
            page, expired = p.select_runs(ids, pipe.execute(), status, labels)
            found += page
            if expired:  # records past their retention: forget them
                self.redis.zrem(self.keys.runs, *expired)
            if len(found) >= limit:
                break
        return found[:limit]

    def run_counts(self, label: dict[str, str] | list[str] | None = None) -> dict[str, int]:
        """How many trajectories are in each state (optionally with these labels)."""
        return p.count_by_status(self.runs(label=label, limit=10**9))

    def tools(self, names: Iterable[str] | None = None) -> list[ToolInfo]:
        """The tools workers published (name, description, JSON Schema, external)."""
        return tools_mod.select(tools_mod.parse_tools(self.redis.hgetall(self.keys.tools)), names)

    def tool_specs(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """OpenAI function-calling specs of the published tools (optionally only ``names``)."""
        return tools_mod.tool_specs(self.redis.hgetall(self.keys.tools), names)

    def bg_list(self, traj_id: str) -> list[BgTask]:
        """The trajectory's background tasks, oldest first (read from Redis)."""
        return bg.list_tasks(self.redis, self.keys, traj_id)

    def bg_get(self, traj_id: str, task_id: str) -> BgTask | None:
        """One background task's state and output tails, or None if unknown."""
        return bg.get_task(self.redis, self.keys, traj_id, task_id)

    def bg_output(self, traj_id: str, task_id: str, *, wait_s: float = 0.0) -> BgTask | None:
        """A task with its output tails (``stdout_tail``, ``stderr_tail``, byte counts),
        after waiting up to ``wait_s`` for it to end; ``status`` says if it has."""
        return bg.wait_task(self.redis, self.keys, traj_id, task_id, wait_s)

    def bg_stop(self, traj_id: str, task_id: str, *, force: bool = False) -> Result:
        """Stop a task (a ``bg_stop`` tool call): SIGTERM, SIGKILL after a grace period."""
        return self.call(traj_id, "bg_stop", {"task_id": task_id, "force": force})


class AsyncClient:
    """asyncio toolq client; same methods as ``Client``, awaitable."""

    def __init__(
        self,
        redis_url: str | None = None,
        namespace: str = "toolq",
        redis_client: aioredis.Redis | None = None,
    ) -> None:
        self.redis = redis_client or aioredis.Redis.from_url(
            resolve_redis_url(redis_url), **CONNECT_KW
        )
        self.keys = Keys(namespace)
        self._open = self.redis.register_script(lua.OPEN)
        self._submit = self.redis.register_script(lua.SUBMIT)
        self._cancel = self.redis.register_script(lua.CANCEL)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.redis.aclose()

    async def open(self, traj_id: str, spec: TrajectorySpec | dict[str, Any] | None = None) -> str:
        """See ``Client.open``."""
        keys, args, entry = p.open_args(self.keys, traj_id, _spec(spec))
        status = p.s(await self._open(keys=keys, args=args))
        if status == "new":
            pipe = self.redis.pipeline(transaction=False)
            pipe.zadd(self.keys.runs, {traj_id: args[1]}, nx=True)
            pipe.zadd(self.keys.pending, {traj_id: args[1]}, nx=True)
            pipe.xadd(self.keys.open, entry)
            await pipe.execute()
        elif status not in ("pending", "running"):
            raise TrajectoryEnded(f"trajectory {traj_id} has ended ({status})")
        return status

    async def submit(
        self,
        traj_id: str,
        tool: str,
        args: dict[str, Any] | None = None,
        *,
        call_id: str | None = None,
        timeout_s: float | None = None,
        idempotent: bool = False,
    ) -> str:
        """See ``Client.submit``."""
        entry = p.make_call(tool, args, call_id, timeout_s, idempotent)
        keys, argv = p.submit_args(self.keys, traj_id, entry)
        return call_id or p.s(await self._submit(keys=keys, args=argv))

    async def result(self, traj_id: str, call_id: str, timeout_s: float | None = 60.0) -> Result:
        """See ``Client.result``."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrevrange(self.keys.events(traj_id), count=1)
        pipe.hgetall(self.keys.result(traj_id, call_id))
        cursor_reply, fields = await pipe.execute()
        return await self._wait(traj_id, call_id, p.last_event_id(cursor_reply), fields, timeout_s)

    async def call(
        self,
        traj_id: str,
        tool: str,
        args: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        wait_s: float | None = None,
        call_id: str | None = None,
        idempotent: bool = False,
    ) -> Result:
        """See ``Client.call``."""
        entry = p.make_call(tool, args, call_id, timeout_s, idempotent)
        keys, argv = p.submit_args(self.keys, traj_id, entry)
        for attempt in range(RETRIES if call_id else 1):
            try:
                cursor, existing, entry_id = await self._send_call(traj_id, call_id, (keys, argv))
                break
            except REDIS_DOWN:
                if not call_id or attempt == RETRIES - 1:
                    raise
                await asyncio.sleep(_backoff_s(attempt))
        cid = call_id or p.s(entry_id)
        wait = wait_s if wait_s is not None else _call_wait_s(timeout_s)
        return await self._wait(traj_id, cid, cursor, existing, wait)

    async def _send_call(
        self, traj_id: str, call_id: str | None, submit: tuple[list[str], list[Any]]
    ) -> tuple[str, Any, Any]:
        """See ``Client._send_call``."""
        for loaded in (False, True):
            pipe = self.redis.pipeline(transaction=False)
            p.queue_call(pipe, self.keys, traj_id, call_id, self._submit.sha, submit)
            try:
                return p.call_replies(await pipe.execute(), call_id)
            except NoScriptError:
                if loaded:
                    raise
                await self.redis.script_load(lua.SUBMIT)
        raise AssertionError("unreachable")

    async def _wait(
        self, traj_id: str, call_id: str, cursor: str, fields: Any, timeout_s: float | None
    ) -> Result:
        found = p.parse_result(fields)
        deadline = time.monotonic() + _wait_timeout(timeout_s)
        events = self.keys.events(traj_id)
        errors = 0
        while found is None:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise WaitTimeout(f"no result for call {call_id} of {traj_id} yet")
            try:
                reply = await self.redis.xread({events: cursor}, count=100, block=left_ms)
                new_cursor, hit, found = p.scan_result(reply, call_id)
                if found is None and (hit or new_cursor is None):
                    fields = await self.redis.hgetall(self.keys.result(traj_id, call_id))
                    found = p.parse_result(fields)
                cursor = new_cursor or cursor  # only once the look succeeded
            except REDIS_DOWN:
                await asyncio.sleep(min(_backoff_s(errors), max(left_ms, 0) / 1000))
                errors += 1
        return found

    async def close(self, traj_id: str) -> str:
        """See ``Client.close``."""
        return await self._control(traj_id, "close")

    async def cancel(self, traj_id: str) -> str:
        """See ``Client.cancel``."""
        keys, argv = p.cancel_args(self.keys, traj_id)
        outcome = p.s(await self._cancel(keys=keys, args=argv))
        if outcome == "cancelled":
            await self.redis.zrem(self.keys.pending, traj_id)
        return outcome

    async def _control(self, traj_id: str, kind: str) -> str:
        keys, argv = p.submit_args(self.keys, traj_id, CallEntry(type=kind))
        return p.s(await self._submit(keys=keys, args=argv))

    async def trajectory(self, traj_id: str) -> TrajectoryRecord | None:
        """See ``Client.trajectory``."""
        fields = await self.redis.hgetall(self.keys.traj(traj_id))
        return TrajectoryRecord.from_fields(fields) if fields else None

    async def runs(
        self,
        status: str | None = None,
        label: dict[str, str] | list[str] | None = None,
        limit: int = 100,
    ) -> list[TrajectoryRecord]:
        """See ``Client.runs``."""
        labels = p.parse_labels(label)
        found: list[TrajectoryRecord] = []
        start = 0
        while len(found) < limit:
            ids = await self.redis.zrevrange(self.keys.runs, start, start + p.RUNS_PAGE - 1)
            if not ids:
                break
            pipe = self.redis.pipeline(transaction=False)
            for traj_id in ids:
                pipe.hgetall(self.keys.traj(p.s(traj_id)))
            page, _expired = p.select_runs(ids, await pipe.execute(), status, labels)
            found += page
            start += p.RUNS_PAGE
        return found[:limit]

    async def tools(self, names: Iterable[str] | None = None) -> list[ToolInfo]:
        """See ``Client.tools``."""
        raw = await self.redis.hgetall(self.keys.tools)
        return tools_mod.select(tools_mod.parse_tools(raw), names)

    async def tool_specs(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """See ``Client.tool_specs``."""
        return tools_mod.tool_specs(await self.redis.hgetall(self.keys.tools), names)

    async def bg_list(self, traj_id: str) -> list[BgTask]:
        """See ``Client.bg_list``."""
        return await bg.list_tasks_async(self.redis, self.keys, traj_id)

    async def bg_get(self, traj_id: str, task_id: str) -> BgTask | None:
        """See ``Client.bg_get``."""
        return await bg.get_task_async(self.redis, self.keys, traj_id, task_id)

    async def bg_output(self, traj_id: str, task_id: str, *, wait_s: float = 0.0) -> BgTask | None:
        """See ``Client.bg_output``."""
        return await bg.wait_task_async(self.redis, self.keys, traj_id, task_id, wait_s)

    async def bg_stop(self, traj_id: str, task_id: str, *, force: bool = False) -> Result:
        """See ``Client.bg_stop``."""
        return await self.call(traj_id, "bg_stop", {"task_id": task_id, "force": force})


def _spec(spec: TrajectorySpec | dict[str, Any] | None) -> TrajectorySpec | None:
    if spec is None or isinstance(spec, TrajectorySpec):
        return spec
    return TrajectorySpec.model_validate(spec)
