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
    TrajectorySpec,
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

# KEYS: traj, calls, events   ARGV: result_key_prefix, result_ttl_ms, events_maxlen, now_ms,
#                                   then the entry's field/value pairs
# Appends the call; if the trajectory already ended, answers it at once with a
# `trajectory_ended` result so that no call is ever left without one.
SUBMIT_LUA = """
local final = {completed=1, failed=1, timeout=1, cancelled=1}
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
local st = redis.call('HGET', KEYS[1], 'status')
if st and final[st] then
  local cid = id
  for i = 5, #ARGV, 2 do if ARGV[i] == 'call_id' then cid = ARGV[i + 1] end end
  local rkey = ARGV[1] .. cid
  if redis.call('EXISTS', rkey) == 0 then
    redis.call('HSET', rkey, 'v', '1', 'call_id', cid, 'traj', redis.call('HGET', KEYS[1], 'traj'),
               'ok', '0', 'error_code', 'trajectory_ended',
               'error', 'the trajectory has ended (' .. st .. ')', 'finished_ms', ARGV[4])
    redis.call('PEXPIRE', rkey, ARGV[2])
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'v', '1', 'type', 'result',
               'call_id', cid, 'ok', '0', 'error_code', 'trajectory_ended')
  end
end
return id
"""

RESULT_TTL_MS = 24 * 3600 * 1000
EVENTS_MAXLEN = 10_000


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


def parse_result(fields: dict[Any, Any]) -> Result | None:
    return Result.from_fields(fields) if fields else None


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
