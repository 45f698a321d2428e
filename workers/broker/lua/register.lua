-- REGISTER: registry heartbeat: merge this worker into <ns>:models[model] (JSON; the format
-- and its one reader are headrace.client.registry).
--   KEYS[1] registry hash; ARGV[1] model, ARGV[2] consumer, ARGV[3] worker JSON (a flat
--   object: version, backend, batching limits, host, pid), ARGV[4] servable description JSON
--   text ('' = keep), ARGV[5] stale_ms, ARGV[6] 'up'|'down'.
-- Times are Redis server time, so liveness does not depend on the workers' clocks. The
-- description is stored as text: cjson would turn its empty arrays into objects.
-- Race: workers of one model heartbeat concurrently; a client-side read-modify-write of the
-- shared JSON would drop other workers' entries.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stale = tonumber(ARGV[5])
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local info = {}
if raw then
  local ok, v = pcall(cjson.decode, raw)
  if ok and type(v) == 'table' then info = v end
end
local workers = {}
if type(info['workers']) == 'table' then
  for name, w in pairs(info['workers']) do
    if type(w) == 'table' and type(w['seen_ms']) == 'number' and now - w['seen_ms'] <= stale then
      workers[name] = w
    end
  end
end
local served = {}
if ARGV[6] == 'down' then
  workers[ARGV[2]] = nil
else
  local ok, w = pcall(cjson.decode, ARGV[3])
  if not ok or type(w) ~= 'table' then w = {} end
  w['seen_ms'] = now
  workers[ARGV[2]] = w
end
for _, w in pairs(workers) do
  if w['version'] ~= nil then served[tostring(w['version'])] = true end
end
local sigs = {}
if type(info['signatures']) == 'table' then sigs = info['signatures'] end
if ARGV[6] ~= 'down' and ARGV[4] ~= '' then
  local ok, w = pcall(cjson.decode, ARGV[3])
  local version = (ok and type(w) == 'table' and w['version'] ~= nil) and tostring(w['version']) or ''
  sigs[version] = {seen_ms = now, describe = ARGV[4]}
end
-- Keep the signatures of versions still served; when none is served, keep the newest one
-- so that a producer can still describe the model while its workers are away.
local newest, newest_ms = nil, -1
for v, e in pairs(sigs) do
  local ms = (type(e) == 'table' and type(e['seen_ms']) == 'number') and e['seen_ms'] or 0
  if ms > newest_ms then newest, newest_ms = v, ms end
end
local kept = {}
for v, e in pairs(sigs) do
  if served[v] or v == newest then kept[v] = e end
end
info['model'] = ARGV[1]
info['updated_ms'] = now
info['workers'] = workers
info['signatures'] = kept
local enc = cjson.encode(info)
redis.call('HSET', KEYS[1], ARGV[1], enc)
return enc
