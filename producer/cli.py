"""The ``toolq`` command line.

Producer commands need only Redis; ``toolq worker``, ``toolq rq-worker`` and
``toolq demo`` dispatch to the worker package (``pip install toolq[worker]``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from toolq.schemas import InvalidIdError, TrajectorySpec

from . import cli_bg, cli_status
from .cli_tools import tools_cmd
from .client import Client, ToolqError
from .config import NoRedisError


def _json_arg(value: str, what: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as exc:  # bad JSON, a 5,000-digit number, deep nesting
        raise click.UsageError(f"{what} is not valid JSON: {exc}") from None


def _client(ctx: click.Context) -> Client:
    obj = ctx.ensure_object(dict)
    if "client" not in obj:
        try:
            obj["client"] = Client(obj.get("redis_url"), obj.get("namespace", "toolq"))
        except NoRedisError as exc:
            raise click.UsageError(str(exc)) from None
    client: Client = obj["client"]
    return client


@click.group()
@click.option("--redis-url", envvar="TOOLQ_REDIS_URL", help="Redis URL [env TOOLQ_REDIS_URL].")
@click.option(
    "--namespace",
    envvar="TOOLQ_NAMESPACE",
    default="toolq",
    show_default=True,
    help="Key prefix [env TOOLQ_NAMESPACE].",
)
@click.version_option(package_name="toolq")
@click.pass_context
def main(ctx: click.Context, redis_url: str | None, namespace: str) -> None:
    """toolq: run AI agents' tool calls from Redis streams in sticky sandboxes."""
    ctx.ensure_object(dict).update(redis_url=redis_url, namespace=namespace)


@main.command("open")
@click.argument("traj")
@click.option("--spec", "spec_json", default=None, help="Trajectory spec as JSON.")
@click.pass_context
def open_cmd(ctx: click.Context, traj: str, spec_json: str | None) -> None:
    """Open trajectory TRAJ (no-op if it is open already)."""
    spec = TrajectorySpec.model_validate(_json_arg(spec_json, "--spec")) if spec_json else None
    status = _run(lambda: _client(ctx).open(traj, spec))
    click.echo(json.dumps({"traj": traj, "status": status}))


@main.command("call")
@click.argument("traj")
@click.argument("tool")
@click.argument("args", default="{}")
@click.option("--timeout", "timeout_s", type=float, default=None, help="Call timeout (s).")
@click.option("--call-id", default=None, help="Client call id (idempotent resubmission).")
@click.pass_context
def call_cmd(
    ctx: click.Context,
    traj: str,
    tool: str,
    args: str,
    timeout_s: float | None,
    call_id: str | None,
) -> None:
    """Run TOOL with ARGS (JSON) in TRAJ and print the result as JSON.

    Opens TRAJ with the default spec if needed. Exit status: 0 when the tool
    succeeded, 1 when it failed, 2 on usage errors.
    """
    parsed = _json_arg(args, "ARGS")
    if not isinstance(parsed, dict):
        raise click.UsageError("ARGS must be a JSON object")
    client = _client(ctx)
    _run(lambda: client.open(traj))
    result = _run(lambda: client.call(traj, tool, parsed, timeout_s=timeout_s, call_id=call_id))
    click.echo(result.model_dump_json())
    sys.exit(0 if result.ok else 1)


@main.command("close")
@click.argument("traj")
@click.pass_context
def close_cmd(ctx: click.Context, traj: str) -> None:
    """Close TRAJ after its submitted calls; frees its slot."""
    entry = _run(lambda: _client(ctx).close(traj))
    click.echo(json.dumps({"traj": traj, "close_entry": entry}))


@main.command("cancel")
@click.argument("traj")
@click.pass_context
def cancel_cmd(ctx: click.Context, traj: str) -> None:
    """Cancel TRAJ now: kill what runs, answer pending calls with `cancelled`."""
    entry = _run(lambda: _client(ctx).cancel(traj))
    click.echo(json.dumps({"traj": traj, "cancel_entry": entry}))


def _run(fn: Any) -> Any:
    try:
        return fn()
    except (InvalidIdError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    except ToolqError as exc:
        raise click.ClickException(str(exc)) from None


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
main.add_command(cli_bg.bg)


if __name__ == "__main__":
    main()
