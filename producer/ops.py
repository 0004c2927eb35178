"""The client's protocol logic, once, free of I/O ("sans-IO").

Each operation is a generator: it yields a list of Redis commands (``Cmd``),
receives their replies (sent back by a driver in one pipelined round trip),
and finally returns its value. ``Client`` drives them with a blocking Redis
client, ``AsyncClient`` with an asyncio one, so both speak exactly the same
protocol. Scripts travel as EVALSHA; a driver loads them when Redis has
forgotten them (NOSCRIPT) and sends the pipeline again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
import uuid
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from toolq.schemas import (
    CLOSED_REASON,
    BgTask,
    CallEntry,
    Keys,
    OpenRequest,
    Policy,
    Result,
    ToolInfo,
    TrajectoryRecord,
    TrajectorySpec,
    check_part,
    check_traj_id,
    lua,
    stream_call_id,
)

from . import tools as tools_mod

T = TypeVar("T")

# What the submit and cancel scripts use for the answers they write (the
# workers' defaults: result_ttl_s, events_maxlen, retention_s).
RESULT_TTL_MS = 3600 * 1000
EVENTS_MAXLEN = 64
RETENTION_MS = 24 * 3600 * 1000
RUNS_PAGE = 500
INBOX_TTL_S = 60  # a worker's inbox holds duplicates only: unread, they may go


@dataclass(frozen=True)
class Cmd:
    """One Redis command, by its redis-py method name."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    script: str | None = None  # the Lua source of an EVALSHA, loaded on NOSCRIPT


Op = Generator[list[Cmd], list[Any], T]


def script(source: str, keys: list[str], args: Iterable[Any]) -> Cmd:
    """EVALSHA of ``source`` (the driver loads it if Redis does not know it)."""
    return Cmd("evalsha", (script_sha(source), len(keys), *keys, *args), script=source)


@functools.cache
def script_sha(source: str) -> str:
    """The SHA1 Redis names a script by (computed once per script: every submit runs one)."""
    return hashlib.sha1(source.encode()).hexdigest()


def one(cmd: Cmd) -> Op[Any]:
    """A single command's reply."""
    return (yield [cmd])[0]


class ToolqError(Exception):
    """Base of the errors toolq clients raise."""


class WaitTimeout(ToolqError, TimeoutError):
    """No result arrived within the wait timeout (the call may still finish later)."""


class TrajectoryEnded(ToolqError):
    """The trajectory has already reached a final state."""


class LimitExceeded(ToolqError):
    """A limit refused the operation: e.g. a child's open, because its parent has
    ended, is at its ``max_depth`` or has ``max_children`` open children. Nothing
    was created. ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"limit_exceeded: {reason}")
        self.reason = reason


class UnknownTrajectory(ToolqError, KeyError):
    """No such trajectory: never opened, or its record expired."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown trajectory"


def now_ms() -> int:
    return int(time.time() * 1000)


