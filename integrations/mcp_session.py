"""The toolq side of an MCP session: one trajectory, and toolq's answers as MCP results.

A ``TrajectorySession`` opens its trajectory at the session's first tool call
(listing tools claims no sandbox), runs every call of the session in it, and
closes it when the session ends. ``Sessions`` keeps a server's sessions by MCP
session id. Results become ``CallToolResult``s: the text a model reads
(``model_calls.result_text``: output, then ``[error_code] error``), the result's
fields as structured content, and ``isError`` when the call failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import mcp.types as types

from toolq.producer import AsyncClient, Result, TrajectoryEnded, UnknownTrajectory, spec_wait_s
from toolq.producer.model_calls import CLIENT_FAILURES, client_failure, result_text
from toolq.producer.tools import permitted, policy_in_force
from toolq.schemas import ToolInfo, TrajectorySpec

log = logging.getLogger(__name__)

#: The result fields an MCP client gets as structured content (absent ones left out).
STRUCTURED_FIELDS = {
    "ok",
    "output",
    "exit_code",
    "error_code",
    "error",
    "timed_out",
    "truncated",
    "output_bytes",
    "infra",
    "data",
    "call_id",
    "traj",
}


class TrajectorySession:
    """One MCP session's trajectory: opened at the first call, closed by ``end``."""

    def __init__(
        self,
        client: AsyncClient,
        traj_id: str,
        spec: TrajectorySpec,
        *,
        reuse: bool = False,
        keep_open: bool = False,
        wait_s: float | None = None,
    ) -> None:
        """``reuse`` starts an ended trajectory of that id over at the first call
        (see ``Client.open``); ``keep_open`` leaves it open when the session ends;
        ``wait_s`` bounds a call's wait for its result (default: ``spec_wait_s``,
        the spec's ``max_call_timeout_s`` and a margin, so a call that runs gets
        its result)."""
        self.client, self.traj_id, self.spec = client, traj_id, spec
        self.reuse, self.keep_open = reuse, keep_open
        self.wait_s = wait_s if wait_s is not None else spec_wait_s(spec)
        self.opened = False
        #: The session has ended: no call opens the trajectory any more.
        self.closing = False
        self._opening = asyncio.Lock()

    async def tools(self) -> list[ToolInfo]:
        """The published tools that the policy in force lets this trajectory call."""
        record = await self.client.record(self.traj_id)
        if record is not None and record.status.final and not self.opened:
            record = None  # an earlier run of the id: the session's own spec will hold
        return permitted(await self.client.tools(), policy_in_force(record, self.spec))

    async def call(self, tool: str, args: dict[str, Any] | None) -> types.CallToolResult:
        """Run one call in the trajectory (opening it first if needed); every
        outcome, a refusal or a wait that ran out included, is a tool result."""
        try:
            await self._open()
            result = await self.client.call(self.traj_id, tool, args or {}, wait_s=self.wait_s)
        except CLIENT_FAILURES as exc:  # no result: Redis unreachable, a refused open, ...
            failed = client_failure(exc)
            return error_result(failed.code, failed.message, infra=failed.infra)
        return tool_result(result)

    async def end(self) -> None:
        """The session ended: close the trajectory after its submitted calls
        (not when ``keep_open``, nor when no call ever opened it); calls that
        come later are answered ``trajectory_ended``."""
        async with self._opening:  # an open under way completes first, then is closed
            self.closing = True
            opened = self.opened
        if not opened or self.keep_open:
            return
        # One that ended by itself (idle timeout, deadline) or expired has nothing to free.
        with contextlib.suppress(TrajectoryEnded, UnknownTrajectory):
            await self.client.close(self.traj_id)

    async def _open(self) -> None:
        async with self._opening:  # concurrent first calls open it once
            if self.closing:
                raise TrajectoryEnded(f"the MCP session of trajectory {self.traj_id} has ended")
            if not self.opened:
                await self.client.open(self.traj_id, self.spec, reuse=self.reuse)
                self.opened = True


class Sessions:
    """A server's trajectory sessions by MCP session id (``None``: stdio's one session).

    A session's entry lives until ``end``: over HTTP the SDK's own end of the
    session (the client's DELETE, its idle timeout, a crash, the server
    stopping) calls it; over stdio the server's stop does.
    """

    def __init__(self, make: Callable[[str | None], TrajectorySession]) -> None:
        self._make = make
        self._by_key: dict[str | None, TrajectorySession] = {}

    def get(self, key: str | None) -> TrajectorySession | None:
        """The session's trajectory, if the session has started."""
        return self._by_key.get(key)

    def start(self, key: str | None) -> TrajectorySession:
        """A new session's trajectory (opened at its first call)."""
        session = self._by_key[key] = self._make(key)
        return session

    async def end(self, key: str | None) -> None:
        """The session ended: close its trajectory."""
        session = self._by_key.pop(key, None)
        if session is not None:
            await session.end()

    async def end_all(self) -> None:
        """The server stops: close every session's trajectory. A close that fails is
        logged and the others go on (that trajectory's idle timeout will end it)."""
        sessions = list(self._by_key.items())
        ends = await asyncio.gather(*(self.end(key) for key, _ in sessions), return_exceptions=True)
        for (_, session), outcome in zip(sessions, ends, strict=True):
            if isinstance(outcome, BaseException):
                log.warning("could not close trajectory %s: %r", session.traj_id, outcome)

    def __len__(self) -> int:
        return len(self._by_key)


def tool_result(result: Result) -> types.CallToolResult:
    """A toolq result as an MCP tool result (``isError`` when it failed)."""
    structured = result.model_dump(include=STRUCTURED_FIELDS, exclude_none=True, mode="json")
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=result_text(result))],
        structured_content=structured,
        is_error=not result.ok,
    )


def error_result(code: str, message: str, *, infra: bool = False) -> types.CallToolResult:
    """A call that got no toolq result (``code`` says why; ``infra``: toolq, not the
    model, is to blame) as an MCP tool error."""
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=f"[{code}] {message}")],
        structured_content={"ok": False, "error_code": code, "error": message, "infra": infra},
        is_error=True,
    )
