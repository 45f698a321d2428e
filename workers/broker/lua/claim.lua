-- CLAIM: take over entries idle longer than the lease (any consumer's, this one's
-- included), with their delivery counts, sized to a byte budget.
--   KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] min_idle_ms, ARGV[4] start
--   ('-' or '(' .. last id seen), ARGV[5] most entries, ARGV[6] budget (bytes of entries
--   returned whole), ARGV[7] largest entry returned whole, ARGV[8] longest routing field kept
--   of an oversize entry, ARGV[9..] the routing field names.
-- Returns {next_start, entries, full}: next_start '0-0' when the pending list was walked to
-- its end; entries as READ returns them, each with its delivery count appended
-- ({id, fields, deliveries} or {id, routing fields, size_bytes, field_count, deliveries});
-- full = 1 when the budget stopped the walk (the rest stays pending for the next call).
-- Pending entries deleted from the stream are acknowledged (nothing is left to run).
--
-- Race: the idle time checked (XPENDING IDLE), the size read (XRANGE) and the claim (XCLAIM,
-- which bumps the delivery count) must concern the same pending state; another consumer's
-- claim in between would make two workers run the entry. Inside one script nothing
-- interleaves, and the delivery count returned is the one this claim set.
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local min_idle, start, count = ARGV[3], ARGV[4], tonumber(ARGV[5])
local budget, max_entry, max_route = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local routing = {}
for i = 9, #ARGV do routing[ARGV[i]] = true end
local function size_of(fields)
  local n = 0
  for i = 1, #fields do n = n + #fields[i] end
  return n
end
local pending = redis.call('XPENDING', stream, group, 'IDLE', min_idle, start, '+', count)
local out, total, last, full = {}, 0, nil, 0
for _, p in ipairs(pending) do
  local id, deliveries = p[1], p[4] + 1
  local e = redis.call('XRANGE', stream, id, id)
  if #e == 0 then
    redis.call('XACK', stream, group, id)
  else
    local size = size_of(e[1][2])
    if size > max_entry then
      redis.call('XCLAIM', stream, group, consumer, min_idle, id, 'RETRYCOUNT', deliveries, 'JUSTID')
      local keep = {}
      for i = 1, #e[1][2], 2 do
        local f, v = e[1][2][i], e[1][2][i + 1]
        if routing[f] and #v <= max_route then keep[#keep + 1] = f; keep[#keep + 1] = v end
      end
      out[#out + 1] = {id, keep, size, #e[1][2] / 2, deliveries}
    elseif #out > 0 and total + size > budget then
      full = 1
      break
    else
      local c = redis.call('XCLAIM', stream, group, consumer, min_idle, id)
      if c[1] then
        total = total + size
        out[#out + 1] = {id, c[1][2], deliveries}
      end
    end
  end
  last = id
end
local next_start = '0-0'
if full == 1 or #pending >= count then
  if last then next_start = '(' .. last end
end
return {next_start, out, full}
