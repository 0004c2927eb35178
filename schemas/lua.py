"""Every Lua script of the protocol, in one place (producers and workers run them).

Each script touches the keys of one trajectory only (one ``{T}`` hash tag), so
it runs unchanged on Redis Cluster. Every key a script touches is declared in
KEYS, result and background-task keys included: while a cluster migrates the
trajectory's slot (a reshard), Redis can then redirect the whole script (ASK,
TRYAGAIN) before it runs, where an undeclared key missing on the old node would
fail it halfway ("Script attempted to access a non local key"). Scripts that
answer the entries of a stream (``CANCEL``, ``END``) or mark the tasks of an
index (``BG_LOST``) take the keys of what the caller read just before; an entry
that arrived since is left for the caller's next run.

Scripts a worker runs for a trajectory it owns are *fenced*: they take the
worker's id and the ownership epoch it got from ``CLAIM`` and write nothing
(returning ``FENCED``) when the record names another owner or epoch. A worker
that was taken for dead (a stall, a partition) and comes back can therefore
not write a result, an event, an end or a background task for a trajectory
another worker serves now.
"""

from __future__ import annotations

from .models import BG_FINAL_STATUSES, FINAL_STATUSES, Limits

#: What a fenced script returns when the caller no longer owns the trajectory.
FENCED = -1


def _lua_set(name: str, values: frozenset[str]) -> str:
    members = ", ".join(f"['{v}']=1" for v in sorted(values))
    return f"local {name} = {{{members}}}\n"


#: Lua tables of the final trajectory and background-task statuses (from the models).
FINAL_LUA = _lua_set("final", FINAL_STATUSES)
BG_FINAL_LUA = _lua_set("bg_final", BG_FINAL_STATUSES)

# owns(): the fence. ARGV[1] = worker id, ARGV[2] = epoch; KEYS[1] = the record.
_FENCE_LUA = """
local function owns()
  local rec = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
  return rec[1] == ARGV[1] and rec[2] == ARGV[2]
end
"""

# declared_from(): the keys declared from KEYS[first] on, as a set.
_DECLARED_LUA = """
local function declared_from(first)
  local set = {}
  for i = first, #KEYS do set[KEYS[i]] = true end
  return set
end
"""

# answer(): a failed result for one call unless it has one, with its event.
# Needs: KEYS[1] record, the result key (declared), result TTL (ms), events key,
# events maxlen, now.
_ANSWER_LUA = (
    _DECLARED_LUA
    + """
local function answer(rkey, cid, code, message, ttl_ms, events, maxlen, now)
  if redis.call('EXISTS', rkey) == 1 then return 0 end
  -- A record's key is <ns>:{T}: a never-opened trajectory's answers name it too.
  local traj = redis.call('HGET', KEYS[1], 'traj') or string.match(KEYS[1], '{([^{}]*)}$') or ''
  local fields = {'v', '1', 'call_id', cid, 'traj', traj, 'ok', '0', 'error_code', code,
                  'error', message, 'finished_ms', now}
  redis.call('HSET', rkey, unpack(fields))
  redis.call('PEXPIRE', rkey, ttl_ms)
  local inline = {}
  for i = 1, #fields, 2 do inline[fields[i]] = fields[i + 1] end
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'v', '1', 'type', 'result',
             'call_id', cid, 'ok', '0', 'error_code', code, 'result', cjson.encode(inline))
  return 1
end
-- A field of an entry (the last one of that name, as the workers parse it).
local function field(flat, name)
  local value = nil
  for i = 1, #flat, 2 do if flat[i] == name then value = flat[i + 1] end end
  return value
end
-- A call's id: its call_id when that is a valid id ([A-Za-z0-9._:-]{1,200}),
-- else its entry id (as the workers answer it).
local function call_id_of(flat, entry_id)
  local cid = field(flat, 'call_id')
  if cid and #cid <= 200 and string.match(cid, '^[%w%.:_%-]+$') then return cid end
  return entry_id
end
-- Only close and cancel are control entries; anything else is a call (and an
-- unknown type gets an error result like any other malformed call).
local function is_call(flat)
  local kind = field(flat, 'type')
  return kind ~= 'close' and kind ~= 'cancel'
end
"""
)

