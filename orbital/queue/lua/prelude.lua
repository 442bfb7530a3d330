-- Shared helpers prepended to every Orbital script.
--
-- Every script receives the key prefix as ARGV[1], the time as epoch seconds
-- in ARGV[2] and as ISO 8601 in ARGV[3], so all scripts agree on one clock
-- (the caller's) and stay deterministic for replication.
--
-- Some key names (the triple's lock, a deferred job's queue, a nightly run)
-- are only known from data inside Redis, so scripts derive them from the
-- prefix. That is fine on one server or under Sentinel; Redis Cluster is not
-- supported.
local P = ARGV[1]
local NOW = tonumber(ARGV[2])
local ISO = ARGV[3]

local TERMINAL = {passed=true, failed=true, error=true, timed_out=true,
                  cancelled=true, superseded=true, lost=true}
local FAILING = {failed=true, error=true, timed_out=true, lost=true}

local function k(...)
  return table.concat({P, ...}, ':')
end

local function job_key(jid) return k('job', jid) end

local function load_job(jid)
  local flat = redis.call('HGETALL', job_key(jid))
  if #flat == 0 then return nil end
  local j = {}
  for i = 1, #flat, 2 do j[flat[i]] = flat[i + 1] end
  return j
end

local function triple_of(j)
  if j.arch == nil or j.arch == '' or j.repo == '' then return nil end
  if j.type ~= 'integration-test' and j.type ~= 'unit-test' and j.type ~= 'daemon' then
    return nil
  end
  return j.repo .. '|' .. j.branch .. '|' .. j.arch
end

-- A CloudEvent in the outbox. Only fields with real values are set: an empty
-- commit or worker is left out rather than sent as a placeholder.
local function emit(etype, j, extra, id_suffix)
  local data = {}
  local join = {
    ['job.id'] = j.id, ['job.type'] = j.type, ['repository.name'] = j.repo,
    ['arch'] = j.arch, ['branch'] = j.branch, ['commit_sha'] = j.commit_sha,
    ['worker_id'] = j.worker, ['triggered_by'] = j.trigger,
    ['framework.version'] = j.framework_version, ['nightly.run_id'] = j.nightly_id,
    ['attempt'] = tonumber(j.attempts or '0'),
  }
  if (join['commit_sha'] == nil or join['commit_sha'] == '') then join['commit_sha'] = j.commit end
  for key, value in pairs(join) do
    if value ~= nil and value ~= '' then data[key] = value end
  end
  for key, value in pairs(extra or {}) do data[key] = value end
  local event = {
    specversion = '1.0',
    id = j.id .. '.' .. etype .. '.' .. (j.attempts or '0') .. (id_suffix or ''),
    source = 'orbital/' .. P,
    type = etype,
    subject = j.id,
    time = ISO,
    datacontenttype = 'application/json',
    data = data,
  }
  redis.call('XADD', k('events', 'outbox'), '*', 'e', cjson.encode(event))
end

local function set_state(jid, state, fields)
  local args = {'state', state}
  for key, value in pairs(fields or {}) do
    table.insert(args, key)
    table.insert(args, tostring(value))
  end
  redis.call('HSET', job_key(jid), unpack(args))
end

-- Count an ended job in its nightly run; the last one closes the run.
local function count_in_nightly(j, state)
  if j.nightly_id == nil or j.nightly_id == '' then return end
  local nk = k('nightly', j.nightly_id)
  if redis.call('EXISTS', nk) == 0 then return end
  local bucket = state
  if FAILING[state] then bucket = 'failed' end
  redis.call('HINCRBY', nk, bucket, 1)
  local ended = redis.call('HINCRBY', nk, 'ended', 1)
  local total = tonumber(redis.call('HGET', nk, 'total') or '0')
  if ended == total then
    local n = {}
    local flat = redis.call('HGETALL', nk)
    for i = 1, #flat, 2 do n[flat[i]] = flat[i + 1] end
    local passed = tonumber(n.passed or '0')
    local failed = tonumber(n.failed or '0')
    local started = tonumber(n.started_at or NOW)
    local rate = 0
    if passed + failed > 0 then rate = passed / (passed + failed) end
    redis.call('HSET', nk, 'finished_at', NOW, 'state', 'finished',
               'pass_rate', tostring(rate))
    local event = {
      specversion = '1.0', id = j.nightly_id .. '.nightly.summary',
      source = 'orbital/' .. P, type = 'nightly.summary', subject = j.nightly_id,
      time = ISO, datacontenttype = 'application/json',
      data = {['nightly.run_id'] = j.nightly_id, total = total, passed = passed,
              failed = failed, cancelled = tonumber(n.cancelled or '0'),
              superseded = tonumber(n.superseded or '0'),
              pass_rate = rate, duration_s = NOW - started},
    }
    redis.call('XADD', k('events', 'outbox'), '*', 'e', cjson.encode(event))
  end
end

-- Put a job whose hash exists into its queue, unless its triple is busy.
-- Returns 'queued' or 'deferred'.
local function admit(jid)
  local j = load_job(jid)
  local triple = triple_of(j)
  if triple then
    local lock = k('lock', triple)
    local holder = redis.call('GET', lock)
    if holder then
      local hstate = redis.call('HGET', job_key(holder), 'state')
      -- A lock whose holder ended or vanished is stale: it is taken over.
      if (not hstate) or TERMINAL[hstate] then holder = false end
    end
    if holder and holder ~= jid then
      local dkey = k('deferred', triple)
      local older = redis.call('GET', dkey)
      if older and older ~= jid then
        set_state(older, 'superseded', {superseded_by = jid, finished_at = NOW})
        redis.call('ZREM', k('jobs', 'active'), older)
        redis.call('ZADD', k('jobs', 'ended'), NOW, older)
        local o = load_job(older)
        emit('build.superseded', o, {['superseded_by'] = jid})
        count_in_nightly(o, 'superseded')
      end
      redis.call('SET', dkey, jid)
      set_state(jid, 'deferred', {deferred_behind = holder})
      j.state = 'deferred'
      emit('build.deferred', j, {['holder.job_id'] = holder})
      return 'deferred'
    end
    redis.call('SET', lock, jid)
    redis.call('SADD', k('locks'), triple)
  end
  set_state(jid, 'queued', {enqueued_at = NOW})
  redis.call('LPUSH', k('queue', j.queue), jid)
  redis.call('SADD', k('queues'), j.queue)
  return 'queued'
end

-- Release the triple lock held by jid and promote the deferred job, if any.
local function release_lock(j)
  local triple = triple_of(j)
  if not triple then return end
  local lock = k('lock', triple)
  if redis.call('GET', lock) ~= j.id then return end
  local dkey = k('deferred', triple)
  local next_jid = redis.call('GET', dkey)
  redis.call('DEL', dkey)
  if next_jid and redis.call('HGET', job_key(next_jid), 'state') == 'deferred' then
    redis.call('SET', lock, next_jid)
    local n = load_job(next_jid)
    set_state(next_jid, 'queued', {enqueued_at = NOW, deferred_behind = ''})
    redis.call('LPUSH', k('queue', n.queue), next_jid)
    redis.call('SADD', k('queues'), n.queue)
  else
    redis.call('DEL', lock)
    redis.call('SREM', k('locks'), triple)
  end
end

-- Record a build in every history index and the triage queue.
local function index_build(j, status, build_json)
  local bkey = k('build', j.id)
  if redis.call('SET', bkey, build_json, 'NX') == false then return false end
  local triple = triple_of(j)
  redis.call('ZADD', k('builds', 'all'), NOW, j.id)
  redis.call('ZADD', k('builds', 'repo', j.repo), NOW, j.id)
  if status == 'passed' then
    redis.call('ZADD', k('builds', 'passed'), NOW, j.id)
    redis.call('ZADD', k('builds', 'repo', j.repo, 'passed'), NOW, j.id)
  end
  if triple then
    redis.call('ZADD', k('builds', 'triple', triple), NOW, j.id)
    if status == 'passed' then
      redis.call('ZREM', k('triage'), triple)
    elseif FAILING[status] then
      redis.call('ZINCRBY', k('triage'), 1, triple)
    end
  end
  return true
end

-- A build record for a job that ended without its worker writing one.
local function minimal_build(j, status, reason)
  return cjson.encode({
    job_id = j.id, type = j.type, repo = j.repo, branch = j.branch, arch = j.arch,
    commit = j.commit, commit_sha = j.commit_sha, trigger = j.trigger,
    nightly_id = j.nightly_id, worker = j.worker, status = status,
    attempts = tonumber(j.attempts or '0'), steps = {}, failed_step = '',
    failure_summary = reason, queued_at = tonumber(j.enqueued_at or '0'),
    started_at = tonumber(j.started_at or '0'), finished_at = NOW,
  })
end

-- End a job: final state, lock released, counted, indexed.
local function end_job(j, state, build_json, fields)
  fields = fields or {}
  fields.finished_at = NOW
  fields.token = ''
  set_state(j.id, state, fields)
  j.state = state
  redis.call('ZREM', k('jobs', 'active'), j.id)
  redis.call('ZADD', k('jobs', 'ended'), NOW, j.id)
  redis.call('DEL', k('lease', j.id))
  release_lock(j)
  count_in_nightly(j, state)
  if build_json then index_build(j, state, build_json) end
end
