-- Shared by the delivery scripts (broker/webhooks/queue.py prepends it to each).
--
-- KEYS[1] the ring of endpoints with queued deliveries ("{tid}:{weid}" -> no later than the
-- earliest score of the endpoint's due zset), KEYS[2] the pending counter (all tenants).
-- ARGV[1..9] the key templates (string.format with the ids; built from TenantScope by queue.py,
-- so the layout stays in tenants/scope.py); a script's own arguments start at ARGV[NT + 1].
local RING, PENDING = KEYS[1], KEYS[2]
local T = {endpoints = ARGV[1], endpoint = ARGV[2], attempts = ARGV[3], cursor = ARGV[4],
           queue = ARGV[5], due = ARGV[6], heads = ARGV[7], events = ARGV[8], base = ARGV[9]}
local NT = 9

local function fmt(s) return string.format('%d', s) end

-- Queue the delivery of entry `eid` to endpoint `weid`, behind the other deliveries of the same
-- session `sid` ('-' for a tenant event) to it. A queue is in the endpoint's due zset exactly
-- while it is not empty: a new queue's head is due now (the ring only moves earlier: LT).
local function wh_enqueue(tid, weid, sid, eid, now)
  local n = redis.call('RPUSH', string.format(T.queue, tid, weid, sid), eid)
  redis.call('INCR', PENDING)
  if n == 1 then
    redis.call('ZADD', string.format(T.due, tid, weid), fmt(now), sid)
    redis.call('ZADD', RING, 'LT', fmt(now), tid .. ':' .. weid)
  end
  return n
end

-- stream entry ids "ms-seq" compared as numbers: true when a > b
local function id_after(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if not am then return false end
  if not bm then return true end
  am, bm = tonumber(am), tonumber(bm)
  if am ~= bm then return am > bm end
  return tonumber(as) > tonumber(bs)
end

-- one line of the endpoint's attempt log (fields: broker/webhooks/__init__.py), capped
local ATTEMPTS_MAXLEN = 1000
local function wh_log(tid, weid, eid, etype, attempt, status, err, latency, response, now)
  redis.call('XADD', string.format(T.attempts, tid, weid), 'MAXLEN', '~', ATTEMPTS_MAXLEN, '*',
    'event_id', 'evt_' .. eid, 'event_type', etype, 'attempt', attempt, 'status', status, 'error', err,
    'latency_ms', latency, 'response', response, 'at', fmt(now))
end
