-- Atomic admission of one session (see tenants/admission.py for the rules). Loaded after the
-- functions of tenants/mint_rate.lua (mint_peek, mint_take: tenants.mint_rate.lua_library()),
-- tenants/outbox.lua (append_event: the session.created event) and tenants/budget.lua.
--
-- KEYS[1] idempotency record (hash {body, sid}) or "" when no Idempotency-Key
-- KEYS[2] rate      zset sid -> admission ms      (sliding 60 s window log)
-- KEYS[3] day       counter of the UTC day of now
-- KEYS[4] live      zset sid -> lease deadline ms (concurrency leases)
-- KEYS[5] sessions  zset sid -> created ms        (listing index)
-- KEYS[6] session   hash of the new session
-- KEYS[7] due:expiry     zset "{tid}:{sid}" -> when to terminate
-- KEYS[8] end user  zset sid -> created ms        or "" when no end user
-- KEYS[9] stats hash: live status -> count of sessions (the transition script keeps it too)
-- KEYS[10] mint     hash {tat, last}: the tenant's GCRA mint schedule (tenants/mint_rate.lua)
-- KEYS[11] provision schedule  zset sid -> mint slot ms (the tenant's)
-- KEYS[12] provision tenants   zset tid -> earliest score of its schedule (global ring)
-- KEYS[13] provision wake-up list (global)
-- KEYS[14] the tenant's key base (TenantScope.base()) for the budgets and usage counters (budget.lua)
--
-- ARGV: 1 now_ms, 2 sid, 3 sessions_per_minute, 4 sessions_per_day,
--       5 max_concurrent_sessions, 6 max_sessions_per_end_user, 7 end_user_policy,
--       8 body digest, 9 lease_until_ms, 10 openai_requests_per_minute,
--       11 mint emission interval T (ms), 12 mint tolerance tau (ms),
--       13 mint window (ms: the latest slot admitted is now + this),
--       14 seconds to next UTC midnight, 15 session key prefix (".../s:"),
--       16 due member prefix ("{tid}:"), 17 tenant id, 18 wake-up list cap,
--       19 budget spec (JSON, tenants/budgets.py), 20.. session field, value pairs
--
-- Nothing is written before every check has passed: a refusal (and a replay) leaves every
-- key as it was. Expired leases and rate entries that left the window are simply not
-- counted; an admission purges them.
--
-- Mint pacing (openai_requests_per_minute): the slot this session would be granted is
-- computed without writing (mint_peek); if it is later than now + window, the request is
-- refused (provisioning_backlog), else the slot is taken (mint_take) with everything else,
-- stored as the session's mint_at and written to the provisioning schedule.
--
-- Replies:
--   {"replayed", sid} | {"key_reused"}
--   {"refused", code, limit, current, retry_after_s, minute_used, minute_reset_s,
--    day_used, live_used, eu_used (-1: no end user), mint_backlog, mint_remaining, mint_next}
--   {"budget_exhausted", budget, limit, used, reserved, period_end_ms, retry_after_s}
--   {"admitted", minute_used, minute_reset_s, day_used, live_used, eu_used,
--    mint_at, mint_backlog, mint_remaining, mint_next, budget "<ttl>|<cut 0/1>|<thresholds>",
--    replaced sid...}
-- mint_backlog: the tenant's sessions whose mint slot is after now (after this admission);
-- mint_remaining: sessions that would still be admitted now under the mint window;
-- mint_next: the slot the next request would get (ms).

local WINDOW = 60000
local DAY_TTL = 172800
local IDEM_TTL = 86400
local WAKE_AHEAD = 1000  -- a slot due within this of now wakes an idle worker

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
local mint_per_minute = tonumber(ARGV[10])
local mint_interval = tonumber(ARGV[11])
local mint_tau = tonumber(ARGV[12])
local mint_window = tonumber(ARGV[13])
local day_reset = tonumber(ARGV[14])
local session_prefix = ARGV[15]
local due_prefix = ARGV[16]
local tenant_id = ARGV[17]
local wake_cap = tonumber(ARGV[18])
local FIELDS_AT = 20

local idem_key = KEYS[1]
local rate_key, day_key, live_key = KEYS[2], KEYS[3], KEYS[4]
local index_key, session_key = KEYS[5], KEYS[6]
local due_expiry = KEYS[7]
local eu_key = KEYS[8]
local stats_key = KEYS[9]
local mint_key, schedule_key, ring_key, wake_key = KEYS[10], KEYS[11], KEYS[12], KEYS[13]
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

-- the mint slot this session would get (nothing written yet)
local latest = now + mint_window
local slot, tat, last = mint_peek(mint_key, now, mint_tau)

-- sessions whose slot is after now, given the schedule's tat (exact while T and tau are
-- unchanged: the j-th newest reservation was granted tat - j*T - tau, or its own now)
local function backlog(at_tat)
  return math.max(0, math.ceil((at_tat - mint_tau - now) / mint_interval) - 1)
end
-- sessions that would be admitted now, one after the other, given (tat, last)
local function remaining(at_tat, at_last)
  if at_last > latest then
    return 0
  end
  return math.max(0, math.floor((latest + mint_tau - at_tat) / mint_interval) + 1)
end

