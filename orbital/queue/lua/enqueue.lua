-- ARGV: prefix, now, iso, job id, job fields (JSON object of strings), due time (0 = now)
-- Returns {outcome, detail}: outcome is queued, deferred (detail: holder), scheduled,
-- or exists (detail: the existing job's state).
local jid = ARGV[4]
local jkey = job_key(jid)
if redis.call('EXISTS', jkey) == 1 then
  return {'exists', redis.call('HGET', jkey, 'state') or ''}
end

local args = {}
for key, value in pairs(cjson.decode(ARGV[5])) do
  table.insert(args, key)
  table.insert(args, value)
end
redis.call('HSET', jkey, unpack(args))
redis.call('ZADD', k('jobs', 'active'), NOW, jid)

local due = tonumber(ARGV[6])
if due > NOW then
  set_state(jid, 'scheduled', {due_at = due})
  redis.call('ZADD', k('delayed'), due, jid)
  return {'scheduled', ''}
end

local outcome = admit(jid)
return {outcome, redis.call('HGET', jkey, 'deferred_behind') or ''}
