#!lua name=headrace
-- headrace wire protocol v1: the submit function (a Redis Function library, Redis >= 7.0).
--
-- Load once per Redis primary (workers do it at start; operators: `headrace functions load`
-- or `redis-cli -x FUNCTION LOAD REPLACE < client/submit.lua`), then submit with
--
--   FCALL headrace_submit 2 <ns>:{<model>}:requests <ns>:{<model>}:limits
--         <group> <max_backlog> field value [field value ...]
--
-- KEYS[1]  the model's request stream, <ns>:{<model>}:requests
-- KEYS[2]  the model's limits hash, <ns>:{<model>}:limits (written by the model's workers;
--          field max_payload_bytes; absent: DEFAULT_MAX_PAYLOAD_BYTES; field
--          samples_per_entry, absent: 1)
-- ARGV[1]  the workers' consumer group ("workers"), for the backlog reading
-- ARGV[2]  max_backlog: refuse when the backlog is >= this many samples (0 = no limit):
--          entries times the workers' published samples_per_entry
-- ARGV[3…] the request entry as field, value, field, value, ... (see docs/protocol.md)
--
-- Returns {1, <entry id>} when the request was added, {0, <backlog>} when the backlog was
-- full (nothing was written), or an error reply whose first word is the wire error code
-- (e.g. "payload_too_large entry of 5000000 bytes exceeds ..."), nothing written.
--
-- What it guarantees about every entry it adds: the server picks the entry id ('*', never
-- one from the caller), nothing is trimmed, the required fields are there exactly once and
-- well-formed, and the whole entry (every field name and value) fits max_payload_bytes.
--
-- Why a function: the check (read the backlog) and the act (XADD) must be one atomic step.
-- With a check in the client followed by a separate XADD, many producers read the same
-- backlog below the limit at the same moment and all add, overshooting max_backlog by up to
-- one request per producer; Redis runs a function without interleaving other commands, so
-- every producer sees the backlog including everything added before it. Both keys carry
-- the {<model>} hash tag, so the function is Redis Cluster safe.
--
-- It never creates the consumer group: workers create it at id 0, so entries added before
-- any worker started are still delivered; a producer that could create groups could also
-- create one that pins trimming forever.

local LIBRARY_VERSION = 1
local DEFAULT_MAX_PAYLOAD_BYTES = 4194304
local MAX_FIELDS = 16        -- field names per entry, unknown optional ones included
local MAX_NAME_BYTES = 64    -- bytes of one field name
local MAX_MS_DIGITS = 18     -- deadline_ms / ts_ms: decimal ASCII below 10^18 (fits int64)

local REQUIRED = {'v', 'id', 'reply_to', 'body'}

local function refuse(code, message)
  return redis.error_reply(code .. ' ' .. message)
end

local function parse_keys(keys)
  if #keys ~= 2 then
    return nil, 'needs 2 keys: <ns>:{<model>}:requests <ns>:{<model>}:limits'
  end
  local prefix = string.match(keys[1], '^([^{}:]+:{[A-Za-z0-9._%-]+}):requests$')
  if prefix == nil then
    return nil, 'KEYS[1] must be a request stream <ns>:{<model>}:requests'
  end
  if keys[2] ~= prefix .. ':limits' then
    return nil, 'KEYS[2] must be ' .. prefix .. ':limits'
  end
  return string.match(prefix, '{(.*)}$')
end

-- The entry's fields as a table, or nil plus (code, message).
local function read_fields(args, max_bytes)
  local n = #args - 2
  if n < 2 or n % 2 ~= 0 then
    return nil, 'decode_error', 'the entry must be field, value pairs after <group> <max_backlog>'
  end
  if n / 2 > MAX_FIELDS then
    return nil, 'payload_too_large', 'entry of ' .. (n / 2) .. ' fields exceeds ' .. MAX_FIELDS
  end
  local fields, total = {}, 0
  for i = 3, #args, 2 do
    local name, value = args[i], args[i + 1]
    if #name == 0 or #name > MAX_NAME_BYTES then
      return nil, 'decode_error', 'field names must be 1-' .. MAX_NAME_BYTES .. ' bytes'
    end
    if fields[name] ~= nil then
      return nil, 'decode_error', "field '" .. name .. "' is given twice"
    end
    fields[name] = value
    total = total + #name + #value
  end
  if total > max_bytes then
    return nil, 'payload_too_large',
      'entry of ' .. total .. ' bytes (all fields) exceeds max_payload_bytes=' .. max_bytes
  end
  return fields
end

