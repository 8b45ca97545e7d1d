-- Shared pieces of the session scripts (transition.lua, provision_claim.lua, and the
-- termination_finish.lua): prepended to each of them by broker/sessions/lua.py, so a status
-- change or a schedule change is written the same way by every script that makes it.

-- The status of session `hkey` goes from `st` to `new`, the live-status counts (`stats` hash:
-- status -> number of sessions in it, for the live statuses only) kept in step.
local function set_status(hkey, stats, st, new)
  if new == st then return end
  redis.call('HSET', hkey, 'status', new)
  redis.call('HINCRBY', stats, st, -1)
  if new == 'queued' or new == 'provisioning' or new == 'ready' or new == 'terminating' then
    redis.call('HINCRBY', stats, new, 1)
  end
end

-- Session `sid` of tenant `tid` is taken by the provisioning scheduler at `score` (ms): its
-- entry in the tenant's schedule `sched`, and the tenant's entry in the ring of tenants with
-- scheduled work never later than that (LT: added when absent, only ever lowered here).
local function schedule(sched, ring, tid, sid, score)
  redis.call('ZADD', sched, score, sid)
  redis.call('ZADD', ring, 'LT', score, tid)
end

-- Session `sid` leaves the provisioning schedule; a tenant with nothing left scheduled leaves
-- the ring (a ring score left lower than the tenant's earliest entry is corrected by the
-- next claim that looks at the tenant).
local function unschedule(sched, ring, tid, sid)
  if redis.call('ZREM', sched, sid) == 1 and redis.call('ZCARD', sched) == 0 then
    redis.call('ZREM', ring, tid)
  end
end
