-- REFRESH: reset the idle time of entries this consumer still owns.
--   KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3..] entry ids. Returns owned ids.
-- Race: between "is it still mine?" (XPENDING) and "touch it" (XCLAIM) another worker's
-- claim could take the entry; doing both in one script means we never steal an entry back
-- from a worker that legitimately claimed it. XCLAIM ... 0 ... JUSTID resets idle without
-- bumping the delivery counter.
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