# ---------------------------------------------------------------- producers

# KEYS: traj, calls, events, bg index[, children]
# ARGV: traj_id, now_ms, spec_json, reuse ('1' or '0')[, then field/value pairs of
#       the new record: parent, depth, max_depth, max_children]
# Creates the trajectory record once. Returns 'new' (created: enqueue its open
# request), 'requeue' (created earlier but its open request may never have
# been enqueued: a producer died in between; enqueue it again), or its status.
# With reuse = '1' an ended trajectory starts over under the same id (every key
# given is deleted: the children key is optional, so older callers pass four).
OPEN = (
    FINAL_LUA
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if st and final[st] and ARGV[4] == '1' then
  redis.call('DEL', unpack(KEYS))
  st = false
end
if st then
  if st == 'pending' and not redis.call('HGET', KEYS[1], 'enqueued_ms') then
    return 'requeue'
  end
  return st
end
redis.call('HSET', KEYS[1], 'v', '1', 'traj', ARGV[1], 'status', 'pending',
           'created_ms', ARGV[2], 'spec', ARGV[3], 'calls_total', '0', 'calls_failed', '0')
if #ARGV > 4 then redis.call('HSET', KEYS[1], unpack(ARGV, 5)) end
return 'new'
"""
)

_LIMITS = Limits()
# KEYS: parent's record, parent's children   ARGV: child id, now_ms
# Reserves a place for a child in its parent's slot, atomically with the checks
# (a cluster puts the child elsewhere, so its own record cannot be written here).
# Returns {'ok', child depth, parent's effective max_depth} or {'refused', reason}:
# the parent does not exist, has ended or is being cancelled, the child would
# nest deeper than the parent's max_depth, or the parent has max_children open
# children. A child reserved already is ok again (an open retried after a lost
# reply is not counted twice). A parent opened without the limit fields (another
# client) has them read from its spec, else the defaults.
RESERVE_CHILD = (
    FINAL_LUA
    + f"local defaults = {{max_depth = {_LIMITS.max_depth}, "
    + f"max_children = {_LIMITS.max_children}}}\n"
    + """
local function limit(name)
  local v = tonumber(redis.call('HGET', KEYS[1], name) or '')
  if v then return v end
  local ok, spec = pcall(cjson.decode, redis.call('HGET', KEYS[1], 'spec') or '')
  if ok and type(spec) == 'table' and type(spec.limits) == 'table' then
    v = tonumber(spec.limits[name])
  end
  return v or defaults[name]
end
local st, parent, cancelling, depth = unpack(redis.call('HMGET', KEYS[1], 'status', 'traj',
                                                        'cancel_requested_ms', 'depth'))
if not st then return {'refused', 'the parent does not exist (never opened, or expired)'} end
if final[st] then return {'refused', 'parent ' .. parent .. ' has ended (' .. st .. ')'} end
if cancelling then return {'refused', 'parent ' .. parent .. ' is being cancelled'} end
depth = (tonumber(depth) or 0) + 1
local max_depth = limit('max_depth')
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return {'ok', depth, max_depth} end
if depth > max_depth then
  return {'refused', 'depth ' .. depth .. ' would pass the max_depth (' .. max_depth ..
          ') of parent ' .. parent}
end
local max_children = limit('max_children')
local open = redis.call('HLEN', KEYS[2])
if open >= max_children then
  return {'refused', 'parent ' .. parent .. ' has ' .. open .. ' open children (max_children ' ..
          max_children .. ')'}
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {'ok', depth, max_depth}
"""
)

# KEYS: traj   ARGV: now_ms
# The open request is on <ns>:open: a later open need not enqueue it again.
ENQUEUED = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'enqueued_ms', ARGV[1])
end
return 1
"""

# KEYS: traj, calls, events[, result key]
# ARGV: result_key_prefix, result_ttl_ms, events_maxlen, now_ms, then the entry's
#       field/value pairs
# Returns {call_id, entry_id}: where the call's result will be, and the entry
# added to the calls stream ('' when none was kept). A call whose `call_id`
# already has a result is not added again. A call to a trajectory that ended
# is answered at once with `trajectory_ended`, one to a trajectory never
# opened (or expired) with `bad_request`: no call is ever left without a
# result. A close or cancel entry for such a trajectory is not added (both ids '').
# The result key (<prefix><call_id>) is declared as KEYS[4] for a call with a
# `call_id` (cluster-safe while its slot migrates); a call without one is named
# by its entry id, which nobody knows before the script runs: that key is built
# from the prefix (give every call a `call_id` on a cluster).
SUBMIT = (
    FINAL_LUA
    + _ANSWER_LUA
    + """
local entry = {unpack(ARGV, 5)}
local cid = call_id_of(entry, false)
local st = redis.call('HGET', KEYS[1], 'status')
if not is_call(entry) then
  if not st or final[st] then return {'', ''} end
  return {'', redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))}
end
local rkey = cid and ARGV[1] .. cid
if rkey and KEYS[4] and KEYS[4] ~= rkey then
  return redis.error_reply('KEYS[4] is not the result key of the call_id')
end
if rkey and redis.call('EXISTS', rkey) == 1 then return {cid, ''} end
if st and not final[st] then
  local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
  redis.call('HINCRBY', KEYS[1], 'calls_submitted', 1)
  return {cid or id, id}
end
if not cid then  -- the entry id names the call: take one, keep nothing
  cid = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
  redis.call('XDEL', KEYS[2], cid)
  if redis.call('XLEN', KEYS[2]) == 0 then redis.call('DEL', KEYS[2]) end
  rkey = ARGV[1] .. cid
end
if not st then
  answer(rkey, cid, 'bad_request', 'the trajectory is not open: open it before submitting calls',
         ARGV[2], KEYS[3], ARGV[3], ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
else
  local reason = redis.call('HGET', KEYS[1], 'reason') or st
  answer(rkey, cid, 'trajectory_ended',
         'the trajectory has ended (' .. st .. ': ' .. reason .. ')',
         ARGV[2], KEYS[3], ARGV[3], ARGV[4])
end
return {cid, ''}
"""
)

# KEYS: traj, calls, events[, children[, result keys]]
# ARGV: result_key_prefix, result_ttl_ms, events_maxlen, now_ms, retention_ms, traj_id[,
#       declared ('1': KEYS[5..] are the result keys of the calls in the stream)]
# Cancels a trajectory no worker owns (pending) right here: every call in its
# stream gets a `cancelled` result. An owned one gets a cancel entry, which its
# worker acts on as soon as it reads it, and `cancel_requested_ms` in its record,
# which the worker looks at while the entry waits behind a full read-ahead.
# Returns 'requested', 'cancelled', 'ended' (it had ended already), 'unknown'
# (never opened, or expired) or, when declared, 'retry': a call in the stream
# has no declared result key (it arrived after the caller read the stream;
# nothing was changed: read again and run it again). Without `declared` the
# result keys are built from the prefix (older callers; not cluster-safe while
# the slot migrates). Its children are the caller's to cancel (they live in
# other slots on a cluster); `cancel_requested_ms` makes RESERVE_CHILD refuse
# new ones meanwhile.
CANCEL = (
    FINAL_LUA
    + _ANSWER_LUA
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'unknown' end
if final[st] then return 'ended' end
local owner = redis.call('HGET', KEYS[1], 'owner')
if st == 'running' or (owner and owner ~= '') then
  redis.call('XADD', KEYS[2], '*', 'v', '1', 'type', 'cancel')
  redis.call('HSET', KEYS[1], 'cancel_requested_ms', ARGV[4])
  return 'requested'
end
local entries = redis.call('XRANGE', KEYS[2], '-', '+')
local declared = ARGV[7] == '1' and declared_from(5)
if declared then
  for _, e in ipairs(entries) do
    if is_call(e[2]) and not declared[ARGV[1] .. call_id_of(e[2], e[1])] then
      return 'retry'
    end
  end
end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'ended_ms', ARGV[4],
           'reason', 'cancelled by client before it started')
for _, e in ipairs(entries) do
  if is_call(e[2]) then
    local cid = call_id_of(e[2], e[1])
    if answer(ARGV[1] .. cid, cid, 'cancelled', 'trajectory cancelled',
              ARGV[2], KEYS[3], ARGV[3], ARGV[4]) == 1 then
      redis.call('HINCRBY', KEYS[1], 'calls_total', 1)
      redis.call('HINCRBY', KEYS[1], 'calls_failed', 1)
    end
  end
end
redis.call('DEL', KEYS[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'v', '1', 'type', 'state',
           'status', 'cancelled')
for _, i in ipairs({1, 3, 4}) do
  if KEYS[i] then redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
end
return 'cancelled'
"""
)

# ------------------------------------------------------------------ workers

# The heartbeats (`<ns>:workers`, worker -> unix ms by Redis's clock). A worker
# declared dead has minus the time of that declaration as its score until the
# others have re-queued its trajectories: its own next heartbeat then tells it
# so, and it drops everything it held before acting again.

# KEYS: workers   ARGV: worker, heartbeat_ms, force ('1': a worker (re)starting)
# Returns 1 (beaten) or 0: the fleet declared this worker dead (not beaten).
BEAT = """
local s = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if s and s < 0 and ARGV[3] ~= '1' then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
"""

# KEYS: workers   ARGV: worker, dead_after_ms
# Declares a worker dead when its heartbeat is older than dead_after_ms by
# Redis's clock, atomically (a worker that beat since is left alone). Returns
# when it was declared dead (now, or earlier by another worker), or 0: alive.
DECLARE_DEAD = """
local s = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if not s then return 0 end
if s < 0 then return -s end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if now - s < tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], -now, ARGV[1])
return now
"""

# KEYS: workers   ARGV: worker
# Forgets a worker declared dead once its trajectories are re-queued (not one
# that beat again since). Returns 1 when it did.
FORGET_DEAD = """
local s = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if s and s < 0 then redis.call('ZREM', KEYS[1], ARGV[1]) return 1 end
return 0
"""

# KEYS: traj, calls
# ARGV: worker, now_ms, spec_json, traj_id, group, previous owner ('' if none: the
#       open request re-queues that worker's trajectory, so it may be displaced),
#       previous epoch ('' if none: then only that ownership may be displaced)
# Takes ownership and starts a new ownership epoch. Returns {'ok', epoch, now_ms
# by Redis's clock, the policy in force (JSON, '' for the spec's own)}, {'ended',
# status} or {'owned', owner}. Creates the calls stream's group.
CLAIM = (
    FINAL_LUA
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if st and final[st] then return {'ended', st} end
local owner, held = unpack(redis.call('HMGET', KEYS[1], 'owner', 'epoch'))
local displaced = owner == ARGV[6] and (ARGV[7] == nil or ARGV[7] == '' or held == ARGV[7])
if owner and owner ~= '' and owner ~= ARGV[1] and not displaced then
  return {'owned', owner}
end
redis.call('HSETNX', KEYS[1], 'created_ms', ARGV[2])
redis.call('HSETNX', KEYS[1], 'started_ms', ARGV[2])
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local t = redis.call('TIME')
local claimed_ms = tostring(t[1] * 1000 + math.floor(t[2] / 1000))
redis.call('HSET', KEYS[1], 'v', '1', 'traj', ARGV[4], 'status', 'running', 'owner', ARGV[1],
           'spec', ARGV[3], 'last_activity_ms', ARGV[2], 'claimed_ms', claimed_ms)
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[2], ARGV[5], '0', 'MKSTREAM')
return {'ok', tostring(epoch), claimed_ms, redis.call('HGET', KEYS[1], 'policy') or ''}
"""
)

