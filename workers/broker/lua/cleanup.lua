-- CLEANUP: delete consumers that own nothing and have been idle a while.
--   KEYS[1] stream; ARGV[1] group, ARGV[2] min_idle_ms, ARGV[3] only this name ('' = any).
--   Returns the names deleted.
-- Race: XGROUP DELCONSUMER drops the consumer's pending entries from the PEL (they would
-- never be redelivered). Checking "pending == 0" client-side and deleting afterwards could
-- delete a consumer that got entries in between; check and delete in one script.
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
