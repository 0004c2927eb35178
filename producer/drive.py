"""What the sync and asyncio clients share: connection settings, retry policy,
how commands go into a pipeline, and the wait operations both drive.

The operations here are sans-IO generators like those of ``ops`` (see there).
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Iterable
from typing import Any

from redis.exceptions import AskError, BusyLoadingError, ClusterError, MovedError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from toolq.schemas import BgTask, Keys, Result, TrajectoryRecord, TrajectorySpec, TrajStatus

from . import ops
from .config import ClusterNodeError
from .ops import Cmd, Op, ToolCall
from .waits import Call, WaitSet, cursor_before, wait_op

RETRIES = 20
BACKOFF = {"base": 0.05, "cap": 2.0}
RETRY_ON = [RedisConnectionError, RedisTimeoutError]
# Waits block in XREAD for as long as the caller asked: no socket read timeout
# (redis-py >= 8 defaults to 5 s), and RESP2 replies, which the parsing expects.
# Connecting includes the handshake, which a busy Redis or a starved event loop
# can delay for seconds: allow for a loaded machine.
CONNECT_KW: dict[str, Any] = {
    "socket_timeout": None,
    "socket_connect_timeout": 30,
    "protocol": 2,
    "max_connections": 10_000,
    "retry_on_error": RETRY_ON,
}
CLUSTER_KW: dict[str, Any] = {k: v for k, v in CONNECT_KW.items() if k != "retry_on_error"}


# What a restarting Redis or a cluster failing over answers for a while: wait and
# send again (redis-py's own cluster retries do not back off). ClusterError covers
# CLUSTERDOWN and redis-py's "TTL exhausted" after redirections that went on (a
# slot migrating: TRYAGAIN until its keys have moved). BusyLoadingError (a Redis
# loading its data) is a ConnectionError.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ClusterError, TryAgainError)


#: How long clients wait, besides their retries, for a Redis that answers LOADING
#: (restarted, loading its AOF: it is up and will serve once loaded).
LOADING_WAIT_S = 300.0


#: The default budget (``RETRIES``) also lasts at least this long: longer than a
#: Redis Cluster failover at Redis's default cluster-node-timeout (15 s: the
#: master is found failed, a replica elected and the clients' slot map renewed).
RETRY_MIN_S = 30.0


class RetryBudget:
    """When to send a command again after ``REDIS_DOWN``: ``retries`` backoffs
    while Redis is unreachable (the default, ``RETRIES``, for at least
    ``RETRY_MIN_S``); a Redis that answers LOADING is waited for on top of
    those, up to ``LOADING_WAIT_S``."""

    def __init__(self, retries: int) -> None:
        self.retries = retries
        self.attempt = 0
        self.min_s = RETRY_MIN_S if retries >= RETRIES else 0.0
        self.started = time.monotonic()
        self.loading_since: float | None = None

    def delay_s(self, exc: BaseException) -> float | None:
        """Seconds to wait before the next try, or None: give up (raise ``exc``)."""
        now = time.monotonic()
        if isinstance(exc, BusyLoadingError):
            self.loading_since = self.loading_since or now
            if now - self.loading_since < LOADING_WAIT_S:
                return float(random.uniform(0.05, 0.5))
        if self.attempt >= self.retries and now - self.started >= self.min_s:
            return None
        self.attempt += 1
        return backoff_s(self.attempt - 1)


def backoff_s(attempt: int) -> float:
    """Exponential backoff with full jitter, capped at 2 s."""
    return float(random.uniform(0, min(0.05 * 2**attempt, 2.0)))


def default_wait_s(timeout_s: float | None) -> float:
    return 60.0 if timeout_s is None else timeout_s


def renamed_wait_s(wait_s: float | None, timeout_s: float | None) -> float | None:
    """``result(timeout_s=)``: the old name of ``wait_s`` (every wait takes ``wait_s``)."""
    if timeout_s is None:
        return wait_s
    warnings.warn("result(timeout_s=) is deprecated: use wait_s=", DeprecationWarning, stacklevel=3)
    return timeout_s


def call_wait_s(timeout_s: float | None) -> float:
    # Leave room past the call's own timeout for queueing and slot start.
    return (timeout_s or 60.0) + 60.0


#: How long past a call's longest run a wait lasts: queueing, and a slot's start.
WAIT_MARGIN_S = 60.0


def spec_wait_s(
    spec: TrajectorySpec | None, timeout_s: float | None = None, *, margin_s: float = WAIT_MARGIN_S
) -> float:
    """How long to wait for a call's result in a trajectory of ``spec``: the longest
    the call may run, plus ``margin_s``. That is ``timeout_s`` capped by the spec's
    ``limits.max_call_timeout_s``; without ``timeout_s``, the cap itself, since a
    tool's ``timeout_s`` argument or a policy entry may ask for that much. A result
    missing after this wait means toolq is in trouble, not that a command ran long.
    The adapters' (MCP, SkyRL, SWE-ReX) one default."""
    cap_s = (spec or TrajectorySpec()).limits.max_call_timeout_s
    return (cap_s if timeout_s is None else min(timeout_s, cap_s)) + margin_s


