-- CANCEL_MARKS: the first 21 bytes of each cancel marker ("" when absent or not a string).
--   KEYS[1], KEYS[2], ...: the cancel markers of a batch's request ids. Returns one string per key.
-- Race: none to prevent (it only reads). Why a script rather than MGET: the size of what
-- comes back. Producers may SET cancel:<id> (their ACL allows it) to any
-- value up to Redis's 512 MB; MGET would carry every such value whole into the worker's
-- memory (a batch of 32 ids: up to 16 GB) before it could look at the length. A marker is a
-- Unix ms timestamp (13 digits), so 21 bytes tell a valid one from junk.
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.pcall('GETRANGE', key, 0, 20)
  if type(v) == 'table' then v = '' end  -- WRONGTYPE: not a marker the SDK writes
  out[i] = v
end
return out
