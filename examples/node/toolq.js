'use strict';
/**
 * A small toolq client for Node.js: open a trajectory, call tools, wait for
 * results race-free, read background tasks, close. It speaks PROTOCOL.md with
 * plain Redis commands (node-redis `sendCommand`), and decodes the flat string
 * fields with the JSON Schema files in schemas/json/.
 *
 *   const { ToolqClient } = require('./toolq');
 *   const tq = await ToolqClient.connect({ url: 'redis://127.0.0.1:6379' });
 *   await tq.open('t1');
 *   const r = await tq.call('t1', 'bash', { command: 'echo hi' });
 *   await tq.close('t1');
 *   await tq.quit();
 *
 * On Redis Cluster: every command it sends names the keys of one trajectory
 * (or one global key), and each wait reads one trajectory's events stream, so
 * nothing spans hash slots; connect node-redis with `createCluster` instead of
 * `createClient` (its `sendCommand` then needs the key to route by).
 */

const crypto = require('node:crypto');
const path = require('node:path');
const { createClient } = require('redis');

const PROTOCOL_VERSION = '1';
const TRAJ_ID_RE = /^[A-Za-z0-9._:-]{1,128}$/;
const CALL_ID_RE = /^[A-Za-z0-9._:-]{1,200}$/;
const RESULT_TTL_MS = 3600 * 1000; // the workers' defaults: result_ttl_s,
const EVENTS_MAXLEN = 64; //           events_maxlen,
const RETENTION_MS = 24 * 3600 * 1000; // retention_s
const FINAL_STATUSES = new Set(['completed', 'failed', 'timeout', 'cancelled']);
const BG_FINAL = new Set(['completed', 'failed', 'stopped', 'lost']);
const SCHEMA_DIR = path.join(__dirname, '..', '..', 'schemas', 'json');

// The scripts of PROTOCOL.md, verbatim (tests/test_protocol.py checks they
// match toolq.schemas.lua; `python -m toolq.schemas.export` rewrites them).
// KEYS: traj   ARGV: traj_id, now_ms, spec_json
const OPEN_LUA = `
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
`;

// KEYS: traj, calls, events   ARGV: result_key_prefix, result_ttl_ms, events_maxlen, now_ms,
//                                   then the entry's field/value pairs
const ENQUEUED_LUA = `
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'enqueued_ms', ARGV[1])
end
return 1
`;

const SUBMIT_LUA = `
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
`;

// KEYS: traj, calls, events   ARGV: result_key_prefix, result_ttl_ms, events_maxlen, now_ms,
//                                   retention_ms, traj_id
const CANCEL_LUA = `
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
`;

// KEYS: parent's record, parent's children   ARGV: child id, now_ms. Before
// opening a child (a spec with a parent): see "Child trajectories" in PROTOCOL.md.
const RESERVE_CHILD_LUA = `
local final = {['cancelled']=1, ['completed']=1, ['failed']=1, ['timeout']=1}
local defaults = {max_depth = 3, max_children = 16}

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
`;

class ToolqError extends Error {}

/** No result within the wait; the call may still finish later. */
class WaitTimeout extends ToolqError {}

/** Key names, exactly as schemas/keys.py builds them. */
class Keys {
  constructor(ns = 'toolq') {
    this.ns = ns;
    this.open = `${ns}:open`;
  }
  traj(t) { return `${this.ns}:{${t}}`; }
  calls(t) { return `${this.ns}:{${t}}:calls`; }
  events(t) { return `${this.ns}:{${t}}:events`; }
  result(t, callId) { return `${this.ns}:{${t}}:result:${callId}`; }
  bg(t, taskId) { return `${this.ns}:{${t}}:bg:${taskId}`; }
  bgIndex(t) { return `${this.ns}:{${t}}:bg`; }
  get runs() { return `${this.ns}:runs`; }
  get pending() { return `${this.ns}:pending`; }
  get tools() { return `${this.ns}:tools`; }
}

// ------------------------------------------------------------ encoding -----

