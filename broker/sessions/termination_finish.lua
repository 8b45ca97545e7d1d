-- Record `terminated` for a batch of sessions whose upstream session is gone (lib.lua of
-- broker/sessions is prepended): per session the same writes as transition.lua does for
-- finish_terminated (workers/jobs/common.py): from any live status, status terminated
-- (set_status: the stats count), terminated_at, termination_reason (kept if set, else the
-- given one), the fields a retained record no longer needs dropped (TERMINAL_DROP, from
-- broker/sessions/terminal.py), billable seconds settled, the session.terminated event appended
-- (tenants/outbox.lua), the lease released (live zset
-- and end-user zset), out of the termination, expiring and provisioning schedules, the retention TTL,
-- the new status published. Keep the two in step.
-- KEYS: 1 due:expiry, 2 the ring of tenants with scheduled provisioning, 3 stats hash,
--       4 due:expiring, then per session i: 4i+1 session hash, 4i+2 the tenant's live zset,
--       4i+3 its end-user zset, 4i+4 the tenant's provisioning schedule
-- ARGV: 1 now (ms), 2 retention seconds, then per session i: session id, due member,
--       events channel, reason when none is recorded, tenant id
-- Returns per session: {the termination reason recorded, usage.threshold_reached events its
-- budget settle recorded} when applied, false when the session was missing or already terminal.
local now, retention = ARGV[1], ARGV[2]
local out = {}
for i = 1, (#KEYS - 4) / 4 do
  local a = 5 * i - 2
  local sid, member, channel, reason, tid = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local hkey = KEYS[4 * i + 1]
  local st = redis.call('HGET', hkey, 'status')
  if st == 'queued' or st == 'provisioning' or st == 'ready' or st == 'terminating' then
    local recorded = redis.call('HGET', hkey, 'termination_reason')
    if recorded and recorded ~= '' then reason = recorded end
    set_status(hkey, KEYS[3], st, 'terminated')
    redis.call('HSET', hkey, 'terminated_at', now, 'termination_reason', reason)
    redis.call('HDEL', hkey, unpack(TERMINAL_DROP))
    local crossed = budget_settle(hkey, tonumber(now))  -- billable_seconds, budgets, usage (tenants/budget.lua)
    append_event(hkey, 'session.terminated')  -- its event, same step (tenants/outbox.lua)
    redis.call('ZREM', KEYS[4 * i + 2], sid)
    redis.call('ZREM', KEYS[4 * i + 3], sid)
    redis.call('ZREM', KEYS[1], member)
    redis.call('ZREM', KEYS[4], member)
    unschedule(KEYS[4 * i + 4], KEYS[2], tid, sid)
    redis.call('EXPIRE', hkey, retention)
    redis.call('PUBLISH', channel, 'terminated')
    out[i] = {reason, crossed}
  else
    out[i] = false
  end
end
return out