# KEYS: traj, result, events, calls[, staged output]
# ARGV: worker, epoch, group, entry_id, result_ttl_ms, events_maxlen, ok, error_code,
#       call_id, now_ms, infra ('1': counted in calls_infra), the result as one JSON
#       object of strings for its event ('': the event carries none; the client reads
#       the hash), then the result hash's fields as name/value pairs
# Fenced. Writes the result only if none exists (exactly one final result per
# call), then acknowledges and deletes the entry: an answered call leaves the
# stream. A large output is not an argument: every byte given to a script costs
# Redis about 1.3 ms a MiB (bench/notes.md), so the writer stores it in the staged
# output key (a hash holding `output`, with a TTL) in the same pipeline, just
# before; the script renames that key to the result (no copy) or deletes it.
# Returns 1 (written), 0 (it had a result already) or FENCED, or an error when the
# staged output is missing (nothing written: the writer writes an error result).
FINISH = (
    _FENCE_LUA
    + """
local staged = KEYS[5]
if not owns() then
  if staged then redis.call('DEL', staged) end
  return -1
end
local written = 0
if redis.call('EXISTS', KEYS[2]) == 0 then
  if staged then
    if redis.call('EXISTS', staged) == 0 then
      return redis.error_reply('the staged output of ' .. ARGV[9] .. ' is missing')
    end
    redis.call('RENAME', staged, KEYS[2])
  end
  redis.call('HSET', KEYS[2], unpack(ARGV, 13))
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  local event = {'v', '1', 'type', 'result', 'call_id', ARGV[9], 'ok', ARGV[7],
                 'error_code', ARGV[8]}
  if ARGV[12] ~= '' then
    event[#event + 1] = 'result'
    event[#event + 1] = ARGV[12]
  end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', unpack(event))
  redis.call('HINCRBY', KEYS[1], 'calls_total', 1)
  if ARGV[7] == '0' then redis.call('HINCRBY', KEYS[1], 'calls_failed', 1) end
  if ARGV[11] == '1' then redis.call('HINCRBY', KEYS[1], 'calls_infra', 1) end
  redis.call('HSET', KEYS[1], 'last_activity_ms', ARGV[10], 'last_call_id', ARGV[9])
  written = 1
elseif staged then
  redis.call('DEL', staged)
end
if ARGV[4] ~= '' then
  redis.call('XACK', KEYS[4], ARGV[3], ARGV[4])
  redis.call('XDEL', KEYS[4], ARGV[4])
end
return written
"""
)

