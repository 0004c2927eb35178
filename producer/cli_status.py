"""``toolq status``: workers, backlog, trajectories and recent errors, from Redis."""

from __future__ import annotations

import json
import time

import click

from .status import DEAD_AFTER_S, RUNS_SAMPLE, WINDOW_MIN, collect, render


@click.command("status")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option(
    "--interval", "interval_s", type=float, default=2.0, show_default=True, help="Seconds."
)
@click.option("--json", "as_json", is_flag=True, help="JSON (one object per refresh).")
@click.option(
    "--dead-after",
    "dead_after_s",
    type=float,
    default=DEAD_AFTER_S,
    show_default=True,
    help="A heartbeat older than this many seconds marks a worker dead.",
)
@click.option(
    "--window",
    "window_min",
    type=click.IntRange(1, 120),
    default=WINDOW_MIN,
    show_default=True,
    help="Minutes of calls the error rate covers.",
)
@click.option(
    "--runs",
    "runs_sample",
    type=click.IntRange(0),
    default=RUNS_SAMPLE,
    show_default=True,
    help="Newest runs counted by state.",
)
@click.option("--count", "refreshes", type=click.IntRange(1), default=None, hidden=True)
@click.pass_context
def status(
    ctx: click.Context,
    watch: bool,
    interval_s: float,
    as_json: bool,
    dead_after_s: float,
    window_min: int,
    runs_sample: int,
    refreshes: int | None,
) -> None:
    """Show workers (heartbeat, slots), backlog, trajectories by state and recent errors.

    Reads Redis only. Exit status 0 whenever Redis answers.
    """
    from .cli import _client

    client = _client(ctx)
    shown = 0
    while True:
        snapshot = collect(
            client.redis,
            client.keys,
            dead_after_s=dead_after_s,
            runs_sample=runs_sample,
            window_min=window_min,
        )
        if as_json:
            click.echo(json.dumps(snapshot.summary()))
        else:
            if watch:
                click.clear()
            click.echo(render(snapshot))
        shown += 1
        if not watch or (refreshes is not None and shown >= refreshes):
            return
        try:
            time.sleep(interval_s)
        except KeyboardInterrupt:
            return
