-- GCRA (virtual scheduling) reservation of the next OpenAI mint slot of one tenant.
--
-- KEYS[1] mint hash {tat, last}: theoretical arrival time and the last granted slot (ms)
-- ARGV[1] now_ms, ARGV[2] emission interval T (ms), ARGV[3] tolerance tau = (burst-1)*T (ms)
-- Reply: the granted slot (ms). Every call reserves one slot: grant = max(now, tat - tau,
-- last grant), then tat = max(tat, now) + T. Grants never decrease (FIFO) and any two grants
-- i < j are at least (j - i) * T - tau apart.

local function int(n)
  return string.format('%d', n)
end

local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local tau = tonumber(ARGV[3])

local state = redis.call('HMGET', KEYS[1], 'tat', 'last')
local tat = tonumber(state[1] or '0') or 0
local last = tonumber(state[2] or '0') or 0

if tat < now then
  tat = now
end
local grant = math.max(now, tat - tau, last)
tat = tat + interval
redis.call('HSET', KEYS[1], 'tat', int(tat), 'last', int(grant))
-- forget the tenant's schedule once it no longer matters (one interval after tat)
redis.call('PEXPIRE', KEYS[1], int(tat - now + interval + 60000))
return grant