# KEYS: a fork's snapshot-writing marker, the snapshot's files (one slot: {name})
# Written after the fork was answered, the files stay only while the marker does:
# without it the snapshot was deleted meanwhile, or the marker lapsed and copies
# that waited for it elsewhere failed. Returns 1 (kept) or 0 (the files deleted).
SNAPSHOT_KEPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
redis.call('DEL', KEYS[2])
return 0
"""

# KEYS: traj, calls   ARGV: worker, epoch, group, entry_id
# Fenced. Acknowledges and deletes one entry that needs no result (a control entry).
ACK = (
    _FENCE_LUA
    + """
if not owns() then return -1 end
redis.call('XACK', KEYS[2], ARGV[3], ARGV[4])
redis.call('XDEL', KEYS[2], ARGV[4])
return 1
"""
)

# KEYS: traj, events, calls, children, then the result keys of the stream's
#       first `batch` calls (as the caller read them just before)
# ARGV: worker, epoch ('' : only a trajectory nobody owns, i.e. whose open request
#       was invalid), status, now_ms, reason, retention_ms, events_maxlen,
#       result_key_prefix, result_ttl_ms, batch (entries answered per run),
#       events kept after the end[, error code of those answers]
# Fenced. Moves the trajectory to a final state once, then answers the calls
# still in its stream with `trajectory_ended` (or the code given: a failed start's
# snapshot_not_found), at most `batch` per run and only those whose result key is
# declared (it stops at the first other one), counts them in calls_total, and
# deletes the stream once empty. Returns how many entries are left (read the
# stream and call it again until 0), or FENCED.
END = (
    FINAL_LUA
    + _FENCE_LUA
    + _ANSWER_LUA
    + """
