-- ARGV: prefix, now, iso, job id, worker id, token, final state,
--       build record JSON ('' for none), job fields JSON, events JSON
-- Events: a list of {type=..., data={...}, suffix=...}; the join fields are added here.
-- Returns {outcome, state}: outcome ended, stale (token no longer ours), final, gone.
local jid, worker, token = ARGV[4], ARGV[5], ARGV[6]
redis.call('LREM', k('worker', worker, 'claimed'), 0, jid)
local j = load_job(jid)
if not j then return {'gone', ''} end
if j.token ~= token then return {'stale', j.state} end

local state = ARGV[7]
local overridden = false
if j.state == 'cancelled' then
  overridden = state ~= 'cancelled'
  state = 'cancelled'
elseif TERMINAL[j.state] then
  return {'final', j.state}
end

local fields = cjson.decode(ARGV[9])
for key, value in pairs(fields) do j[key] = value end

local build = ARGV[8]
if build == '' then
  build = nil
elseif overridden then
  local record = cjson.decode(build)
  record.status = state
  build = cjson.encode(record)
end

end_job(j, state, build, fields)
for _, ev in ipairs(cjson.decode(ARGV[10])) do
  local data = ev.data or {}
  if overridden then data.status = state; data.passed = false end
  if not (overridden and ev.type == 'build.assertion.failed') then
    emit(ev.type, j, data, ev.suffix)
  end
end
return {'ended', state}
