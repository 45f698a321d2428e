-- TRIM: trim the stream to what every group has acknowledged.
--   KEYS[1] stream. Returns the number of entries removed.
-- Race: computing the safe id client-side and trimming later could remove an entry that a
-- group was delivered (and has pending) in between; inside the script nothing interleaves.
-- Per group the floor is its oldest pending id, else its last-delivered-id (everything up
-- to it was delivered and acked); XTRIM MINID keeps entries >= the smallest floor.
-- Stream ids compare as (ms, seq) integers: their decimal strings are compared by length
-- first, so 10-digit and 13-digit ms values order correctly without float rounding.
local function id_lt(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
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