/** Flat string fields of a message: booleans "1"/"0", objects as JSON text. */
function encode(message) {
  const flat = [];
  for (const [key, value] of Object.entries(message)) {
    if (value === undefined || value === null) continue; // absent = default
    let text;
    if (typeof value === 'boolean') text = value ? '1' : '0';
    else if (typeof value === 'object') text = JSON.stringify(value);
    else text = String(value);
    flat.push(key, text);
  }
  return flat;
}

const schemaCache = new Map();

/** A schema of schemas/json/, loaded once. */
function schema(name) {
  if (!schemaCache.has(name)) {
    schemaCache.set(name, require(path.join(SCHEMA_DIR, `${name}.json`)));
  }
  return schemaCache.get(name);
}

/** The JSON types a property may take (null left out), following $refs. */
function propertyTypes(doc, prop) {
  const types = new Set();
  for (let option of prop.anyOf || [prop]) {
    if (option.$ref) option = doc.$defs[option.$ref.split('/').pop()];
    if (option.type && option.type !== 'null') types.add(option.type);
  }
  return types;
}

/**
 * Decode flat fields (HGETALL or a stream entry) into typed values with the
 * message's JSON Schema. Absent fields get the schema's default; unknown
 * fields (from a newer protocol) are kept as strings and otherwise ignored.
 */
function decode(name, flat) {
  const doc = schema(name);
  const out = {};
  for (const [key, prop] of Object.entries(doc.properties)) {
    if (prop.default !== undefined) out[key] = prop.default;
  }
  for (const [key, text] of Object.entries(flat)) {
    const prop = doc.properties[key];
    out[key] = prop ? decodeValue(propertyTypes(doc, prop), text) : text;
  }
  return out;
}

function decodeValue(types, text) {
  if (types.has('boolean')) return text === '1' || text === 'true';
  if (types.has('integer') || types.has('number')) return text === '' ? null : Number(text);
  if (types.has('object')) return text === '' ? null : JSON.parse(text);
  return text;
}

/** [f1, v1, f2, v2] -> {f1: v1, f2: v2} */
function pairs(flat) {
  const out = {};
  for (let i = 0; i + 1 < (flat || []).length; i += 2) out[String(flat[i])] = String(flat[i + 1]);
  return out;
}

function checkTraj(traj) {
  if (typeof traj !== 'string' || !TRAJ_ID_RE.test(traj)) {
    throw new ToolqError(`invalid trajectory id ${JSON.stringify(traj)}: must match ${TRAJ_ID_RE}`);
  }
  return traj;
}

// -------------------------------------------------------------- client -----

class ToolqClient {
  /**
   * Connect; `url` defaults to $TOOLQ_REDIS_URL, `namespace` to $TOOLQ_NAMESPACE
   * or "toolq", like every other toolq client and command.
   */
  static async connect({ url, namespace } = {}) {
    const redisUrl = url || process.env.TOOLQ_REDIS_URL || 'redis://127.0.0.1:6379';
    const redis = createClient({ url: redisUrl });
    redis.on('error', (err) => console.error('redis:', err.message));
    await redis.connect();
    return new ToolqClient(redis, namespace || process.env.TOOLQ_NAMESPACE || 'toolq');
  }

  constructor(redis, namespace) {
    this.redis = redis;
    this.keys = new Keys(namespace);
    this.idle = []; // connections for blocking XREADs, which would stall `redis`
  }

  async quit() {
    for (const conn of [this.redis, ...this.idle]) await conn.quit();
    this.idle = [];
  }

  async newBlockingConnection() {
    const conn = this.redis.duplicate();
    conn.on('error', (err) => console.error('redis:', err.message));
    return conn.connect();
  }

  send(args) {
    return this.redis.sendCommand(args.map(String));
  }