if ARGV[2] == '' then
  local owner = redis.call('HGET', KEYS[1], 'owner')
  if owner and owner ~= '' then return -1 end
elseif not owns() then
  return -1
end
local st = redis.call('HGET', KEYS[1], 'status')
if not (st and final[st]) then
  st = ARGV[3]
  redis.call('HSET', KEYS[1], 'status', st, 'ended_ms', ARGV[4], 'reason', ARGV[5])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'v', '1', 'type', 'state',
             'status', st)
  for _, i in ipairs({1, 2, 4}) do
    if KEYS[i] then redis.call('PEXPIRE', KEYS[i], ARGV[6]) end
  end
end
local reason = redis.call('HGET', KEYS[1], 'reason') or st
local message = 'the trajectory has ended (' .. st .. ': ' .. reason .. ')'
local code = ARGV[12]
if not code or code == '' then code = 'trajectory_ended' end
local entries = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', ARGV[10])
local declared = declared_from(5)
for _, e in ipairs(entries) do
  if is_call(e[2]) then
    local cid = call_id_of(e[2], e[1])
    if not declared[ARGV[8] .. cid] then break end
    if answer(ARGV[8] .. cid, cid, code, message, ARGV[9], KEYS[2], ARGV[7], ARGV[4]) == 1 then
      redis.call('HINCRBY', KEYS[1], 'calls_total', 1)  -- submitted while open: answered now
      redis.call('HINCRBY', KEYS[1], 'calls_failed', 1)
    end
  end
  redis.call('XDEL', KEYS[3], e[1])
