-- Record `terminated` for a batch of sessions whose upstream session is gone: per session the
-- same writes as transition.lua does for finish_terminated (workers/jobs/common.py): from
-- any live status, status terminated, terminated_at, termination_reason (kept if set, else
-- the given one), the stats count, the fields a retained record no longer needs dropped
-- (TERMINAL_DROP, defined before this script by broker/sessions/terminal.py), the lease
-- released (live zset and end-user zset), both due entries removed, the retention TTL, the
-- new status published. Keep the two in step.
-- KEYS: 1 due:expiry, 2 due:provision, 3 stats hash (live status -> count),
--       then per session i: 3i+1 session hash, 3i+2 the tenant's live zset, 3i+3 its end-user zset
-- ARGV: 1 now (ms), 2 retention seconds, then per session i: session id, due member,
--       events channel, reason when none is recorded
-- Returns per session: the termination reason recorded when applied, false when the session
-- was missing or already terminal.
local now, retention = ARGV[1], ARGV[2]
local out = {}
for i = 1, (#KEYS - 3) / 3 do
  local sid, member, channel, reason = ARGV[4 * i - 1], ARGV[4 * i], ARGV[4 * i + 1], ARGV[4 * i + 2]
  local hkey = KEYS[3 * i + 1]
  local st = redis.call('HGET', hkey, 'status')
  if st == 'queued' or st == 'provisioning' or st == 'ready' or st == 'terminating' then
    local recorded = redis.call('HGET', hkey, 'termination_reason')
    if recorded and recorded ~= '' then reason = recorded end
    redis.call('HSET', hkey, 'status', 'terminated', 'terminated_at', now, 'termination_reason', reason)
    redis.call('HINCRBY', KEYS[3], st, -1)
    redis.call('HDEL', hkey, unpack(TERMINAL_DROP))
    budget_settle(hkey, tonumber(now))  -- billable_seconds, budgets, usage (tenants/budget.lua)
    redis.call('ZREM', KEYS[3 * i + 2], sid)
    redis.call('ZREM', KEYS[3 * i + 3], sid)
    redis.call('ZREM', KEYS[1], member)
    redis.call('ZREM', KEYS[2], member)
    redis.call('EXPIRE', hkey, retention)
    redis.call('PUBLISH', channel, 'terminated')
    out[i] = reason
  else
    out[i] = false
  end
end
return out
