-- ARGV: prefix, now, iso, job id, token, fields JSON
-- Sets fields on a running job only while the caller still holds it.
local jid, token = ARGV[4], ARGV[5]
if redis.call('HGET', job_key(jid), 'token') ~= token then return 0 end
local args = {}
for key, value in pairs(cjson.decode(ARGV[6])) do
  table.insert(args, key)
  table.insert(args, tostring(value))
end
if #args > 0 then redis.call('HSET', job_key(jid), unpack(args)) end
return 1
