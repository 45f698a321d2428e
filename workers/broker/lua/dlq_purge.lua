-- DLQ_PURGE: count and delete the dead-letter stream in one step, so the count is exactly
-- what was deleted.
--   KEYS[1] dlq. Returns the number of dead letters deleted.
local n = redis.call('XLEN', KEYS[1])
redis.call('DEL', KEYS[1])
return n
