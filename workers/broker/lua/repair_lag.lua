-- REPAIR_LAG: repair a stale lag. Redis 7.0 reloads a group's entries-read from the last AOF
-- rewrite after a restart, so XINFO GROUPS reports every entry read since the rewrite as
-- lag, for good; the submit script would refuse producers against an empty queue. When the
-- group has been delivered everything ever added (last-delivered-id = last-generated-id),
-- its true entries-read is entries-added: set it.
--   KEYS[1] stream; ARGV[1] group. Returns 1 when repaired, else 0.
-- Race: between reading the ids and SETID another consumer could read or a producer add;
-- inside one script nothing interleaves, so the equality still holds when SETID runs.
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
