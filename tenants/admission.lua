-- Atomic admission of one session (see tenants/admission.py for the rules).
--
-- KEYS[1] idempotency record (hash {body, sid}) or "" when no Idempotency-Key
-- KEYS[2] rate      zset sid -> admission ms      (sliding 60 s window log)
-- KEYS[3] day       counter of the UTC day of now
-- KEYS[4] live      zset sid -> lease deadline ms (concurrency leases)
-- KEYS[5] sessions  zset sid -> created ms        (listing index)
-- KEYS[6] session   hash of the new session
-- KEYS[7] due:provision  zset "{tid}:{sid}" -> provisioning deadline
-- KEYS[8] due:expiry     zset "{tid}:{sid}" -> when to terminate
-- KEYS[9] end user  zset sid -> created ms        or "" when no end user
-- KEYS[10..13] the provisioning job to write with the admission: job key, result key,
--              queue zset, wake-up list (broker/sessions/jobs.py ENQUEUE), or "" when none
-- KEYS[14] stats hash: live status -> count of sessions (the transition script keeps it too)
-- KEYS[15] the tenant's key base (TenantScope.base()) for the budgets and usage counters (budget.lua)
--
-- ARGV: 1 now_ms, 2 sid, 3 sessions_per_minute, 4 sessions_per_day,
--       5 max_concurrent_sessions, 6 max_sessions_per_end_user, 7 end_user_policy,
--       8 body digest, 9 lease_until_ms, 10 provision_deadline_ms,
--       11 seconds to next UTC midnight, 12 session key prefix (".../s:"),
--       13 due member prefix ("{tid}:"), 14 job id, 15 job score, 16 job key TTL ms,
--       17 serialized job, 18 wake-up list cap, 19 budget spec (JSON, tenants/budgets.py),
--       20.. session field, value pairs
--
-- Nothing is written before every check has passed: a refusal (and a replay) leaves every
-- key as it was. Expired leases and rate entries that left the window are simply not
-- counted; an admission purges them.
--
-- Replies:
--   {"replayed", sid} | {"key_reused"}
--   {"refused", code, limit, current, retry_after_s, minute_used, minute_reset_s,
--    day_used, live_used, eu_used (-1: no end user)}
--   {"budget_exhausted", budget, limit, used, reserved, period_end_ms, retry_after_s}
--   {"admitted", minute_used, minute_reset_s, day_used, live_used, eu_used,
--    budget "<ttl>|<cut 0/1>|<thresholds>", replaced sid...}

local WINDOW = 60000
local DAY_TTL = 172800
local IDEM_TTL = 86400

local function int(n)
  return string.format('%d', n)
end

local now = tonumber(ARGV[1])
local sid = ARGV[2]
local per_minute = tonumber(ARGV[3])
local per_day = tonumber(ARGV[4])
local max_live = tonumber(ARGV[5])
local eu_cap = tonumber(ARGV[6])
local eu_policy = ARGV[7]
local body = ARGV[8]
local lease_until = tonumber(ARGV[9])
local provision_deadline = tonumber(ARGV[10])
local day_reset = tonumber(ARGV[11])
local session_prefix = ARGV[12]
local due_prefix = ARGV[13]
local FIELDS_AT = 20

local idem_key = KEYS[1]
local rate_key, day_key, live_key = KEYS[2], KEYS[3], KEYS[4]
local index_key, session_key = KEYS[5], KEYS[6]
local due_provision, due_expiry = KEYS[7], KEYS[8]
local eu_key = KEYS[9]
local has_idem = idem_key ~= ''
local has_eu = eu_key ~= ''

-- 1. idempotency: a recorded key answers before anything is counted
if has_idem then
  local rec = redis.call('HMGET', idem_key, 'body', 'sid')
  if rec[2] then
    if rec[1] == body then
      return {'replayed', rec[2]}
    end
    return {'key_reused'}
  end
end

