-- Session-second budgets and usage counters (tenants/budgets.py explains the rules).
-- Composed (prepended) into tenants/admission.lua (budget_admit) and into every script that
-- records a terminal status (budget_settle: broker/sessions/transition.lua,
-- broker/sessions/termination_finish.lua, through broker/sessions/terminal.py). Defines Lua functions only,
-- and calls append_tenant_event (tenants/outbox.lua): the outbox must be prepended BEFORE this
-- file (a Lua local function is visible only after its definition).
--
-- Keys, all under the tenant's base (TenantScope.base(): the same names as tenants/scope.py's
-- TenantScope.budget_month / budget_end_users / usage_day / usage_hour):
--   budget:{yyyymm}      hash used, reserved, t50/t80/t100 (threshold recorded)        month + 40 d
--   budget:{yyyymm}:eu   hash u:{eu}, r:{eu}, t50:{eu}... (the same, per end user)     month + 40 d
--   usage:d:{yyyymmdd}   hash s, b, s:{eu}, b:{eu} (sessions admitted, billable seconds)  400 d
--   usage:h:{yyyymmddhh} hash (the same per UTC hour)                                     31 d
--   events               the tenant's event stream: usage.threshold_reached (append_tenant_event)
-- A session's seconds count in the month, day and hour in which it was admitted (its
-- reservation lives there); the session hash keeps where (budget_base, budget_period,
-- budget_reserved, budget_limits, usage_day, usage_hour) so the settle needs no clock.

local BUDGET_MIN_TTL = 10
local BUDGET_THRESHOLDS = {50, 80, 100}

local function budget_int(n)
  return string.format('%d', n)
end

-- "2026-11-01T00:00:00Z": the ISO start of the UTC month after `period` (yyyymm), i.e. when it ends.
local function budget_period_end(period)
  local y, m = tonumber(string.sub(period, 1, 4)), tonumber(string.sub(period, 5, 6))
  if m == 12 then y, m = y + 1, 1 else m = m + 1 end
  return string.format('%04d-%02d-01T00:00:00Z', y, m)
end

-- Record each threshold of one budget that committed seconds (used + reserved) reach, once
-- per period (flag field HSETNX in the budget hash): a usage.threshold_reached event in the
-- tenant's event stream, in this same step. Returns how many were recorded.
local function budget_thresholds(base, hkey, flag_suffix, budget, limit, used, reserved, period, end_user, now)
  if limit < 0 then return 0 end
  local committed = used + reserved
  local n = 0
  for _, pct in ipairs(BUDGET_THRESHOLDS) do
    if committed * 100 >= pct * limit and
        redis.call('HSETNX', hkey, 't' .. pct .. flag_suffix, budget_int(now)) == 1 then
      local data = {budget = budget, percent = pct, limit = limit, used = used, reserved = reserved,
                    committed = committed, period = string.sub(period, 1, 4) .. '-' .. string.sub(period, 5, 6),
                    period_end = budget_period_end(period)}
      if end_user ~= '' then data.end_user = end_user end
      append_tenant_event(base, 'usage.threshold_reached', cjson.encode(data), '')
      n = n + 1
    end
  end
  return n
end