  /**
   * Request a trajectory; returns "new", or its status if it exists already.
   * An open request a crashed producer never enqueued ("requeue") is enqueued
   * again. With `reuse`, an ended trajectory starts over under the same id.
   */
  async open(traj, spec = {}, { reuse = false } = {}) {
    checkTraj(traj);
    const k = this.keys;
    const now = Date.now();
    const specJson = JSON.stringify(spec);
    const status = await this.send([
      'EVAL', OPEN_LUA, 4, k.traj(traj), k.calls(traj), k.events(traj), k.bgIndex(traj),
      traj, now, specJson, reuse ? 1 : 0,
    ]);
    if (status === 'new' || status === 'requeue') {
      await Promise.all([
        this.send(['ZADD', k.runs, 'NX', now, traj]),
        this.send(['ZADD', k.pending, 'NX', now, traj]),
        this.send(['XADD', k.open, '*', ...encode({ v: 1, traj, spec })]),
      ]);
      await this.send(['EVAL', ENQUEUED_LUA, 1, k.traj(traj), now]);
      return status === 'new' ? 'new' : 'pending';
    }
    if (FINAL_STATUSES.has(status)) throw new ToolqError(`trajectory ${traj} has ended (${status})`);
    return status;
  }

  /** Append an entry with SUBMIT_LUA; returns [call id, entry id] ('' when none was kept). */
  appendEntry(traj, entry) {
    checkTraj(traj);
    if (entry.call_id !== undefined && !CALL_ID_RE.test(entry.call_id)) {
      throw new ToolqError(`invalid call_id ${JSON.stringify(entry.call_id)}`);
    }
    const k = this.keys;
    // The result key is declared (KEYS[4]) when the entry names its call: the
    // script then runs on a cluster slot being migrated, too.
    const keys = [k.traj(traj), k.calls(traj), k.events(traj)];
    if (entry.call_id !== undefined && entry.type !== 'close' && entry.type !== 'cancel') {
      keys.push(k.result(traj, entry.call_id));
    }
    return this.send([
      'EVAL', SUBMIT_LUA, keys.length, ...keys,
      k.result(traj, ''), RESULT_TTL_MS, EVENTS_MAXLEN, Date.now(),
      ...encode({ v: PROTOCOL_VERSION, ...entry }),
    ]);
  }

  /**
   * Submit a tool call; returns its call id. A fresh call id is made unless
   * given, so that sending it again (after a lost reply) never runs it twice.
   */
  async submit(traj, tool, args = {}, { callId, timeoutS, idempotent } = {}) {
    const id = callId || crypto.randomUUID().replaceAll('-', '');
    const entry = { type: 'call', tool, args, call_id: id, timeout_s: timeoutS, idempotent };
    const [resultId] = await this.appendEntry(traj, entry);
    return resultId;
  }

  /** Submit a call and wait for its result. */
  async call(traj, tool, args = {}, opts = {}) {
    // Read the events cursor *before* submitting: the result's event comes after it.
    const cursor = this.lastEventId(traj);
    const callId = await this.submit(traj, tool, args, opts);
    const waitMs = opts.waitMs ?? ((opts.timeoutS ?? 60) + 60) * 1000;
    return this.waitResult(traj, callId, await cursor, waitMs);
  }

  /** Wait up to `waitMs` for the result of a call submitted earlier. */
  async result(traj, callId, { waitMs = 60000 } = {}) {
    // Cursor first, then the hash: a result written after the cursor was read
    // has its event after the cursor, so XREAD from it cannot miss it.
    return this.waitResult(traj, callId, await this.lastEventId(traj), waitMs);
  }

  async waitResult(traj, callId, cursor, waitMs) {
    const found = await this.waitFor(traj, cursor, waitMs,
      (e) => e.type === 'result' && e.call_id === callId,
      () => this.readHash(this.keys.result(traj, callId), 'result'));
    if (!found) throw new WaitTimeout(`no result for call ${callId} of ${traj} yet`);
    return found;
  }

  /**
   * The race-free wait of PROTOCOL.md: look at the state; if not there yet,
   * block on the events stream from `cursor` until a matching event (or the
   * deadline), then look again. Returns what `look` returns, or null.
   */
  async waitFor(traj, cursor, waitMs, matches, look) {
    const deadline = Date.now() + waitMs;
    let found = await look();
    while (!found) {
      const left = deadline - Date.now();
      if (left <= 0) return null;
      const { next, hit } = await this.readEvents(traj, cursor, left, matches);
      cursor = next || cursor;
      if (hit || !next) found = await look(); // event seen, or timed out: look again
    }
    return found;
  }

