"""`toolq mcp --transport http`, driven by the MCP SDK's own clients against a live worker.

A real `toolq mcp` process serves streamable HTTP on a free port of
127.0.0.1, in front of a real Redis and a real worker (local backend). Every
session gets a trajectory of its own, closed when the session ends: the
client's DELETE, the SDK's idle timeout (the spec's), or the server's stop.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mcp
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.types import INVALID_REQUEST, CallToolResult

from tests.helpers import redis_client, wait_for
from tests.mcp_clients import (
    CALL_WAIT_S,
    INITIALIZE,
    SPEC,
    call,
    free_port,
    http_session,
    port_open,
    status,
    text,
    toolq_mcp,
    traj_of,
    until,
)
from toolq.producer import Client
from toolq.schemas import Keys, TrajStatus


@pytest.fixture
def worker(start_worker: Callable[..., Any]) -> Any:
    return start_worker("local")


#: ``serve(*options, spec=SPEC)``: a `toolq mcp --transport http` server's URL and process.
Serve = Callable[..., tuple[str, subprocess.Popen]]


@pytest.fixture
def serve(redis_url: str, ns: str, worker: Any, tmp_path: Path) -> Iterator[Serve]:
    """Start `toolq mcp --transport http` on free ports; each stopped with SIGTERM at the end."""
    started: list[subprocess.Popen] = []

    def start(*options: str, spec: dict[str, Any] = SPEC) -> tuple[str, subprocess.Popen]:
        port = free_port()
        command = toolq_mcp(redis_url, ns, "--transport", "http", "--port", str(port))
        log = tmp_path / f"mcp-{port}.log"
        with log.open("w") as stderr:
            proc = subprocess.Popen([*command, "--spec", json.dumps(spec), *options], stderr=stderr)
        started.append(proc)
        url = f"http://127.0.0.1:{port}/mcp"
        wait_for(lambda: url in log.read_text() or proc.poll() is not None, what="serving")
        assert proc.poll() is None and port_open(port), log.read_text()  # said once bound
        return url, proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


@pytest.fixture
def http_server(serve: Serve) -> tuple[str, subprocess.Popen]:
    """`toolq mcp --transport http` with the tests' spec."""
    return serve()


def test_http_sessions_get_a_trajectory_each(
    http_server: tuple[str, subprocess.Popen], client: Client
) -> None:
    url, _ = http_server

    async def two_sessions() -> tuple[str, str]:
        async with http_session(url) as one, http_session(url) as two:
            names = {t.name for t in (await one.list_tools()).tools}
            assert "bash" in names and "archive" not in names
            await call(one, "write_file", path="who.txt", content="one")
            await call(two, "write_file", path="who.txt", content="two")
            read_one, read_two = await asyncio.gather(
                call(one, "read_file", path="who.txt"), call(two, "read_file", path="who.txt")
            )
            assert (text(read_one), text(read_two)) == ("one", "two")  # separate sandboxes
            blocked = await call(two, "archive", path=".")
            assert blocked.is_error and blocked.structured_content is not None
            assert blocked.structured_content["error_code"] == "tool_blocked"
            traj_one, traj_two = (traj_of(r) for r in (read_one, read_two))
            assert traj_one != traj_two and traj_one.startswith("mcp-")
            async with http_session(url) as three:  # ends (DELETE) while the others go on
                traj_three = traj_of(await call(three, "bash", command="true"))
            await until(lambda: status(client, traj_three) == TrajStatus.COMPLETED, "DELETE")
            assert status(client, traj_one) == status(client, traj_two) == TrajStatus.RUNNING
            return traj_one, traj_two

    trajs = asyncio.run(two_sessions())
    for traj in trajs:
        wait_for(lambda t=traj: status(client, t) == TrajStatus.COMPLETED, what="session ends")
        record = client.record(traj)
        assert record is not None and record.calls_total == record.calls_submitted


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_http_server_stopping_closes_open_sessions(
    http_server: tuple[str, subprocess.Popen], client: Client, signum: int
) -> None:
    url, proc = http_server
    transport = streamable_http_client(url, terminate_on_close=False)

    async def abandoned_session() -> str:
        async with transport as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            return traj_of(await call(session, "bash", command="true"))

    traj = asyncio.run(abandoned_session())  # no DELETE: the session stays
    assert status(client, traj) == TrajStatus.RUNNING
    proc.send_signal(signum)
    assert proc.wait(60) == 0
    wait_for(lambda: status(client, traj) == TrajStatus.COMPLETED, what="the close at shutdown")