end
local left = redis.call('XLEN', KEYS[3])
if left == 0 then
  redis.call('DEL', KEYS[3])
  -- Nobody waits on an ended trajectory's old events: keep the last few. The
  -- stream is written anew, because trimming inside a stream node frees no memory.
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[11])
  local ttl = redis.call('PTTL', KEYS[2])
  redis.call('DEL', KEYS[2])
  for i = #last, 1, -1 do
    redis.call('XADD', KEYS[2], last[i][1], unpack(last[i][2]))
  end
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
return left
"""
)

# KEYS: traj   ARGV: worker, epoch, now_ms
# Fenced. Hands a running trajectory back (shutdown, or a dead worker's
# trajectory re-queued by a survivor): pending again, no owner.
RELEASE = (
    FINAL_LUA
    + _FENCE_LUA
    + """
if not owns() then return -1 end
local st = redis.call('HGET', KEYS[1], 'status')
if st and final[st] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'pending', 'owner', '', 'last_activity_ms', ARGV[3])
return 1
"""
)

# KEYS: traj   ARGV: worker, epoch, then field/value pairs (slot, host, ...)
# Fenced. Records where the trajectory runs.
SET_FIELDS = (
    _FENCE_LUA
    + """
if not owns() then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
return 1
"""
)

# KEYS: traj, bg hash, bg index, events
# ARGV: worker, epoch, retention_ms, events_maxlen, task_id, started_ms, status,
#       then field/value pairs
# Fenced. Writes a background task unless its recorded status is final already;
# on a final status also appends a bg event. Returns 'new', 'ok', 'final' (ignored)
# or FENCED.
BG_WRITE = (
    BG_FINAL_LUA
    + _FENCE_LUA
    + """
if not owns() then return -1 end
local st = redis.call('HGET', KEYS[2], 'status')
if st and bg_final[st] then return 'final' end
redis.call('HSET', KEYS[2], unpack(ARGV, 8))
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], 'NX', ARGV[6], ARGV[5])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
if bg_final[ARGV[7]] then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'v', '1', 'type', 'bg',
             'task_id', ARGV[5], 'status', ARGV[7])
end
if st then return 'ok' end
return 'new'
"""
)

# KEYS: traj, bg index, events, then the task hashes (<ns>:{T}:bg:<task_id>) to look at
# ARGV: worker, epoch, events_maxlen, now_ms, bg key prefix (<ns>:{T}:bg:)
# Fenced. Marks every indexed task still `running` as `lost` (its agent is gone:
# nobody can report on it), with an event each: those whose hash is declared
# (the caller passes the index it read and the tasks it wrote itself). Returns
# how many it marked, or FENCED.
BG_LOST = (
    _FENCE_LUA
    + _DECLARED_LUA
    + """
if not owns() then return -1 end
local marked = 0
local declared = declared_from(4)
for _, task in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local key = ARGV[5] .. task
  if declared[key] and redis.call('HGET', key, 'status') == 'running' then
    redis.call('HSET', key, 'status', 'lost', 'ended_ms', ARGV[4])
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'v', '1', 'type', 'bg',
               'task_id', task, 'status', 'lost')
    marked = marked + 1
  end
end
return marked
"""
)
