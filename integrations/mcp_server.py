"""``toolq mcp``: the tools toolq's workers publish, served over MCP.

Built on the ``mcp`` SDK's low-level ``Server``. Every MCP session runs its
calls in a trajectory of its own (``mcp_session.TrajectorySession``): opened
with the server's spec at the session's first tool call, closed when the
session ends. Over stdio the process is the session (it ends when stdin closes
or on SIGTERM/SIGINT); over streamable HTTP a session is the SDK's
``Mcp-Session-Id`` session, ended by the client's DELETE, by the SDK after the
spec's ``limits.idle_timeout_s`` without a request, or when the server stops.
``tools/list`` gives the published tools the trajectory's policy
allows, with their JSON Schemas.

    run(McpSettings(redis_url="redis://localhost:6379", transport="http", port=8765))
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any, Literal, cast

import anyio
import mcp.types as types
import uvicorn
from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage

from toolq.producer import AsyncClient
from toolq.producer.tools import mcp_spec
from toolq.schemas import TrajectorySpec

from .mcp_session import Sessions, TrajectorySession
from .mcp_stdin import CheckedLines, StdinLines, pollable

#: Longest the server waits, when it stops, for the closes of its trajectories.
CLOSE_WAIT_S = 10.0
INSTRUCTIONS = (
    "Every tool call of this session runs in one toolq trajectory: a sandbox whose files, "
    "working directory and background tasks persist from call to call until the session ends."
)


class StartError(RuntimeError):
    """The HTTP server could not start (a port in use, say)."""


@dataclass(frozen=True)
class McpSettings:
    """What ``toolq mcp`` serves, and where (the command's options)."""

    redis_url: str | None = None
    namespace: str | None = None  #: default: TOOLQ_NAMESPACE, else toolq
    spec: TrajectorySpec = field(default_factory=TrajectorySpec)
    transport: Literal["stdio", "http"] = "stdio"
    host: str = "127.0.0.1"
    port: int = 8000
    #: stdio: the trajectory's id (an ended one is started over); default ``mcp-<random>``.
    trajectory: str | None = None
    #: Leave trajectories open when their sessions end.
    keep_open: bool = False
    #: Longest a call waits for its result (default: see ``TrajectorySession``).
    wait_s: float | None = None
    #: HTTP: most sessions open at once; the SDK refuses more (HTTP 503) until one ends.
    max_sessions: int = 10_000


class Bridge:
    """The server's handlers: MCP sessions in, toolq trajectories out."""

    def __init__(self, settings: McpSettings) -> None:
        self.settings = settings
        self._client: AsyncClient | None = None
        self.sessions = Sessions(self._new_session)

    @property
    def client(self) -> AsyncClient:
        """The server's one toolq client (``RuntimeError`` outside the lifespan)."""
        if self._client is None:
            raise RuntimeError("the server is not running")
        return self._client

    @asynccontextmanager
    async def lifespan(self, _server: Server[Bridge]) -> AsyncIterator[Bridge]:
        """The server's life (stdio: the process; HTTP: the app's): its one
        client, and every open trajectory closed when it stops."""
        self._client = client = AsyncClient(self.settings.redis_url, self.settings.namespace)
        try:
            yield self
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    with anyio.move_on_after(CLOSE_WAIT_S):
                        await self.sessions.end_all()
                finally:
                    self._client = None
                    await client.aclose()

    async def list_tools(
        self, ctx: ServerRequestContext[Bridge], _params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        """``tools/list``: the published tools the session's trajectory may call."""
        tools = await self._session(ctx).tools()
        return types.ListToolsResult(tools=[types.Tool.model_validate(mcp_spec(t)) for t in tools])

    async def call_tool(
        self, ctx: ServerRequestContext[Bridge], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        """``tools/call``: one call in the session's trajectory; every outcome is a
        tool result (``isError`` with toolq's code when it failed)."""
        return await self._session(ctx).call(params.name, params.arguments)

    def _session(self, ctx: ServerRequestContext[Bridge]) -> TrajectorySession:
        """The request's session: stdio's one, or the SDK's HTTP session of that id."""
        if self.settings.transport == "stdio":  # the process is the session
            return self.sessions.get(None) or self.sessions.start(None)
        connection = _connection(ctx)
        key = connection.session_id
        if key is None:
            raise MCPError(
                types.INVALID_REQUEST,
                "toolq mcp runs each session's calls in a trajectory of its own: over HTTP it "
                "needs a session (the initialize handshake, protocol 2025-11-25 or earlier)",
            )
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions.start(key)
            # However the SDK ends the session (DELETE, its idle timeout, a crash, the
            # server stopping), its teardown closes the trajectory.
            connection.exit_stack.push_async_callback(self.sessions.end, key)
        return session

    def _new_session(self, key: str | None) -> TrajectorySession:
        settings = self.settings
        kw: dict[str, Any] = {"keep_open": settings.keep_open, "wait_s": settings.wait_s}
        if key is None:  # stdio: a named trajectory is joined, or started over once ended
            traj_id = settings.trajectory or f"mcp-{uuid.uuid4().hex[:12]}"
            return TrajectorySession(self.client, traj_id, settings.spec, reuse=True, **kw)
        return TrajectorySession(self.client, f"mcp-{key}", settings.spec, **kw)


def _connection(ctx: ServerRequestContext[Bridge]) -> Connection:
    """The request's MCP connection: one per HTTP session, with the SDK's session id
    and the exit stack its teardown unwinds. mcp 2.3 gives low-level handlers no
    public way to it (``Context.connection`` has it, but the SDK does not hand
    handlers a ``Context`` yet), so this reads the request's session proxy."""
    connection = getattr(ctx.session, "_connection", None)
    if not isinstance(connection, Connection):
        raise RuntimeError(f"mcp {version('mcp')} hides the request's connection from toolq mcp")
    return connection


async def _no_discover(
    _ctx: ServerRequestContext[Bridge], _params: types.RequestParams
) -> types.DiscoverResult:
    """HTTP refuses the 2026 protocol's ``server/discover``: its requests carry no
    session, so clients that probe (``mcp.Client``'s default) fall back to the
    initialize handshake, which has one."""
    raise MCPError(types.METHOD_NOT_FOUND, "toolq mcp over HTTP serves session protocols only")


def build_server(bridge: Bridge) -> Server[Bridge]:
    """The MCP server of ``bridge``: tools/list and tools/call."""
    server: Server[Bridge] = Server(
        "toolq",
        version=version("toolq"),
        instructions=INSTRUCTIONS,
        lifespan=bridge.lifespan,
        on_list_tools=bridge.list_tools,
        on_call_tool=bridge.call_tool,
    )
    if bridge.settings.transport == "http":
        server.add_request_handler("server/discover", types.RequestParams, _no_discover)
    return server


async def serve_stdio(settings: McpSettings) -> None:
    """Serve one session on stdin/stdout until stdin closes or SIGTERM/SIGINT."""
    server = build_server(Bridge(settings))
    scope = anyio.CancelScope()

    # A pipe is read without a thread, so that a signal need not wait for a line.
    lines: Any = StdinLines() if pollable(0) else anyio.wrap_file(sys.stdin)
    stdin = CheckedLines(lines)

    async def serve() -> None:
        with scope:  # a signal cancels it; the lifespan still closes the trajectory
            async with stdio_server(stdin=cast(Any, stdin)) as (read, write):

                async def reply(error: types.JSONRPCError) -> None:
                    await write.send(SessionMessage(error))

                stdin.reply = reply
                await server.run(read, write, server.create_initialization_options())

    await _until_signal(serve, scope.cancel)


class _Uvicorn(uvicorn.Server):
    """uvicorn leaving the signals to toolq (it would re-raise SIGTERM after
    shutting down, and the process would die of it instead of exiting 0), and
    saying where it serves once it listens there."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        except SystemExit:  # uvicorn's way to fail a start (a port in use), having logged why
            self.should_exit = True  # serve() returns; serve_http raises StartError
            return
        where = f"http://{self.config.host}:{self.config.port}/mcp"
        print(f"toolq mcp: serving {where}", file=sys.stderr)


async def serve_http(settings: McpSettings) -> None:
    """Serve streamable HTTP on ``host:port`` (path ``/mcp``) until SIGTERM/SIGINT."""
    bridge = Bridge(settings)
    # A session without requests for the trajectory's idle timeout ends with it.
    app = build_server(bridge).streamable_http_app(
        host=settings.host,
        session_idle_timeout=settings.spec.limits.idle_timeout_s,
        max_sessions=settings.max_sessions,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
    )
    server = _Uvicorn(config)

    def stop() -> None:
        server.should_exit = True  # graceful: the app's lifespan closes the trajectories

    await _until_signal(server.serve, stop)
    if not server.started:
        raise StartError(
            f"toolq mcp cannot serve on {settings.host}:{settings.port} (the error above says why)"
        )


async def _until_signal(serve: Callable[[], Awaitable[None]], stop: Callable[[], None]) -> None:
    """Run ``serve``; SIGTERM or SIGINT calls ``stop``, which makes it end."""
    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

            async def watch() -> None:
                async for _ in signals:
                    stop()

            tg.start_soon(watch)
            await serve()
            tg.cancel_scope.cancel()


def run(settings: McpSettings) -> None:
    """Serve until the session (stdio) or the server (HTTP) ends; ``StartError``
    when the HTTP server cannot listen."""
    anyio.run(serve_stdio if settings.transport == "stdio" else serve_http, settings)
