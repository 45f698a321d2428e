"""The Lua scripts of the worker data plane, one constant per atomic operation.

Every script runs atomically on the Redis server; each says which race it exists for.
All keys a script touches are passed in KEYS. The request stream, DLQ, dedupe markers,
stats stream and the SDK's reply streams of one model share the ``{<model>}`` hash tag, so
on Redis Cluster they live in one slot. ``reply_to`` is chosen by the producer: the SDK
always puts it in the model's slot; a foreign producer that picks a key elsewhere still works
on a single Redis (any key is local there) but would get CROSSSLOT on a cluster.
"""

from __future__ import annotations

from typing import Final

# Shared helper: stream ids compare as (ms, seq) integers; compare their decimal strings by
# length first so 10-digit and 13-digit ms values order correctly without float rounding.
_ID_LT: Final = """
local function id_lt(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
"""

# Results + acks of one batch, in one round trip and one atomic step.
#   KEYS[1] request stream, KEYS[2] dead-letter stream, then per op its keys (see below)
#   ARGV[1] group, ARGV[2] dedupe_ttl_s, ARGV[3] reply_ttl_ms, ARGV[4] now_ms, then ops:
#     'A', entry_id                              ack only (duplicate / already answered)
#     'R', entry_id, n, f1, v1, ... fn, vn       result; keys: done marker, reply stream
#     'D', entry_id, with_reply, n, dlq fields..., m, reply fields...
#                                                dead letter; keys (when with_reply=1):
#                                                done marker, reply stream
# Returns one integer per op: A -> 0; R -> 1 written, 0 duplicate (marker existed),
# -1 reply stream not writable (entry moved to the DLQ instead); D -> 1 dead-lettered,
# 0 already answered (only acked).
#
# Races this prevents:
# * a worker crashing between "XADD result" and "XACK": done separately, the redelivered
#   entry would be answered twice; here both happen in one script or neither does;
# * two workers finishing the same entry (one claimed it after the other's lease lapsed):
#   the first SET NX wins, the second only acks, so the producer sees one result;
# * a producer re-submitting a request id as a new entry: the marker (kept dedupe_ttl_s)
#   makes the new entry ack-only;
# * dead-lettering: XADD to the DLQ, the error reply and XACK are one step, so an entry is
#   never both in the DLQ and still pending (or acked without being in the DLQ).
COMMIT: Final = """
local stream, dlq = KEYS[1], KEYS[2]
local group, ttl, reply_ttl, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local a, k = 5, 3
local out = {}
local function take_fields()
  local n = tonumber(ARGV[a]); a = a + 1
  local f = {}
  for i = 1, n * 2 do f[i] = ARGV[a + i - 1] end
  a = a + n * 2
  return f
end
local function field(fields, name)
  for i = 1, #fields, 2 do if fields[i] == name then return fields[i + 1] end end
  return ''
end
-- pcall: a reply_to naming a key of another type must not abort the batch half-way.
local function reply(rkey, fields)
  local r = redis.pcall('XADD', rkey, '*', unpack(fields))
  if type(r) == 'table' and r.err then return r.err end
  redis.call('PEXPIRE', rkey, reply_ttl)
  return nil
end
while a <= #ARGV do
  local op, id = ARGV[a], ARGV[a + 1]
  a = a + 2
  if op == 'A' then
    out[#out + 1] = 0
  elseif op == 'R' then
    local done, rkey = KEYS[k], KEYS[k + 1]
    k = k + 2
    local fields = take_fields()
    if redis.call('SET', done, id, 'NX', 'EX', ttl) then
      local err = reply(rkey, fields)
      if err then
        redis.call('DEL', done)
        redis.call('XADD', dlq, '*', 'id', field(fields, 'id'), 'reply_to', rkey,
          'dlq_reason', 'reply_to is not writable: ' .. err, 'dlq_code', 'internal_error',
          'dlq_entry_id', id, 'dlq_deliveries', '0', 'dlq_ts_ms', now)
        out[#out + 1] = -1
      else
        out[#out + 1] = 1
      end
    else
      out[#out + 1] = 0
    end
  elseif op == 'D' then
    local with_reply = ARGV[a] == '1'
    a = a + 1
    local dfields = take_fields()
    local rfields = take_fields()
    if with_reply then
      local done, rkey = KEYS[k], KEYS[k + 1]
      k = k + 2
      if redis.call('SET', done, id, 'NX', 'EX', ttl) then
        redis.call('XADD', dlq, '*', unpack(dfields))
        reply(rkey, rfields)
        out[#out + 1] = 1
      else
        out[#out + 1] = 0
      end
    else
      redis.call('XADD', dlq, '*', unpack(dfields))
      out[#out + 1] = 1
    end
  else
    return redis.error_reply('headrace commit: unknown op ' .. tostring(op))
  end
  redis.call('XACK', stream, group, id)
end
return out
"""

