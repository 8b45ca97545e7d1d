-- Record the outcome of one delivery attempt (lib.lua and tenants/outbox.lua prepended).
--
-- The attempt-log line is written in any case (the attempt was made), unless the endpoint is
-- gone. The queue changes only while the head is still the delivered entry and the claim is
-- this one (token): a claim whose lease ran out and was taken by another worker changes nothing.
--
-- result 'ok' (2xx): the head is popped, the attempt count and `failing_since` cleared, the next
--   head of the session's queue is due now (or the queue is gone).
-- a failure: `failing_since` is set if it was empty; then
--   'gone' (410), or `now - failing_since >= failing_ms`: the endpoint is disabled (reason gone /
--   failing) and `webhook_endpoint.disabled` is appended to the tenant's outbox in this same
--   step, the head popped (the claim drops the rest of its queues): endpoint_gone /
--   endpoint_failing are counted once per endpoint disabled;
--   an endpoint already disabled (by another attempt, by the tenant): due now, for the claim to drop;
--   else after the last attempt (`give_up`): the head is popped (given up), the next is due now;
--   else the head is tried again at `retry_at` (attempt count = `attempt`).
-- ARGV (after the templates): tenant id, endpoint id, session, entry id, token, result
--   (ok|fail|gone), now, retry_at, give_up (1|0), failing_ms, attempt, event type, status,
--   error, latency_ms, response
-- Reply: delivered | retry | gave_up | endpoint_gone | endpoint_failing | stale
local tid, weid, sid, eid, token, result = ARGV[NT + 1], ARGV[NT + 2], ARGV[NT + 3], ARGV[NT + 4],
  ARGV[NT + 5], ARGV[NT + 6]
local now, retry_at, give_up, failing_ms = tonumber(ARGV[NT + 7]), tonumber(ARGV[NT + 8]), ARGV[NT + 9],
  tonumber(ARGV[NT + 10])
local attempt = ARGV[NT + 11]
local ekey = string.format(T.endpoint, tid, weid)
local q = string.format(T.queue, tid, weid, sid)
local due = string.format(T.due, tid, weid)
local heads = string.format(T.heads, tid, weid)
local member = tid .. ':' .. weid
local exists = redis.call('EXISTS', ekey) == 1
if exists then
  wh_log(tid, weid, eid, ARGV[NT + 12], attempt, ARGV[NT + 13], ARGV[NT + 14], ARGV[NT + 15], ARGV[NT + 16], now)
end
if redis.call('LINDEX', q, 0) ~= eid or redis.call('HGET', heads, sid .. ':c') ~= token then
  return 'stale'
end

local function pop_head()
  redis.call('LPOP', q)
  redis.call('DECR', PENDING)
  redis.call('HDEL', heads, sid .. ':n', sid .. ':c')
  if redis.call('LLEN', q) > 0 then
    redis.call('ZADD', due, fmt(now), sid)
    redis.call('ZADD', RING, 'LT', fmt(now), member)
  else
    redis.call('ZREM', due, sid)
  end
end

if not exists then
  -- deleted while the POST was in flight: the claim drops its queues
  redis.call('HDEL', heads, sid .. ':c')
  redis.call('ZADD', due, fmt(now), sid)
  redis.call('ZADD', RING, 'LT', fmt(now), member)
  return 'stale'
end
if result == 'ok' then
  pop_head()
  redis.call('HSET', ekey, 'failing_since', '')
  return 'delivered'
end
local fs = tonumber(redis.call('HGET', ekey, 'failing_since') or '')
if not fs then
  fs = now
  redis.call('HSET', ekey, 'failing_since', fmt(now))
end
local reason = ''
if result == 'gone' then
  reason = 'gone'
elseif now - fs >= failing_ms then
  reason = 'failing'
end
if reason ~= '' and redis.call('HGET', ekey, 'disabled') ~= '1' then
  redis.call('HSET', ekey, 'disabled', '1', 'disabled_reason', reason, 'disabled_at', fmt(now))
  local url = redis.call('HGET', ekey, 'url') or ''
  append_tenant_event(string.format(T.base, tid), 'webhook_endpoint.disabled',
    cjson.encode({id = weid, url = url, disabled_reason = reason}), '')
  pop_head()
  if reason == 'gone' then return 'endpoint_gone' end
  return 'endpoint_failing'
end
if redis.call('HGET', ekey, 'disabled') == '1' then
  -- disabled meanwhile (another attempt, the tenant): the claim drops its queues, this one too
  redis.call('HSET', heads, sid .. ':n', attempt)
  redis.call('HDEL', heads, sid .. ':c')
  redis.call('ZADD', due, fmt(now), sid)
  redis.call('ZADD', RING, 'LT', fmt(now), member)
  return 'retry'
end
if give_up == '1' then
  pop_head()
  return 'gave_up'
end
redis.call('HSET', heads, sid .. ':n', attempt)
redis.call('HDEL', heads, sid .. ':c')
redis.call('ZADD', due, fmt(retry_at), sid)
redis.call('ZADD', RING, 'LT', fmt(retry_at), member)
return 'retry'
