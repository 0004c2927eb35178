"""``toolq bg list|output|stop``: a trajectory's background tasks.

``list`` and ``output`` read the tasks' Redis hashes (no worker round trip);
``stop`` is a ``bg_stop`` tool call through the trajectory's call stream.
"""

from __future__ import annotations

import json
import sys
import time

import click

from toolq.schemas import BG_FINAL_STATUSES as FINAL_STATUSES
from toolq.schemas import BgTask

from .cli_common import client_of


def _duration_s(task: BgTask) -> float:
    end_ms = task.ended_ms or int(time.time() * 1000)
    return max(0.0, (end_ms - task.started_ms) / 1000) if task.started_ms else 0.0


def _row(task: BgTask) -> str:
    exit_code = "-" if task.exit_code is None else str(task.exit_code)
    label = f"[{task.name}] " if task.name else ""
    return (
        f"{task.task_id:<14} {task.status:<10} {_duration_s(task):>8.1f}s {exit_code:>5} "
        f"{task.stdout_bytes:>10} {task.stderr_bytes:>10}  {label}{task.command[:60]}"
    )


@click.group("bg")
def bg() -> None:
    """Background tasks of a trajectory (started with the bg_start tool)."""


@bg.command("list")
@click.argument("traj")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per task.")
@click.pass_context
def list_cmd(ctx: click.Context, traj: str, as_json: bool) -> None:
    """List TRAJ's background tasks with status, duration and output sizes."""
    tasks: list[BgTask] = client_of(ctx).bg_list(traj)
    if as_json:
        for task in tasks:
            click.echo(task.model_dump_json())
        return
    click.echo(
        f"{'TASK':<14} {'STATUS':<10} {'DURATION':>9} {'EXIT':>5} {'STDOUT_B':>10} "
        f"{'STDERR_B':>10}  COMMAND"
    )
    for task in tasks:
        click.echo(_row(task))


@bg.command("output")
@click.argument("traj")
@click.argument("task_id")
@click.option("--wait", "wait_s", type=float, default=0.0, help="Wait up to this long for the end.")
@click.pass_context
def output_cmd(ctx: click.Context, traj: str, task_id: str, wait_s: float) -> None:
    """Print TASK_ID's output tails: stdout to stdout, stderr to stderr.

    A status line goes to stderr. Exit status: 0 when the task has ended or is
    running, 1 when it is unknown.
    """
    task: BgTask | None = client_of(ctx).bg_output(traj, task_id, wait_s=wait_s)
    if task is None:
        raise click.ClickException(f"no background task {task_id} in trajectory {traj}")
    click.echo(task.stdout_tail, nl=False)
    click.echo(task.stderr_tail, nl=False, err=True)
    state = task.status if task.status in FINAL_STATUSES else "still running"
    tail_note = " (tails only)" if task.truncated else ""
    click.echo(
        f"[{task.task_id} {state}, exit code {task.exit_code}, {_duration_s(task):.1f}s; "
        f"{task.stdout_bytes} stdout / {task.stderr_bytes} stderr bytes{tail_note}]",
        err=True,
    )


@bg.command("stop")
@click.argument("traj")
@click.argument("task_id")
@click.option("--force", is_flag=True, help="SIGKILL at once instead of SIGTERM first.")
@click.pass_context
def stop_cmd(ctx: click.Context, traj: str, task_id: str, force: bool) -> None:
    """Stop TASK_ID (SIGTERM to its process group, SIGKILL after a grace period).

    Prints the bg_stop result as JSON; exit status 1 if the call failed.
    """
    result = client_of(ctx).bg_stop(traj, task_id, force=force)
    click.echo(json.dumps(result.model_dump(mode="json")))
    sys.exit(0 if result.ok else 1)
