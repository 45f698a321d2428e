#!lua name=headrace
-- headrace wire protocol v1: the submit function (a Redis Function library, Redis >= 7.0).
--
-- Load once per Redis primary (workers do it at start; operators: `headrace functions load`
-- or `redis-cli -x FUNCTION LOAD REPLACE < client/submit.lua`), then submit with
--
--   FCALL headrace_submit 3 <ns>:{<model>}:requests <ns>:{<model>}:limits <ns>:{<model>}:inbox
--         <group> <max_backlog> field value [field value ...]
--
-- KEYS[1]  the model's request stream, <ns>:{<model>}:requests, or one partition's,
--          <ns>:{<model>~<p>}:requests (the entry's model is <model>)
-- KEYS[2]  the model's limits hash, <ns>:{<model>}:limits (written by the model's workers;
--          fields max_payload_bytes, absent: DEFAULT_MAX_PAYLOAD_BYTES; submit_mode; and
--          samples_per_entry, absent: 1)
-- KEYS[3]  the model's inbox, <ns>:{<model>}:inbox (a list the workers relay from)
-- ARGV[1]  the workers' consumer group ("workers"), for the backlog reading
-- ARGV[2]  max_backlog: refuse when the backlog is >= this many samples (0 = no limit):
--          entries times the workers' published samples_per_entry
-- ARGV[3…] the request entry as field, value, field, value, ... (see docs/protocol.md)
--
-- Returns {1, <entry id>} when the request was added to the stream (direct mode), {1, 'inbox'}
-- when it was queued in the inbox (strict mode), {0, <backlog>} when the backlog was full
-- (nothing was written), or an error reply whose first word is the wire error code (e.g.
-- "payload_too_large entry of 5000000 bytes exceeds ..."), nothing written.
--
-- Strict mode (the default): the checked entry is appended to the inbox as one msgpack array
-- [field, value, field, value, ...]; the workers move it into the request stream with
-- headrace_relay (below). Redis runs a function's commands under the CALLER's ACL, so a
-- function that XADDs needs a caller allowed to XADD, who could then also XADD MAXLEN 0, an
-- explicit maximal id, etc. by hand. Appending to a list is the only right a strict producer
-- needs: RPUSH cannot trim, reorder or block anything, and whatever a producer RPUSHes by
-- hand is checked again by the relay. Direct mode (limits field submit_mode = 'direct',
-- published by workers started with --submit-mode direct) XADDs at once, but only for a
-- caller the operator granted XADD (docs/security.md); any other caller still goes through
-- the inbox.
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

local LIBRARY_VERSION = 4
local DEFAULT_MAX_PAYLOAD_BYTES = 4194304
local MAX_FIELDS = 16        -- field names per entry, unknown optional ones included
local MAX_NAME_BYTES = 64    -- bytes of one field name
local MAX_MS_DIGITS = 18     -- deadline_ms / ts_ms: decimal ASCII below 10^18 (fits int64)

local REQUIRED = {'v', 'id', 'reply_to', 'body'}

local function refuse(code, message)
  return redis.error_reply(code .. ' ' .. message)
end

