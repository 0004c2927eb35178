#!/usr/bin/env bash
# Drive one toolq trajectory with nothing but redis-cli: open it, run
# `echo hi` with the bash tool, wait for the result race-free, read it, close.
# PROTOCOL.md quotes the blocks between "# doc:NAME" and "# /doc" verbatim
# (tests/test_protocol.py keeps the two identical).
#
#   TOOLQ_REDIS_URL=redis://127.0.0.1:6379 TOOLQ_NAMESPACE=toolq examples/redis-cli/walkthrough.sh
#
# Environment: TOOLQ_REDIS_URL (default redis://127.0.0.1:6379), TOOLQ_NAMESPACE
# (default toolq), like every toolq command and client; TOOLQ_TRAJ (default walk-<pid>), TOOLQ_WAIT_S (default 60),
# REDIS_CLI (default redis-cli). Prints key=value lines; exits non-zero when a
# step fails or times out.
#
# On Redis Cluster, run redis-cli with -c (REDIS_CLI="redis-cli -c" does not
# work: set REDIS_CLI to a wrapper script that adds it): each command names
# the keys of one trajectory or one global key, so redis-cli follows MOVED to
# the right node.
# doc:setup
set -euo pipefail
REDIS_URL="${TOOLQ_REDIS_URL:-redis://127.0.0.1:6379}"   # the settings every toolq client reads
NS="${TOOLQ_NAMESPACE:-toolq}"
T="${TOOLQ_TRAJ:-walk-$$}"                # the trajectory id
WAIT_S="${TOOLQ_WAIT_S:-60}"              # how long a wait may take
REDIS_CLI="${REDIS_CLI:-redis-cli}"
fail() { echo "walkthrough: $*" >&2; exit 1; }
r() { "$REDIS_CLI" -e -u "$REDIS_URL" "$@"; }   # -e: exit non-zero on an error reply
now_ms() { echo "$(date +%s)000"; }
# /doc

# The scripts of PROTOCOL.md, verbatim (the tests check they match the ones
# the Python client runs).
OPEN_LUA=$(cat <<'LUA'
local final = {['cancelled']=1, ['completed']=1, ['failed']=1, ['timeout']=1}

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
LUA
)
ENQUEUED_LUA=$(cat <<'LUA'
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'enqueued_ms', ARGV[1])
end
return 1
LUA
)
SUBMIT_LUA=$(cat <<'LUA'
local final = {['cancelled']=1, ['completed']=1, ['failed']=1, ['timeout']=1}

local function declared_from(first)
  local set = {}
  for i = first, #KEYS do set[KEYS[i]] = true end
  return set
end

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
LUA
)

# wait_for KEY FIELD: block on the events stream until hash KEY has FIELD.
# doc:wait
wait_for() {
  local key=$1 field=$2 deadline=$((SECONDS + WAIT_S)) cursor
  while [ "$SECONDS" -lt "$deadline" ]; do
    # Newest event id first, then the state: anything written after this
    # read adds an event after $cursor, so XREAD below wakes up for it.
    cursor=$(r XREVRANGE "$NS:{$T}:events" + - COUNT 1 | sed -n 1p)
    [ -n "$(r HGET "$key" "$field")" ] && return 0
    r XREAD COUNT 1 BLOCK 1000 STREAMS "$NS:{$T}:events" "${cursor:-0-0}" >/dev/null
  done
  return 1
}
# /doc

# doc:open
SPEC='{"limits":{"call_timeout_s":30},"labels":{"example":"redis-cli"}}'
now=$(now_ms)
status=$(r EVAL "$OPEN_LUA" 4 "$NS:{$T}" "$NS:{$T}:calls" "$NS:{$T}:events" "$NS:{$T}:bg" \
  "$T" "$now" "$SPEC" 0)
if [ "$status" = new ] || [ "$status" = requeue ]; then   # announce it to the workers
  r ZADD "$NS:runs" NX "$now" "$T" >/dev/null
  r ZADD "$NS:pending" NX "$now" "$T" >/dev/null
  r XADD "$NS:open" '*' v 1 traj "$T" spec "$SPEC" >/dev/null
  r EVAL "$ENQUEUED_LUA" 1 "$NS:{$T}" "$now" >/dev/null
fi
# /doc
case "$status" in new | requeue | pending | running) ;; *) fail "trajectory $T has ended ($status)" ;; esac
echo "traj=$T"
echo "open=$status"

# doc:call
call_id="c-$(now_ms)"   # a call id of our own: safe to submit again
r EVAL "$SUBMIT_LUA" 3 "$NS:{$T}" "$NS:{$T}:calls" "$NS:{$T}:events" \
  "$NS:{$T}:result:" 3600000 64 "$(now_ms)" \
  v 1 type call call_id "$call_id" tool bash args '{"command":"echo hi"}' >/dev/null
# /doc
echo "call_id=$call_id"

# doc:result
wait_for "$NS:{$T}:result:$call_id" ok || fail "no result for $call_id within ${WAIT_S}s"
ok=$(r HGET "$NS:{$T}:result:$call_id" ok)             # "1" or "0"
output=$(r HGET "$NS:{$T}:result:$call_id" output)     # "hi" (the shell drops the newline)
error_code=$(r HGET "$NS:{$T}:result:$call_id" error_code)
# /doc
echo "ok=$ok"
echo "output=$output"
echo "exit_code=$(r HGET "$NS:{$T}:result:$call_id" exit_code)"
[ "$ok" = 1 ] || fail "call failed: ${error_code:-?}: $(r HGET "$NS:{$T}:result:$call_id" error)"

# doc:close
r EVAL "$SUBMIT_LUA" 3 "$NS:{$T}" "$NS:{$T}:calls" "$NS:{$T}:events" \
  "$NS:{$T}:result:" 3600000 64 "$(now_ms)" v 1 type close >/dev/null
wait_for "$NS:{$T}" ended_ms || fail "trajectory did not end within ${WAIT_S}s"
final=$(r HGET "$NS:{$T}" status)                      # completed
# /doc
echo "status=$final"
[ "$final" = completed ] || fail "trajectory ended $final, not completed"
