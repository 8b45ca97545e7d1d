-- Claim due provisionings for one worker, fairly across tenants (lib.lua is prepended).
--
-- The schedule: per tenant a zset sid -> when the scheduler takes it next (ms: the mint slot
-- reserved at admission, then a retry time, or the end of a claim's lease), and a ring of the
-- tenants with scheduled work, tid -> a score never later than the tenant's earliest entry
-- (admission and lib.lua's schedule() only lower it; this script corrects it upwards).
--
-- Round robin: the tenants due in the ring (score <= now), in ring order, are served one
-- session each per round, round after round, until `room` sessions are claimed or none is
-- due. A tenant served here is put back in the ring at `now` (behind every tenant already
-- waiting, whose score is <= now) while it has more due, else at its earliest entry (a later
-- slot, a retry time or a lease); so when the workers are saturated, a claim of one session
-- goes to the tenant that has waited longest since it was last served, never to the tenant
-- with the longest backlog.
--
-- Claiming a session: its entry moves to `lease_until` (no other worker takes it until the
-- lease runs out: the claimer renews it while it works, so a claimer that died loses it
-- `lease` after its last renewal), it moves from queued to provisioning (set_status, as
-- transition.lua) and its attempts count goes up by one. A session found in another status
-- (ready, terminating, terminal, missing) is no longer the scheduler's: its entry is dropped.
--
-- A session admitted by replace_oldest may wait for the sessions it replaced (`waits_for`, ids
-- comma-separated, tenants/admission.lua): while one of them is live (queued, provisioning,
-- ready, terminating: its upstream session may still run) it is not claimed, its entry moves
-- to `now + recheck` (the same session, still queued, no attempt counted, no new mint slot);
-- once none is, `waits_for` is dropped and it is claimed. Past its provisioning deadline
-- (created_at + ARGV[10], when given) it is claimed anyway: the worker fails it.
--
-- KEYS: 1 ring, 2 stats hash (live status -> count)
-- ARGV: 1 now (ms), 2 lease until (ms), 3 room (sessions to claim at most),
--       4 tenants read from the ring per call at most (room + 32 below that),
--       5, 6 the tenant schedule key around the tenant id (prefix, suffix),
--       7, 8, 9 the session key around tenant id and session id (prefix, middle, suffix),
--       10 the provisioning deadline (ms after created_at) or "" (none), 11 recheck (ms)
-- Reply: {earliest ring score after the claim or "", then per claimed session:
--         tenant id, status before the claim, its hash after the claim (HGETALL)}
local ring, stats = KEYS[1], KEYS[2]
local now, lease_until = tonumber(ARGV[1]), ARGV[2]
local room = tonumber(ARGV[3])
local sp, ss = ARGV[5], ARGV[6]
local kp, km, ks = ARGV[7], ARGV[8], ARGV[9]
local deadline, recheck = tonumber(ARGV[10]), tonumber(ARGV[11])
local out = {''}

-- true while session `hkey` (of tenant `tid`) waits for a replaced session still live
local function waiting(hkey, tid)
  local waits = redis.call('HGET', hkey, 'waits_for')
  if not waits or waits == '' then return false end
  if deadline and now >= (tonumber(redis.call('HGET', hkey, 'created_at')) or 0) + deadline then
    return false
  end
  for w in string.gmatch(waits, '[^,]+') do
    local ws = redis.call('HGET', kp .. tid .. km .. w .. ks, 'status')
    if ws == 'queued' or ws == 'provisioning' or ws == 'ready' or ws == 'terminating' then
      return true
    end
  end
  redis.call('HDEL', hkey, 'waits_for')
  return false
end

if room > 0 then
  -- the due tenants, earliest first: as many as can be served, plus some whose ring entry may
  -- lag (nothing due any more: corrected below)
  local want = math.min(tonumber(ARGV[4]), room + 32)
  local tenants = redis.call('ZRANGEBYSCORE', ring, '-inf', ARGV[1], 'LIMIT', 0, want)
  local served, looked = {}, {}
  local active = tenants
  while room > 0 and #active > 0 do
    local still = {}
    for _, tid in ipairs(active) do
      if room <= 0 then break end
      looked[tid] = true
      local sched = sp .. tid .. ss
      local due = redis.call('ZRANGEBYSCORE', sched, '-inf', ARGV[1], 'LIMIT', 0, 1)
      local sid = due[1]
      if sid then
        local hkey = kp .. tid .. km .. sid .. ks
        local st = redis.call('HGET', hkey, 'status')
        if (st == 'queued' or st == 'provisioning') and waiting(hkey, tid) then
          redis.call('ZADD', sched, string.format('%d', now + recheck), sid)
        elseif st == 'queued' or st == 'provisioning' then
          redis.call('ZADD', sched, lease_until, sid)
          set_status(hkey, stats, st, 'provisioning')
          redis.call('HINCRBY', hkey, 'attempts', 1)
          out[#out + 1] = tid
          out[#out + 1] = st
          out[#out + 1] = redis.call('HGETALL', hkey)
          room = room - 1
          served[tid] = true
        else
          redis.call('ZREM', sched, sid)
        end
        still[#still + 1] = tid
      end
    end
    active = still
  end
  -- every tenant looked at gets its true place in the ring (one not reached keeps its due score)
  for _, tid in ipairs(tenants) do
    if looked[tid] then
      local sched = sp .. tid .. ss
      local first = redis.call('ZRANGE', sched, 0, 0, 'WITHSCORES')
      if not first[2] then
        redis.call('ZREM', ring, tid)
      else
        local score = tonumber(first[2])
        if served[tid] and score <= now then score = now end
        if served[tid] or score > now then
          redis.call('ZADD', ring, string.format('%d', score), tid)
        end
      end
    end
  end
end
local nxt = redis.call('ZRANGE', ring, 0, 0, 'WITHSCORES')
if nxt[2] then out[1] = nxt[2] end
return out