local function refuse(code, limit, current, retry_after)
  return {'refused', code, limit, current, math.max(1, retry_after),
          minute_used, minute_reset, day_used, live_used, eu_used,
          backlog(tat), remaining(tat, last), slot}
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
-- replace_oldest never lets live upstream sessions exceed max_concurrent_sessions (issue 17):
-- a replaced session whose upstream session may be live (its record says a create may have
-- happened: an avaturn_session_id, or create_state inflight/unknown/done) keeps its lease
-- until its termination ends it upstream, and the new session waits for it (`waits_for`:
-- the provisioning claim defers it while one of them is live); a replaced session that never
-- reached upstream frees its slot now, and hands the new session what it was waiting for.
-- The new session takes the replaced ones' slot: they (and what they waited for) are not
-- counted against it; every other admission counts them all until they end.
local keeps, waits, seen, inherited_live = {}, {}, {}, 0
for _, old in ipairs(replaced) do
  local f = redis.call('HMGET', session_prefix .. old, 'avaturn_session_id', 'create_state', 'waits_for')
  if (f[1] and f[1] ~= '') or f[2] == 'inflight' or f[2] == 'unknown' or f[2] == 'done' then
    keeps[old] = true
    if not seen[old] then seen[old] = true; waits[#waits + 1] = old end
  end
  if f[3] and f[3] ~= '' then
    for w in string.gmatch(f[3], '[^,]+') do
      local ws = redis.call('HGET', session_prefix .. w, 'status')
      if not seen[w] and (ws == 'queued' or ws == 'provisioning' or ws == 'ready' or ws == 'terminating') then
        seen[w] = true
        waits[#waits + 1] = w
        local lease = redis.call('ZSCORE', live_key, w)
        if lease and tonumber(lease) > now then inherited_live = inherited_live + 1 end
      end
    end
  end
end
if live_used - #replaced - inherited_live >= max_live then
  return refuse('concurrency_limit', max_live, live_used, 1)
end
if slot > latest then
  -- limit: the pacing itself (mints per minute); current: the sessions already waiting
  return refuse('provisioning_backlog', mint_per_minute, backlog(tat),
                math.ceil((slot - latest) / 1000))
end

-- 3b. budgets (tenants/budget.lua, prepended): the last check; on success it reserves the
-- session's seconds, writes its ttl_seconds (maybe cut) and counts it; on refusal nothing
local budget = budget_admit(KEYS[14], ARGV[19], session_key)
if budget[1] == 'budget_exhausted' then return budget end

-- 4. admit
redis.call('ZREMRANGEBYSCORE', live_key, '-inf', int(now))
redis.call('ZREMRANGEBYSCORE', rate_key, '-inf', int(now - WINDOW))

local new_tat = mint_take(mint_key, now, mint_interval, slot, tat)
if #ARGV >= FIELDS_AT then
  redis.call('HSET', session_key, 'mint_at', int(slot), unpack(ARGV, FIELDS_AT))
else
  redis.call('HSET', session_key, 'mint_at', int(slot))
end
redis.call('ZADD', index_key, int(now), sid)
redis.call('HINCRBY', stats_key, 'queued', 1)
redis.call('ZADD', live_key, int(lease_until), sid)
redis.call('ZADD', rate_key, int(now), sid)
local newest = redis.call('ZRANGE', rate_key, -1, -1, 'WITHSCORES')
-- one window after the newest entry (plus a window of slack for clock skew between callers)
redis.call('PEXPIRE', rate_key, int(math.max(tonumber(newest[2]), now) - now + 2 * WINDOW))
redis.call('INCR', day_key)
redis.call('EXPIRE', day_key, DAY_TTL)
if has_idem then
  redis.call('HSET', idem_key, 'body', body, 'sid', sid)
  redis.call('EXPIRE', idem_key, IDEM_TTL)
end
-- the provisioning schedule, in the same step: the session at its slot, its tenant in the
-- ring at its earliest score (LT: added if absent, only ever lowered), and a wake-up token
-- when the slot is (about to be) due
redis.call('ZADD', schedule_key, int(slot), sid)
redis.call('ZADD', ring_key, 'LT', int(slot), tenant_id)
if slot <= now + WAKE_AHEAD then
  redis.call('LPUSH', wake_key, '1')
  redis.call('LTRIM', wake_key, 0, wake_cap - 1)
end

local freed = 0
for _, old in ipairs(replaced) do
  local old_key = session_prefix .. old
  local status = redis.call('HGET', old_key, 'status')
  if status == 'queued' or status == 'provisioning' or status == 'ready' then
    redis.call('HSET', old_key, 'status', 'terminating', 'termination_reason', 'replaced',
               'terminating_at', int(now))
    redis.call('HINCRBY', stats_key, status, -1)
    redis.call('HINCRBY', stats_key, 'terminating', 1)
    status = 'terminating'
  end
  if status == 'terminating' then
    redis.call('ZADD', due_expiry, int(now), due_prefix .. old)
  end
  if not keeps[old] then
    redis.call('ZREM', live_key, old)
    freed = freed + 1
  end
end
if #waits > 0 then
  redis.call('HSET', session_key, 'waits_for', table.concat(waits, ','))
end
-- its event, in this same step (tenants/outbox.lua)
append_event(session_key, 'session.created')
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
               live_used - freed + 1, has_eu and (#eu_live - #replaced + 1) or -1,
               slot, backlog(new_tat), remaining(new_tat, slot), math.max(now, new_tat - mint_tau, slot),
               budget[2]}
for _, old in ipairs(replaced) do
  reply[#reply + 1] = old
end
return reply
