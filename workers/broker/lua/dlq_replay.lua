-- DLQ_REPLAY: replay one dead letter: re-add its original fields to the request stream,
-- forget the request's dedupe marker, delete the dead letter.
--   KEYS[1] dlq, KEYS[2] request stream, KEYS[3] done marker (optional);
--   ARGV[1] dlq entry id, ARGV[2] expected request id ('' = none), ARGV[3] the prefix of
--   the dead-letter fields (headrace.workers.pipeline.ops.DLQ_PREFIX), left out.
--   Returns the new id or false.
-- Race: two operators replaying the same DLQ concurrently would re-queue an entry twice;
-- the existence check and XDEL in one script make the second a no-op.
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return false end
local f = e[1][2]
local prefix = ARGV[3]
local out = {}
local rid = ''
for i = 1, #f, 2 do
  if string.sub(f[i], 1, #prefix) ~= prefix then
    out[#out + 1] = f[i]
    out[#out + 1] = f[i + 1]
  end
  if f[i] == 'id' then rid = f[i + 1] end
end
if rid ~= ARGV[2] then return false end
if #out == 0 then return false end
if KEYS[3] then redis.call('DEL', KEYS[3]) end
local nid = redis.call('XADD', KEYS[2], '*', unpack(out))
redis.call('XDEL', KEYS[1], ARGV[1])
return nid
