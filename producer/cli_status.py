"""``toolq status``: workers, backlog, trajectories, what runs now, calls/s and
latency, from Redis. ``--watch`` rides out Redis restarts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial

import click
from redis.exceptions import ClusterDownError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rich.console import Console, Group
from rich.live import Live

from .cli_common import client_of
from .status import DEAD_AFTER_S, RUNS_SAMPLE, WINDOW_MIN, Status, collect
from .status_render import down_reason, render, to_text, unreachable, view

# What a restarting Redis (BusyLoadingError is a ConnectionError) or a cluster
# failing over answers for a while; anything else is a real error.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError)


class _Screen:
    """Where refreshes go: JSON lines, plain text (pipes) or a live terminal view."""

    def __init__(self, as_json: bool, interval_s: float, live: Live | None) -> None:
        self.as_json = as_json
        self.interval_s = interval_s
        self.live = live
        self.last: Status | None = None
        self.frames = 0

    def show(self, status: Status) -> None:
        """One answered refresh."""
        self.last = status
        if self.as_json:
            click.echo(json.dumps(status.summary()))
        elif self.live is not None:
            self.live.update(view(status), refresh=True)
        else:
            self._plain(render(status))

    def down(self, error: BaseException) -> None:
        """One refresh Redis did not answer: a single line, the last view kept below
        it on a terminal so the operator still sees what was there."""
        last_ok_ms = self.last.at_ms if self.last else None
        line = unreachable(error, self.interval_s, last_ok_ms)
        if self.as_json:
            now_ms = int(time.time() * 1000)
            click.echo(json.dumps({"at_ms": now_ms, "error": down_reason(error)}))
        elif self.live is not None:
            below = [view(self.last)] if self.last else []
            self.live.update(Group(line, *below), refresh=True)
        else:
            self._plain(to_text(line))

    def _plain(self, text: str) -> None:
        if self.frames:
            click.echo("")  # a blank line between refreshes in a pipe
        click.echo(text)
        self.frames += 1


def _watch(
    read: Callable[[], Status], screen: _Screen, interval_s: float, refreshes: int | None
) -> None:
    shown = 0
    while refreshes is None or shown < refreshes:
        if shown:
            time.sleep(interval_s)
        try:
            status = read()
        except REDIS_DOWN as exc:  # a restart or failover: show it and try again
            screen.down(exc)
        else:
            screen.show(status)
        shown += 1


@click.command("status")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C, through Redis restarts.")
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
    help="Minutes of calls the error rate, calls/s and latency cover.",
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
    """Show workers, backlog, trajectories by state, what runs now, calls/s,
    p50/p95 latency and recent errors.

    Reads Redis only. Exit status 0 whenever Redis answers; without --watch an
    unreachable Redis is exit 3, with --watch it is shown and retried.
    """
    client = client_of(ctx)
    read = partial(
        collect,
        client.redis,
        client.keys,
        dead_after_s=dead_after_s,
        runs_sample=runs_sample,
        window_min=window_min,
    )
    console = Console()
    if not watch:
        if as_json or not console.is_terminal:
            _Screen(as_json, interval_s, None).show(read())
        else:
            console.print(view(read()))
        return
    try:
        if as_json or not console.is_terminal:
            _watch(read, _Screen(as_json, interval_s, None), interval_s, refreshes)
            return
        with Live(console=console, auto_refresh=False) as live:
            _watch(read, _Screen(as_json, interval_s, live), interval_s, refreshes)
    except KeyboardInterrupt:  # Ctrl-C is how --watch ends: no "Aborted!", exit 0
        return
