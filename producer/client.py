"""toolq clients: open a trajectory, submit calls, wait for results, close.

``Client`` is synchronous, ``AsyncClient`` its asyncio twin: both are thin
drivers over the same protocol logic (``ops``, ``waits``), with the same
methods and docstrings. They need only Redis (no docker, rq or prometheus).

    with Client("redis://localhost:6379") as c:
        c.open("t1")
        r = c.call("t1", "bash", {"command": "echo hi"})
        print(r.output)
        c.close("t1")

Every operation is safe to send again (calls carry a client call id), so a
Redis restart or failover costs latency, not errors: connection failures are
retried with jittered exponential backoff (redis-py's ``Retry``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ClusterDownError, NoScriptError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from toolq.schemas import (
    BgTask,
    Keys,
    Result,
    ToolInfo,
    TrajectoryRecord,
    TrajectorySpec,
    TrajStatus,
)

from . import ops
from . import tools as tools_mod
from .config import redis_target, resolve_redis_url
from .ops import Cmd, Op, ToolqError, TrajectoryEnded, UnknownTrajectory, WaitTimeout
from .waits import EventHub, WaitSet, cursor_before, wait_op, xread_args, xread_route

__all__ = [
    "AsyncClient",
    "Client",
    "ToolqError",
    "TrajectoryEnded",
    "UnknownTrajectory",
    "WaitTimeout",
]

#: Connection failures are retried this many times (15-30 s of backoff in all).
RETRIES = 20
_BACKOFF = {"base": 0.05, "cap": 2.0}
_RETRY_ON = [RedisConnectionError, RedisTimeoutError]
# Waits block in XREAD for as long as the caller asked: no socket read timeout
# (redis-py >= 8 defaults to 5 s), and RESP2 replies, which the parsing expects.
# Connecting includes the handshake, which a busy Redis or a starved event loop
# can delay for seconds: allow for a loaded machine.
CONNECT_KW: dict[str, Any] = {
    "socket_timeout": None,
    "socket_connect_timeout": 30,
    "protocol": 2,
    "max_connections": 10_000,
    "retry_on_error": _RETRY_ON,
}
_CLUSTER_KW: dict[str, Any] = {
    k: v for k, v in CONNECT_KW.items() if k not in ("max_connections", "retry_on_error")
}


# What a restarting Redis or a cluster failing over answers for a while: wait and
# send again (redis-py's own cluster retries do not back off).
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError)


def _backoff_s(attempt: int) -> float:
    """Exponential backoff with full jitter, capped at 2 s (15-30 s over RETRIES)."""
    return float(random.uniform(0, min(0.05 * 2**attempt, 2.0)))


def _wait_s(timeout_s: float | None) -> float:
    return 60.0 if timeout_s is None else timeout_s


def _call_wait_s(timeout_s: float | None) -> float:
    # Leave room past the call's own timeout for queueing and slot start.
    return (timeout_s or 60.0) + 60.0


def _spec(spec: TrajectorySpec | dict[str, Any] | None) -> TrajectorySpec | None:
    if spec is None or isinstance(spec, TrajectorySpec):
        return spec
    return TrajectorySpec.model_validate(spec)


def queue(pipe: Any, cmd: Cmd) -> None:
    """Add ``cmd`` to a pipeline; scripts as plain EVALSHA/EVAL commands, which a
    cluster pipeline routes by their keys (its ``evalsha`` method refuses)."""
    if cmd.name in ("evalsha", "eval"):
        pipe.execute_command(cmd.name.upper(), *cmd.args)
    else:
        getattr(pipe, cmd.name)(*cmd.args, **cmd.kwargs)


def with_source(cmd: Cmd) -> Cmd:
    """An EVALSHA as EVAL of its source: runs (and caches) a script Redis forgot."""
    if cmd.name != "evalsha" or not cmd.script:
        return cmd
    return Cmd("eval", (cmd.script, *cmd.args[1:]), script=cmd.script)


def _raise_errors(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


class Client:
    """Synchronous toolq client."""

    def __init__(
        self,
        redis_url: str | None = None,
        namespace: str = "toolq",
        redis_client: redis.Redis | None = None,
        retries: int = RETRIES,
    ) -> None:
        """``retries``: how often a command is sent again while Redis is unreachable
        (15-30 s with the default; the CLI gives up after about a second)."""
        target, self.cluster = redis_target(resolve_redis_url(redis_url))
        self.retries = retries
        # One layer of retries, ours (``_execute``): redis-py's own would multiply it.
        retry = Retry(ExponentialWithJitterBackoff(**_BACKOFF), 0)
        if redis_client is not None:
            self.redis = redis_client
            self.cluster = isinstance(redis_client, redis.RedisCluster)
        elif self.cluster:
            self.redis = cast(
                redis.Redis, redis.RedisCluster.from_url(target, retry=retry, **_CLUSTER_KW)
            )
        else:
            self.redis = redis.Redis.from_url(target, retry=retry, **CONNECT_KW)
        self.keys = Keys(namespace)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.redis.close()

    # ------------------------------------------------------------- driver
    def _drive(self, op: Op[ops.T]) -> ops.T:
        try:
            request = next(op)
            while True:
                request = op.send(self._execute(request))
        except StopIteration as stop:
            value: ops.T = stop.value
            return value

    def _execute(self, cmds: list[Cmd]) -> list[Any]:
        for attempt in range(self.retries + 1):
            try:
                return self._execute_once(cmds)
            except REDIS_DOWN:  # safe to send again: every operation is idempotent
                if attempt == self.retries:
                    raise
                time.sleep(_backoff_s(attempt))
        raise AssertionError("unreachable")

    def _execute_once(self, cmds: list[Cmd]) -> list[Any]:
        replies = self._pipeline(cmds)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:  # a restarted Redis forgot the scripts: nothing of those ran
            again = self._pipeline([with_source(cmds[i]) for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return _raise_errors(replies)

    def _pipeline(self, cmds: list[Cmd]) -> list[Any]:
        if self.cluster and all(c.name == "xread" for c in cmds):
            return [self._routed_xread(c) for c in cmds]
        pipe = self.redis.pipeline(transaction=False)
        for cmd in cmds:
            queue(pipe, cmd)
        return list(pipe.execute(raise_on_error=False))

    def _routed_xread(self, cmd: Cmd) -> Any:
        """An XREAD sent to its slot's node outright (see ``waits.xread``)."""
        (streams,) = cmd.args
        client: Any = self.redis
        args = xread_args(streams, cmd.kwargs.get("block"))
        return client.execute_command(*args, **xread_route(client, streams))

    # ---------------------------------------------------------- lifecycle
    def open(
        self,
        traj_id: str,
        spec: TrajectorySpec | dict[str, Any] | None = None,
        *,
        reuse: bool = False,
    ) -> str:
        """Request a trajectory; returns its status (``new`` when just created).

        Opening an open trajectory again is a no-op (and re-enqueues an open
        request a crashed producer left half done). An ended one raises
        ``TrajectoryEnded``, unless ``reuse`` starts it over under the same id.
        """
        return self._drive(ops.open_traj(self.keys, traj_id, _spec(spec), reuse))

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
        """Append a tool call; returns its call id at once (a fresh one unless given).

        A ``call_id`` that already has a result is not run again: its result stands.
        """
        entry = ops.make_call(tool, args, call_id, timeout_s, idempotent)
        return self._drive(ops.submit(self.keys, traj_id, entry)).call_id

    def close(self, traj_id: str) -> str:
        """Close after the calls already submitted; frees the slot. Returns the entry id
        ('' when a close had ended it already: sending a close again is no error).

        Raises ``UnknownTrajectory`` or ``TrajectoryEnded`` (it ended otherwise).
        """
        return self._drive(ops.close(self.keys, traj_id))

    def cancel(self, traj_id: str) -> str:
        """Cancel now: kill what runs, answer what waits with ``cancelled``.

        Returns ``requested`` (its worker acts within a second), ``cancelled``
        (no worker owned it: done here) or ``ended`` (it had ended already);
        raises ``UnknownTrajectory`` for a trajectory never opened.
        """
        return self._drive(ops.cancel(self.keys, traj_id))

    # -------------------------------------------------------------- calls
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
        """Submit a call and wait for its result (``WaitTimeout`` after ``wait_s``)."""
        entry = ops.make_call(tool, args, call_id, timeout_s, idempotent)
        done = self._drive(ops.submit(self.keys, traj_id, entry))
        wait = wait_s if wait_s is not None else _call_wait_s(timeout_s)
        return self._await([done], wait)[0]

    def result(self, traj_id: str, call_id: str, timeout_s: float | None = 60.0) -> Result:
        """Wait up to ``timeout_s`` for a call's result; raises ``WaitTimeout``."""
        done = ops.Submitted(traj_id, call_id, "")
        return self._await([done], _wait_s(timeout_s), look_first=True)[0]

    def _await(
        self, calls: list[ops.Submitted], wait_s: float, look_first: bool = False
    ) -> list[Result]:
        return self._drive(_await_op(self.keys, calls, wait_s, look_first, self.cluster))

    # ------------------------------------------------------------ reading
    def trajectory(self, traj_id: str) -> TrajectoryRecord | None:
        """The trajectory record, or None if unknown (or expired)."""
        return self._drive(ops.get_record(self.keys, traj_id))

    def runs(
        self,
        status: str | None = None,
        label: dict[str, str] | list[str] | None = None,
        limit: int = 100,
    ) -> list[TrajectoryRecord]:
        """Trajectories, newest first, filtered by status and labels (``k=v``)."""
        return self._drive(ops.runs(self.keys, status, ops.parse_labels(label), limit))

    def run_counts(self, label: dict[str, str] | list[str] | None = None) -> dict[str, int]:
        """How many trajectories are in each state (optionally with these labels)."""
        return _count_by_status(self.runs(label=label, limit=10**9))

    def tools(self, names: Iterable[str] | None = None) -> list[ToolInfo]:
        """The tools workers published (name, description, JSON Schema, external)."""
        return self._drive(ops.tool_infos(self.keys, names))

    def tool_specs(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """OpenAI function-calling specs of the published tools (optionally only ``names``)."""
        return [tools_mod.openai_spec(t) for t in self.tools(names)]

    # --------------------------------------------------- background tasks
    def bg_list(self, traj_id: str) -> list[BgTask]:
        """The trajectory's background tasks, oldest first (read from Redis)."""
        return self._drive(ops.bg_list(self.keys, traj_id))

    def bg_get(self, traj_id: str, task_id: str) -> BgTask | None:
        """One background task's state and output tails, or None if unknown."""
        return self._drive(ops.bg_get(self.keys, traj_id, task_id))

    def bg_output(self, traj_id: str, task_id: str, *, wait_s: float = 0.0) -> BgTask | None:
        """A task with its output tails (``stdout_tail``, ``stderr_tail``, byte counts),
        after waiting up to ``wait_s`` for it to end; ``status`` says if it has."""
        return self._drive(_bg_wait_op(self.keys, traj_id, task_id, wait_s))

    def bg_stop(self, traj_id: str, task_id: str, *, force: bool = False) -> Result:
        """Stop a task (a ``bg_stop`` tool call): SIGTERM, SIGKILL after a grace period."""
        return self.call(traj_id, "bg_stop", {"task_id": task_id, "force": force})


class AsyncClient:
    """asyncio toolq client: the same methods as ``Client``, awaitable.

    All its waits share one connection: one reader serves every concurrent
    ``call``/``result`` of the client (``waits.EventHub``).
    """

    def __init__(
        self,
        redis_url: str | None = None,
        namespace: str = "toolq",
        redis_client: aioredis.Redis | None = None,
    ) -> None:
        target, self.cluster = redis_target(resolve_redis_url(redis_url))
        # One layer of retries, ours (``_execute``): redis-py's own would multiply it.
        retry = AsyncRetry(ExponentialWithJitterBackoff(**_BACKOFF), 0)
        if redis_client is not None:
            self.redis = redis_client
            self.cluster = isinstance(redis_client, aioredis.RedisCluster)
        elif self.cluster:
            cluster = aioredis.RedisCluster.from_url(target, retry=retry, **_CLUSTER_KW)
            self.redis = cast(aioredis.Redis, cluster)
        else:
            self.redis = aioredis.Redis.from_url(target, retry=retry, **CONNECT_KW)
        self.keys = Keys(namespace)
        self._hub = EventHub(self.redis, self.keys, self.cluster)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the event reader and close the connections."""
        await self._hub.close()
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
        for attempt in range(RETRIES + 1):
            try:
                return await self._execute_once(cmds)
            except REDIS_DOWN:  # safe to send again: every operation is idempotent
                if attempt == RETRIES:
                    raise
                await asyncio.sleep(_backoff_s(attempt))
        raise AssertionError("unreachable")

    async def _execute_once(self, cmds: list[Cmd]) -> list[Any]:
        replies = await self._pipeline(cmds)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:  # a restarted Redis forgot the scripts: nothing of those ran
            again = await self._pipeline([with_source(cmds[i]) for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return _raise_errors(replies)

    async def _pipeline(self, cmds: list[Cmd]) -> list[Any]:
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
        return await self._drive(ops.open_traj(self.keys, traj_id, _spec(spec), reuse))

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
        entry = ops.make_call(tool, args, call_id, timeout_s, idempotent)
        return (await self._drive(ops.submit(self.keys, traj_id, entry))).call_id

    async def close(self, traj_id: str) -> str:
        return await self._drive(ops.close(self.keys, traj_id))

    async def cancel(self, traj_id: str) -> str:
        return await self._drive(ops.cancel(self.keys, traj_id))

    # -------------------------------------------------------------- calls
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
        entry = ops.make_call(tool, args, call_id, timeout_s, idempotent)
        done = await self._drive(ops.submit(self.keys, traj_id, entry))
        wait = wait_s if wait_s is not None else _call_wait_s(timeout_s)
        return await self._await(done, wait)

    async def result(self, traj_id: str, call_id: str, timeout_s: float | None = 60.0) -> Result:
        return await self._await(ops.Submitted(traj_id, call_id, ""), _wait_s(timeout_s))

    async def _await(self, done: ops.Submitted, wait_s: float) -> Result:
        if done.entry_id:
            cursor = cursor_before(done.entry_id)
        else:  # answered at once, or an older call: look first, then wait from now
            cursor, found = await self._drive(_look_op(self.keys, done))
            if found is not None:
                return found
        return await self._hub.wait(done.traj_id, done.call_id, cursor, wait_s)

    # ------------------------------------------------------------ reading
    async def trajectory(self, traj_id: str) -> TrajectoryRecord | None:
        return await self._drive(ops.get_record(self.keys, traj_id))

    async def runs(
        self,
        status: str | None = None,
        label: dict[str, str] | list[str] | None = None,
        limit: int = 100,
    ) -> list[TrajectoryRecord]:
        return await self._drive(ops.runs(self.keys, status, ops.parse_labels(label), limit))

    async def run_counts(self, label: dict[str, str] | list[str] | None = None) -> dict[str, int]:
        return _count_by_status(await self.runs(label=label, limit=10**9))

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
        return await self._drive(_bg_wait_op(self.keys, traj_id, task_id, wait_s))

    async def bg_stop(self, traj_id: str, task_id: str, *, force: bool = False) -> Result:
        return await self.call(traj_id, "bg_stop", {"task_id": task_id, "force": force})


# The asyncio client's methods carry the sync client's docstrings.
for _name, _method in vars(AsyncClient).items():
    _twin = getattr(Client, _name, None)
    if callable(_method) and not _name.startswith("_") and _twin is not None and _twin.__doc__:
        _method.__doc__ = _method.__doc__ or _twin.__doc__


# ------------------------------------------------------- shared wait ops
def _look_op(keys: Keys, done: ops.Submitted) -> Op[tuple[str, Result | None]]:
    """The events cursor now and the result if it exists (one round trip)."""
    last, fields = yield [
        Cmd("xrevrange", (keys.events(done.traj_id),), {"count": 1}),
        Cmd("hgetall", (keys.result(done.traj_id, done.call_id),)),
    ]
    return (ops.s(last[0][0]) if last else "0-0"), ops.result_of(fields)


def _await_op(
    keys: Keys, calls: list[ops.Submitted], wait_s: float, look_first: bool, cluster: bool
) -> Op[list[Result]]:
    """Results of ``calls`` in their order, waiting up to ``wait_s`` in all."""
    deadline = time.monotonic() + wait_s
    waits, found = WaitSet(keys, cluster), {}
    for done in calls:
        if done.entry_id and not look_first:
            waits.add(done.traj_id, done.call_id, cursor_before(done.entry_id))
            continue
        cursor, result = yield from _look_op(keys, done)
        if result is not None:
            found[(done.traj_id, done.call_id)] = result
        else:
            waits.add(done.traj_id, done.call_id, cursor)
    found.update((yield from wait_op(waits, deadline)))
    return [found[(d.traj_id, d.call_id)] for d in calls]


def _bg_wait_op(keys: Keys, traj_id: str, task_id: str, wait_s: float) -> Op[BgTask | None]:
    """The task once it has ended, or as it is after ``wait_s`` seconds."""
    task = yield from ops.bg_get(keys, traj_id, task_id)
    last = yield from ops.one(Cmd("xrevrange", (keys.events(traj_id),), {"count": 1}))
    cursor = ops.s(last[0][0]) if last else "0-0"
    deadline = time.monotonic() + wait_s
    while task is not None and task.status == "running":
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            break
        block = min(left_ms, 2000)
        reply = yield from ops.one(
            Cmd("xread", ({keys.events(traj_id): cursor},), {"count": 100, "block": block})
        )
        for _stream, entries in reply or []:
            cursor = ops.s(entries[-1][0])
        task = yield from ops.bg_get(keys, traj_id, task_id)
    return task


def _count_by_status(records: list[TrajectoryRecord]) -> dict[str, int]:
    counts = {status.value: 0 for status in TrajStatus}
    for rec in records:
        counts[rec.status.value] += 1
    return counts
