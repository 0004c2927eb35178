"""The ``toolq`` command line.

Producer commands need only Redis; ``toolq worker``, ``toolq rq-worker`` and
``toolq demo`` dispatch to the worker package (``pip install toolq[worker]``).
Errors are one line with a documented exit status (``cli_errors``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from . import cli_bg, cli_files, cli_status
from .cli_common import client_of, json_arg, spec_of
from .cli_errors import EXIT_INTERRUPTED, EXIT_TIMEOUT, CliError, ToolqGroup
from .cli_mcp import mcp_cmd
from .cli_tools import tools_cmd
from .drive import call_wait_s
from .ops import WaitTimeout, new_call_id

#: ``--wait``: seconds, never negative.
WAIT_S = click.FloatRange(min=0)


@click.group(cls=ToolqGroup)
@click.option("--redis-url", envvar="TOOLQ_REDIS_URL", help="Redis URL [env TOOLQ_REDIS_URL].")
@click.option(
    "--namespace",
    envvar="TOOLQ_NAMESPACE",
    default="toolq",
    show_default=True,
    help="Key prefix [env TOOLQ_NAMESPACE].",
)
@click.option(
    "--debug", is_flag=True, envvar="TOOLQ_DEBUG", help="Show tracebacks [env TOOLQ_DEBUG]."
)
@click.version_option(package_name="toolq")
@click.pass_context
def main(ctx: click.Context, redis_url: str | None, namespace: str, debug: bool) -> None:
    """toolq: run AI agents' tool calls from Redis streams in sticky sandboxes.

    Exit status: 0 done (for `call`: the tool succeeded), 1 the tool failed or
    what was asked for does not exist, 2 usage, 3 Redis or the Docker engine
    cannot be reached, 124 a wait timed out, 130 interrupted (Ctrl-C).
    """
    ctx.ensure_object(dict).update(redis_url=redis_url, namespace=namespace, debug=debug)


@main.command("open")
@click.argument("traj")
@click.option("--spec", "spec_json", default=None, help="Trajectory spec as JSON.")
@click.option("--reuse", is_flag=True, help="Start an ended trajectory of this id over.")
@click.pass_context
def open_cmd(ctx: click.Context, traj: str, spec_json: str | None, reuse: bool) -> None:
    """Open trajectory TRAJ (no-op if it is open already)."""
    spec = spec_of(spec_json) if spec_json else None
    status = client_of(ctx).open(traj, spec, reuse=reuse)
    click.echo(json.dumps({"traj": traj, "status": status}))


@main.command("call")
@click.argument("traj")
@click.argument("tool")
@click.argument("args", default="{}")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Call timeout (s)  [default: the trajectory's limits.call_timeout_s]",
)
@click.option(
    "--call-id",
    default=None,
    help="Client call id (idempotent resubmission)  [default: a fresh one]",
)
@click.option(
    "--wait",
    "wait_s",
    type=WAIT_S,
    default=None,
    help="Seconds to wait for the result  [default: the call timeout + 60, or 120]",
)
@click.pass_context
def call_cmd(
    ctx: click.Context,
    traj: str,
    tool: str,
    args: str,
    timeout_s: float | None,
    call_id: str | None,
    wait_s: float | None,
) -> None:
    """Run TOOL with ARGS (JSON) in TRAJ and print the result as JSON.

    Opens TRAJ with the default spec if needed. Exit status: 0 when the tool
    succeeded, 1 when it failed, 2 on usage errors, 3 when Redis cannot be
    reached, 124 when no result came in time (says so when no worker is alive),
    130 on Ctrl-C (the call runs on: the line printed says how to get its result
    or cancel it).
    """
    parsed = json_arg(args, "ARGS")
    if not isinstance(parsed, dict):
        raise click.UsageError("ARGS must be a JSON object")
    client = client_of(ctx)
    call_id = call_id or new_call_id()
    wait = wait_s if wait_s is not None else call_wait_s(timeout_s)
    submitted = False
    try:
        client.open(traj)
        client.submit(traj, tool, parsed, call_id=call_id, timeout_s=timeout_s)
        submitted = True
        result = client.result(traj, call_id, wait)  # says at once when no worker is alive
    except KeyboardInterrupt:  # the call is in Redis (or may be): it runs on without us
        runs = "still runs" if submitted else "may have been submitted"
        click.echo(
            f"toolq: interrupted; call {call_id} of {traj} {runs}: its result: "
            f"`toolq result {traj} {call_id}`; to stop it: `toolq cancel {traj}`",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    except WaitTimeout as exc:
        raise CliError(str(exc), EXIT_TIMEOUT) from None
    click.echo(result.model_dump_json())
    sys.exit(0 if result.ok else 1)


@main.command("result")
@click.argument("traj")
@click.argument("call_id")
@click.option(
    "--wait", "wait_s", type=WAIT_S, default=60.0, show_default=True, help="Seconds to wait."
)
@click.pass_context
def result_cmd(ctx: click.Context, traj: str, call_id: str, wait_s: float) -> None:
    """Print the result of call CALL_ID of TRAJ as JSON, waiting for it if needed.

    Exit status as for `call`: 0 the tool succeeded, 1 it failed, 124 no result
    came in time.
    """
    try:
        result = client_of(ctx).result(traj, call_id, wait_s)
    except WaitTimeout as exc:
        raise CliError(str(exc), EXIT_TIMEOUT) from None
    click.echo(result.model_dump_json())
    sys.exit(0 if result.ok else 1)


@main.command("close")
@click.argument("traj")
@click.pass_context
def close_cmd(ctx: click.Context, traj: str) -> None:
    """Close TRAJ after its submitted calls; frees its slot."""
    entry = client_of(ctx).close(traj)
    click.echo(json.dumps({"traj": traj, "close_entry": entry}))


@main.command("cancel")
@click.argument("traj")
@click.pass_context
def cancel_cmd(ctx: click.Context, traj: str) -> None:
    """Cancel TRAJ and its open children now: kill what runs, answer pending calls
    with `cancelled`."""
    entry = client_of(ctx).cancel(traj)
    click.echo(json.dumps({"traj": traj, "cancel_entry": entry}))


def _load_producer_commands() -> None:
    from .cli_demo import demo
    from .cli_runs import runs, show

    main.add_command(runs)
    main.add_command(show)
    main.add_command(cli_status.status)
    main.add_command(demo)


def _load_worker_commands() -> None:
    try:
        from toolq.worker.cli import worker
        from toolq.worker.rq_worker import rq_worker
    except ImportError as exc:  # producer-only install
        missing = str(exc)

        @main.command("worker", context_settings={"ignore_unknown_options": True})
        @click.argument("args", nargs=-1, type=click.UNPROCESSED)
        def worker_missing(args: Any) -> None:
            """Run a worker (needs `pip install toolq[worker]`)."""
            raise click.ClickException(f"the worker is not installed ({missing})")

        return
    main.add_command(worker)
    main.add_command(rq_worker)


_load_producer_commands()
_load_worker_commands()
main.add_command(tools_cmd)
main.add_command(mcp_cmd)
main.add_command(cli_bg.bg)
for _files_cmd in (cli_files.upload, cli_files.download, cli_files.snapshot, cli_files.fork):
    main.add_command(_files_cmd)


if __name__ == "__main__":
    main()
