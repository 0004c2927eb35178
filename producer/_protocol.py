"""What the clients send and how they read it back, free of any I/O.

Both the sync and the asyncio client build their commands from here, so they
speak exactly the same protocol.
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

# KEYS: traj   ARGV: traj_id, now_ms, spec_json
# Creates the trajectory record once; returns its status ('new' when created).
OPEN_LUA = """
local st = redis.call('HGET', KEYS[1], 'status')
if st then return st end
redis.call('HSET', KEYS[1], 'v', '1', 'traj', ARGV[1], 'status', 'pending',
           'created_ms', ARGV[2], 'spec', ARGV[3], 'calls_total', '0', 'calls_failed', '0')
return 'new'
"""

_FINAL_LUA = "local final = {completed=1, failed=1, timeout=1, cancelled=1}\n"

# Writes a failed result for one call entry unless it has one; used by the
# scripts below. ARGV[1] = result key prefix, ARGV[2] = result TTL (ms),
# ARGV[3] = events maxlen, ARGV[4] = now (ms).
_ANSWER_LUA = """
local function answer(cid, code, message)
  local rkey = ARGV[1] .. cid
  if redis.call('EXISTS', rkey) == 1 then return end
  local traj = redis.call('HGET', KEYS[1], 'traj') or ''
  redis.call('HSET', rkey, 'v', '1', 'call_id', cid, 'traj', traj,
             'ok', '0', 'error_code', code, 'error', message, 'finished_ms', ARGV[4])
  redis.call('PEXPIRE', rkey, ARGV[2])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'v', '1', 'type', 'result',
             'call_id', cid, 'ok', '0', 'error_code', code)
end
local function field(flat, name)
  for i = 1, #flat, 2 do if flat[i] == name then return flat[i + 1] end end
  return nil
end
"""

# KEYS: traj, calls, events   ARGV: result_key_prefix, result_ttl_ms, events_maxlen, now_ms,
#                                   then the entry's field/value pairs
# Appends the entry. A call to a trajectory that already ended is answered at
# once with `trajectory_ended`, and one to a trajectory never opened (or
# expired) with `bad_request`, so that no call is ever left without a result.
SUBMIT_LUA = (
    _FINAL_LUA
    + _ANSWER_LUA
    + """
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
local entry = {unpack(ARGV, 5)}
local kind = field(entry, 'type') or 'call'
if kind ~= 'call' then return id end
local st = redis.call('HGET', KEYS[1], 'status')
if not st then
  answer(field(entry, 'call_id') or id, 'bad_request',
         'the trajectory is not open: open it before submitting calls')
  for i = 2, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
elseif final[st] then
  local reason = redis.call('HGET', KEYS[1], 'reason') or st
  answer(field(entry, 'call_id') or id, 'trajectory_ended',
         'the trajectory has ended (' .. st .. ': ' .. reason .. ')')
elseif st then
  redis.call('HINCRBY', KEYS[1], 'calls_submitted', 1)
end
return id
"""
)

# KEYS: traj, calls, events   ARGV: result_key_prefix, result_ttl_ms, events_maxlen, now_ms,
#                                   retention_ms, traj_id
# Cancels a trajectory no worker owns (pending, or never opened) right here:
# every call in its stream gets a `cancelled` result. An owned one gets a
# cancel entry, which its worker acts on at once. Returns what happened.
CANCEL_LUA = (
    _FINAL_LUA
    + _ANSWER_LUA
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if st and final[st] then return 'ended' end
local owner = redis.call('HGET', KEYS[1], 'owner')
if st == 'running' or (owner and owner ~= '') then
  redis.call('XADD', KEYS[2], '*', 'v', '1', 'type', 'cancel')
  return 'requested'
end
redis.call('HSET', KEYS[1], 'v', '1', 'traj', ARGV[6], 'status', 'cancelled',
           'ended_ms', ARGV[4], 'reason', 'cancelled by client before it started')
redis.call('HSETNX', KEYS[1], 'created_ms', ARGV[4])
for _, e in ipairs(redis.call('XRANGE', KEYS[2], '-', '+')) do
  if (field(e[2], 'type') or 'call') == 'call' then
    answer(field(e[2], 'call_id') or e[1], 'cancelled', 'trajectory cancelled')
  end
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'v', '1', 'type', 'state',
           'status', 'cancelled')
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
return 'cancelled'
"""
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
    """Keys and args of OPEN_LUA, and the open-stream entry to add when new."""
    check_traj_id(traj_id)
    req = OpenRequest(traj=traj_id, spec=spec or TrajectorySpec())
    fields = req.to_fields()
    return [keys.traj(traj_id)], [traj_id, now_ms(), fields["spec"]], fields


def submit_args(keys: Keys, traj_id: str, entry: CallEntry) -> tuple[list[str], list[Any]]:
    """Keys and args of SUBMIT_LUA for one call or control entry."""
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
    """Keys and args of CANCEL_LUA."""
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


def scan_events(reply: Any, call_id: str) -> tuple[str | None, bool]:
    """Walk an XREAD reply: (new cursor, whether ``call_id``'s result event is in it)."""
    cursor = None
    found = False
    for _stream, entries in reply or []:
        for entry_id, fields in entries:
            cursor = s(entry_id)
            if s(fields.get(b"call_id", b"")) == call_id and s(fields.get(b"type")) == "result":
                found = True
    return cursor, found


def scan_result(reply: Any, call_id: str) -> tuple[str | None, bool, Result | None]:
    """Like ``scan_events``, plus the result itself when its event carries it inline.

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


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