  /** One XREAD BLOCK on the events stream; returns the new cursor and whether an event matched. */
  async readEvents(traj, cursor, blockMs, matches) {
    const conn = this.idle.pop() || (await this.newBlockingConnection());
    let reply;
    try {
      reply = await conn.sendCommand([
        'XREAD', 'COUNT', '100', 'BLOCK', String(Math.max(1, Math.round(blockMs))),
        'STREAMS', this.keys.events(traj), cursor,
      ]);
    } finally {
      this.idle.push(conn);
    }
    let next = null;
    let hit = false;
    for (const [, entries] of reply || []) {
      for (const [id, fields] of entries) {
        next = id;
        hit = hit || matches(decode('event', pairs(fields)));
      }
    }
    return { next, hit };
  }

  /** The id of the newest event ("0-0" if none): the cursor to wait after. */
  async lastEventId(traj) {
    const reply = await this.send(['XREVRANGE', this.keys.events(traj), '+', '-', 'COUNT', 1]);
    return reply && reply.length ? reply[0][0] : '0-0';
  }

  async readHash(key, schemaName) {
    const flat = pairs(await this.send(['HGETALL', key]));
    return Object.keys(flat).length ? decode(schemaName, flat) : null;
  }

  /** Close after the calls already submitted (FIFO); returns the entry id. */
  async close(traj) {
    const [, entryId] = await this.appendEntry(traj, { type: 'close' });
    if (!entryId) throw new ToolqError(`trajectory ${traj} is not open`);
    return entryId;
  }

  /**
   * Cancel now: what runs is killed, what waits is answered `cancelled`.
   * Returns "requested" (its worker acts on a cancel entry), "cancelled" (no
   * worker owned it: done by the script) or "ended" (it had ended already);
   * throws for a trajectory never opened.
   */
  async cancel(traj) {
    checkTraj(traj);
    const k = this.keys;
    const outcome = await this.send([
      'EVAL', CANCEL_LUA, 3, k.traj(traj), k.calls(traj), k.events(traj),
      k.result(traj, ''), RESULT_TTL_MS, EVENTS_MAXLEN, Date.now(), RETENTION_MS, traj,
    ]);
    if (outcome === 'unknown') throw new ToolqError(`no trajectory ${traj}`);
    if (outcome === 'cancelled') await this.send(['ZREM', k.pending, traj]);
    return outcome;
  }

  /** The trajectory record, decoded, or null. */
  trajectory(traj) {
    return this.readHash(this.keys.traj(checkTraj(traj)), 'trajectory_record');
  }

  /** Wait until the trajectory reaches a final state; returns its record (or null on timeout). */
  async waitEnded(traj, { waitMs = 60000 } = {}) {
    const cursor = await this.lastEventId(traj);
    return this.waitFor(traj, cursor, waitMs, (e) => e.type === 'state', async () => {
      const rec = await this.trajectory(traj);
      return rec && FINAL_STATUSES.has(rec.status) ? rec : null;
    });
  }

  /** A background task's hash, decoded, or null. */
  bgTask(traj, taskId) {
    return this.readHash(this.keys.bg(checkTraj(traj), taskId), 'bg_task');
  }

  /** Wait until a background task is no longer running; returns its hash (or null on timeout). */
  async waitBg(traj, taskId, { waitMs = 60000 } = {}) {
    const cursor = await this.lastEventId(traj);
    const matches = (e) => e.type === 'bg' && e.task_id === taskId;
    return this.waitFor(traj, cursor, waitMs, matches, async () => {
      const task = await this.bgTask(traj, taskId);
      return task && BG_FINAL.has(task.status) ? task : null;
    });
  }
}

module.exports = {
  ToolqClient, ToolqError, WaitTimeout, Keys, encode, decode,
  OPEN_LUA, ENQUEUED_LUA, SUBMIT_LUA, CANCEL_LUA, RESERVE_CHILD_LUA,
};