# Lease refresh: reset the idle time of entries this consumer still owns.
#   KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3..] entry ids. Returns owned ids.
# Race: between "is it still mine?" (XPENDING) and "touch it" (XCLAIM) another worker's
# XAUTOCLAIM could take the entry; doing both in one script means we never steal an entry
# back from a worker that legitimately claimed it. XCLAIM ... 0 ... JUSTID resets idle
# without bumping the delivery counter.
REFRESH: Final = """
local owned = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then owned[#owned + 1] = ARGV[i] end
end
if #owned > 0 then
  local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
  for _, id in ipairs(owned) do args[#args + 1] = id end
  args[#args + 1] = 'JUSTID'
  redis.call(unpack(args))
end
return owned
"""

# Hand back entries this consumer holds but never ran (its model call hung): they become
# claimable at once, with the delivery counter they had before this consumer took them.
#   KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] idle_ms (the lease), then pairs
#   ARGV[4..] (entry id, deliveries as this consumer got it). Returns the ids handed back.
# Race: as for REFRESH, ownership check and XCLAIM in one script, so an entry another
# worker claimed in between is never touched. RETRYCOUNT undoes our delivery: innocent
# batch-mates of a request that hangs every worker must not run out of max_deliveries.
RELEASE: Final = """
local released = {}
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if p[1] and p[1][2] == ARGV[2] then
    local n = math.max(0, tonumber(ARGV[i + 1]) - 1)
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'RETRYCOUNT', n, 'JUSTID')
    released[#released + 1] = id
  end
end
return released
"""

# Repair a stale lag: Redis 7.0 reloads a group's entries-read from the last AOF rewrite
# after a restart, so XINFO GROUPS reports every entry read since the rewrite as lag, for
# good; the submit script would refuse producers against an empty queue. When the group has
# been delivered everything ever added (last-delivered-id = last-generated-id), its true
# entries-read is entries-added: set it.
#   KEYS[1] stream; ARGV[1] group. Returns 1 when repaired, else 0.
# Race: between reading the ids and SETID another consumer could read or a producer add;
# inside one script nothing interleaves, so the equality still holds when SETID runs.
REPAIR_LAG: Final = """
local s = redis.call('XINFO', 'STREAM', KEYS[1])
local last, added
for i = 1, #s, 2 do
  if s[i] == 'last-generated-id' then last = s[i + 1] elseif s[i] == 'entries-added' then added = s[i + 1] end
end
if not last or not added then return 0 end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  if info['name'] == ARGV[1] then
    if info['last-delivered-id'] == last and info['lag'] ~= 0 then
      redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], last, 'ENTRIESREAD', added)
      return 1
    end
    return 0
  end
end
return 0
"""