def test_a_session_the_sdk_ends_for_idleness_closes_its_trajectory(
    serve: Serve, client: Client, redis_url: str, ns: str
) -> None:
    """A session abandoned without a DELETE: after the spec's idle timeout the SDK
    ends it, and its teardown closes the trajectory; its id is refused afterwards.
    A call sent around MCP keeps the trajectory busy meanwhile, so the worker's own
    idle timeout cannot be what ends it."""
    url, _ = serve(spec={**SPEC, "limits": {"idle_timeout_s": 2}})
    transport = streamable_http_client(url, terminate_on_close=False)

    async def abandoned_session() -> str:
        async with transport as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            return traj_of(await call(session, "bash", command="true"))

    traj = asyncio.run(abandoned_session())
    client.submit(traj, "bash", {"command": "sleep 600"}, timeout_s=600)
    calls, r = Keys(ns).calls(traj), redis_client(redis_url)
    try:
        closing = lambda: any(f.get(b"type") == b"close" for _, f in r.xrange(calls))  # noqa: E731
        wait_for(closing, what="the session's end to close its trajectory")
        assert status(client, traj) == TrajStatus.RUNNING  # the close waits for the sleep
        assert session_status(url, traj.removeprefix("mcp-")) == 404
    finally:
        client.cancel(traj)


def session_status(url: str, session_id: str) -> int:
    """The HTTP status of a ``tools/list`` request in that session."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    headers = {"Mcp-Session-Id": session_id, "Mcp-Protocol-Version": "2025-11-25"}
    return post_status(url, body, headers)


def post_status(url: str, body: dict[str, Any], headers: dict[str, str]) -> int:
    """The HTTP status the server answers a JSON-RPC message with."""
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        **headers,
    }
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(response.status)
    except urllib.error.HTTPError as refused:
        return refused.code


def test_max_sessions_refuses_sessions_beyond_it(serve: Serve, client: Client) -> None:
    url, _ = serve("--max-sessions", "1")

    async def one_at_a_time() -> list[int]:
        async with http_session(url) as only:
            assert not (await call(only, "bash", command="true")).is_error
            refused = initialize_status(url)  # a second session, while the first is open
        await until(lambda: initialize_status(url) == 200, "room for a session again")
        return [refused]

    assert asyncio.run(one_at_a_time()) == [503]


def initialize_status(url: str) -> int:
    """The HTTP status of an ``initialize`` request (a new session's first)."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE}
    return post_status(url, body, {})


def test_a_port_in_use_fails_the_start_without_claiming_to_serve(
    redis_url: str, ns: str, worker: Any
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = toolq_mcp(redis_url, ns, "--transport", "http", "--port", str(port))
        r = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "address already in use" in r.stderr and "serving" not in r.stderr, r.stderr
    assert f"Error: toolq mcp cannot serve on 127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_sdks_high_level_client_negotiates_a_session(
    http_server: tuple[str, subprocess.Popen], redis_url: str, ns: str, client: Client
) -> None:
    """`mcp.Client` probes the 2026 protocol first: over HTTP the server refuses
    it (no sessions there), so the client falls back to the handshake; over
    stdio the process is the session, so the 2026 protocol serves as well."""
    url, _ = http_server
    command, *args = toolq_mcp(redis_url, ns, "--spec", json.dumps(SPEC))

    async def both() -> list[tuple[str | None, list[CallToolResult]]]:
        seen = []
        for server in (url, StdioServerParameters(command=command, args=args)):
            async with mcp.Client(server, read_timeout_seconds=CALL_WAIT_S) as c:
                wrote = await c.call_tool("write_file", {"path": "x.txt", "content": "x"})
                read = await c.call_tool("read_file", {"path": "x.txt"})
                seen.append((c.protocol_version, [wrote, read]))
        return seen

    (http_version, http_calls), (stdio_version, stdio_calls) = asyncio.run(both())
    assert http_version is not None and http_version < "2026"
    assert stdio_version is not None and stdio_version >= "2026"
    for results in (http_calls, stdio_calls):
        assert [r.is_error for r in results] == [False, False]
        assert "x" in text(results[1]) and traj_of(results[0]) == traj_of(results[1])


def test_http_requests_without_a_session_are_refused_clearly(
    http_server: tuple[str, subprocess.Popen],
) -> None:
    """A client pinned to the 2026 protocol sends no session: nothing to map to a
    trajectory, so its calls are refused with a message saying what is needed."""
    url, _ = http_server

    async def refusal() -> mcp.MCPError:
        async with mcp.Client(url, mode="2026-07-28") as c:
            try:
                await c.call_tool("bash", {"command": "true"})
            except mcp.MCPError as exc:
                return exc
        raise AssertionError("a call without a session was served")

    refused = asyncio.run(refusal())
    assert refused.code == INVALID_REQUEST and "needs a session" in refused.message
