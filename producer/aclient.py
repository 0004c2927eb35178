"""The asyncio toolq client: the methods of ``Client``, awaitable (see ``client.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import NoScriptError

from toolq.schemas import (
    BgTask,
    Keys,
    Result,
    SnapshotInfo,
    ToolInfo,
    TrajectoryRecord,
    TrajectorySpec,
)

from . import children, ops, snapshots
from . import tools as tools_mod
from .client import Client
from .config import redis_target, resolve_namespace, resolve_redis_url
from .drive import (
    BACKOFF,
    CLUSTER_KW,
    CONNECT_KW,
    REDIS_DOWN,
    RETRIES,
    CallLike,
    RetryBudget,
    as_spec,
    bg_wait_op,
    call_wait_s,
    calls_wait_s,
    count_by_status,
    default_wait_s,
    look_op,
    queue,
    raise_errors,
    renamed_wait_s,
    tool_calls,
    with_source,
)
from .hub import EventHub
from .liveness import Liveness, workers_alive_op
from .mux import MuxConnection
from .ops import Cmd, Op, ToolCall, WaitTimeout
from .session import AsyncTrajectory
from .waits import Call, cursor_before


class AsyncClient:
    """asyncio toolq client: the same methods as ``Client``, awaitable.

    All its waits share one connection: one reader serves every concurrent
    ``call``/``result`` of the client (``hub.EventHub``).
    """

    def __init__(
        self,
        redis_url: str | None = None,
        namespace: str | None = None,
        redis_client: aioredis.Redis | None = None,
    ) -> None:
        target, self.cluster = redis_target(resolve_redis_url(redis_url))
        # One layer of retries, ours (``_execute``): redis-py's own would multiply it.
        retry = AsyncRetry(ExponentialWithJitterBackoff(**BACKOFF), 0)
        if redis_client is not None:
            self.redis = redis_client
            self.cluster = isinstance(redis_client, aioredis.RedisCluster)
        elif self.cluster:
            cluster = aioredis.RedisCluster.from_url(target, retry=retry, **CLUSTER_KW)
            self.redis = cast(aioredis.Redis, cluster)
        else:
            self.redis = aioredis.Redis.from_url(target, retry=retry, **CONNECT_KW)
        self.keys = Keys(resolve_namespace(namespace))
        self._liveness = Liveness()
        # Scripts (every submit) and the event reader's wakes share one pipelined
        # connection on one Redis.
        self._mux = None if self.cluster else MuxConnection(self.redis.connection_pool)
        self._hub = EventHub(self.redis, self.keys, self.cluster, self._mux)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the event reader and close the connections."""
        await self._hub.close()
        if self._mux is not None:
            await self._mux.aclose()
        await self.redis.aclose()

    # ------------------------------------------------------------- driver
    async def _drive(self, op: Op[ops.T]) -> ops.T:
        try:
            request = next(op)
            while True:
                request = op.send(await self._execute(request))
        except StopIteration as stop:
            value: ops.T = stop.value
            return value

    async def _execute(self, cmds: list[Cmd]) -> list[Any]:
        budget = RetryBudget(RETRIES)
        while True:
            try:
                return await self._execute_once(cmds)
            except REDIS_DOWN as exc:  # safe to send again: every operation is idempotent
                delay_s = budget.delay_s(exc)
                if delay_s is None:
                    raise
                await asyncio.sleep(delay_s)

    async def _execute_once(self, cmds: list[Cmd]) -> list[Any]:
        replies = await self._pipeline(cmds)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:  # a restarted Redis forgot the scripts: nothing of those ran
            again = await self._pipeline([with_source(cmds[i]) for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return raise_errors(replies)

    async def _pipeline(self, cmds: list[Cmd]) -> list[Any]:
        if self._mux is not None and cmds and all(c.name in ("evalsha", "eval") for c in cmds):
            return await self._mux.execute([(cmd.name.upper(), *cmd.args) for cmd in cmds])
        pipe = self.redis.pipeline(transaction=False)
        for cmd in cmds:
            queue(pipe, cmd)
        return list(await pipe.execute(raise_on_error=False))

    # ---------------------------------------------------------- lifecycle
    async def open(
        self,
        traj_id: str,
        spec: TrajectorySpec | dict[str, Any] | None = None,
        *,
        reuse: bool = False,
    ) -> str:
        return await self._drive(children.open_traj(self.keys, traj_id, as_spec(spec), reuse))

    async def submit(
        self,
        traj_id: str,
        tool: str,
        args: dict[str, Any] | str | None = None,
        *,
        call_id: str | None = None,
        timeout_s: float | None = None,
        idempotent: bool = False,
    ) -> str:
        entry = ToolCall(tool, args, call_id, timeout_s, idempotent)
        return (await self._drive(ops.submit(self.keys, traj_id, entry))).call_id

    async def set_policy(
        self,
        traj_id: str,
        *,
        step: str | None = None,
        allowed_tools: list[str] | None = None,
        blocked_tools: list[str] | None = None,
        call_timeout_s: float | None = None,
    ) -> str:
        entry = ops.policy_entry(step, allowed_tools, blocked_tools, call_timeout_s)
        return (await self._drive(ops.submit(self.keys, traj_id, entry))).call_id

    async def submit_many(self, traj_id: str, calls: Iterable[CallLike]) -> list[str]:
        done = await self._drive(ops.submit_many(self.keys, traj_id, tool_calls(calls)))
        return [d.call_id for d in done]

    async def close(self, traj_id: str) -> str:
        return await self._drive(ops.close(self.keys, traj_id))

    async def cancel(self, traj_id: str) -> str:
        return await self._drive(children.cancel(self.keys, traj_id))

    # -------------------------------------------------------------- calls
    async def call(
        self,
        traj_id: str,
        tool: str,
        args: dict[str, Any] | str | None = None,
        *,
        timeout_s: float | None = None,
        wait_s: float | None = None,
        call_id: str | None = None,
        idempotent: bool = False,
    ) -> Result:
        entry = ToolCall(tool, args, call_id, timeout_s, idempotent)
        done = await self._drive(ops.submit(self.keys, traj_id, entry))
        wait = wait_s if wait_s is not None else call_wait_s(entry.asked_timeout_s)
        return await self._await(done, wait)

    async def call_many(
        self, traj_id: str, calls: Iterable[CallLike], *, wait_s: float | None = None
    ) -> list[Result]:
        to_submit = tool_calls(calls)
        done = await self._drive(ops.submit_many(self.keys, traj_id, to_submit))
        wait = wait_s if wait_s is not None else calls_wait_s(to_submit)
        return await _gather([self._await(d, wait) for d in done])

    async def result(
        self,
        traj_id: str,
        call_id: str,
        wait_s: float | None = 60.0,
        *,
        timeout_s: float | None = None,
    ) -> Result:
        wait_s = renamed_wait_s(wait_s, timeout_s)
        return await self._await(ops.Submitted(traj_id, call_id, ""), default_wait_s(wait_s))

    async def results(self, calls: Iterable[Call], *, wait_s: float | None = 60.0) -> list[Result]:
        return await _gather([self.result(t, c, wait_s) for t, c in calls])

    async def as_completed(
        self, calls: Iterable[Call], *, wait_s: float | None = 60.0
    ) -> AsyncIterator[Result]:
        tasks = [asyncio.ensure_future(self.result(t, c, wait_s)) for t, c in calls]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:  # a timeout or a caller that stopped early: stop the other waits
            for task in tasks:
                task.cancel()

    async def _await(self, done: ops.Submitted, wait_s: float) -> Result:
        if not self._liveness.seen:  # before the first wait: warn when no worker serves us
            self._liveness.note(await self._drive(workers_alive_op(self.keys)), self.keys)
        try:
            return await self._await_result(done, wait_s)
        except WaitTimeout as exc:
            alive = await self._drive(workers_alive_op(self.keys))
            raise WaitTimeout(self._liveness.explain(exc, alive, self.keys)) from None

    async def _await_result(self, done: ops.Submitted, wait_s: float) -> Result:
        if done.entry_id:
            cursor = cursor_before(done.entry_id)
        else:  # answered at once, or an older call: look first, then wait from now
            ((cursor, found),) = await self._drive(look_op(self.keys, [done]))
            if found is not None:
                return found
        return await self._hub.wait(done.traj_id, done.call_id, cursor, wait_s)

    # ------------------------------------------------------- agent loops
    def trajectory(
        self,
        traj_id: str,
        spec: TrajectorySpec | dict[str, Any] | None = None,
        *,
        reuse: bool = False,
    ) -> AsyncTrajectory:
        """A handle on one trajectory for an agent loop; as an async context manager
        it opens the trajectory and closes it (cancels it when the block raised).
        ``reuse`` starts an ended trajectory of the same id over (see ``open``)."""
        return AsyncTrajectory(self, traj_id, as_spec(spec), reuse)

    # ------------------------------------------------------------ reading
    async def snapshot(
        self, traj_id: str, name: str, *, ttl_s: float | None = None, wait_s: float = 600.0
    ) -> Result:
        """See ``Client.snapshot``."""
        op = snapshots.take_op(self.keys, traj_id, name, ttl_s, wait_s, self.cluster)
        return await self._drive(op)

    async def fork(
        self,
        traj_id: str,
        new_ids: Iterable[str],
        spec: TrajectorySpec | dict[str, Any] | None = None,
        *,
        ttl_s: float | None = None,
        wait_s: float = 600.0,
    ) -> Result:
        """See ``Client.fork``."""
        op = snapshots.fork_op(
            self.keys, traj_id, list(new_ids), as_spec(spec), ttl_s, wait_s, self.cluster
        )
        return await self._drive(op)

    async def snapshots(self) -> list[SnapshotInfo]:
        """See ``Client.snapshots``."""
        return await self._drive(snapshots.list_op(self.keys))

    async def delete_snapshot(self, name: str) -> bool:
        """See ``Client.delete_snapshot``."""
        return await self._drive(snapshots.delete_op(self.keys, name))

    async def record(self, traj_id: str) -> TrajectoryRecord | None:
        return await self._drive(ops.get_record(self.keys, traj_id))

    async def runs(
        self,
        status: str | None = None,
        label: dict[str, str] | list[str] | None = None,
        limit: int = 100,
        *,
        parent: str | None = None,
    ) -> list[TrajectoryRecord]:
        labels = ops.parse_labels(label)
        if parent is not None:
            return await self._drive(children.child_runs(self.keys, parent, status, labels, limit))
        return await self._drive(ops.runs(self.keys, status, labels, limit))

    async def run_counts(self, label: dict[str, str] | list[str] | None = None) -> dict[str, int]:
        return count_by_status(await self.runs(label=label, limit=10**9))

    async def tools(self, names: Iterable[str] | None = None) -> list[ToolInfo]:
        return await self._drive(ops.tool_infos(self.keys, names))

    async def tool_specs(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        return [tools_mod.openai_spec(t) for t in await self.tools(names)]

    # --------------------------------------------------- background tasks
    async def bg_list(self, traj_id: str) -> list[BgTask]:
        return await self._drive(ops.bg_list(self.keys, traj_id))

    async def bg_get(self, traj_id: str, task_id: str) -> BgTask | None:
        return await self._drive(ops.bg_get(self.keys, traj_id, task_id))

    async def bg_output(self, traj_id: str, task_id: str, *, wait_s: float = 0.0) -> BgTask | None:
        return await self._drive(bg_wait_op(self.keys, traj_id, task_id, wait_s))

    async def bg_stop(self, traj_id: str, task_id: str, *, force: bool = False) -> Result:
        return await self.call(traj_id, "bg_stop", {"task_id": task_id, "force": force})


# The asyncio client's methods carry the sync client's docstrings.
for _name, _method in vars(AsyncClient).items():
    _twin = getattr(Client, _name, None)
    if callable(_method) and not _name.startswith("_") and _twin is not None and _twin.__doc__:
        _method.__doc__ = _method.__doc__ or _twin.__doc__


async def _gather(waits: list[Any]) -> list[Result]:
    """Await all; on the first error (a timeout), stop the other waits and raise it."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
