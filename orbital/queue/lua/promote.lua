-- ARGV: prefix, now, iso, batch size. Admits scheduled jobs that are due.
local due = redis.call('ZRANGEBYSCORE', k('delayed'), '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[4]))
local admitted = 0
for _, jid in ipairs(due) do
  redis.call('ZREM', k('delayed'), jid)
  if redis.call('HGET', job_key(jid), 'state') == 'scheduled' then
    admit(jid)
    admitted = admitted + 1
  end
end
return admitted
