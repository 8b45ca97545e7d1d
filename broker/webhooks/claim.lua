-- Claim due deliveries for one worker, fairly across endpoints (lib.lua prepended).
--
-- The ring (KEYS[1]) holds each endpoint with queued deliveries, scored no later than the
-- earliest score of its due zset (sid -> when the head of that session's queue is tried next:
-- now, a retry time or a claim's lease end). Round robin as provision_claim.lua: the endpoints
-- due in the ring, in ring order, get one delivery each per round until `room` are claimed; an
-- endpoint that has `cap` deliveries in flight in this worker (`busy`, given by the worker, plus
-- what this call took) is skipped, so a slow receiver holds at most `cap` of the worker's slots
-- and never the others' work; likewise a tenant with `tenant_cap` deliveries in flight in this
-- worker (its endpoints together) is skipped, so one tenant's 10 slow endpoints cannot hold
-- every slot. A served endpoint goes back in the ring at `now` (behind the ones already
-- waiting) while it has more due, else at its earliest score.
--
-- Claiming a queue: its score moves to `lease_until` (the claimer renews it while the POST is
-- in flight; a dead claimer's delivery is claimed again when the lease runs out) and its claim
-- token is recorded (the completion applies only with it). The attempt number returned is the
-- failed attempts so far + 1 (a claim that died made no attempt that counts).
--
-- An endpoint found deleted or disabled: its queues are dropped (at most `drop_batch` per call;
-- the rest on the next calls), each delivery of a disabled one with an attempt-log line
-- `endpoint_disabled` (a deleted endpoint has no log). An entry no longer in the outbox (older
-- than 7 days) is dropped from its queue.
--
-- ARGV (after the templates): now, lease until, room, cap, token, drop_batch, n busy,
--       then n pairs (ring member "{tid}:{weid}", deliveries in flight in this worker),
--       then tenant_cap (optional: none when absent)
-- Reply: {the earliest ring score of an endpoint not at its cap, or '', then per claim:
--         tenant id, endpoint id, session ('-'), entry id, attempt, entry fields (flat),
--         endpoint {url, secret_enc, prev_secret_enc, prev_secret_until}}
local now, lease_until = tonumber(ARGV[NT + 1]), ARGV[NT + 2]
local room, cap, token = tonumber(ARGV[NT + 3]), tonumber(ARGV[NT + 4]), ARGV[NT + 5]
local drop_batch, nbusy = tonumber(ARGV[NT + 6]), tonumber(ARGV[NT + 7])
local tenant_cap = tonumber(ARGV[NT + 8 + 2 * nbusy] or '') or math.huge
local inflight = {}
local tinflight = {}
local function tenant_of(m) return string.match(m, '^([^:]+):') end
for i = 1, nbusy do
  local m, n = ARGV[NT + 6 + 2 * i], tonumber(ARGV[NT + 7 + 2 * i])
  inflight[m] = n
  local t = tenant_of(m)
  tinflight[t] = (tinflight[t] or 0) + n
end
local out = {''}

local function next_head(tid, weid, sid, due, q)
  if redis.call('LLEN', q) > 0 then
    redis.call('ZADD', due, fmt(now), sid)
  else
    redis.call('ZREM', due, sid)
  end
end

local function drop(tid, weid, logged)
  local due = string.format(T.due, tid, weid)
  local heads = string.format(T.heads, tid, weid)
  local events = string.format(T.events, tid)
  for _, sid in ipairs(redis.call('ZRANGE', due, 0, drop_batch - 1)) do
    local q = string.format(T.queue, tid, weid, sid)
    local ids = redis.call('LRANGE', q, 0, -1)
    if logged then
      local n = tonumber(redis.call('HGET', heads, sid .. ':n')) or 0
      for i, eid in ipairs(ids) do
        local e = redis.call('XRANGE', events, eid, eid)
        local etype = ''
        if e[1] then
          for j = 1, #e[1][2], 2 do
            if e[1][2][j] == 'type' then etype = e[1][2][j + 1] end
          end
        end
        wh_log(tid, weid, eid, etype, i == 1 and n + 1 or 1, '', 'endpoint_disabled', '', '', now)
      end
    end
    redis.call('DEL', q)
    if #ids > 0 then redis.call('DECRBY', PENDING, #ids) end
    redis.call('ZREM', due, sid)
    redis.call('HDEL', heads, sid .. ':n', sid .. ':c')
  end
  if redis.call('ZCARD', due) == 0 then redis.call('DEL', heads) end
end

local capped = {}
local ncapped = 0
local tcapped = {}
local ntcapped = 0
local function at_cap(m)
  return (inflight[m] or 0) >= cap or (tinflight[tenant_of(m)] or 0) >= tenant_cap
end
for m, n in pairs(inflight) do
  if n >= cap then capped[m] = true; ncapped = ncapped + 1 end
end
for t, n in pairs(tinflight) do
  if n >= tenant_cap then tcapped[t] = true; ntcapped = ntcapped + 1 end
end
-- ring entries that may be skipped as capped: the capped endpoints, and up to 10 (the most a
-- tenant has) per capped tenant
local function skippable() return ncapped + 10 * ntcapped end

if room > 0 then
  local members = redis.call('ZRANGEBYSCORE', RING, '-inf', fmt(now), 'LIMIT', 0, room + 32 + skippable())
  local looked, served, info = {}, {}, {}
  local active = members
  while room > 0 and #active > 0 do
    local still = {}
    for _, m in ipairs(active) do
      if room <= 0 then break end
      if not at_cap(m) then
        looked[m] = true
        local tid, weid = string.match(m, '^([^:]+):(.+)$')
        local ep = info[m]
        if ep == nil then
          ep = redis.call('HMGET', string.format(T.endpoint, tid, weid),
                          'url', 'secret_enc', 'prev_secret_enc', 'prev_secret_until', 'disabled')
          info[m] = ep
        end
        if not ep[1] or ep[5] == '1' then
          drop(tid, weid, ep[1] and true or false)
        else
          local due = string.format(T.due, tid, weid)
          local sid = redis.call('ZRANGEBYSCORE', due, '-inf', fmt(now), 'LIMIT', 0, 1)[1]
          if sid then
            local q = string.format(T.queue, tid, weid, sid)
            local heads = string.format(T.heads, tid, weid)
            local eid = redis.call('LINDEX', q, 0)
            if not eid then
              redis.call('ZREM', due, sid)
            else
              local e = redis.call('XRANGE', string.format(T.events, tid), eid, eid)
              if #e == 0 then
                redis.call('LPOP', q)
                redis.call('DECR', PENDING)
                redis.call('HDEL', heads, sid .. ':n', sid .. ':c')
                next_head(tid, weid, sid, due, q)
              else
                redis.call('ZADD', due, lease_until, sid)
                redis.call('HSET', heads, sid .. ':c', token)
                local n = tonumber(redis.call('HGET', heads, sid .. ':n')) or 0
                out[#out + 1] = tid
                out[#out + 1] = weid
                out[#out + 1] = sid
                out[#out + 1] = eid
                out[#out + 1] = n + 1
                out[#out + 1] = e[1][2]
                out[#out + 1] = {ep[1], ep[2] or '', ep[3] or '', ep[4] or ''}
                room = room - 1
                served[m] = true
                inflight[m] = (inflight[m] or 0) + 1
                if inflight[m] >= cap and not capped[m] then capped[m] = true; ncapped = ncapped + 1 end
                tinflight[tid] = (tinflight[tid] or 0) + 1
                if tinflight[tid] >= tenant_cap and not tcapped[tid] then tcapped[tid] = true; ntcapped = ntcapped + 1 end
              end
            end
            still[#still + 1] = m
          end
        end
      end
    end
    active = still
  end
  -- every endpoint looked at gets its true place in the ring (a capped one keeps its due score)
  for _, m in ipairs(members) do
    if looked[m] then
      local tid, weid = string.match(m, '^([^:]+):(.+)$')
      local first = redis.call('ZRANGE', string.format(T.due, tid, weid), 0, 0, 'WITHSCORES')
      if not first[2] then
        redis.call('ZREM', RING, m)
      else
        local score = tonumber(first[2])
        if served[m] and score <= now then score = now end
        if served[m] or score > now then
          redis.call('ZADD', RING, fmt(score), m)
        end
      end
    end
  end
end
-- the next time this worker has something to claim: capped endpoints wait for its completions
local head = redis.call('ZRANGE', RING, 0, skippable(), 'WITHSCORES')
for i = 1, #head, 2 do
  if not capped[head[i]] and not tcapped[tenant_of(head[i])] then
    out[1] = head[i + 1]
    break
  end
end
return out
