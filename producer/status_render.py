"""How ``toolq status`` lays out a ``Status``: rich tables, one section each.

``view`` builds the renderable (colour on a terminal); ``render`` turns it into
plain text (no ANSI codes) for pipes, files and tests.
"""

from __future__ import annotations

import io
import time

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from .status import CallStats, Status, WorkerRow, format_age, format_latency

#: Width of plain-text output: wide enough that worker and trajectory ids fit.
PLAIN_WIDTH = 120


def _table(*headers: str, right: tuple[str, ...] = ()) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 2, 0, 0))
    for header in headers:
        table.add_column(header, justify="right" if header in right else "left", no_wrap=True)
    return table


def _heading(title: str, detail: str = "") -> Text:
    text = Text(title, style="bold")
    if detail:
        text.append(f"  {detail}")
    return text


def _stamp(at_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at_ms / 1000))


def local_warning(status: Status) -> Text | None:
    """The warning shown while a live worker runs calls on the local backend."""
    local = sorted(w.worker for w in status.alive if w.backend == "local")
    if not local:
        return None
    workers = local[0] if len(local) == 1 else f"{len(local)} workers"
    return Text(
        f"WARNING: {workers} on the local backend, which is not a sandbox: no isolation, "
        "and limits such as network:false and memory_mb are not enforced.",
        style="bold yellow",
    )


def _workers(status: Status) -> list[RenderableType]:
    alive = status.alive
    used = sum(w.slots_used for w in alive)
    total = sum(w.slots_total for w in alive)
    dead = len(status.workers) - len(alive)
    parts: list[RenderableType] = [
        _heading("WORKERS", f"{len(alive)} alive, {dead} dead  slots {used}/{total} used")
    ]
    if not status.workers:
        return parts
    table = _table(
        "WORKER", "STATE", "HEARTBEAT", "SLOTS", "IMAGES", "BACKEND", "VERSION", "HOST",
        right=("HEARTBEAT", "SLOTS", "IMAGES"),
    )  # fmt: skip
    for w in sorted(status.workers, key=lambda w: (not w.alive, w.worker)):
        table.add_row(
            Text(w.worker),
            Text("alive", style="green") if w.alive else Text("DEAD", style="bold red"),
            Text(f"{format_age(w.heartbeat_age_s)} ago"),
            Text(f"{w.slots_used}/{w.slots_total}"),
            Text(_images(w)),
            Text(w.backend or "?", style="yellow" if w.backend == "local" else ""),
            Text(w.version or "?"),
            Text(w.host or "?"),
        )
    return [*parts, table]


def _images(w: WorkerRow) -> str:
    """Images held, and pulling when any: ``12 (+2)``; ``-`` when none published."""
    if w.images_held is None:
        return "-"
    return f"{w.images_held} (+{w.images_pulling})" if w.images_pulling else str(w.images_held)


def _backlog(status: Status) -> list[RenderableType]:
    b = status.backlog
    heading = _heading("BACKLOG", f"{b.pending} trajectories waiting for a slot")
    if not b.pending:
        return [heading]
    table = _table("WAITING", "LONGEST WAIT", "TRAJECTORY", right=("WAITING", "LONGEST WAIT"))
    table.add_row(
        Text(str(b.pending)), Text(format_age(b.oldest_age_s)), Text(b.oldest_traj or "?")
    )
    return [heading, table]


def _trajectories(status: Status) -> list[RenderableType]:
    scope = (
        f"newest {status.runs_sampled} of {status.runs_total} runs"
        if status.runs_sampled < status.runs_total
        else f"{status.runs_total} runs"
    )
    states = list(status.trajectories)
    table = _table(*(s.upper() for s in states), right=tuple(s.upper() for s in states))
    table.add_row(*(Text(str(status.trajectories[s])) for s in states))
    return [_heading("TRAJECTORIES", f"({scope})"), table]