-- Admission: check every budget that applies and, when the session fits (its TTL possibly
-- cut), reserve it and count the admission. Called after every other check has passed,
-- before the admission's own writes; writes nothing when it refuses.
-- base: the tenant's key base; spec: JSON from tenants/budgets.py admission_spec().
-- Returns {'budget_exhausted', budget, limit, used, reserved, period_end_ms, retry_after_s}
-- or {'ok', '<granted ttl>|<limited 0/1>|<thresholds recorded>'}.
local function budget_admit(base, spec_json, session_key)
  local spec = cjson.decode(spec_json)
  local now, ttl, eu = spec.now, spec.ttl, spec.eu
  local mkey = base .. 'budget:' .. spec.p
  local ekey = mkey .. ':eu'
  local m_used, m_res, e_used, e_res = 0, 0, 0, 0  -- read only where a budget applies
  if spec.m >= 0 then
    local m = redis.call('HMGET', mkey, 'used', 'reserved')
    m_used, m_res = tonumber(m[1] or '0'), tonumber(m[2] or '0')
  end
  if eu ~= '' and spec.e >= 0 then
    local e = redis.call('HMGET', ekey, 'u:' .. eu, 'r:' .. eu)
    e_used, e_res = tonumber(e[1] or '0'), tonumber(e[2] or '0')
  end
  local granted, binding = ttl, nil
  if spec.m >= 0 then
    local left = spec.m - m_used - m_res
    if left < granted then granted, binding = left, {'session_seconds_per_month', spec.m, m_used, m_res} end
  end
  if eu ~= '' and spec.e >= 0 then
    local left = spec.e - e_used - e_res
    if left < granted then
      granted, binding = left, {'session_seconds_per_end_user_per_month', spec.e, e_used, e_res}
    end
  end
  if granted < BUDGET_MIN_TTL then
    return {'budget_exhausted', binding[1], binding[2], binding[3], binding[4], budget_int(spec.pe),
            math.max(1, math.ceil((spec.pe - now) / 1000))}
  end
  local keep_month = math.max(1, math.ceil((spec.pe - now) / 1000)) + 40 * 86400
  redis.call('HINCRBY', mkey, 'reserved', granted)
  redis.call('EXPIRE', mkey, keep_month)
  local crossed = budget_thresholds(base, mkey, '', 'session_seconds_per_month', spec.m,
                                    m_used, m_res + granted, spec.p, '', now)
  if eu ~= '' then
    redis.call('HINCRBY', ekey, 'r:' .. eu, granted)
    redis.call('EXPIRE', ekey, keep_month)
    if spec.e >= 0 then
      crossed = crossed + budget_thresholds(base, ekey, ':' .. eu, 'session_seconds_per_end_user_per_month',
                                            spec.e, e_used, e_res + granted, spec.p, eu, now)
    end
  end
  for _, w in ipairs({{'usage:d:' .. spec.d, 400 * 86400}, {'usage:h:' .. spec.h, 31 * 86400}}) do
    local key = base .. w[1]
    redis.call('HINCRBY', key, 's', 1)
    if eu ~= '' then redis.call('HINCRBY', key, 's:' .. eu, 1) end
    redis.call('EXPIRE', key, w[2] + 86400)
  end
  local limited = granted < ttl
  redis.call('HSET', session_key, 'ttl_seconds', granted, 'budget_base', base, 'budget_period', spec.p,
             'budget_reserved', granted, 'budget_limits', budget_int(spec.m) .. ',' .. budget_int(spec.e),
             'usage_day', spec.d, 'usage_hour', spec.h)
  if limited then redis.call('HSET', session_key, 'ttl_limited_by', 'budget') end
  return {'ok', budget_int(granted) .. '|' .. (limited and '1' or '0') .. '|' .. budget_int(crossed)}
end

-- Terminal transition: record billable_seconds (ready_at -> end, rounded up; 0 if never
-- ready) once, add it to the period's used seconds and the usage windows, and return the
-- session's reservation at once. end_ms: the terminal time (nil: the hash's terminated_at,
-- else Redis's clock). A record admitted before budgets existed only gets billable_seconds.
-- Returns how many usage.threshold_reached events it recorded (the caller counts them in
-- broker_usage_thresholds_total): a settle crosses a threshold when the session's billable
-- seconds exceed its reservation (it was billed until it actually ended: expiry lateness,
-- rounding up, a DELETE retried upstream while terminating).
local function budget_settle(session_key, end_ms)
  local f = redis.call('HMGET', session_key, 'billable_seconds', 'ready_at', 'terminated_at', 'end_user',
                       'budget_base', 'budget_period', 'budget_reserved', 'budget_limits', 'usage_day', 'usage_hour')
  if f[1] then return 0 end
  if not end_ms then
    end_ms = tonumber(f[3] or '')
    if not end_ms or end_ms <= 0 then
      local t = redis.call('TIME')
      end_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
  end
  local ready = tonumber(f[2] or '0') or 0
  local billable = 0
  if ready > 0 then billable = math.max(0, math.ceil((end_ms - ready) / 1000)) end
  redis.call('HSET', session_key, 'billable_seconds', billable)
  local base, period = f[5], f[6]
  if not base or not period then return 0 end
  local eu, reserved = f[4] or '', tonumber(f[7] or '0')
  local limits = {}
  for v in string.gmatch(f[8] or '-1,-1', '[^,]+') do limits[#limits + 1] = tonumber(v) end
  local mkey = base .. 'budget:' .. period
  if redis.call('EXISTS', mkey) == 0 then return 0 end  -- the period's accounting has expired (40 d after it)
  local used = redis.call('HINCRBY', mkey, 'used', billable)
  local res = redis.call('HINCRBY', mkey, 'reserved', -reserved)
  local crossed = budget_thresholds(base, mkey, '', 'session_seconds_per_month', limits[1] or -1, used, res,
                                    period, '', end_ms)
  if eu ~= '' then
    local ekey = mkey .. ':eu'
    local e_used = redis.call('HINCRBY', ekey, 'u:' .. eu, billable)
    local e_res = redis.call('HINCRBY', ekey, 'r:' .. eu, -reserved)
    crossed = crossed + budget_thresholds(base, ekey, ':' .. eu, 'session_seconds_per_end_user_per_month',
                                          limits[2] or -1, e_used, e_res, period, eu, end_ms)
  end
  for _, w in ipairs({'usage:d:' .. (f[9] or ''), 'usage:h:' .. (f[10] or '')}) do
    if billable > 0 and redis.call('EXISTS', base .. w) == 1 then
      redis.call('HINCRBY', base .. w, 'b', billable)
      if eu ~= '' then redis.call('HINCRBY', base .. w, 'b:' .. eu, billable) end
    end
  end
  return crossed
end