local function check_envelope(fields, model)
  for _, name in ipairs(REQUIRED) do
    if fields[name] == nil then
      return 'missing_field', "entry field '" .. name .. "' is missing"
    end
  end
  if fields['v'] ~= '1' then
    return 'unsupported_version', 'protocol version ' .. string.format('%q', string.sub(fields['v'], 1, 16))
      .. ' is not supported; send v=1'
  end
  local id = fields['id']
  if #id > 128 or string.match(id, '^[A-Za-z0-9._:%-]+$') == nil then
    return 'decode_error', 'request id must be 1-128 characters of [A-Za-z0-9._:-]'
  end
  local reply_to = fields['reply_to']
  if #reply_to == 0 or #reply_to > 512 or string.find(reply_to, '[%z\1-\31\127]') then
    return 'decode_error', 'reply_to must be a 1-512 byte key without control characters'
  end
  -- The caller must be able to read the stream it names: results go only where the
  -- producer itself collects them, never into another client's reply stream.
  if not redis.acl_check_cmd('XREAD', 'STREAMS', reply_to, '0') then
    return 'decode_error', 'reply_to must be a reply stream this Redis user may read (XREAD)'
  end
  for _, name in ipairs({'deadline_ms', 'ts_ms'}) do
    local value = fields[name]
    if value ~= nil and value ~= '' and (#value > MAX_MS_DIGITS or string.match(value, '^[0-9]+$') == nil) then
      return 'decode_error', name .. ' must be empty or 1-' .. MAX_MS_DIGITS .. ' ASCII digits (Unix ms)'
    end
  end
  local n = fields['n']
  if n ~= nil and (#n > 9 or string.match(n, '^[0-9]+$') == nil or tonumber(n) < 1) then
    return 'decode_error', 'n (the sample count) must be 1-9 ASCII digits, at least 1'
  end
  if fields['model'] ~= nil and fields['model'] ~= model then
    return 'unknown_model', "entry names model '" .. string.sub(fields['model'], 1, 128)
      .. "' but was sent to the stream of '" .. model .. "'"
  end
  return nil
end

local function find_group(stream, group)
  local groups = redis.pcall('XINFO', 'GROUPS', stream)
  if type(groups) == 'table' and groups['err'] then
    -- "no such key": the stream does not exist yet. A WRONGTYPE key fails in XADD below.
    return nil
  end
  for _, g in ipairs(groups) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then return info end
  end
  return nil
end

local function backlog_of(stream, group)
  local info = find_group(stream, group)
  local length = redis.call('XLEN', stream)
  if info == nil or info['lag'] == nil or info['lag'] == false then
    -- No group yet, or its lag is unknown (entries deleted inside the unread range): XLEN
    -- counts every entry still in the stream, unread and pending ones included, plus acked
    -- entries not trimmed yet, so it is a safe upper bound of lag + pending.
    return length
  end
  -- Every unread and pending entry is still in the stream (trimming keeps them), so XLEN
  -- bounds lag + pending. Redis 7.0 can report a stale, too large lag for good after an AOF
  -- rewrite followed by a restart; unbounded, that phantom lag would refuse requests to an
  -- empty queue.
  return math.min(tonumber(info['lag']) + tonumber(info['pending']), length)
end

local function submit(keys, args)
  local model, key_error = parse_keys(keys)
  if model == nil then
    return refuse('decode_error', key_error)
  end
  local group, max_backlog = args[1], tonumber(args[2])
  if group == nil or #group == 0 or max_backlog == nil or max_backlog < 0 then
    return refuse('decode_error', 'ARGV must start with <group> <max_backlog>')
  end
  local max_bytes = tonumber(redis.call('HGET', keys[2], 'max_payload_bytes')) or DEFAULT_MAX_PAYLOAD_BYTES
  local fields, code, message = read_fields(args, max_bytes)
  if fields == nil then
    return refuse(code, message)
  end
  code, message = check_envelope(fields, model)
  if code ~= nil then
    return refuse(code, message)
  end
  -- Backlog in samples: the entries times the samples per entry the workers published
  -- (a moving average of what they read; absent: 1). Read-only: producers never write
  -- the limits hash, whose max_payload_bytes they must not be able to raise.
  local backlog = backlog_of(keys[1], group)
  if max_backlog > 0 and backlog > 0 then
    local per_entry = tonumber(redis.call('HGET', keys[2], 'samples_per_entry')) or 1
    backlog = math.floor(backlog * math.max(per_entry, 1) + 0.5)
  end
  if max_backlog > 0 and backlog >= max_backlog then
    return {0, backlog}
  end
  return {1, redis.call('XADD', keys[1], '*', unpack(args, 3))}
end

redis.register_function{function_name = 'headrace_submit', callback = submit}
redis.register_function{
  function_name = 'headrace_version',
  callback = function() return LIBRARY_VERSION end,
  flags = {'no-writes'},
}
