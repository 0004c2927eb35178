"""Clients for the `toolq mcp` tests: the MCP SDK's own, against `toolq mcp` processes."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult

from tests.helpers import TOOLQ, wait_for
from toolq.producer import Client
from toolq.schemas import TrajStatus

#: The servers' spec: a policy that blocks one tool, and an env the calls can see.
SPEC = {"blocked_tools": ["archive"], "env": {"GREETING": "hello"}}
CALL_WAIT_S = 60  # generous: a first call waits for its slot to start
#: The params of a raw ``initialize`` request (the handshake protocol).
INITIALIZE = {
    "protocolVersion": "2025-11-25",
    "capabilities": {},
    "clientInfo": {"name": "toolq-tests", "version": "0"},
}


def toolq_mcp(redis_url: str, ns: str, *options: str) -> list[str]:
    return [*TOOLQ, "--redis-url", redis_url, "--namespace", ns, "mcp", *options]


@asynccontextmanager
async def stdio_session(
    redis_url: str, ns: str, *options: str, spec: dict[str, Any] = SPEC
) -> AsyncIterator[ClientSession]:
    """A session with a `toolq mcp` process the SDK's stdio client spawns."""
    command, *args = toolq_mcp(redis_url, ns, "--spec", json.dumps(spec), *options)
    params = StdioServerParameters(command=command, args=args)
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


@asynccontextmanager
async def http_session(url: str) -> AsyncIterator[ClientSession]:
    """A session over the SDK's streamable HTTP client (it DELETEs the session at exit)."""
    async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def call(session: ClientSession, tool: str, **args: Any) -> CallToolResult:
    result = await session.call_tool(tool, args, read_timeout_seconds=CALL_WAIT_S)
    assert isinstance(result, CallToolResult)
    return result


def text(result: CallToolResult) -> str:
    (content,) = result.content
    assert content.type == "text"
    return content.text


async def until(check: Callable[[], Any], what: str) -> None:
    """``wait_for`` from a test's event loop (which keeps serving its sessions meanwhile)."""
    await asyncio.to_thread(wait_for, check, 60, what)


def status(client: Client, traj: str) -> TrajStatus | None:
    record = client.record(traj)
    return record.status if record else None


def traj_of(result: CallToolResult) -> str:
    assert result.structured_content is not None
    return str(result.structured_content["traj"])


def rpc(proc: subprocess.Popen, msg_id: int, method: str, params: Any) -> dict[str, Any]:
    """Send one JSON-RPC request on a stdio server's stdin (``proc`` unbuffered),
    return its reply line."""
    _send(proc, {"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], CALL_WAIT_S)
    assert ready, f"no reply to {method} within {CALL_WAIT_S}s"
    reply: dict[str, Any] = json.loads(proc.stdout.readline())
    assert reply.get("id") == msg_id, reply
    return reply


def notify(proc: subprocess.Popen, method: str) -> None:
    """Send one JSON-RPC notification on a stdio server's stdin."""
    _send(proc, {"jsonrpc": "2.0", "method": method})


def _send(proc: subprocess.Popen, message: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write((json.dumps(message) + "\n").encode())
