-- The event outbox (contract section 11, issue 20): append_event(hkey, type) records the event
-- of a session state change in the SAME script (so the same atomic step) as the change.
-- Prepended to every script that makes such a change (tenants/admission.lua: session.created;
-- broker/sessions/transition.lua and broker/sessions/termination_finish.lua: session.ready, session.failed,
-- session.terminated), by tenants/outbox.py; call it after the record holds the new state.
--
-- Storage: the tenant's stream `events` under its key base (TenantScope.events(): the session
-- key with its `:s:{sid}` replaced by `:events`), entries older than 7 days trimmed (MINID ~) by each append. The
-- entry's id (ms-seq, monotonic per tenant) is the event's (`evt_` + it). Fields: type,
-- session id, sequence (HINCRBY of the session's `event_seq`: 1, 2, 3...), then the session
-- fields the session object is rendered from as of the event (never its config, secrets or
-- frontend token): broker/sessions/outbox.py renders them. The event id is then PUBLISHed on
-- the channel of the stream's own name (TenantScope.events(), matched by scope.OUTBOX_PATTERN):
-- a wake-up for the live streams; the stream, not the message, is the record.
local OUTBOX_RETENTION_MS = 7 * 86400 * 1000
local OUTBOX_FIELDS = {'status', 'created_at', 'ready_at', 'expires_at', 'terminated_at',
  'avaturn_session_id', 'end_user', 'termination_reason', 'error_code', 'error_message', 'metadata',
  'billable_seconds', 'ttl_limited_by', 'ttl_seconds'}

-- One entry onto a tenant's outbox stream (entries older than 7 days trimmed), then its id
-- PUBLISHed on the stream's name: wakes the SSE readers (broker/sessions/events.py: one
-- subscription per API process) and the webhook fan-out (workers/webhooks.py).
local function outbox_add(stream, entry)
  local t = redis.call('TIME')
  local minid = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - OUTBOX_RETENTION_MS
  local id = redis.call('XADD', stream, 'MINID', '~', string.format('%d', minid), '*', unpack(entry))
  redis.call('PUBLISH', stream, id)
  return id
end

local function append_event(hkey, etype)
  local base, sid = string.match(hkey, '^(.*):s:([^:]+)$')
  local seq = redis.call('HINCRBY', hkey, 'event_seq', 1)
  local values = redis.call('HMGET', hkey, unpack(OUTBOX_FIELDS))
  local entry = {'type', etype, 'session_id', sid, 'sequence', seq}
  -- every field, '' when the session has none yet: all session events of a stream then have one
  -- field list, which a stream node stores once (its master entry) instead of in every entry
  -- (the bench's memory per live session: 2,062 -> 2,032 bytes, created + ready events each)
  for j, name in ipairs(OUTBOX_FIELDS) do
    entry[#entry + 1] = name
    entry[#entry + 1] = values[j] or ''
  end
  return outbox_add(base .. ':events', entry)
end

-- A tenant event that is not a session's (usage.threshold_reached, webhook_endpoint.disabled,
-- test.ping): `base` is the tenant's key base (TenantScope.base(), ending in a colon), `data_json` the event's `data`
-- object as JSON (never a secret), `endpoint_id` (optional, '' for none) restricts its webhook
-- delivery to that one endpoint (test.ping). Same stream, retention and wake-up as append_event.
local function append_tenant_event(base, etype, data_json, endpoint_id)
  local entry = {'type', etype, 'data', data_json}
  if endpoint_id and endpoint_id ~= '' then
    entry[#entry + 1] = 'endpoint_id'
    entry[#entry + 1] = endpoint_id
  end
  return outbox_add(base .. 'events', entry)
end