def s(value: Any) -> str:
    """Decode a Redis reply value."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def new_call_id() -> str:
    """A client call id (64 random bits, in hex): makes a submission safe to send
    again after a lost reply."""
    return uuid.uuid4().hex[:16]


# ------------------------------------------------------------- lifecycle
def lineage(spec: TrajectorySpec, depth: int, parent_max_depth: int | None) -> dict[str, str]:
    """The record's parent, depth and effective limits (what RESERVE_CHILD reads
    when this trajectory opens children of its own)."""
    max_depth = spec.limits.max_depth
    if parent_max_depth is not None:
        max_depth = min(max_depth, parent_max_depth)
    fields = {"depth": str(depth), "max_depth": str(max_depth)}
    fields["max_children"] = str(spec.limits.max_children)
    if spec.parent is not None:
        fields["parent"] = spec.parent
    return fields


def open_record(
    keys: Keys,
    traj_id: str,
    spec: TrajectorySpec,
    reuse: bool,
    extra: dict[str, str],
    prefer: tuple[str, int] | None = None,
) -> Op[str]:
    """The open script (with ``extra`` fields in a new record), then the open request
    (``prefer``: also in that worker's inbox, see ``children.open_traj``)."""
    # Only the fields the caller set: a trajectory opened from a snapshot keeps the
    # snapshot's spec where the opener's says nothing (a default is not a choice).
    spec_json = spec.model_dump_json(exclude_unset=True, exclude_none=True)
    request = OpenRequest(traj=traj_id)
    if prefer is not None:
        request = OpenRequest(traj=traj_id, prefer=prefer[0], prefer_ms=prefer[1])
    fields = {**request.to_fields(), "spec": spec_json}
    at = now_ms()
    record_keys = [keys.traj(traj_id), keys.calls(traj_id), keys.events(traj_id)]
    record_keys += [keys.bg_index(traj_id), keys.children(traj_id)]
    argv = [traj_id, at, fields["spec"], int(reuse), *(x for kv in extra.items() for x in kv)]
    status = s((yield [script(lua.OPEN, record_keys, argv)])[0])
    if status in ("new", "requeue"):
        inbox = []
        if prefer is not None:  # a duplicate for the preferred worker; expires if unread
            box = keys.worker_inbox(prefer[0])
            inbox = [Cmd("rpush", (box, json.dumps(fields))), Cmd("expire", (box, INBOX_TTL_S))]
        yield [
            Cmd("zadd", (keys.runs, {traj_id: at}), {"nx": True}),
            Cmd("zadd", (keys.pending, {traj_id: at}), {"nx": True}),
            *inbox,
            Cmd("xadd", (keys.open, fields)),
            script(lua.ENQUEUED, [keys.traj(traj_id)], [at]),
        ]
        return "new" if status == "new" else "pending"
    if status not in ("pending", "running"):
        record = yield from get_record(keys, traj_id)
        raise TrajectoryEnded(ended_message(traj_id, status, record))
    return status


def ended_message(traj_id: str, status: str, record: TrajectoryRecord | None) -> str:
    """Why an ended trajectory refuses, and how to start it over (any client)."""
    reason = f": {record.reason}" if record is not None and record.reason else ""
    return (
        f"trajectory {traj_id} has ended ({status}{reason}); to start it over under the "
        f"same id: `toolq open {traj_id} --reuse` (Python: open(..., reuse=True))"
    )


@dataclass(frozen=True)
class Submitted:
    """Where a call's result will be (``call_id``) and its entry (``entry_id``, '' when
    it was answered at once or had a result already)."""

    traj_id: str
    call_id: str
    entry_id: str


@dataclass(frozen=True)
class ToolCall:
    """One tool call to submit. ``args`` is a dict, or JSON text as a model wrote it:
    text that is not a JSON object is submitted as it is, and the worker answers
    it with an ``invalid_args`` result (so the model learns what it did wrong)."""

    tool: str
    args: dict[str, Any] | str | None = None
    call_id: str | None = None
    timeout_s: float | None = None
    idempotent: bool = False

    @property
    def asked_timeout_s(self) -> float | None:
        """The timeout it asks for: its arguments' ``timeout_s`` wins over the
        entry's, as on the worker (None: the trajectory's default)."""
        inner = self.args.get("timeout_s") if isinstance(self.args, dict) else None
        if isinstance(inner, (int, float)) and not isinstance(inner, bool) and inner > 0:
            return float(inner)
        return self.timeout_s


def submit(keys: Keys, traj_id: str, entry: CallEntry | ToolCall) -> Op[Submitted]:
    """Append a call (the submit script); the entry carries a client call id."""
    return (yield from submit_many(keys, traj_id, [entry]))[0]


def submit_many(
    keys: Keys, traj_id: str, entries: Iterable[CallEntry | ToolCall]
) -> Op[list[Submitted]]:
    """Append calls in order, in one round trip (all of a trajectory's keys are in
    one hash slot, so a cluster sends the pipeline to one node, in order)."""
    check_traj_id(traj_id)
    cmds = [_submit_cmd(keys, traj_id, entry_fields(e)) for e in entries]
    replies = yield cmds
    return [Submitted(traj_id, *(s(x) for x in reply)) for reply in replies]


def _submit_cmd(keys: Keys, traj_id: str, fields: dict[str, str]) -> Cmd:
    flat = [x for kv in fields.items() for x in kv]
    argv = [keys.result(traj_id, ""), RESULT_TTL_MS, EVENTS_MAXLEN, now_ms(), *flat]
    declared = _traj_keys(keys, traj_id)
    call_id = stream_call_id(fields, "")
    if call_id:  # the result key, declared: safe while a cluster migrates the slot
        declared.append(keys.result(traj_id, call_id))
    return script(lua.SUBMIT, declared, argv)


def entry_fields(entry: CallEntry | ToolCall) -> dict[str, str]:
    """The stream fields of a call, with a fresh client call id unless it has one.

    Arguments given as text are parsed here; text that is not a JSON object
    travels as it is, for the worker to answer with ``invalid_args``.
    """
    if isinstance(entry, CallEntry):
        fields: dict[str, str] = entry.to_fields()
        if "call_id" in fields:
            check_part(fields["call_id"], "call_id")
        return fields
    args = entry.args
    raw: str | None = None
    if isinstance(args, str):
        parsed = _json_object_or_none(args)
        args, raw = (parsed, None) if parsed is not None else ({}, args)
    call = make_call(entry.tool, args, entry.call_id, entry.timeout_s, entry.idempotent)
    fields = call.to_fields()
    check_part(fields["call_id"], "call_id")
    if raw is not None:
        fields["args"] = raw
    return fields


def policy_entry(
    step: str | None = None,
    allowed_tools: list[str] | None = None,
    blocked_tools: list[str] | None = None,
    call_timeout_s: float | None = None,
) -> CallEntry:
    """A policy entry: the policy holds for the calls submitted after it."""
    policy = Policy(
        step=step,
        allowed_tools=allowed_tools,
        blocked_tools=blocked_tools or [],
        call_timeout_s=call_timeout_s,
    )
    return CallEntry(type="policy", policy=policy, call_id=new_call_id())


def make_call(
    tool: str,
    args: dict[str, Any] | None,
    call_id: str | None,
    timeout_s: float | None,
    idempotent: bool,
) -> CallEntry:
    """A call entry, with a fresh client call id unless one is given."""
    return CallEntry(
        tool=tool,
        args=args or {},
        call_id=call_id or new_call_id(),
        timeout_s=timeout_s,
        idempotent=idempotent,
    )


def _json_object_or_none(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text) if text.strip() else {}
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def close(keys: Keys, traj_id: str) -> Op[str]:
    """Append a close entry; returns its entry id ('' when a close had ended it
    already: a close retried after a lost reply is no error)."""
    done = yield from submit(keys, traj_id, CallEntry(type="close"))
    if not done.entry_id:
        record = yield from get_record(keys, traj_id)
        if record is not None and record.reason == CLOSED_REASON:
            return ""
        yield from _raise_ended(keys, traj_id)
    return done.entry_id


# Rounds of the cancel script that may meet calls submitted after the stream was
# read ('retry'); the last round builds the result keys in the script instead.
CANCEL_ROUNDS = 5


def cancel_each(keys: Keys, traj_ids: list[str]) -> Op[list[str]]:
    """The cancel script for each trajectory, each given the result keys of the
    calls in its stream (read just before); returns the outcomes, in order."""
    outcomes = ["retry"] * len(traj_ids)
    for round_no in range(CANCEL_ROUNDS):
        todo = [i for i, o in enumerate(outcomes) if o == "retry"]
        if not todo:
            break
        declared = round_no < CANCEL_ROUNDS - 1
        streams: list[Any] = [[] for _ in todo]
        if declared:
            streams = yield [Cmd("xrange", (keys.calls(traj_ids[i]),)) for i in todo]
        replies = yield [
            cancel_cmd(keys, traj_ids[i], stream, declared)
            for i, stream in zip(todo, streams, strict=True)
        ]
        for i, reply in zip(todo, replies, strict=True):
            outcomes[i] = s(reply)
    return outcomes


def cancel_cmd(keys: Keys, traj_id: str, stream: Iterable[Any] = (), declared: bool = True) -> Cmd:
    """The cancel script for one trajectory (its reply: see ``lua.CANCEL``), with
    the result keys of ``stream``'s calls (entries as XRANGE returns them)."""
    argv = [keys.result(traj_id, ""), RESULT_TTL_MS, EVENTS_MAXLEN, now_ms(), RETENTION_MS, traj_id]
    argv.append("1" if declared else "0")
    call_ids = {stream_call_id(fields, entry_id) for entry_id, fields in stream}
    results = [keys.result(traj_id, c) for c in sorted(c for c in call_ids if c)]
    return script(lua.CANCEL, [*_traj_keys(keys, traj_id), keys.children(traj_id), *results], argv)


def _raise_ended(keys: Keys, traj_id: str) -> Op[None]:
    record = yield from get_record(keys, traj_id)
    if record is None:
        raise UnknownTrajectory(f"no trajectory {traj_id}")
    raise TrajectoryEnded(ended_message(traj_id, record.status.value, record))


# --------------------------------------------------------------- reading
def get_record(keys: Keys, traj_id: str) -> Op[TrajectoryRecord | None]:
    """The trajectory record, or None if unknown (or expired)."""
    check_traj_id(traj_id)
    fields = yield from one(Cmd("hgetall", (keys.traj(traj_id),)))
    return TrajectoryRecord.from_fields(fields) if fields else None


def runs(
    keys: Keys, status: str | None, labels: dict[str, str], limit: int
) -> Op[list[TrajectoryRecord]]:
    """Trajectories, newest first, by status and labels; forgets expired ones."""
    found: list[TrajectoryRecord] = []
    start = 0
    while len(found) < limit:
        ids = yield from one(Cmd("zrevrange", (keys.runs, start, start + RUNS_PAGE - 1)))
        if not ids:
            break
        records = yield [Cmd("hgetall", (keys.traj(s(t)),)) for t in ids]
        page, expired = select_runs(ids, records, status, labels)
        found += page
        if expired:  # records past their retention: forget them
            yield [Cmd("zrem", (keys.runs, *expired))]
        start += RUNS_PAGE - len(expired)
    return found[:limit]


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


def published_tools(keys: Keys) -> Op[dict[Any, Any]]:
    """The raw ``<ns>:tools`` hash."""
    raw: dict[Any, Any] = yield from one(Cmd("hgetall", (keys.tools,)))
    return raw


def tool_infos(keys: Keys, names: Iterable[str] | None) -> Op[list[ToolInfo]]:
    raw = yield from published_tools(keys)
    return tools_mod.select(tools_mod.parse_tools(raw), names)


def bg_list(keys: Keys, traj_id: str) -> Op[list[BgTask]]:
    """Every background task of a trajectory, oldest first."""
    check_traj_id(traj_id)
    ids = yield from one(Cmd("zrange", (keys.bg_index(traj_id), 0, -1)))
    found = yield [Cmd("hgetall", (keys.bg(traj_id, s(t)),)) for t in ids] if ids else []
    return [BgTask.from_fields(f) for f in found if f]


def bg_get(keys: Keys, traj_id: str, task_id: str) -> Op[BgTask | None]:
    """One background task, or None if unknown."""
    check_traj_id(traj_id)
    check_part(task_id, "task id")
    fields = yield from one(Cmd("hgetall", (keys.bg(traj_id, task_id),)))
    return BgTask.from_fields(fields) if fields else None


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


def result_of(fields: Mapping[Any, Any]) -> Result | None:
    return Result.from_fields(dict(fields)) if fields else None


def _traj_keys(keys: Keys, traj_id: str) -> list[str]:
    """KEYS of the submit and cancel scripts."""
    return [keys.traj(traj_id), keys.calls(traj_id), keys.events(traj_id)]
