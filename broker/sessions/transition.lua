-- Atomic state transition of one session, with its indexes.
-- KEYS: 1 session hash, 2 live zset (leases), 3 end-user zset (or ""-named dummy),
--       4 due:expiry zset, 5 due:provision zset, 6 stats hash (live status -> count)
--       7..10 a job to enqueue when applied (job key, result key, queue, wake-up list:
--       broker/sessions/jobs.py ENQUEUE), or "" when none
--       11..16 (only when given) the running arq job to finish when applied (in-progress key,
--       retry key, job key, result key, queue, abort zset: arq's finish_job, workers/wakeup.py FINISH)
-- ARGV: 1 allowed from-statuses, comma separated, or "*" for any live status
--       2 new status, or "" to keep it
--       3 lease: "" keep | "del" release (also from the end-user zset) | score (ms)
--       4 due expiry: "" | "del" | score      5 due provision: "" | "del" | score
--       6 due member "{tid}:{sid}"             7 session id
--       8 pub/sub channel or ""                9 retention seconds on terminal or ""
--       10 n: number of field/value pairs to HSET
--       11..15 the job: id, score, job key TTL ms, serialized job, wake-up cap (unused without one)
--       16..18 (only with KEYS 11..16) the job to finish: id, serialized result, result TTL ms
--       then (16.., or 19.. with a job to finish) the pairs, then fields to HDEL
-- A transition to a terminal status (terminated, failed) also drops the fields a retained record
-- no longer needs: TERMINAL_DROP, defined before this script by broker/sessions/terminal.py, and
-- settles the session's budget reservation and billable seconds (budget_settle, composed there too).
-- Returns {1, new status} when applied, {0, current status} when not allowed, {-1, ""} if missing.
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
if new ~= '' then redis.call('HSET', KEYS[1], 'status', new) else new = st end
if new ~= st then
  redis.call('HINCRBY', KEYS[6], st, -1)
  if new == 'queued' or new == 'provisioning' or new == 'ready' or new == 'terminating' then
    redis.call('HINCRBY', KEYS[6], new, 1)
  end
end

local n = tonumber(ARGV[10])
local finish = #KEYS >= 16
local i = 16
if finish then i = 19 end
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
if new ~= st and (new == 'terminated' or new == 'failed') then budget_settle(KEYS[1], nil) end  -- tenants/budget.lua

local sid, member = ARGV[7], ARGV[6]
if ARGV[3] == 'del' then
  redis.call('ZREM', KEYS[2], sid)
  redis.call('ZREM', KEYS[3], sid)
elseif ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[2], 'XX', ARGV[3], sid)
end
if ARGV[4] == 'del' then redis.call('ZREM', KEYS[4], member)
elseif ARGV[4] ~= '' then redis.call('ZADD', KEYS[4], ARGV[4], member) end
if ARGV[5] == 'del' then redis.call('ZREM', KEYS[5], member)
elseif ARGV[5] ~= '' then redis.call('ZADD', KEYS[5], ARGV[5], member) end
if ARGV[9] ~= '' then redis.call('EXPIRE', KEYS[1], ARGV[9]) end
if ARGV[8] ~= '' then redis.call('PUBLISH', ARGV[8], new) end
if KEYS[7] ~= '' and redis.call('EXISTS', KEYS[7], KEYS[8]) == 0 then
  redis.call('SET', KEYS[7], ARGV[14], 'PX', ARGV[13])
  redis.call('ZADD', KEYS[9], ARGV[12], ARGV[11])
  redis.call('LPUSH', KEYS[10], '1')
  redis.call('LTRIM', KEYS[10], 0, tonumber(ARGV[15]) - 1)
end
if finish then  -- what arq's finish_job does for a job that succeeded (one round trip less)
  redis.call('DEL', KEYS[11])
  redis.call('SET', KEYS[14], ARGV[17], 'PX', ARGV[18])
  redis.call('DEL', KEYS[12], KEYS[13])
  redis.call('ZREM', KEYS[16], ARGV[16])
  redis.call('ZREM', KEYS[15], ARGV[16])
end
return {1, new}
