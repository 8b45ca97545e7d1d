-- Fan out a tenant's new outbox entries to its endpoints' delivery queues (lib.lua prepended).
--
-- Reads at most `batch` entries after the tenant's cursor (`wh:cursor`, the last entry fanned
-- out; never before the earliest `since` of its enabled endpoints: nothing older goes to any),
-- queues each for every enabled endpoint whose `events` filter names its type (or is empty) and
-- whose `since` is before it (an entry with `endpoint_id`, a test.ping, goes to that endpoint
-- only, whatever its filter), and moves the cursor to the last entry read: one atomic step, so
-- an entry is fanned out exactly once whichever worker runs it and whatever process dies.
-- ARGV (after the templates): tenant id, now (ms), batch
-- Reply: {entries read, deliveries queued}
local tid, now, batch = ARGV[NT + 1], tonumber(ARGV[NT + 2]), tonumber(ARGV[NT + 3])
local eps = redis.call('SMEMBERS', string.format(T.endpoints, tid))
local live = {}
local start = redis.call('GET', string.format(T.cursor, tid))
local min_since = nil
for _, weid in ipairs(eps) do
  local f = redis.call('HMGET', string.format(T.endpoint, tid, weid), 'disabled', 'events', 'since')
  if f[3] and f[1] ~= '1' then
    local types = nil
    if f[2] and f[2] ~= '' then
      types = {}
      for t in string.gmatch(f[2], '[^,]+') do types[t] = true end
    end
    live[#live + 1] = {weid, types, f[3]}
    if not min_since or id_after(min_since, f[3]) then min_since = f[3] end
  end
end
if not min_since then
  -- no enabled endpoint: nothing to deliver; the cursor stays (the next endpoint's `since` moves it)
  return {0, 0}
end
if not start or id_after(min_since, start) then start = min_since end
local rows = redis.call('XRANGE', string.format(T.events, tid), '(' .. start, '+', 'COUNT', batch)
local queued = 0
for _, row in ipairs(rows) do
  local eid, flat = row[1], row[2]
  local etype, sid, only = '', '', ''
  for i = 1, #flat, 2 do
    local k = flat[i]
    if k == 'type' then etype = flat[i + 1]
    elseif k == 'session_id' then sid = flat[i + 1]
    elseif k == 'endpoint_id' then only = flat[i + 1] end
  end
  if sid == '' then sid = '-' end
  for _, ep in ipairs(live) do
    local weid, types, since = ep[1], ep[2], ep[3]
    local wanted
    if only ~= '' then wanted = (only == weid) else wanted = (types == nil or types[etype] == true) end
    if wanted and id_after(eid, since) then
      wh_enqueue(tid, weid, sid, eid, now)
      queued = queued + 1
    end
  end
end
if #rows > 0 then
  redis.call('SET', string.format(T.cursor, tid), rows[#rows][1])
end
return {#rows, queued}
