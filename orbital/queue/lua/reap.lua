-- ARGV: prefix, now, iso, job id, worker id, worker dead (1/0)
-- Hands back a claimed job whose lease is gone. Returns alive (lease held),
-- claiming (a live worker is between its pop and its start script), requeued,
-- lost, cancelled (a cancel whose worker died is finished here), ended or gone.
local jid, worker, dead = ARGV[4], ARGV[5], ARGV[6] == '1'
local claimed = k('worker', worker, 'claimed')
if not redis.call('LPOS', claimed, jid) then return 'gone' end
if redis.call('EXISTS', k('lease', jid)) == 1 then return 'alive' end

local j = load_job(jid)
if not j then
  redis.call('LREM', claimed, 0, jid)
  return 'gone'
end
if j.state == 'queued' and not dead then return 'claiming' end
redis.call('LREM', claimed, 0, jid)

local lab = triple_of(j) ~= nil
if j.state == 'cancelled' and tonumber(j.finished_at or '0') == 0 then
  local reason = 'worker ' .. worker .. ' died while cancelling'
  local build = nil
  if lab then build = minimal_build(j, 'cancelled', reason) end
  end_job(j, 'cancelled', build, {})
  return 'cancelled'
end
if TERMINAL[j.state] then return 'ended' end

if j.state == 'running' then
  local attempts = tonumber(j.attempts or '0')
  if attempts >= tonumber(j.max_attempts or '3') then
    local reason = 'lease lost ' .. attempts .. ' times; last worker ' .. worker
    local build = nil
    if lab then build = minimal_build(j, 'lost', reason) end
    emit('build.lost', j, {reason = reason})
    end_job(j, 'lost', build, {error = reason})
    return 'lost'
  end
end

set_state(jid, 'queued', {token = '', worker = '', requeued_at = NOW})
redis.call('RPUSH', k('queue', j.queue), jid)
return 'requeued'