-- The model and the key prefix of KEYS: the request stream, then one key per suffix.
local function parse_keys(keys, suffixes)
  local usage = '<ns>:{<model>}:requests <ns>:{<model>}:' .. table.concat(suffixes, ' <ns>:{<model>}:')
  if #keys ~= #suffixes + 1 then
    return nil, 'needs ' .. (#suffixes + 1) .. ' keys: ' .. usage
  end
  local prefix = string.match(keys[1], '^([^{}:]+:{[A-Za-z0-9._%-]+}):requests$')
  -- or one partition of a model, tag {<model>~<p>} (docs/scaling.md section 4)
  prefix = prefix or string.match(keys[1], '^([^{}:]+:{[A-Za-z0-9._%-]+~[0-9]+}):requests$')
  if prefix == nil then
    return nil, 'KEYS[1] must be a request stream <ns>:{<model>}:requests'
  end
  for i, suffix in ipairs(suffixes) do
    if keys[i + 1] ~= prefix .. ':' .. suffix then
      return nil, 'KEYS[' .. (i + 1) .. '] must be ' .. prefix .. ':' .. suffix
    end
  end
  local tag = string.match(prefix, '{(.*)}$')
  return string.match(tag, '^(.-)~[0-9]+$') or tag, prefix
end

-- The entry's fields (args[first], args[first + 1], ... field/value pairs) as a table, or nil
-- plus (code, message).
local function read_fields(args, first, max_bytes)
  local n = #args - first + 1
  if n < 2 or n % 2 ~= 0 then
    return nil, 'decode_error', 'the entry must be field, value pairs'
  end
  if n / 2 > MAX_FIELDS then
    return nil, 'payload_too_large', 'entry of ' .. (n / 2) .. ' fields exceeds ' .. MAX_FIELDS
  end
  local fields, total = {}, 0
  for i = first, #args, 2 do
    local name, value = args[i], args[i + 1]
    if type(name) ~= 'string' or type(value) ~= 'string' then
      return nil, 'decode_error', 'field names and values must be strings'
    end
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

local function max_payload_bytes(limits)
  return tonumber(redis.call('HGET', limits, 'max_payload_bytes')) or DEFAULT_MAX_PAYLOAD_BYTES
end

local function submit(keys, args)
  local model, key_error = parse_keys(keys, {'limits', 'inbox'})
  if model == nil then
    return refuse('decode_error', key_error)
  end
  local group, max_backlog = args[1], tonumber(args[2])
  if group == nil or #group == 0 or max_backlog == nil or max_backlog < 0 then
    return refuse('decode_error', 'ARGV must start with <group> <max_backlog>')
  end
  local fields, code, message = read_fields(args, 3, max_payload_bytes(keys[2]))
  if fields == nil then
    return refuse(code, message)
  end
  code, message = check_envelope(fields, model)
  if code ~= nil then
    return refuse(code, message)
  end
  -- Backlog in samples: the entries, in the stream and waiting in the inbox (they are in
  -- the stream a moment later), times the samples per entry the workers published (a moving
  -- average of what they read; absent: 1). Read-only: producers never write the limits
  -- hash, whose max_payload_bytes they must not be able to raise.
  local backlog = backlog_of(keys[1], group) + redis.call('LLEN', keys[3])
  if max_backlog > 0 and backlog > 0 then
    local per_entry = tonumber(redis.call('HGET', keys[2], 'samples_per_entry')) or 1
    backlog = math.floor(backlog * math.max(per_entry, 1) + 0.5)
  end
  if max_backlog > 0 and backlog >= max_backlog then
    return {0, backlog}
  end
  if redis.call('HGET', keys[2], 'submit_mode') == 'direct'
      and redis.acl_check_cmd('XADD', keys[1], '*', 'v', '1') then
    return {1, redis.call('XADD', keys[1], '*', unpack(args, 3))}
  end
  redis.call('RPUSH', keys[3], cmsgpack.pack({unpack(args, 3)}))
  return {1, 'inbox'}
end

-- headrace_relay: move requests from a model's inbox into its request stream (workers only).
--
--   FCALL headrace_relay 4 <ns>:{<model>}:requests <ns>:{<model>}:limits <ns>:{<model>}:inbox
--         <ns>:{<model>}:dlq <count> <reason> <code> <entry id> <deliveries> <ts> <bytes> <fields> <now ms>
--
-- ARGV[1]    most inbox elements to move (the oldest first; one call also stops after 1 MiB)
-- ARGV[2..8] the dead-letter field names (headrace.workers.pipeline.ops: dlq_reason, dlq_code,
--            dlq_entry_id, dlq_deliveries, dlq_ts_ms, dlq_entry_bytes, dlq_entry_fields)
-- ARGV[9]    now (Unix ms), the dead letters' time; empty: the server's clock (TIME) when an
--            element is dead-lettered. A caller that pipelines the call behind its wait for
--            the inbox sends it empty: a time taken before the wake-up would be up to the
--            wait's timeout early.
--
-- Returns {added, dead_lettered, left in the inbox}.
--
-- Every element gets the same bounds as headrace_submit applies (a msgpack array of at most
-- MAX_FIELDS string pairs, names 1-MAX_NAME_BYTES bytes, no name twice, all fields within
-- max_payload_bytes) and is XADDed with a server-picked id and no trimming option. What a
-- producer RPUSHed by hand and does not pass is dead-lettered as a description (its size, and
-- its id and reply_to when they could be read), never copied: the payload stays out of the
-- stream, the DLQ and the worker. The envelope (version, id, reply_to, digits, model) is the
-- worker's to check, as for every entry it reads: it answers a bad one on its reply_to, or
-- dead-letters it.
--
-- Races this prevents: the LPOP and the XADDs are one atomic step, so a worker that dies
-- mid-relay loses and duplicates nothing (an element is either still in the inbox or already
-- in the stream), and two workers relaying at once each move different elements. The worker
-- waits for the inbox with BLMOVE <inbox> <inbox> (a rotation that leaves the element where
-- it is), so a worker killed between that wake-up and this call leaves everything in the
-- inbox for the others.
local RELAY_MAX_COUNT = 1000
local RELAY_MAX_BYTES = 1048576  -- most inbox bytes one call moves (after the element that crosses it)

local function relay_dead_letter(dlq, names, now, raw, code, reason, route)
  if now == '' then
    local t = redis.call('TIME')
    now = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  end
  local entry = {}
  if route ~= nil then
    for _, name in ipairs({'v', 'id', 'reply_to', 'model'}) do
      local value = route[name]
      if type(value) == 'string' and #value <= 1024 then
        entry[#entry + 1] = name
        entry[#entry + 1] = value
      end
    end
  end
  local n_fields = (type(route) == 'table' and route.n_fields) or 0
  for _, pair in ipairs({{names[1], reason}, {names[2], code}, {names[3], 'inbox'}, {names[4], '0'},
                         {names[5], now}, {names[6], tostring(#raw)}, {names[7], tostring(n_fields)}}) do
    entry[#entry + 1] = pair[1]
    entry[#entry + 1] = pair[2]
  end
  return redis.pcall('XADD', dlq, '*', unpack(entry))
end

-- What a refused element's dead letter names: its first value of each field name.
local function route_of(flat)
  local route = {n_fields = math.floor(#flat / 2)}
  for i = 1, math.min(#flat, 2 * MAX_FIELDS) - 1, 2 do
    if type(flat[i]) == 'string' and route[flat[i]] == nil then route[flat[i]] = flat[i + 1] end
  end
  return route
end

-- The element as a flat field list, or nil plus (code, reason, route).
local function unpack_element(raw, max_bytes)
  -- Bounded before decoding: an oversize element is described, never unpacked.
  if #raw > max_bytes + 2 * MAX_FIELDS * 9 then
    return nil, 'payload_too_large', 'inbox element of ' .. #raw .. ' bytes exceeds max_payload_bytes='
      .. max_bytes .. '; its payload was not read'
  end
  local decoded = {pcall(cmsgpack.unpack, raw)}
  if not decoded[1] or #decoded ~= 2 or type(decoded[2]) ~= 'table' then
    return nil, 'decode_error', 'inbox element is not one msgpack array of field, value pairs'
  end
  local flat = decoded[2]
  local n_keys = 0
  for _ in pairs(flat) do n_keys = n_keys + 1 end
  if #flat == 0 or n_keys ~= #flat then
    return nil, 'decode_error', 'inbox element is not a msgpack array of field, value pairs', route_of(flat)
  end
  local fields, code, message = read_fields(flat, 1, max_bytes)
  if fields == nil then
    return nil, code, 'inbox element refused: ' .. message, route_of(flat)
  end
  return flat
end

local function relay(keys, args)
  local model, key_error = parse_keys(keys, {'limits', 'inbox', 'dlq'})
  if model == nil then
    return refuse('decode_error', key_error)
  end
  -- The worker's rights, checked before anything is popped: Redis does not roll a function
  -- back, so a caller who may FCALL but not XADD (a strict producer) must not get this far.
  if not redis.acl_check_cmd('XADD', keys[1], '*', 'v', '1') or not redis.acl_check_cmd('XADD', keys[4], '*', 'v', '1')
      or not redis.acl_check_cmd('LPOP', keys[3], '1') or not redis.acl_check_cmd('LPUSH', keys[3], 'x') then
    return redis.error_reply('NOPERM headrace_relay is for workers (needs XADD, LPOP, LPUSH on the model keys)')
  end
  local count = math.floor(tonumber(args[1]) or 0)
  if count < 1 or count > RELAY_MAX_COUNT or #args ~= 9 then
    return refuse('decode_error', 'ARGV must be <count 1-' .. RELAY_MAX_COUNT .. '> and 8 dead-letter arguments')
  end
  local names, now = {args[2], args[3], args[4], args[5], args[6], args[7], args[8]}, args[9]
  local max_bytes = max_payload_bytes(keys[2])
  local added, dead, bytes = 0, 0, 0
  -- One element at a time, up to count or RELAY_MAX_BYTES: the Lua heap holds one request,
  -- not a whole step of them (a step of 256 large requests costs several times more CPU
  -- per request in allocation and garbage collection).
  while added + dead < count and bytes < RELAY_MAX_BYTES do
    local raw = redis.call('LPOP', keys[3])
    if not raw then break end
    bytes = bytes + #raw
    local flat, code, reason, route = unpack_element(raw, max_bytes)
    local res
    if flat == nil then
      res = relay_dead_letter(keys[4], names, now, raw, code, reason, route)
    else
      res = redis.pcall('XADD', keys[1], '*', unpack(flat))
    end
    if type(res) == 'table' and res.err then
      -- Redis does not roll a function back: an XADD that fails (a stream or DLQ key of
      -- another type, a stream whose last id is the maximal one) must not lose what was
      -- popped. The element goes back to the head of the inbox, where it was.
      redis.call('LPUSH', keys[3], raw)
      return redis.error_reply('ERR headrace_relay stopped after ' .. (added + dead)
        .. ' requests, the next one put back in the inbox: ' .. res.err)
    end
    if flat == nil then dead = dead + 1 else added = added + 1 end
  end
  return {added, dead, redis.call('LLEN', keys[3])}
end

redis.register_function{function_name = 'headrace_submit', callback = submit}
redis.register_function{function_name = 'headrace_relay', callback = relay}
redis.register_function{
  function_name = 'headrace_version',
  callback = function() return LIBRARY_VERSION end,
  flags = {'no-writes'},
}
