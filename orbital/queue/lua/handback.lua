-- ARGV: prefix, now, iso, job id, worker id, token
-- A draining worker returns a job it will not finish: back to the head of its
-- queue, and the attempt does not count (the worker did not die).
local jid, worker, token = ARGV[4], ARGV[5], ARGV[6]
redis.call('LREM', k('worker', worker, 'claimed'), 0, jid)
local j = load_job(jid)
if not j or j.token ~= token then return 'stale' end
redis.call('DEL', k('lease', jid))
if j.state == 'cancelled' then
  local build = nil
  if triple_of(j) then build = minimal_build(j, 'cancelled', 'cancelled while its worker drained') end
  end_job(j, 'cancelled', build, {})
  return 'cancelled'
end
if j.state ~= 'running' then return 'final' end
local attempts = math.max(0, tonumber(j.attempts or '1') - 1)
set_state(jid, 'queued', {token = '', worker = '', attempts = attempts, requeued_at = NOW})
redis.call('RPUSH', k('queue', j.queue), jid)
return 'requeued'
