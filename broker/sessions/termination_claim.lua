-- (lib.lua of broker/sessions is prepended.) Claim due terminations: each listed session that is due (its score in the due:expiry zset
-- <= ARGV[2]) is taken for CLAIM: its score is moved to ARGV[3] (now + the claim lease), so
-- no other worker takes it until the lease runs out (then anyone may: a worker that died
-- mid-DELETE loses nothing). A `ready` session is moved to `terminating` first, exactly as
-- transition.lua does for the expiry (status, stats counts, reason `expired`, terminating_at,
-- the lease in the live zset, the status published on the session's events channel).
-- KEYS: 1 due:expiry zset, 2 stats hash (live status -> count),
--       then per session i (1-based): 2i+1 session hash, 2i+2 the tenant's live zset
-- ARGV: 1 now (ms), 2 due until (ms), 3 claimed until (ms), 4 live-zset lease for a session
--       moved to terminating (ms), 5 due until for a first attempt at a stop (a `terminating`
--       session not expired, no DELETE tried yet: its stop job makes that attempt, the
--       expiry loop only once it is late), 6 F: number of record fields to return,
--       7..6+F their names, then per session i: due member "{tid}:{sid}", session id, events channel
-- Returns one entry per session, in order: {"claimed", field values...} | {"not_due"} |
--   {"gone"} (missing or terminal: dropped from the due set) | {"provisioning"} (queued or
--   provisioning: the provisioning path owns it; looked at again after the lease).
-- A session missing from the due set counts as due (ready: at its expires_at), so a lost
-- due entry never leaves a session running.
local now, due_until, claim_until, lease = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local stop_due_until = tonumber(ARGV[5])
local nf = tonumber(ARGV[6])
local fields = {}
for j = 1, nf do fields[j] = ARGV[6 + j] end
local base = 6 + nf
local due_key, stats = KEYS[1], KEYS[2]
local out = {}
for i = 1, (#KEYS - 2) / 2 do
  local member, sid, channel = ARGV[base + 3 * i - 2], ARGV[base + 3 * i - 1], ARGV[base + 3 * i]
  local hkey, live = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local st = redis.call('HGET', hkey, 'status')
  if st ~= 'queued' and st ~= 'provisioning' and st ~= 'ready' and st ~= 'terminating' then
    redis.call('ZREM', due_key, member)
    out[i] = {'gone'}
  else
    local score = tonumber(redis.call('ZSCORE', due_key, member))
    if not score then
      score = (st == 'ready') and (tonumber(redis.call('HGET', hkey, 'expires_at')) or 0) or 0
    end
    local limit = due_until
    if st == 'terminating' and stop_due_until < due_until
        and redis.call('HGET', hkey, 'termination_reason') ~= 'expired'
        and (tonumber(redis.call('HGET', hkey, 'delete_attempts')) or 0) == 0 then
      limit = stop_due_until
    end
    if score > limit then
      out[i] = {'not_due'}
    elseif st == 'queued' or st == 'provisioning' then
      redis.call('ZADD', due_key, claim_until, member)
      out[i] = {'provisioning'}
    else
      if st == 'ready' then
        set_status(hkey, stats, 'ready', 'terminating')
        redis.call('HSET', hkey, 'termination_reason', 'expired', 'terminating_at', now)
        redis.call('ZADD', live, 'XX', lease, sid)
        redis.call('PUBLISH', channel, 'terminating')
      end
      redis.call('ZADD', due_key, claim_until, member)
      local row = redis.call('HMGET', hkey, unpack(fields))
      table.insert(row, 1, 'claimed')
      out[i] = row
    end
  end
end
return out
