"""toolq clients: open a trajectory, submit calls, wait for results, close.

``Client`` is synchronous, ``AsyncClient`` (``aclient.py``, which builds on
this module) its asyncio twin: both are thin drivers over the same protocol
logic (``ops``, ``waits``, ``drive``), with the same methods and docstrings.
They need only Redis (no docker, rq or prometheus).

    with Client("redis://localhost:6379") as c:
        with c.trajectory("t1") as t:
            r = t.call("bash", {"command": "echo hi"})
            print(r.output)

Every operation is safe to send again (calls carry a client call id), so a
Redis restart or failover costs latency, not errors: connection failures are
retried with jittered exponential backoff.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, cast

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

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
    await_op,
    bg_wait_op,
    call_wait_s,
    calls_wait_s,
    count_by_status,
    default_wait_s,
    queue,
    raise_errors,
    renamed_wait_s,
    tool_calls,
    wait_set_op,
    with_source,
)
from .liveness import Liveness, workers_alive_op
from .ops import (
    Cmd,
    LimitExceeded,
    Op,
    ToolCall,
    ToolqError,
    TrajectoryEnded,
    UnknownTrajectory,
    WaitTimeout,
)
from .session import Trajectory
from .waits import Call, wait_some_op, xread_args, xread_route

__all__ = [
    "CallLike",
    "Client",
    "LimitExceeded",
    "ToolCall",
    "ToolqError",
    "Trajectory",
    "TrajectoryEnded",
    "UnknownTrajectory",
    "WaitTimeout",
]


class Client:
    """Synchronous toolq client."""

    def __init__(
        self,
        redis_url: str | None = None,
        namespace: str | None = None,
        redis_client: redis.Redis | None = None,
        retries: int = RETRIES,
    ) -> None:
        """``retries``: how often a command is sent again while Redis is unreachable
        (at least 30 s with the default; the CLI gives up after about a second)."""
        target, self.cluster = redis_target(resolve_redis_url(redis_url))
        self.retries = retries
        # One layer of retries, ours (``_execute``): redis-py's own would multiply it.
        retry = Retry(ExponentialWithJitterBackoff(**BACKOFF), 0)
        if redis_client is not None:
            self.redis = redis_client
            self.cluster = isinstance(redis_client, redis.RedisCluster)
        elif self.cluster:
            self.redis = cast(
                redis.Redis, redis.RedisCluster.from_url(target, retry=retry, **CLUSTER_KW)
            )
        else:
            self.redis = redis.Redis.from_url(target, retry=retry, **CONNECT_KW)
        self.keys = Keys(resolve_namespace(namespace))
        self._liveness = Liveness()

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
        budget = RetryBudget(self.retries)
        while True:
            try:
                return self._execute_once(cmds)
            except REDIS_DOWN as exc:  # safe to send again: every operation is idempotent
                delay_s = budget.delay_s(exc)
                if delay_s is None:
                    raise
                time.sleep(delay_s)

    def _execute_once(self, cmds: list[Cmd]) -> list[Any]:
        replies = self._pipeline(cmds)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:  # a restarted Redis forgot the scripts: nothing of those ran
            again = self._pipeline([with_source(cmds[i]) for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return raise_errors(replies)

    def _pipeline(self, cmds: list[Cmd]) -> list[Any]:
        if self.cluster and all(c.name == "xread" for c in cmds):
            return [self._routed_xread(c) for c in cmds]
        pipe = self.redis.pipeline(transaction=False)
        for cmd in cmds:
            queue(pipe, cmd)
        return list(pipe.execute(raise_on_error=False))

    def _routed_xread(self, cmd: Cmd) -> Any:
        """An XREAD sent to its slot's node outright (see ``hub.xread``)."""
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

        A spec with a ``parent`` opens a child of that trajectory: refused with
        ``LimitExceeded`` (nothing created) when the parent has ended or is being
        cancelled, when the child would nest deeper than the parent's
        ``limits.max_depth``, or when the parent has ``limits.max_children`` open
        children. Cancelling the parent cancels its open children.
        """
        return self._drive(children.open_traj(self.keys, traj_id, as_spec(spec), reuse))

    def submit(
        self,
        traj_id: str,
        tool: str,
        args: dict[str, Any] | str | None = None,
        *,
        call_id: str | None = None,
        timeout_s: float | None = None,
        idempotent: bool = False,
    ) -> str:
        """Append a tool call; returns its call id at once (a fresh one unless given).

        ``args`` may be JSON text as a model wrote it: text that is not a JSON
        object gets an ``invalid_args`` result. A ``call_id`` that already has a
        result is not run again: its result stands.
        """
        entry = ToolCall(tool, args, call_id, timeout_s, idempotent)
        return self._drive(ops.submit(self.keys, traj_id, entry)).call_id

    def set_policy(
        self,
        traj_id: str,
        *,
        step: str | None = None,
        allowed_tools: list[str] | None = None,
        blocked_tools: list[str] | None = None,
        call_timeout_s: float | None = None,
    ) -> str:
        """Replace the tool policy for the calls submitted after this (a ``policy``
        entry: calls submitted before it keep the old one). Returns the entry's call
        id; its result says the policy is in force, or why it was refused (a
        ``call_timeout_s`` above the spec's ``max_call_timeout_s``). Both tool lists
        are replaced: one left ``None`` is lifted (no ``allowed_tools``: every tool
        not blocked may run, whatever the spec said)."""
        entry = ops.policy_entry(step, allowed_tools, blocked_tools, call_timeout_s)
        return self._drive(ops.submit(self.keys, traj_id, entry)).call_id

    def submit_many(self, traj_id: str, calls: Iterable[CallLike]) -> list[str]:
        """Append several calls (``ToolCall``s or ``(tool, args)`` pairs) in one round
        trip; returns their call ids. They run in this order."""
        done = self._drive(ops.submit_many(self.keys, traj_id, tool_calls(calls)))
        return [d.call_id for d in done]

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
        return self._drive(children.cancel(self.keys, traj_id))

    # -------------------------------------------------------------- calls
    def call(
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
        """Submit a call and wait for its result (``WaitTimeout`` after ``wait_s``)."""
        entry = ToolCall(tool, args, call_id, timeout_s, idempotent)
        done = self._drive(ops.submit(self.keys, traj_id, entry))
        wait = wait_s if wait_s is not None else call_wait_s(entry.asked_timeout_s)
        return self._await([done], wait)[0]

    def call_many(
        self, traj_id: str, calls: Iterable[CallLike], *, wait_s: float | None = None
    ) -> list[Result]:
        """Submit several calls at once (one round trip) and wait for all of their
        results, in the calls' order (``WaitTimeout`` after ``wait_s``)."""
        to_submit = tool_calls(calls)
        done = self._drive(ops.submit_many(self.keys, traj_id, to_submit))
        return self._await(done, wait_s if wait_s is not None else calls_wait_s(to_submit))

    def result(
        self,
        traj_id: str,
        call_id: str,
        wait_s: float | None = 60.0,
        *,
        timeout_s: float | None = None,
    ) -> Result:
        """Wait up to ``wait_s`` for a call's result; raises ``WaitTimeout``.
        (``timeout_s=`` is the deprecated name of ``wait_s``.)"""
        wait_s = renamed_wait_s(wait_s, timeout_s)
        done = ops.Submitted(traj_id, call_id, "")
        return self._await([done], default_wait_s(wait_s), look_first=True)[0]

    def results(self, calls: Iterable[Call], *, wait_s: float | None = 60.0) -> list[Result]:
        """Wait for the results of ``(traj_id, call_id)`` pairs, of any trajectories,
        up to ``wait_s`` in all; returns them in the pairs' order."""
        submitted = [ops.Submitted(t, c, "") for t, c in calls]
        return self._await(submitted, default_wait_s(wait_s), look_first=True)

    def as_completed(
        self, calls: Iterable[Call], *, wait_s: float | None = 60.0
    ) -> Iterator[Result]:
        """Yield the results of ``(traj_id, call_id)`` pairs as they arrive (one
        blocking read serves them all); ``WaitTimeout`` after ``wait_s`` in all."""
        deadline = time.monotonic() + default_wait_s(wait_s)
        submitted = [ops.Submitted(t, c, "") for t, c in calls]
        waits, found = self._drive(wait_set_op(self.keys, submitted, True, self.cluster))
        yield from found.values()
        if waits.pending:
            self._check_workers()
        while waits.pending:
            try:
                yield from self._drive(wait_some_op(waits, deadline)).values()
            except WaitTimeout as exc:
                raise self._explain(exc) from None

    def _await(
        self, calls: list[ops.Submitted], wait_s: float, look_first: bool = False
    ) -> list[Result]:
        self._check_workers()
        try:
            return self._drive(await_op(self.keys, calls, wait_s, look_first, self.cluster))
        except WaitTimeout as exc:
            raise self._explain(exc) from None

    def _check_workers(self) -> None:
        """Before waiting: warn once (logging) when no worker serves the namespace."""
        if not self._liveness.seen:
            self._liveness.note(self._drive(workers_alive_op(self.keys)), self.keys)

    def _explain(self, exc: WaitTimeout) -> WaitTimeout:
        alive = self._drive(workers_alive_op(self.keys))
        return WaitTimeout(self._liveness.explain(exc, alive, self.keys))

    # ------------------------------------------------------- agent loops
    def trajectory(
        self,
        traj_id: str,
        spec: TrajectorySpec | dict[str, Any] | None = None,
        *,
        reuse: bool = False,
    ) -> Trajectory:
        """A handle on one trajectory for an agent loop; as a context manager it
        opens the trajectory and closes it (cancels it when the block raised):

            with client.trajectory("t1", {"image": "python:3.12-slim"}) as t:
                r = t.call("bash", {"command": "ls"})
                messages += t.run_openai(reply.choices[0].message.tool_calls)

        ``reuse`` starts an ended trajectory of the same id over (see ``open``).
        """
        return Trajectory(self, traj_id, as_spec(spec), reuse)

    # ---------------------------------------------------------- snapshots
    def snapshot(
        self, traj_id: str, name: str, *, ttl_s: float | None = None, wait_s: float = 600.0
    ) -> Result:
        """Save the workspace's files and the spec in force under ``name``, after the
        calls submitted before (running processes are not saved). Its result says
        what was saved (``data``: bytes, entries, expires_ms), or why not."""
        return self._drive(snapshots.take_op(self.keys, traj_id, name, ttl_s, wait_s, self.cluster))

    def fork(
        self,
        traj_id: str,
        new_ids: Iterable[str],
        spec: TrajectorySpec | dict[str, Any] | None = None,
        *,
        ttl_s: float | None = None,
        wait_s: float = 600.0,
    ) -> Result:
        """Snapshot ``traj_id`` and open each of ``new_ids`` from it: independent
        copies of its workspace, with its spec under ``spec``'s non-default fields.
        Returns the snapshot's result; raises ``SnapshotFailed`` (nothing opened)."""
        op = snapshots.fork_op(
            self.keys, traj_id, list(new_ids), as_spec(spec), ttl_s, wait_s, self.cluster
        )
        return self._drive(op)

    def snapshots(self) -> list[SnapshotInfo]:
        """The snapshots kept, oldest first."""
        return self._drive(snapshots.list_op(self.keys))

    def delete_snapshot(self, name: str) -> bool:
        """Delete a snapshot; False when there was none of that name."""
        return self._drive(snapshots.delete_op(self.keys, name))

    # ------------------------------------------------------------ reading
    def record(self, traj_id: str) -> TrajectoryRecord | None:
        """The trajectory record, or None if unknown (or expired)."""
        return self._drive(ops.get_record(self.keys, traj_id))

    def runs(
        self,
        status: str | None = None,
        label: dict[str, str] | list[str] | None = None,
        limit: int = 100,
        *,
        parent: str | None = None,
    ) -> list[TrajectoryRecord]:
        """Trajectories, newest first, filtered by status and labels (``k=v``);
        with ``parent``, that trajectory's children (its open ones, and ended ones
        until a later child's open frees their places)."""
        labels = ops.parse_labels(label)
        if parent is not None:
            return self._drive(children.child_runs(self.keys, parent, status, labels, limit))
        return self._drive(ops.runs(self.keys, status, labels, limit))

    def run_counts(self, label: dict[str, str] | list[str] | None = None) -> dict[str, int]:
        """How many trajectories are in each state (optionally with these labels)."""
        return count_by_status(self.runs(label=label, limit=10**9))

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
        return self._drive(bg_wait_op(self.keys, traj_id, task_id, wait_s))

    def bg_stop(self, traj_id: str, task_id: str, *, force: bool = False) -> Result:
        """Stop a task (a ``bg_stop`` tool call): SIGTERM, SIGKILL after a grace period."""
        return self.call(traj_id, "bg_stop", {"task_id": task_id, "force": force})
