"""``toolq mcp``: serve the published tools over MCP, a trajectory per session.

The command is part of the producer's CLI, but the MCP SDK is imported only
when it runs (``toolq.integrations.mcp_server``), so ``toolq`` works without
the ``mcp`` extra and says how to get it.
"""

from __future__ import annotations

import click
from click.core import ParameterSource

from toolq.schemas import TrajectorySpec, check_traj_id

from .cli_common import client_of, spec_of, workers_alive
from .cli_errors import CliError

INSTALL_HINT = "pip install 'toolq[mcp]'"
DEFAULT = ParameterSource.DEFAULT


@click.command("mcp")
@click.option(
    "--transport",
    type=click.Choice(["stdio", "http"]),
    default="stdio",
    show_default=True,
    help="stdio: the MCP client starts this process, one session; http: streamable HTTP "
    "at http://HOST:PORT/mcp, any number of sessions.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP: address to bind.")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="HTTP: port."
)
@click.option("--spec", "spec_json", default=None, help="Trajectory spec as JSON (as `open`).")
@click.option("--image", default=None, help="Sandbox image (overrides the spec's).")
@click.option(
    "--trajectory",
    "traj_id",
    default=None,
    help="stdio: the trajectory's id (an open one is joined, an ended one started over); "
    "default mcp-<random>. HTTP sessions get mcp-<session id>.",
)
@click.option(
    "--keep-open",
    is_flag=True,
    help="Leave trajectories open when their sessions end (their idle timeout still ends them).",
)
@click.option(
    "--wait-s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Longest a tool call waits for its result, then answers wait_timeout (it may still "
    "finish) [default: the spec's max_call_timeout_s + 60].",
)
@click.option(
    "--max-sessions",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="HTTP: most sessions open at once, each holding a sandbox; a new one beyond is "
    "refused (HTTP 503) until one ends. The server has no authentication: this bounds how "
    "much anyone who reaches the port can hold, not who can.",
)
@click.pass_context
def mcp_cmd(
    ctx: click.Context,
    transport: str,
    host: str,
    port: int,
    spec_json: str | None,
    image: str | None,
    traj_id: str | None,
    keep_open: bool,
    wait_s: float | None,
    max_sessions: int,
) -> None:
    """Serve the workers' tools over MCP; each MCP session runs in a trajectory of its own.

    The trajectory opens with the spec at the session's first tool call and
    closes when the session ends (stdio: stdin closes or the process gets
    SIGTERM; HTTP: the client ends the session, the session has no request for
    the spec's idle_timeout_s, or the server stops). Tools the spec's policy
    blocks are not listed. Needs `pip install 'toolq[mcp]'`.
    """
    spec = spec_of(spec_json) if spec_json else TrajectorySpec()
    if image:
        spec = spec.model_copy(update={"image": image})
    if traj_id is not None:
        if transport == "http":
            raise click.UsageError("--trajectory is for stdio: HTTP sessions get their own")
        check_traj_id(traj_id)
    if transport == "stdio" and ctx.get_parameter_source("max_sessions") != DEFAULT:
        raise click.UsageError("--max-sessions is for HTTP: a stdio server has one session")
    try:
        from toolq.integrations import mcp_server
    except ImportError as exc:
        raise CliError(f"toolq mcp needs the MCP SDK ({exc}): {INSTALL_HINT}") from None
    with client_of(ctx) as client:  # fails now, not at the first call, when Redis is unreachable
        if not workers_alive(client):
            click.echo(
                f"toolq mcp: no worker is alive in namespace {client.keys.ns!r}: tool calls "
                "wait until one starts (`toolq worker`)",
                err=True,
            )
    obj = ctx.find_root().obj or {}
    settings = mcp_server.McpSettings(
        redis_url=obj.get("redis_url"),
        namespace=obj.get("namespace", "toolq"),
        spec=spec,
        transport="http" if transport == "http" else "stdio",
        host=host,
        port=port,
        trajectory=traj_id,
        keep_open=keep_open,
        wait_s=wait_s,
        max_sessions=max_sessions,
    )
    try:
        mcp_server.run(settings)
    except mcp_server.StartError as exc:
        raise CliError(str(exc)) from None