# Take over entries idle longer than the lease, with their delivery counts.
#   KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] min_idle_ms, ARGV[4] cursor,
#   ARGV[5] count. Returns {next_cursor, {{id, {f, v, ...}, deliveries}, ...}}.
# Atomic so the delivery count read is the one XAUTOCLAIM just set (no other claim between).
CLAIM: Final = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local out = {}
for _, e in ipairs(r[2]) do
  if e and e[2] then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    local n = 1
    if p[1] then n = p[1][4] end
    out[#out + 1] = {e[1], e[2], n}
  end
end
return {r[1], out}
"""

# Trim the stream to what every group has acknowledged.
#   KEYS[1] stream. Returns the number of entries removed.
# Race: computing the safe id client-side and trimming later could remove an entry that a
# group was delivered (and has pending) in between; inside the script nothing interleaves.
# Per group the floor is its oldest pending id, else its last-delivered-id (everything up
# to it was delivered and acked); XTRIM MINID keeps entries >= the smallest floor.
TRIM: Final = _ID_LT + """
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok or #groups == 0 then return 0 end
local floor = nil
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local cand = info['last-delivered-id']
  local s = redis.call('XPENDING', KEYS[1], info['name'])
  if s[1] > 0 then cand = s[2] end
  if floor == nil or id_lt(cand, floor) then floor = cand end
end
return redis.call('XTRIM', KEYS[1], 'MINID', floor)
"""

# Delete consumers that own nothing and have been idle a while.
#   KEYS[1] stream; ARGV[1] group, ARGV[2] min_idle_ms, ARGV[3] only this name ('' = any).
# Race: XGROUP DELCONSUMER drops the consumer's pending entries from the PEL (they would
# never be redelivered). Checking "pending == 0" client-side and deleting afterwards could
# delete a consumer that got entries in between; check and delete in one script.
CLEANUP: Final = """
local ok, cs = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return {} end
local deleted = {}
local min_idle = tonumber(ARGV[2])
for _, c in ipairs(cs) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if (ARGV[3] == '' or info['name'] == ARGV[3]) and info['pending'] == 0 and info['idle'] >= min_idle then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    deleted[#deleted + 1] = info['name']
  end
end
return deleted
"""

# Registry heartbeat: merge this worker into <ns>:models[model] (JSON; the format and its
# one reader are headrace.client.registry).
#   KEYS[1] registry hash; ARGV[1] model, ARGV[2] consumer, ARGV[3] worker JSON (a flat
#   object: version, backend, batching limits, host, pid), ARGV[4] servable description JSON
#   text ('' = keep), ARGV[5] stale_ms, ARGV[6] 'up'|'down'.
# Times are Redis server time, so liveness does not depend on the workers' clocks. The
# description is stored as text: cjson would turn its empty arrays into objects.
# Race: workers of one model heartbeat concurrently; a client-side read-modify-write of the
# shared JSON would drop other workers' entries.
REGISTER: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stale = tonumber(ARGV[5])
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local info = {}
if raw then
  local ok, v = pcall(cjson.decode, raw)
  if ok and type(v) == 'table' then info = v end
end
local workers = {}
if type(info['workers']) == 'table' then
  for name, w in pairs(info['workers']) do
    if type(w) == 'table' and type(w['seen_ms']) == 'number' and now - w['seen_ms'] <= stale then
      workers[name] = w
    end
  end
end
local served = {}
if ARGV[6] == 'down' then
  workers[ARGV[2]] = nil
else
  local ok, w = pcall(cjson.decode, ARGV[3])
  if not ok or type(w) ~= 'table' then w = {} end
  w['seen_ms'] = now
  workers[ARGV[2]] = w
end
for _, w in pairs(workers) do
  if w['version'] ~= nil then served[tostring(w['version'])] = true end
end
local sigs = {}
if type(info['signatures']) == 'table' then sigs = info['signatures'] end
if ARGV[6] ~= 'down' and ARGV[4] ~= '' then
  local ok, w = pcall(cjson.decode, ARGV[3])
  local version = (ok and type(w) == 'table' and w['version'] ~= nil) and tostring(w['version']) or ''
  sigs[version] = {seen_ms = now, describe = ARGV[4]}
end
-- Keep the signatures of versions still served; when none is served, keep the newest one
-- so that a producer can still describe the model while its workers are away.
local newest, newest_ms = nil, -1
for v, e in pairs(sigs) do
  local ms = (type(e) == 'table' and type(e['seen_ms']) == 'number') and e['seen_ms'] or 0
  if ms > newest_ms then newest, newest_ms = v, ms end
end
local kept = {}
for v, e in pairs(sigs) do
  if served[v] or v == newest then kept[v] = e end
end
info['model'] = ARGV[1]
info['updated_ms'] = now
info['workers'] = workers
info['signatures'] = kept
local enc = cjson.encode(info)
redis.call('HSET', KEYS[1], ARGV[1], enc)
return enc
"""

# Replay one dead letter: re-add its original fields to the request stream, forget the
# request's dedupe marker, delete the dead letter.
#   KEYS[1] dlq, KEYS[2] request stream, KEYS[3] done marker (optional);
#   ARGV[1] dlq entry id, ARGV[2] expected request id ('' = none). Returns the new id or false.
# Race: two operators replaying the same DLQ concurrently would re-queue an entry twice;
# the existence check and XDEL in one script make the second a no-op.
DLQ_REPLAY: Final = """
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return false end
local f = e[1][2]
local out = {}
local rid = ''
for i = 1, #f, 2 do
  if string.sub(f[i], 1, 4) ~= 'dlq_' then
    out[#out + 1] = f[i]
    out[#out + 1] = f[i + 1]
  end
  if f[i] == 'id' then rid = f[i + 1] end
end
if rid ~= ARGV[2] then return false end
if #out == 0 then return false end
if KEYS[3] then redis.call('DEL', KEYS[3]) end
local nid = redis.call('XADD', KEYS[2], '*', unpack(out))
redis.call('XDEL', KEYS[1], ARGV[1])
return nid
"""

# Purge: count and delete in one step so the count is exactly what was deleted.
DLQ_PURGE: Final = """
local n = redis.call('XLEN', KEYS[1])
redis.call('DEL', KEYS[1])
return n
"""