#: A call to submit: a ``ToolCall``, or a ``(tool, args)`` pair.
CallLike = ToolCall | tuple[str, dict[str, Any] | str | None]


def tool_calls(calls: Iterable[CallLike]) -> list[ToolCall]:
    return [c if isinstance(c, ToolCall) else ToolCall(*c) for c in calls]


def calls_wait_s(calls: list[ToolCall]) -> float:
    # A trajectory runs its calls one at a time: room for all of them, in turn.
    return sum(c.asked_timeout_s or 60.0 for c in calls) + 60.0


def as_spec(spec: TrajectorySpec | dict[str, Any] | None) -> TrajectorySpec | None:
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


def raise_errors(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, AskError):  # MOVED too: only a cluster node answers that
            node = f"{reply.host}:{reply.port}"
            word = "MOVED" if isinstance(reply, MovedError) else "ASK"
            raise ClusterNodeError(f"it answered {word} {reply.slot_id} {node}", node) from reply
        if isinstance(reply, Exception):
            raise reply
    return replies


# ------------------------------------------------------- shared wait ops
def look_op(keys: Keys, calls: list[ops.Submitted]) -> Op[list[tuple[str, Result | None]]]:
    """For each call, its events cursor now and its result if it exists (one round trip)."""
    cmds = []
    for done in calls:
        cmds.append(Cmd("xrevrange", (keys.events(done.traj_id),), {"count": 1}))
        cmds.append(Cmd("hgetall", (keys.result(done.traj_id, done.call_id),)))
    replies = yield cmds
    looks = []
    for last, fields in zip(replies[::2], replies[1::2], strict=True):
        looks.append(((ops.s(last[0][0]) if last else "0-0"), ops.result_of(fields)))
    return looks


def wait_set_op(
    keys: Keys, calls: list[ops.Submitted], look_first: bool, cluster: bool
) -> Op[tuple[WaitSet, dict[Call, Result]]]:
    """What to wait for: the calls without a result yet, each from its cursor, and
    the results found already (looked at first for calls submitted earlier)."""
    waits, found = WaitSet(keys, cluster), {}
    looked = [d for d in calls if look_first or not d.entry_id]
    for done in calls:
        if done.entry_id and not look_first:
            waits.add(done.traj_id, done.call_id, cursor_before(done.entry_id))
    for done, (cursor, result) in zip(looked, (yield from look_op(keys, looked)), strict=True):
        if result is not None:
            found[(done.traj_id, done.call_id)] = result
        else:
            waits.add(done.traj_id, done.call_id, cursor)
    return waits, found


def await_op(
    keys: Keys, calls: list[ops.Submitted], wait_s: float, look_first: bool, cluster: bool
) -> Op[list[Result]]:
    """Results of ``calls`` in their order, waiting up to ``wait_s`` in all."""
    deadline = time.monotonic() + wait_s
    waits, found = yield from wait_set_op(keys, calls, look_first, cluster)
    found.update((yield from wait_op(waits, deadline)))
    return [found[(d.traj_id, d.call_id)] for d in calls]


def bg_wait_op(keys: Keys, traj_id: str, task_id: str, wait_s: float) -> Op[BgTask | None]:
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


def count_by_status(records: list[TrajectoryRecord]) -> dict[str, int]:
    counts = {status.value: 0 for status in TrajStatus}
    for rec in records:
        counts[rec.status.value] += 1
    return counts
