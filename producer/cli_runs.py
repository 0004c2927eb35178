"""``toolq runs``, ``toolq show``: list, count and inspect trajectories."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from toolq.schemas import Result, TrajectoryRecord

from . import ops
from .cli_common import client_of
from .client import Client
from .drive import count_by_status
from .status import format_age


def _age(ms: int | None) -> str:
    return format_age(max(0.0, time.time() - ms / 1000)) if ms else "-"


def _row(rec: TrajectoryRecord) -> str:
    labels = ",".join(f"{k}={v}" for k, v in (rec.spec.labels if rec.spec else {}).items())
    return (
        f"{rec.traj:<32} {rec.status.value:<10} {_age(rec.created_ms):>6} "
        f"{rec.calls_total:>6} {rec.calls_failed:>6} {rec.calls_in_flight:>6}  {labels}"
    )


def _check_labels(labels: tuple[str, ...]) -> tuple[str, ...]:
    """``--label`` values are ``k=v`` (a usage error otherwise, exit 2)."""
    for label in labels:
        key, sep, _ = label.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{label!r} is not k=v", param_hint="'--label'")
    return labels


@click.command("runs")
@click.option(
    "--status",
    type=click.Choice(["pending", "running", "completed", "failed", "timeout", "cancelled"]),
    default=None,
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    callback=lambda _ctx, _param, value: _check_labels(value),
    help="Filter by label k=v (repeatable).",
)
@click.option("--parent", default=None, help="Only the children of this trajectory.")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--count", "count_only", is_flag=True, help="Only count by status.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def runs(
    ctx: click.Context,
    status: str | None,
    labels: tuple[str, ...],
    parent: str | None,
    limit: int,
    count_only: bool,
    as_json: bool,
) -> None:
    """List trajectories (newest first) or count them by status.

    Pending ones show how long they have waited for a slot (the backlog).
    --parent P lists P's children: its open ones, and ended ones until a
    later child's open frees their places.
    """
    client: Client = client_of(ctx)
    if count_only:
        counts = (
            count_by_status(client.runs(label=list(labels), limit=10**9, parent=parent))
            if parent
            else client.run_counts(label=list(labels))
        )
        click.echo(
            json.dumps(counts) if as_json else "  ".join(f"{k}: {v}" for k, v in counts.items())
        )
        return
    records = client.runs(status=status, label=list(labels), limit=limit, parent=parent)
    if as_json:
        for rec in records:
            click.echo(rec.model_dump_json(exclude_none=True))
        return
    click.echo(
        f"{'TRAJECTORY':<32} {'STATUS':<10} {'AGE':>6} {'CALLS':>6} {'FAILED':>6} "
        f"{'QUEUED':>6}  LABELS"
    )
    for rec in records:
        click.echo(_row(rec))


def last_results(client: Client, traj_id: str, count: int) -> list[Result]:
    """The trajectory's most recent results (newest last), from its events stream."""
    events: Any = client.redis.xrevrange(client.keys.events(traj_id), count=count * 4)
    call_ids = [
        ops.s(f[b"call_id"]) for _id, f in events if f.get(b"type") == b"result" and b"call_id" in f
    ][:count]
    pipe = client.redis.pipeline(transaction=False)
    for call_id in reversed(call_ids):
        pipe.hgetall(client.keys.result(traj_id, call_id))
    return [Result.from_fields(f) for f in pipe.execute() if f]


@click.command("show")
@click.argument("traj")
@click.option(
    "--calls",
    "n_calls",
    type=int,
    default=10,
    show_default=True,
    help="How many recent calls to show.",
)
@click.pass_context
def show(ctx: click.Context, traj: str, n_calls: int) -> None:
    """Show TRAJ: spec, state, counts and its last calls, as JSON."""
    client: Client = client_of(ctx)
    rec = client.record(traj)
    if rec is None:
        raise click.ClickException(f"no trajectory {traj!r} (never opened, or expired)")
    doc: dict[str, Any] = rec.model_dump(mode="json", exclude_none=True)
    doc["calls_in_flight"] = rec.calls_in_flight
    doc["last_calls"] = [
        {
            "call_id": r.call_id,
            "tool": r.tool,
            "ok": r.ok,
            "error_code": r.error_code,
            "exit_code": r.exit_code,
            "run_ms": r.run_ms,
            "output": r.output[-200:],
        }
        for r in last_results(client, traj, n_calls)
    ]
    click.echo(json.dumps(doc, indent=2))
