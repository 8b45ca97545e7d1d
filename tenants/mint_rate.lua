-- GCRA (virtual scheduling) reservation of the next OpenAI mint slot of one tenant.
--
-- KEYS[1] mint hash {tat, last}: theoretical arrival time and the last granted slot (ms)
-- ARGV[1] now_ms, ARGV[2] emission interval T (ms), ARGV[3] tolerance tau = (burst-1)*T (ms)
-- Reply: the granted slot (ms). Every call reserves one slot: grant = max(now, tat - tau,
-- last grant), then tat = max(tat, now) + T. Grants never decrease (FIFO) and any two grants
-- i < j are at least (j - i) * T - tau apart.
--
-- The two functions before the "main" line are the library that other scripts include
-- (tenants.mint_rate.lua_library()): tenants/admission.lua peeks at the grant, checks it and
-- only then takes it, in the same atomic step.

local function mint_int(n)
  return string.format('%d', n)
end

-- The slot a reservation at `now` would be granted, and the state it is computed from
-- (tat raised to now, last grant). Writes nothing.
local function mint_peek(key, now, tau)
  local state = redis.call('HMGET', key, 'tat', 'last')
  local tat = tonumber(state[1] or '0') or 0
  local last = tonumber(state[2] or '0') or 0
  if tat < now then
    tat = now
  end
  return math.max(now, tat - tau, last), tat, last
end

-- Take the slot `grant` that mint_peek returned (with its `tat`); returns the new tat.
local function mint_take(key, now, interval, grant, tat)
  local new_tat = tat + interval
  redis.call('HSET', key, 'tat', mint_int(new_tat), 'last', mint_int(grant))
  -- forget the tenant's schedule once it no longer matters (one interval after tat)
  redis.call('PEXPIRE', key, mint_int(new_tat - now + interval + 60000))
  return new_tat
end

-- main
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local grant, tat = mint_peek(KEYS[1], now, tonumber(ARGV[3]))
mint_take(KEYS[1], now, interval, grant, tat)
return grant
