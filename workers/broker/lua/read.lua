-- READ: new entries for this consumer (XREADGROUP ... >), sized to a byte budget.
--   KEYS[1] request stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] most entries,
--   ARGV[4] budget (bytes of all fields of the entries returned whole), ARGV[5] largest
--   entry returned whole (bytes), ARGV[6] longest routing field kept of an oversize entry,
--   ARGV[7..] the routing field names.
-- Returns a list of entries, oldest first: {id, {f1, v1, ...}} for an entry returned whole,
-- {id, {routing fields}, size_bytes, field_count} for an oversize one (returned alone, as
-- the first entry beyond the budget; its other fields never leave Redis). Empty: nothing new.
-- Errors with NOGROUP when the stream or the group is missing (the caller recreates it).
--
-- Why a script: XREADGROUP COUNT n cannot be bounded by bytes. n huge entries in one reply
-- blow the worker's memory, and a reply that outlives the socket timeout leaves them
-- pending but unseen, redelivered until they are dead-lettered, innocent ones included.
-- Race: the entries sized (XRANGE after the group's last-delivered id) must be the ones
-- XREADGROUP delivers; a read by another consumer in between would shift them. Inside one
-- script nothing interleaves. XRANGE takes one entry at a time so that the script itself
-- never holds more than the budget plus one entry.
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local count, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local max_entry, max_route = tonumber(ARGV[5]), tonumber(ARGV[6])
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
if not ok then return redis.error_reply('NOGROUP no stream ' .. stream) end
local cursor = nil
for _, g in ipairs(groups) do
  local name, delivered
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then delivered = g[i + 1] end
  end
  if name == group then cursor = delivered end
end
if not cursor then return redis.error_reply('NOGROUP no group ' .. group .. ' on ' .. stream) end
local function size_of(fields)
  local n = 0
  for i = 1, #fields do n = n + #fields[i] end
  return n
end
local take, total, oversize = 0, 0, nil
while take < count do
  local e = redis.call('XRANGE', stream, '(' .. cursor, '+', 'COUNT', 1)
  if #e == 0 then break end
  local size = size_of(e[1][2])
  if size > max_entry then
    if take == 0 then oversize = {size, #e[1][2] / 2} end
    break
  end
  if take > 0 and total + size > budget then break end
  take, total, cursor = take + 1, total + size, e[1][1]
end
local out = {}
if take > 0 then
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', take, 'STREAMS', stream, '>')
  for _, e in ipairs(r[1][2]) do out[#out + 1] = {e[1], e[2]} end
elseif oversize then
  local routing = {}
  for i = 7, #ARGV do routing[ARGV[i]] = true end
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', stream, '>')
  local e = r[1][2][1]
  local keep = {}
  for i = 1, #e[2], 2 do
    if routing[e[2][i]] and #e[2][i + 1] <= max_route then
      keep[#keep + 1] = e[2][i]
      keep[#keep + 1] = e[2][i + 1]
    end
  end
  out[1] = {e[1], keep, oversize[1], oversize[2]}
end
return out
