-- Atomic state transition of one session, with its indexes (lib.lua is prepended).
-- KEYS: 1 session hash, 2 live zset (leases), 3 end-user zset (or ""-named dummy),
--       4 due:expiry zset, 5 the tenant's provisioning schedule, 6 stats hash (live status -> count),
--       7 the ring of tenants with scheduled provisioning, 8 due:expiring zset (session.expiring)
-- ARGV: 1 allowed from-statuses, comma separated, or "*" for any live status
--       2 new status, or "" to keep it
--       3 lease: "" keep | "del" release (also from the end-user zset) | score (ms)
--       4 due expiry: "" | "del" | score
--       5 provisioning schedule: "" | "del" | score (when the scheduler takes it next)
--       6 due member "{tid}:{sid}"             7 session id
--       8 pub/sub channel or ""                9 retention seconds on terminal or ""
--       10 n: number of field/value pairs to HSET
--       11 tenant id
--       12.. the pairs, then fields to HDEL
-- A transition to a terminal status (terminated, failed) also drops the fields a retained record
-- no longer needs: TERMINAL_DROP, defined before this script by broker/sessions/terminal.py, and
-- settles the session's budget reservation and billable seconds (budget_settle, composed there too).
-- A change to ready, failed or terminated appends its event (append_event, tenants/outbox.lua).
-- A change to ready puts the session in due:expiring at its expires_at (the worker's expiring
-- loop records session.expiring from there, workers/expiry.py); leaving ready takes it out.
-- Returns {1, new status, usage.threshold_reached events recorded by the settle} when applied,
-- {0, current status} when not allowed, {-1, ""} if missing.
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {-1, ''} end
local allowed = false
if ARGV[1] == '*' then
  allowed = (st == 'queued' or st == 'provisioning' or st == 'ready' or st == 'terminating')
else
  for s in string.gmatch(ARGV[1], '[^,]+') do
    if s == st then allowed = true; break end
  end
end
if not allowed then return {0, st} end

local new = ARGV[2]
if new == '' then new = st end
set_status(KEYS[1], KEYS[6], st, new)

local n = tonumber(ARGV[10])
local i = 12
if n > 0 then
  local pairs_ = {}
  for j = 0, 2 * n - 1 do pairs_[#pairs_ + 1] = ARGV[i + j] end
  redis.call('HSET', KEYS[1], unpack(pairs_))
end
i = i + 2 * n
if #ARGV >= i then
  local dels = {}
  for j = i, #ARGV do dels[#dels + 1] = ARGV[j] end
  redis.call('HDEL', KEYS[1], unpack(dels))
end
if new == 'terminated' or new == 'failed' then redis.call('HDEL', KEYS[1], unpack(TERMINAL_DROP)) end
local crossed = 0
if new ~= st and (new == 'terminated' or new == 'failed') then crossed = budget_settle(KEYS[1], nil) end  -- tenants/budget.lua
-- the change's event, in this same step, once the record holds the new state (tenants/outbox.lua)
if new ~= st and (new == 'ready' or new == 'failed' or new == 'terminated') then
  append_event(KEYS[1], 'session.' .. new)
end

local sid, member, tid = ARGV[7], ARGV[6], ARGV[11]
if new ~= st and new == 'ready' then
  local expires_at = redis.call('HGET', KEYS[1], 'expires_at')
  if expires_at then redis.call('ZADD', KEYS[8], expires_at, member) end
elseif new ~= st and st == 'ready' or new == 'terminated' or new == 'failed' then
  redis.call('ZREM', KEYS[8], member)
end
if ARGV[3] == 'del' then
  redis.call('ZREM', KEYS[2], sid)
  redis.call('ZREM', KEYS[3], sid)
elseif ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[2], 'XX', ARGV[3], sid)
end
if ARGV[4] == 'del' then redis.call('ZREM', KEYS[4], member)
elseif ARGV[4] ~= '' then redis.call('ZADD', KEYS[4], ARGV[4], member) end
if ARGV[5] == 'del' then unschedule(KEYS[5], KEYS[7], tid, sid)
elseif ARGV[5] ~= '' then schedule(KEYS[5], KEYS[7], tid, sid, ARGV[5]) end
if ARGV[9] ~= '' then redis.call('EXPIRE', KEYS[1], ARGV[9]) end
if ARGV[8] ~= '' then redis.call('PUBLISH', ARGV[8], new) end
return {1, new, crossed}
