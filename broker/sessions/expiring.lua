-- (lib.lua of broker/sessions is prepended: append_event comes with it.) Record the
-- session.expiring event of every session whose expires_at is within the lead time, in ONE
-- atomic step per batch, each only while the session is still `ready`, and once: the due entry
-- is removed and the flag `expiring_at` (HSETNX) set in the same step as the event, so two
-- workers racing on the same entry record it once.
-- The entries are written by the step that makes a session ready (transition.lua: ZADD at its
-- expires_at) and removed by every step that takes it out of ready (transition.lua, finish.lua).
-- KEYS: 1 due:expiring zset ("{tid}:{sid}" -> expires_at, ms)
-- ARGV: 1 until (ms: now + the lead time), 2 batch size, 3 the session key prefix (before
--       "{tid}:s:{sid}"), 4 now (ms)
-- Returns {events recorded, entries taken, score of the next entry left or false}.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local recorded = 0
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  local tid, sid = string.match(member, '^([^:]+):(.+)$')
  if tid then
    local hkey = ARGV[3] .. tid .. ':s:' .. sid
    if redis.call('HGET', hkey, 'status') == 'ready' and redis.call('HSETNX', hkey, 'expiring_at', ARGV[4]) == 1 then
      append_event(hkey, 'session.expiring')  -- tenants/outbox.lua: data.sequence with the others
      recorded = recorded + 1
    end
  end
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {recorded, #due, nxt[2] or false}
