"""`toolq mcp`'s sessions in process: a session's end racing its first open, and
the server's stop when a close fails. Real Redis (and a real worker where calls
must run), the server's own Bridge and TrajectorySession; no MCP client needed."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from mcp.types import CallToolResult

from tests.helpers import redis_client, wait_for
from toolq.integrations.mcp_server import Bridge, McpSettings, build_server
from toolq.integrations.mcp_session import TrajectorySession
from toolq.producer import AsyncClient, Client, spec_wait_s
from toolq.schemas import Keys, TrajectorySpec, TrajStatus


def close_requested(redis_url: str, ns: str, traj: str) -> bool:
    """Whether a close entry waits in the trajectory's calls stream."""
    entries = redis_client(redis_url).xrange(Keys(ns).calls(traj))
    return any(fields.get(b"type") == b"close" for _, fields in entries)


def test_a_session_that_ends_during_its_first_open_closes_the_trajectory(
    start_worker: Callable[..., Any], aclient_factory: Callable[[], AsyncClient], client: Client
) -> None:
    """A DELETE (or the server's stop) while the session's first call is opening the
    trajectory: the open completes, then the close comes; nothing is left open, and
    a call after the end opens nothing."""
    start_worker("local")
    traj = f"mcp-race-{uuid.uuid4().hex[:8]}"

    async def race() -> tuple[CallToolResult, CallToolResult]:
        async with aclient_factory() as aclient:
            session = TrajectorySession(aclient, traj, TrajectorySpec())
            first = asyncio.create_task(session.call("bash", {"command": "echo first"}))
            await asyncio.sleep(0)  # the first call holds the open, waiting on Redis
            await session.end()
            late = await session.call("bash", {"command": "echo late"})
            return await first, late

    first, late = asyncio.run(race())
    wait_for(lambda: client.record(traj).status == TrajStatus.COMPLETED, what="the close")
    assert first.structured_content is not None  # the first call got its one answer
    assert late.is_error and late.structured_content is not None
    assert late.structured_content["error_code"] == "trajectory_ended"
    record = client.record(traj)
    assert record is not None and record.calls_total == record.calls_submitted <= 1


def test_a_sessions_default_wait_is_the_adapters_rule(redis_url: str, ns: str) -> None:
    spec = TrajectorySpec(limits={"max_call_timeout_s": 900})

    async def waits() -> tuple[float, float]:
        async with AsyncClient(redis_url, ns) as aclient:
            default = TrajectorySession(aclient, "t-wait", spec).wait_s
            return default, TrajectorySession(aclient, "t-wait", spec, wait_s=2).wait_s

    assert asyncio.run(waits()) == (spec_wait_s(spec), 2) == (900 + 60, 2)


def test_a_failing_close_at_stop_spares_the_others_and_the_client(
    redis_url: str, ns: str, caplog: pytest.LogCaptureFixture
) -> None:
    """At the server's stop one trajectory's close fails (its calls stream is no
    stream): it is logged, the other trajectory is closed, the client is closed."""
    r = redis_client(redis_url)
    bridge = Bridge(McpSettings(redis_url=redis_url, namespace=ns, transport="http", wait_s=0.5))
    connections_before = {c["id"] for c in r.client_list()}

    async def serve_then_stop() -> tuple[str, str]:
        async with bridge.lifespan(build_server(bridge)):
            broken, fine = bridge.sessions.start("broken"), bridge.sessions.start("fine")
            for session in (broken, fine):  # no worker: opened, then wait_timeout
                waited = await session.call("bash", {"command": "true"})
                assert waited.structured_content is not None
                assert waited.structured_content["error_code"] == "wait_timeout"
            r.delete(Keys(ns).calls(broken.traj_id))
            r.set(Keys(ns).calls(broken.traj_id), "not a stream")  # its close fails: WRONGTYPE
            return broken.traj_id, fine.traj_id

    with caplog.at_level(logging.WARNING, logger="toolq.integrations.mcp_session"):
        broken, fine = asyncio.run(serve_then_stop())
    assert close_requested(redis_url, ns, fine)
    assert f"could not close trajectory {broken}" in caplog.text
    assert len(bridge.sessions) == 0
    with pytest.raises(RuntimeError, match="not running"):
        bridge.client  # noqa: B018
    wait_for(
        lambda: {c["id"] for c in r.client_list()} <= connections_before,
        what="the bridge's connections to close",
    )
