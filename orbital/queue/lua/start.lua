-- ARGV: prefix, now, iso, job id, worker id, token, lease ms
-- Called right after BLMOVE put the id in the worker's claimed list.
local jid, worker, token = ARGV[4], ARGV[5], ARGV[6]
local claimed = k('worker', worker, 'claimed')
local j = load_job(jid)
if not j then
  redis.call('LREM', claimed, 0, jid)
  return {'gone', ''}
end
if j.state ~= 'queued' then
  -- Cancelled (or otherwise ended) between the queue pop and this script.
  redis.call('LREM', claimed, 0, jid)
  return {'skip', j.state}
end

local attempts = tonumber(j.attempts or '0') + 1
redis.call('SET', k('lease', jid), worker, 'PX', ARGV[7])
set_state(jid, 'running', {worker = worker, token = token, started_at = NOW,
                           attempts = attempts})
j.worker, j.attempts, j.state = worker, tostring(attempts), 'running'

local wait = NOW - tonumber(j.enqueued_at or NOW)
if triple_of(j) then emit('build.started', j, {queue_wait_s = wait}) end
-- The job's record comes back with the answer: the worker needs it at once.
return {'ok', tostring(wait), redis.call('HGETALL', job_key(jid))}
