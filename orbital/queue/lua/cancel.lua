-- ARGV: prefix, now, iso, job id, reason
-- Returns {outcome, previous state}: cancelled (ended now), cancelling (a worker
-- runs it and will kill it), final (already ended), unknown.
local jid, reason = ARGV[4], ARGV[5]
local j = load_job(jid)
if not j then return {'unknown', ''} end
local prev = j.state
if TERMINAL[prev] then return {'final', prev} end

if prev == 'running' then
  set_state(jid, 'cancelled', {cancel_reason = reason, cancelled_at = NOW})
  j.state = 'cancelled'
  emit('build.cancelled', j, {reason = reason, previous_state = prev})
  redis.call('PUBLISH', k('cancel'), jid)
  return {'cancelling', prev}
end

local triple = triple_of(j)
if prev == 'scheduled' then
  redis.call('ZREM', k('delayed'), jid)
elseif prev == 'deferred' and triple then
  if redis.call('GET', k('deferred', triple)) == jid then
    redis.call('DEL', k('deferred', triple))
  end
elseif prev == 'queued' then
  redis.call('LREM', k('queue', j.queue), 0, jid)
end

emit('build.cancelled', j, {reason = reason, previous_state = prev})
local build = nil
if triple then build = minimal_build(j, 'cancelled', 'cancelled while ' .. prev .. ': ' .. reason) end
end_job(j, 'cancelled', build, {cancel_reason = reason, cancelled_at = NOW})
return {'cancelled', prev}