def _running(status: Status) -> list[RenderableType]:
    if not status.running_total:
        return [_heading("RUNNING NOW", "none")]
    table = _table(
        "TRAJECTORY", "WORKER", "AGE", "ANSWERED/SUBMITTED", "IN FLIGHT",
        right=("AGE", "ANSWERED/SUBMITTED", "IN FLIGHT"),
    )  # fmt: skip
    for row in status.running:
        answered, submitted = row.calls_answered, row.calls_submitted
        in_flight = None
        if answered is not None and submitted is not None:
            in_flight = max(0, submitted - answered)
        table.add_row(
            Text(row.traj),
            Text(row.owner or "?"),
            Text(format_age(row.age_s) if row.age_s is not None else "?"),
            Text(f"{_or_dash(answered)}/{_or_dash(submitted)}"),
            Text(_or_dash(in_flight)),
        )
    parts: list[RenderableType] = [
        _heading("RUNNING NOW", f"{status.running_total} trajectories, newest first"),
        table,
    ]
    more = status.running_total - len(status.running)
    if more > 0:
        parts.append(Text(f"… and {more} more"))
    return parts


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _calls(c: CallStats) -> list[RenderableType]:
    avg = f"{c.window_s // 60} MIN AVG/S"
    table = _table(
        "ANSWERED", "FAILED", "ERROR RATE", "CALLS/S", "LAST MIN CALLS/S", avg, "P50", "P95",
        right=("ANSWERED", "FAILED", "ERROR RATE", "CALLS/S", "LAST MIN CALLS/S", avg),
    )  # fmt: skip
    table.add_row(
        Text(str(c.calls)),
        Text(str(c.failed), style="red" if c.failed else ""),
        Text(f"{c.error_rate:.1%}"),
        Text(f"{c.calls_per_s:.2f}"),
        Text(f"{c.last_minute_calls_per_s:.2f}"),
        Text(f"{c.window_calls_per_s:.2f}"),
        Text(format_latency(c.latency.p50_ms)),
        Text(format_latency(c.latency.p95_ms)),
    )
    parts: list[RenderableType] = [_heading("CALLS", f"last {c.window_s // 60} min"), table]
    top = ", ".join(f"{code} {n}" for code, n in list(c.errors.items())[:5])
    if top:
        parts.append(Text(f"errors: {top}"))
    return parts


def view(status: Status) -> Group:
    """The human view: workers, backlog, trajectories, what runs now, recent calls."""
    parts: list[RenderableType] = [
        _heading("toolq status", f"namespace={status.namespace}  {_stamp(status.at_ms)}")
    ]
    warning = local_warning(status)
    if warning is not None:
        parts.append(warning)
    for section in (_workers, _backlog, _trajectories, _running):
        parts += [Text(""), *section(status)]
    parts += [Text(""), *_calls(status.calls)]
    return Group(*parts)


def down_reason(error: BaseException) -> str:
    """``Redis unreachable (<first line of the error>)``."""
    lines = str(error).strip().splitlines()
    return f"Redis unreachable ({lines[0] if lines else type(error).__name__})"


def unreachable(error: BaseException, interval_s: float, last_ok_ms: int | None) -> Text:
    """The one line a ``--watch`` refresh shows while Redis does not answer."""
    since = f"; last answer {_stamp(last_ok_ms)}" if last_ok_ms else ""
    return Text(
        f"{_stamp(int(time.time() * 1000))}  {down_reason(error)}, "
        f"retrying every {interval_s:g}s{since}",
        style="bold red",
    )


def plain_console(width: int = PLAIN_WIDTH) -> Console:
    """A console that writes plain text (no colour, no cursor codes) to a buffer;
    a line of text is never wrapped (one line stays one line for grep), tables
    are laid out to ``width``."""
    return Console(
        file=io.StringIO(),
        width=width,
        color_system=None,
        force_terminal=False,
        force_interactive=False,
        force_jupyter=False,
        soft_wrap=True,
    )


def to_text(renderable: RenderableType, width: int = PLAIN_WIDTH) -> str:
    """``renderable`` as plain text, trailing spaces trimmed."""
    console = plain_console(width)
    console.print(renderable)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    return "\n".join(line.rstrip() for line in text.splitlines())


def render(status: Status, width: int = PLAIN_WIDTH) -> str:
    """The human view as plain text."""
    return to_text(view(status), width)
