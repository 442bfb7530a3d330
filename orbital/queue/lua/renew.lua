-- ARGV: prefix, now, iso, job id, worker id, token, lease ms
-- Returns ok, cancelled (keep the lease while killing), or lost (stop at once).
local jid, worker, token = ARGV[4], ARGV[5], ARGV[6]
local s = redis.call('HMGET', job_key(jid), 'state', 'token')
if s[2] ~= token then return 'lost' end
if s[1] ~= 'running' and s[1] ~= 'cancelled' then return 'lost' end
local holder = redis.call('GET', k('lease', jid))
if holder and holder ~= worker then return 'lost' end
redis.call('SET', k('lease', jid), worker, 'PX', ARGV[7])
if s[1] == 'cancelled' then return 'cancelled' end
return 'ok'
