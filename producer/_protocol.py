"""What the clients send and how they read it back, free of any I/O.

Both the sync and the asyncio client build their commands from here, so they
speak exactly the same protocol; the scripts themselves are ``toolq.schemas.lua``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from toolq.schemas import (
    CallEntry,
    Keys,
    OpenRequest,
    Result,
    TrajectoryRecord,
    TrajectorySpec,
    TrajStatus,
    check_part,
    check_traj_id,
)

RESULT_TTL_MS = 24 * 3600 * 1000
EVENTS_MAXLEN = 10_000
RETENTION_MS = 7 * 24 * 3600 * 1000
RUNS_PAGE = 500


def now_ms() -> int:
    return int(time.time() * 1000)


def s(value: Any) -> str:
    """Decode a Redis reply value."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def open_args(
    keys: Keys, traj_id: str, spec: TrajectorySpec | None
) -> tuple[list[str], list[Any], dict[Any, Any]]:
    """Keys and args of ``lua.OPEN``, and the open-stream entry to add when new."""
    check_traj_id(traj_id)
    req = OpenRequest(traj=traj_id, spec=spec or TrajectorySpec())
    fields = req.to_fields()
    return [keys.traj(traj_id)], [traj_id, now_ms(), fields["spec"]], fields


def submit_args(keys: Keys, traj_id: str, entry: CallEntry) -> tuple[list[str], list[Any]]:
    """Keys and args of ``lua.SUBMIT`` for one call or control entry."""
    check_traj_id(traj_id)
    if entry.call_id is not None:
        check_part(entry.call_id, "call_id")
    fields = [x for kv in entry.to_fields().items() for x in kv]
    prefix = keys.result(traj_id, "")
    return (
        [keys.traj(traj_id), keys.calls(traj_id), keys.events(traj_id)],
        [prefix, RESULT_TTL_MS, EVENTS_MAXLEN, now_ms(), *fields],
    )


def cancel_args(keys: Keys, traj_id: str) -> tuple[list[str], list[Any]]:
    """Keys and args of ``lua.CANCEL``."""
    check_traj_id(traj_id)
    return (
        [keys.traj(traj_id), keys.calls(traj_id), keys.events(traj_id)],
        [keys.result(traj_id, ""), RESULT_TTL_MS, EVENTS_MAXLEN, now_ms(), RETENTION_MS, traj_id],
    )


def make_call(
    tool: str,
    args: dict[str, Any] | None,
    call_id: str | None,
    timeout_s: float | None,
    idempotent: bool,
) -> CallEntry:
    return CallEntry(
        tool=tool, args=args or {}, call_id=call_id, timeout_s=timeout_s, idempotent=idempotent
    )


def last_event_id(reply: Any) -> str:
    """The cursor to read events after, from ``XREVRANGE events + - COUNT 1``."""
    return s(reply[0][0]) if reply else "0-0"


def scan_result(reply: Any, call_id: str) -> tuple[str | None, bool, Result | None]:
    """Walk an XREAD reply: (new cursor, whether ``call_id``'s result event is in it,
    the result itself when its event carries it inline).

    Workers put small results in the event's ``result`` field (the result hash's
    fields as a JSON object), which saves the HGETALL; older workers do not.
    """
    cursor, found, inline = None, False, None
    for _stream, entries in reply or []:
        for entry_id, fields in entries:
            cursor = s(entry_id)
            if s(fields.get(b"call_id", b"")) == call_id and s(fields.get(b"type")) == "result":
                found = True
                inline = _inline_result(fields.get(b"result")) or inline
    return cursor, found, inline


def _inline_result(raw: Any) -> Result | None:
    if not raw:
        return None
    try:
        return Result.from_fields(json.loads(raw))
    except ValueError:  # not what this client understands: read the hash instead
        return None


def queue_call(
    pipe: Any,
    keys: Keys,
    traj_id: str,
    call_id: str | None,
    sha: str,
    submit: tuple[list[str], list[Any]],
) -> None:
    """Queue a call's one round trip: events cursor, existing result, submit.

    The submit goes as a bare EVALSHA: a redis-py pipeline holding a Script
    sends SCRIPT EXISTS first, one more round trip per call. The caller loads
    the script and retries on NOSCRIPT (nothing was submitted then).
    """
    pipe.xrevrange(keys.events(traj_id), count=1)
    if call_id is not None:  # a resubmitted call_id may be answered already: that is the result
        pipe.hgetall(keys.result(traj_id, call_id))
    submit_keys, submit_argv = submit
    pipe.evalsha(sha, len(submit_keys), *submit_keys, *submit_argv)


def call_replies(replies: list[Any], call_id: str | None) -> tuple[str, Any, Any]:
    """(events cursor, existing result fields, entry id) from ``queue_call``'s replies."""
    if call_id is None:
        cursor_reply, entry_id = replies
        return last_event_id(cursor_reply), {}, entry_id
    cursor_reply, existing, entry_id = replies
    return last_event_id(cursor_reply), existing, entry_id


def parse_labels(labels: dict[str, str] | list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """``{"k": "v"}`` or ``["k=v", ...]`` -> dict; raises ValueError on a bad pair."""
    if labels is None or isinstance(labels, dict):
        return dict(labels or {})
    out = {}
    for pair in labels:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"label {pair!r} is not key=value")
        out[key] = value
    return out


def select_runs(
    ids: list[Any], records: list[Any], status: str | None, labels: dict[str, str]
) -> tuple[list[TrajectoryRecord], list[str]]:
    """Records matching status and labels, and the ids whose record has expired."""
    found, expired = [], []
    for traj_id, fields in zip(ids, records, strict=True):
        if not fields:
            expired.append(s(traj_id))
            continue
        rec = TrajectoryRecord.from_fields(fields)
        if status and rec.status.value != status:
            continue
        spec_labels = rec.spec.labels if rec.spec else {}
        if all(spec_labels.get(k) == v for k, v in labels.items()):
            found.append(rec)
    return found, expired


def count_by_status(records: list[TrajectoryRecord]) -> dict[str, int]:
    counts = {status.value: 0 for status in TrajStatus}
    for rec in records:
        counts[rec.status.value] += 1
    return counts


def parse_result(fields: dict[Any, Any]) -> Result | None:
    return Result.from_fields(fields) if fields else None
