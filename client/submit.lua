-- headrace wire protocol v1: enqueue one request with backpressure (EVAL/EVALSHA).
--
-- KEYS[1]  the model's request stream, <ns>:{<model>}:requests
-- ARGV[1]  consumer group of the workers ("workers")
-- ARGV[2]  max_backlog: refuse when the backlog is >= this many entries (0 = no limit)
-- ARGV[3…] the request entry as field, value, field, value, ... (see docs/protocol.md)
--
-- Returns {1, <entry id>} when the request was added, {0, <backlog>} when it was refused
-- (nothing was written).
--
-- Why a script: the check (read the backlog) and the act (XADD) must be one atomic step.
-- With a check in the client followed by a separate XADD, many producers read the same
-- backlog below the limit at the same moment and all add, overshooting max_backlog by up
-- to one request per producer; Redis runs a script without interleaving other commands,
-- so here every producer sees the backlog including everything added before it.
-- The script also creates the consumer group at id 0 (MKSTREAM) when it is missing, so
-- requests submitted before any worker started are still delivered to the first worker
-- (a group created later at "$" would skip them). It only touches KEYS[1], so it is
-- Redis Cluster safe.

local stream = KEYS[1]
local group = ARGV[1]
local max_backlog = tonumber(ARGV[2]) or 0

local function find_group()
  local groups = redis.pcall('XINFO', 'GROUPS', stream)
  if type(groups) == 'table' and groups['err'] then
    -- "no such key": the stream does not exist yet. A WRONGTYPE key fails in XGROUP below.
    return nil
  end
  for _, g in ipairs(groups) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then return info end
  end
  return nil
end

local backlog
local info = find_group()
if info == nil then
  redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
  backlog = redis.call('XLEN', stream)
else
  local lag = info['lag']
  if lag == nil or lag == false then
    -- Lag is unknown (Redis < 7, or entries were deleted inside the unread range). XLEN
    -- counts every entry still in the stream: the unread and the pending ones, plus acked
    -- entries not trimmed yet, so it is a safe upper bound of lag + pending.
    backlog = redis.call('XLEN', stream)
  else
    -- Every unread and every pending entry is still in the stream (trimming keeps them),
    -- so XLEN bounds lag + pending. Redis 7.0 can report a stale, too large lag for good
    -- after an AOF rewrite followed by a restart (the group's entries-read is reloaded
    -- from the rewrite); unbounded, that phantom lag would refuse requests to an empty queue.
    backlog = math.min(tonumber(lag) + tonumber(info['pending']), redis.call('XLEN', stream))
  end
end

if max_backlog > 0 and backlog >= max_backlog then
  return {0, backlog}
end
local id = redis.call('XADD', stream, '*', unpack(ARGV, 3))
return {1, id}
