-- RELEASE: hand back entries this consumer holds but never ran (its model call hung):
-- they become claimable at once, with the delivery counter they had before this consumer
-- took them.
--   KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] idle_ms (the lease), then pairs
--   ARGV[4..] (entry id, deliveries as this consumer got it). Returns the ids handed back.
-- Race: as for REFRESH, ownership check and XCLAIM in one script, so an entry another
-- worker claimed in between is never touched. RETRYCOUNT undoes our delivery: innocent
-- batch-mates of a request that hangs every worker must not run out of max_deliveries.
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
