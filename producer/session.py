"""One trajectory of a client, shaped for an agent loop.

    with client.trajectory("t1", {"image": "python:3.12-slim"}) as t:
        while True:
            reply = llm.chat.completions.create(messages=messages, tools=t.tool_specs())
            message = reply.choices[0].message
            messages.append(message)
            if not message.tool_calls:
                break
            messages += t.run_openai(message.tool_calls)

Entering opens the trajectory (``reuse`` starts an ended one over); leaving
closes it after its calls, or cancels it at once when the block raised, so a
crashed loop frees its sandbox. ``Trajectory`` drives a ``Client``,
``AsyncTrajectory`` an ``AsyncClient``; both only forward to them. The clients
make the handles, so this module knows a client only by what a handle asks of
it (``SyncDriver``, ``AsyncDriver``): it never imports ``client`` or ``aclient``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, Protocol

from toolq.schemas import Keys, Result, ToolInfo, TrajectoryRecord, TrajectorySpec

from . import model_calls, tools
from .drive import CallLike
from .ops import ToolCall, TrajectoryEnded
from .waits import Call

SpecLike = TrajectorySpec | dict[str, Any] | None


class SyncDriver(Protocol):
    """What a ``Trajectory`` asks of its client (``client.Client``)."""

    keys: Keys  # the client's namespace

    def open(
        self, traj_id: str, spec: TrajectorySpec | None = None, *, reuse: bool = False
    ) -> str: ...
    def close(self, traj_id: str) -> str: ...
    def cancel(self, traj_id: str) -> str: ...
    def record(self, traj_id: str) -> TrajectoryRecord | None: ...
    def call(self, *args: Any, **kw: Any) -> Result: ...
    def submit(self, *args: Any, **kw: Any) -> str: ...
    def set_policy(self, *args: Any, **kw: Any) -> str: ...
    def snapshot(self, traj_id: str, name: str, *, ttl_s: float | None = None) -> Result: ...
    def fork(self, traj_id: str, new_ids: Iterable[str], spec: SpecLike = None) -> Result: ...
    def trajectory(self, traj_id: str) -> Trajectory: ...
    def call_many(
        self, traj_id: str, calls: Iterable[CallLike], *, wait_s: float | None = None
    ) -> list[Result]: ...
    def as_completed(
        self, calls: Iterable[Call], *, wait_s: float | None = 60.0
    ) -> Iterator[Result]: ...
    def tools(self, names: Iterable[str] | None = None) -> list[ToolInfo]: ...


class AsyncDriver(Protocol):
    """What an ``AsyncTrajectory`` asks of its client (``aclient.AsyncClient``)."""

    keys: Keys  # the client's namespace

    async def open(
        self, traj_id: str, spec: TrajectorySpec | None = None, *, reuse: bool = False
    ) -> str: ...
    async def close(self, traj_id: str) -> str: ...
    async def cancel(self, traj_id: str) -> str: ...
    async def record(self, traj_id: str) -> TrajectoryRecord | None: ...
    async def call(self, *args: Any, **kw: Any) -> Result: ...
    async def submit(self, *args: Any, **kw: Any) -> str: ...
    async def set_policy(self, *args: Any, **kw: Any) -> str: ...
    async def snapshot(self, traj_id: str, name: str, *, ttl_s: float | None = None) -> Result: ...
    async def fork(self, traj_id: str, new_ids: Iterable[str], spec: SpecLike = None) -> Result: ...
    def trajectory(self, traj_id: str) -> AsyncTrajectory: ...
    async def call_many(
        self, traj_id: str, calls: Iterable[CallLike], *, wait_s: float | None = None
    ) -> list[Result]: ...
    def as_completed(
        self, calls: Iterable[Call], *, wait_s: float | None = 60.0
    ) -> AsyncIterator[Result]: ...
    async def tools(self, names: Iterable[str] | None = None) -> list[ToolInfo]: ...


class Trajectory:
    """A trajectory of a ``Client``: its calls, without repeating its id."""

    def __init__(
        self, client: SyncDriver, traj_id: str, spec: TrajectorySpec | None, reuse: bool
    ) -> None:
        self.client, self.traj_id, self.spec, self.reuse = client, traj_id, spec, reuse

    def __enter__(self) -> Trajectory:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if exc_type is None:
                self.close()
            else:  # the loop failed: free the sandbox now, answer what waits
                self.cancel()
        except TrajectoryEnded:  # it ended by itself (a limit, say): nothing to free
            pass

    def open(self) -> str:
        """Open it (see ``Client.open``); returns its status."""
        return self.client.open(self.traj_id, self.spec, reuse=self.reuse)

    def close(self) -> str:
        """Close it after the calls already submitted (see ``Client.close``)."""
        return self.client.close(self.traj_id)

    def cancel(self) -> str:
        """Cancel it now (see ``Client.cancel``)."""
        return self.client.cancel(self.traj_id)

    def record(self) -> TrajectoryRecord | None:
        """Its record (status, counts, times), or None once expired."""
        return self.client.record(self.traj_id)

    def call(self, tool: str, args: dict[str, Any] | str | None = None, **kw: Any) -> Result:
        """Run one call and wait for its result (see ``Client.call``)."""
        return self.client.call(self.traj_id, tool, args, **kw)

    def submit(self, tool: str, args: dict[str, Any] | str | None = None, **kw: Any) -> str:
        """Submit one call; returns its call id (see ``Client.submit``)."""
        return self.client.submit(self.traj_id, tool, args, **kw)

    def set_policy(self, **policy: Any) -> str:
        """Replace the tool policy for the calls after this (see ``Client.set_policy``)."""
        return self.client.set_policy(self.traj_id, **policy)

    def snapshot(self, name: str, *, ttl_s: float | None = None) -> Result:
        """Save its workspace and spec under ``name`` (see ``Client.snapshot``)."""
        return self.client.snapshot(self.traj_id, name, ttl_s=ttl_s)

    def fork(
        self, new_ids: Iterable[str], spec: TrajectorySpec | dict[str, Any] | None = None
    ) -> list[Trajectory]:
        """Open copies of it (see ``Client.fork``); handles on them (open already)."""
        ids = list(new_ids)
        self.client.fork(self.traj_id, ids, spec)
        return [self.client.trajectory(new_id) for new_id in ids]

    def call_many(self, calls: Iterable[CallLike], *, wait_s: float | None = None) -> list[Result]:
        """Submit calls at once, wait for all; results in the calls' order."""
        return self.client.call_many(self.traj_id, calls, wait_s=wait_s)

    def as_completed(
        self, call_ids: Iterable[str], *, wait_s: float | None = 60.0
    ) -> Iterator[Result]:
        """Results of submitted calls as they arrive."""
        return self.client.as_completed([(self.traj_id, c) for c in call_ids], wait_s=wait_s)

    def tool_specs(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """OpenAI function specs of the published tools its tool policy lets it call
        (the policy in force: its last policy entry, else its spec)."""
        in_force = tools.policy_in_force(self.record(), self.spec)
        return [tools.openai_spec(t) for t in tools.permitted(self.client.tools(names), in_force)]

    def run_openai(self, tool_calls: Iterable[Any] | None) -> list[dict[str, Any]]:
        """Run an OpenAI chat-completions message's ``tool_calls``; returns the
        ``role: tool`` messages that answer them (malformed arguments answered
        ``invalid_args``, never raised)."""
        calls = model_calls.openai_calls(tool_calls)
        return model_calls.openai_messages(calls, self._run(calls))

    def run_anthropic(self, content: Iterable[Any] | None) -> list[dict[str, Any]]:
        """Run the ``tool_use`` blocks of an Anthropic message's content; returns the
        ``tool_result`` blocks for the next user message."""
        calls = model_calls.anthropic_calls(content)
        return model_calls.anthropic_blocks(calls, self._run(calls))

    def _run(self, calls: list[model_calls.ModelCall]) -> list[Result]:
        tool_calls: list[ToolCall] = [c.call for c in calls]
        return self.call_many(tool_calls) if tool_calls else []


class AsyncTrajectory:
    """A trajectory of an ``AsyncClient``: the methods of ``Trajectory``, awaitable."""

    def __init__(
        self, client: AsyncDriver, traj_id: str, spec: TrajectorySpec | None, reuse: bool
    ) -> None:
        self.client, self.traj_id, self.spec, self.reuse = client, traj_id, spec, reuse

    async def __aenter__(self) -> AsyncTrajectory:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if exc_type is None:
                await self.close()
            else:  # the loop failed: free the sandbox now, answer what waits
                await self.cancel()
        except TrajectoryEnded:  # it ended by itself (a limit, say): nothing to free
            pass

    async def open(self) -> str:
        return await self.client.open(self.traj_id, self.spec, reuse=self.reuse)

    async def close(self) -> str:
        return await self.client.close(self.traj_id)

    async def cancel(self) -> str:
        return await self.client.cancel(self.traj_id)

    async def record(self) -> TrajectoryRecord | None:
        return await self.client.record(self.traj_id)

    async def call(self, tool: str, args: dict[str, Any] | str | None = None, **kw: Any) -> Result:
        return await self.client.call(self.traj_id, tool, args, **kw)

    async def submit(self, tool: str, args: dict[str, Any] | str | None = None, **kw: Any) -> str:
        return await self.client.submit(self.traj_id, tool, args, **kw)

    async def set_policy(self, **policy: Any) -> str:
        return await self.client.set_policy(self.traj_id, **policy)

    async def snapshot(self, name: str, *, ttl_s: float | None = None) -> Result:
        return await self.client.snapshot(self.traj_id, name, ttl_s=ttl_s)

    async def fork(
        self, new_ids: Iterable[str], spec: TrajectorySpec | dict[str, Any] | None = None
    ) -> list[AsyncTrajectory]:
        ids = list(new_ids)
        await self.client.fork(self.traj_id, ids, spec)
        return [self.client.trajectory(new_id) for new_id in ids]

    async def call_many(
        self, calls: Iterable[CallLike], *, wait_s: float | None = None
    ) -> list[Result]:
        return await self.client.call_many(self.traj_id, calls, wait_s=wait_s)

    def as_completed(
        self, call_ids: Iterable[str], *, wait_s: float | None = 60.0
    ) -> AsyncIterator[Result]:
        return self.client.as_completed([(self.traj_id, c) for c in call_ids], wait_s=wait_s)

    async def tool_specs(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        in_force = tools.policy_in_force(await self.record(), self.spec)
        published = await self.client.tools(names)
        return [tools.openai_spec(t) for t in tools.permitted(published, in_force)]

    async def run_openai(self, tool_calls: Iterable[Any] | None) -> list[dict[str, Any]]:
        calls = model_calls.openai_calls(tool_calls)
        return model_calls.openai_messages(calls, await self._run(calls))

    async def run_anthropic(self, content: Iterable[Any] | None) -> list[dict[str, Any]]:
        calls = model_calls.anthropic_calls(content)
        return model_calls.anthropic_blocks(calls, await self._run(calls))

    async def _run(self, calls: list[model_calls.ModelCall]) -> list[Result]:
        tool_calls: list[ToolCall] = [c.call for c in calls]
        return await self.call_many(tool_calls) if tool_calls else []


# The asyncio handle's methods carry the sync handle's docstrings.
for _name, _method in vars(AsyncTrajectory).items():
    _twin = getattr(Trajectory, _name, None)
    if callable(_method) and not _name.startswith("_") and _twin is not None and _twin.__doc__:
        _method.__doc__ = _method.__doc__ or _twin.__doc__
