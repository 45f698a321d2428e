-- COMMIT: results, dead letters and acks of one batch, in one round trip and one atomic step.
--   KEYS[1] request stream, KEYS[2] dead-letter stream, then per op its keys (see below)
--   ARGV[1] group, ARGV[2] dedupe_ttl_s, ARGV[3] reply_ttl_ms, ARGV[4] now_ms,
--   ARGV[5..9] the dead-letter field names for reason, code, entry id, deliveries, time
--   (headrace.workers.pipeline.ops.DLQ_SCRIPT_NAMES), then the ops:
--     'A', entry_id                              ack only (duplicate / already answered)
--     'R', entry_id, n, f1, v1, ... fn, vn       result; keys: done marker, reply stream
--     'D', entry_id, with_reply, n, dlq fields..., m, reply fields...
--                                                dead letter; keys (when with_reply=1):
--                                                done marker, reply stream
-- Returns one integer per op: A -> 0; R -> 1 written, 0 duplicate (marker existed),
-- -1 reply stream not writable (entry moved to the DLQ instead); D -> 1 dead-lettered,
-- 0 already answered (only acked).
-- The worker bounds every field list it passes (a dead letter copies at most 64 fields of
-- the original entry): unpack() cannot spread more than ~8000 values, and a failing commit
-- would be retried forever.
--
-- Races this prevents:
-- * a worker crashing between "XADD result" and "XACK": done separately, the redelivered
--   entry would be answered twice; here both happen in one script or neither does;
-- * two workers finishing the same entry (one claimed it after the other's lease lapsed):
--   the first SET NX wins, the second only acks, so the producer sees one result;
-- * a producer re-submitting a request id as a new entry: the marker (kept dedupe_ttl_s)
--   makes the new entry ack-only;
-- * dead-lettering: XADD to the DLQ, the error reply and XACK are one step, so an entry is
--   never both in the DLQ and still pending (or acked without being in the DLQ).
local stream, dlq = KEYS[1], KEYS[2]
local group, ttl, reply_ttl, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local n_reason, n_code, n_entry, n_deliveries, n_ts = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local a, k = 10, 3
local out = {}
-- Acked and expiry-refreshed once per script rather than once per op: one XACK of every id
-- (in slices, as unpack() spreads at most ~8000 values) and one PEXPIRE per reply stream
-- written. Inside the script nothing interleaves, so the end of it is the same moment.
local acks, touched = {}, {}
local function finish()
  for i = 1, #acks, 4000 do
    redis.call('XACK', stream, group, unpack(acks, i, math.min(i + 3999, #acks)))
  end
  for rkey in pairs(touched) do redis.call('PEXPIRE', rkey, reply_ttl) end
end
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
  touched[rkey] = true
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
          n_reason, 'reply_to is not writable: ' .. err, n_code, 'internal_error',
          n_entry, id, n_deliveries, '0', n_ts, now)
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
    finish()  -- the ops before it are done: acked like every other
    return redis.error_reply('headrace commit: unknown op ' .. tostring(op))
  end
  acks[#acks + 1] = id
end
finish()
return out