-- 2. read everything (expired entries are not counted)
local window_open = '(' .. int(now - WINDOW)
local minute_used = redis.call('ZCOUNT', rate_key, window_open, '+inf')
local minute_reset = 0
local oldest = redis.call('ZRANGEBYSCORE', rate_key, window_open, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if oldest[2] then
  minute_reset = math.max(1, math.ceil((tonumber(oldest[2]) + WINDOW - now) / 1000))
end
local day_used = tonumber(redis.call('GET', day_key) or '0')
local live_used = redis.call('ZCOUNT', live_key, '(' .. int(now), '+inf')

local eu_live, eu_stale = {}, {}
if has_eu then
  -- oldest first; a member counts while it holds an unexpired lease in live
  for _, member in ipairs(redis.call('ZRANGE', eu_key, 0, -1)) do
    local lease = redis.call('ZSCORE', live_key, member)
    if lease and tonumber(lease) > now then
      eu_live[#eu_live + 1] = member
    else
      eu_stale[#eu_stale + 1] = member
    end
  end
end
local eu_used = has_eu and #eu_live or -1

local function refuse(code, limit, current, retry_after)
  return {'refused', code, limit, current, math.max(1, retry_after),
          minute_used, minute_reset, day_used, live_used, eu_used}
end

-- 3. checks, in order
if minute_used >= per_minute then
  local retry = minute_reset
  if retry == 0 then retry = WINDOW / 1000 end
  return refuse('rate_limited', per_minute, minute_used, retry)
end
if day_used >= per_day then
  return refuse('daily_quota_exhausted', per_day, day_used, day_reset)
end
local replaced = {}
if has_eu and #eu_live >= eu_cap then
  if eu_policy ~= 'replace_oldest' or eu_cap < 1 then
    return refuse('end_user_limit', eu_cap, #eu_live, 1)
  end
  for i = 1, #eu_live - eu_cap + 1 do
    replaced[i] = eu_live[i]
  end
end
if live_used - #replaced >= max_live then
  return refuse('concurrency_limit', max_live, live_used, 1)
end

-- 3b. budgets (tenants/budget.lua, prepended): the last check; on success it reserves the
-- session's seconds, writes its ttl_seconds (maybe cut) and counts it; on refusal nothing
local budget = budget_admit(KEYS[15], ARGV[19], session_key)
if budget[1] == 'budget_exhausted' then return budget end

-- 4. admit
redis.call('ZREMRANGEBYSCORE', live_key, '-inf', int(now))
redis.call('ZREMRANGEBYSCORE', rate_key, '-inf', int(now - WINDOW))

if #ARGV >= FIELDS_AT then
  redis.call('HSET', session_key, unpack(ARGV, FIELDS_AT))
end
redis.call('ZADD', index_key, int(now), sid)
redis.call('HINCRBY', KEYS[14], 'queued', 1)
redis.call('ZADD', live_key, int(lease_until), sid)
redis.call('ZADD', rate_key, int(now), sid)
local newest = redis.call('ZRANGE', rate_key, -1, -1, 'WITHSCORES')
-- one window after the newest entry (plus a window of slack for clock skew between callers)
redis.call('PEXPIRE', rate_key, int(math.max(tonumber(newest[2]), now) - now + 2 * WINDOW))
redis.call('INCR', day_key)
redis.call('EXPIRE', day_key, DAY_TTL)
redis.call('ZADD', due_provision, int(provision_deadline), due_prefix .. sid)
if has_idem then
  redis.call('HSET', idem_key, 'body', body, 'sid', sid)
  redis.call('EXPIRE', idem_key, IDEM_TTL)
end
-- the provisioning job, in the same step (arq's rule: not over an existing job or result)
if KEYS[10] ~= '' and redis.call('EXISTS', KEYS[10], KEYS[11]) == 0 then
  redis.call('SET', KEYS[10], ARGV[17], 'PX', ARGV[16])
  redis.call('ZADD', KEYS[12], ARGV[15], ARGV[14])
  redis.call('LPUSH', KEYS[13], '1')
  redis.call('LTRIM', KEYS[13], 0, tonumber(ARGV[18]) - 1)
end

for _, old in ipairs(replaced) do
  local old_key = session_prefix .. old
  local status = redis.call('HGET', old_key, 'status')
  if status == 'queued' or status == 'provisioning' or status == 'ready' then
    redis.call('HSET', old_key, 'status', 'terminating', 'termination_reason', 'replaced',
               'terminating_at', int(now))
    redis.call('HINCRBY', KEYS[14], status, -1)
    redis.call('HINCRBY', KEYS[14], 'terminating', 1)
    status = 'terminating'
  end
  if status == 'terminating' then
    redis.call('ZADD', due_expiry, int(now), due_prefix .. old)
  end
  redis.call('ZREM', live_key, old)
end
if has_eu then
  for _, old in ipairs(replaced) do
    redis.call('ZREM', eu_key, old)
  end
  for _, stale in ipairs(eu_stale) do
    redis.call('ZREM', eu_key, stale)
  end
  redis.call('ZADD', eu_key, int(now), sid)
end

local new_minute_reset = minute_reset
if minute_used == 0 then new_minute_reset = WINDOW / 1000 end
local reply = {'admitted', minute_used + 1, new_minute_reset, day_used + 1,
               live_used - #replaced + 1, has_eu and (#eu_live - #replaced + 1) or -1, budget[2]}
for _, old in ipairs(replaced) do
  reply[#reply + 1] = old
end
return reply
