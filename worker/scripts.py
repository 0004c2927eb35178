"""Lua scripts that make the worker's multi-key updates atomic.

Every script touches keys of one trajectory only (one hash tag), so it runs
unchanged on Redis Cluster.
"""

from __future__ import annotations

FINAL_LUA = "local final = {completed=1, failed=1, timeout=1, cancelled=1}\n"

# KEYS: result, events, calls, traj
# ARGV: group, entry_id, result_ttl_ms, events_maxlen, ok, error_code, call_id, now_ms,
#       inline ('' or the result's fields as a JSON object, carried by the event),
#       then the result's field/value pairs.
# Writes the result only if none exists (exactly one final result per call),
# always acknowledges the entry.
FINISH_CALL = """
local written = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 10))
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  local event = {'v', '1', 'type', 'result', 'call_id', ARGV[7], 'ok', ARGV[5],
                 'error_code', ARGV[6]}
  if ARGV[9] ~= '' then
    event[#event + 1] = 'result'
    event[#event + 1] = ARGV[9]
  end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(event))
  if redis.call('EXISTS', KEYS[4]) == 1 then
    redis.call('HINCRBY', KEYS[4], 'calls_total', 1)
    if ARGV[5] == '0' then redis.call('HINCRBY', KEYS[4], 'calls_failed', 1) end
    redis.call('HSET', KEYS[4], 'last_activity_ms', ARGV[8], 'last_call_id', ARGV[7])
  end
  written = 1
end
if ARGV[2] ~= '' then redis.call('XACK', KEYS[3], ARGV[1], ARGV[2]) end
return written
"""

# KEYS: traj, calls
# ARGV: worker, now_ms, spec_json, traj_id, group, previous owner ('' if none: the
#       open request re-queues that worker's trajectory, so it may be displaced)
# Returns 'ok', 'ended' or 'owned:<worker>'. Creates the calls stream's group.
CLAIM_TRAJ = (
    FINAL_LUA
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if st and final[st] then return 'ended' end
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= '' and owner ~= ARGV[1] and owner ~= ARGV[6] then
  return 'owned:' .. owner
end
redis.call('HSETNX', KEYS[1], 'created_ms', ARGV[2])
redis.call('HSETNX', KEYS[1], 'started_ms', ARGV[2])
redis.call('HSET', KEYS[1], 'v', '1', 'traj', ARGV[4], 'status', 'running', 'owner', ARGV[1],
           'spec', ARGV[3], 'last_activity_ms', ARGV[2])
local ok, err = pcall(redis.call, 'XGROUP', 'CREATE', KEYS[2], ARGV[5], '0', 'MKSTREAM')
return 'ok'
"""
)

# KEYS: traj, events, calls
# ARGV: status, now_ms, reason, retention_ms, events_maxlen, worker
# Moves a trajectory to a final state once; later attempts return 0.
END_TRAJ = (
    FINAL_LUA
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if st and final[st] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'ended_ms', ARGV[2], 'reason', ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'v', '1', 'type', 'state',
           'status', ARGV[1])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
return 1
"""
)

# KEYS: traj
# ARGV: worker
# Hands a running trajectory back (graceful shutdown): pending again, no owner.
RELEASE_TRAJ = (
    FINAL_LUA
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if st and final[st] then return 0 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'pending', 'owner', '')
return 1
"""
)
