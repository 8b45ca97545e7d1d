"""The tenant's webhook endpoints (contract section 11): create, list, get, update, delete,
rotate the signing secret, and read the attempt log. The hash fields are those of
``broker/webhooks/__init__.py`` (the delivery reads them).

Every write that must hold against parallel requests or the delivery is one Lua script: the
create checks the limit of :data:`MAX_ENDPOINTS` and adds the endpoint in one step (N parallel
creates with L places left create exactly L); update, disable/enable and rotation act only on an
endpoint that still exists (a hash without ``url`` is not an endpoint); the delete removes the
hash, its attempt log and its id, and takes the tenant out of ``WEBHOOK_TENANTS`` with its last
endpoint. Times of the records are Redis's (``TIME``), the clock of the outbox entry ids;
``since`` is the id of the tenant's last event when the endpoint was created (or enabled again).

The secret is stored encrypted (``tenants.crypto.CredentialCipher``, like the tenants' upstream
credentials) and shown only in the answers of the create and of a rotation.
"""

from __future__ import annotations

import os
import re
from typing import Any

import msgspec
import redis.asyncio as aioredis

from broker.core.errors import Conflict, InvalidInput, NotFound
from broker.sessions.models import iso
from broker.sessions.outbox import EVENT_TYPES, Event, entry_id, event_id
from tenants.crypto import CredentialCipher
from tenants.outbox import lua_functions
from tenants.scope import WEBHOOK_TENANTS, TenantScope

from .signing import new_secret
from .urls import validate_url

MAX_ENDPOINTS = 10
MAX_DESCRIPTION = 256
ROTATION_OVERLAP_MS = 24 * 3600 * 1000
_ID = re.compile(r"we_[0-9a-f]{24}")
_ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# `since` of an endpoint created or enabled now: the id of the tenant's last event (KEYS[n]), so
# that every event recorded after this step is after it, also one in the same millisecond
# (a "{ms}-0" made from TIME missed an event whose id was exactly that: a test.ping right
# after the create).
_SINCE = """
local function since_now(events)
  local last = redis.call('XREVRANGE', events, '+', '-', 'COUNT', 1)[1]
  if last then return last[1] end
  return '0-0'
end
"""

# KEYS: the endpoints set, the new endpoint's hash, WEBHOOK_TENANTS, the tenant's events; ARGV:
# limit, tenant id, then field/value pairs. Answers {1, count} when created, {0, count} when the
# tenant has `limit` already.
_CREATE = _SINCE + """
local n = redis.call('SCARD', KEYS[1])
if n >= tonumber(ARGV[1]) then return {0, n} end
local t = redis.call('TIME')
local ms = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[2], 'created_at', ms, 'since', since_now(KEYS[4]), unpack(ARGV, 3))
redis.call('SADD', KEYS[1], string.match(KEYS[2], ':wh:ep:([^:]+)$'))
redis.call('SADD', KEYS[3], ARGV[2])
return {1, n + 1}
"""

# KEYS: the endpoint's hash, the tenant's events; ARGV: '' | 'enable' | 'disable', then
# field/value pairs to set. Answers 0 when the endpoint does not exist. Enabling a disabled endpoint moves its `since` to
# now: the events recorded while it was disabled are not delivered to it (as the fan-out skips a
# disabled endpoint; a resend delivers one on demand), whether or not the tenant has another
# enabled endpoint (with none, the fan-out's cursor stays behind).
_UPDATE = _SINCE + """
if redis.call('HEXISTS', KEYS[1], 'url') == 0 then return 0 end
if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
if ARGV[1] == 'enable' then
  if redis.call('HGET', KEYS[1], 'disabled') == '1' then
    redis.call('HSET', KEYS[1], 'since', since_now(KEYS[2]))
  end
  redis.call('HSET', KEYS[1], 'disabled', '0', 'disabled_reason', '', 'disabled_at', '', 'failing_since', '')
elseif ARGV[1] == 'disable' and redis.call('HGET', KEYS[1], 'disabled') ~= '1' then
  local t = redis.call('TIME')
  local ms = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  redis.call('HSET', KEYS[1], 'disabled', '1', 'disabled_reason', 'tenant', 'disabled_at', ms)
end
return 1
"""

# KEYS: the endpoint's hash; ARGV: the new encrypted secret, the overlap (ms). The old secret
# keeps signing beside the new one until now + overlap.
_ROTATE = """
if redis.call('HEXISTS', KEYS[1], 'url') == 0 then return 0 end
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old = redis.call('HGET', KEYS[1], 'secret_enc')
redis.call('HSET', KEYS[1], 'prev_secret_enc', old, 'prev_secret_until', string.format('%d', ms + tonumber(ARGV[2])),
  'secret_enc', ARGV[1])
return 1
"""

# KEYS: the endpoints set, the endpoint's hash, its attempts stream, WEBHOOK_TENANTS, the
# tenant's fan-out cursor; ARGV: the endpoint id, the tenant id. Answers 0 when the endpoint did
# not exist (what a late write of the delivery may have left under its keys is removed all the
# same). With the last endpoint go the tenant's mark and its cursor (a new endpoint starts at its
# own `since`); the queues of the deleted endpoint are dropped by the delivery's claim.
_DELETE = """
local member = redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
if redis.call('SCARD', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[4], ARGV[2])
  redis.call('DEL', KEYS[5])
end
return member
"""

# KEYS: the endpoint's hash; ARGV: the tenant's key base, the event's data (JSON), the endpoint id.
# Appends a test.ping for this endpoint only (tenants/outbox.lua), if it exists and is enabled:
# answers {2, entry id}, {1, ''} when it is disabled, {0, ''} when it does not exist.
_PING = lua_functions() + """
local st = redis.call('HMGET', KEYS[1], 'url', 'disabled')
if not st[1] or st[1] == '' then return {0, ''} end
if st[2] == '1' then return {1, ''} end
return {2, append_tenant_event(ARGV[1], 'test.ping', ARGV[2], ARGV[3])}
"""


class EndpointCreate(msgspec.Struct, forbid_unknown_fields=True):
    url: str | None = None  # required: checked by the create, so that its 400 names the field
    events: list[str] | None = None
    description: str | None = None


class EndpointPatch(msgspec.Struct, forbid_unknown_fields=True):
    url: str | msgspec.UnsetType = msgspec.UNSET
    events: list[str] | None | msgspec.UnsetType = msgspec.UNSET
    description: str | None | msgspec.UnsetType = msgspec.UNSET
    disabled: bool | msgspec.UnsetType = msgspec.UNSET


class EndpointView(msgspec.Struct, kw_only=True):
    """An endpoint as the API shows it (never its secret)."""

    id: str
    url: str
    description: str
    events: list[str] | None  # None: every event type
    disabled: bool
    disabled_reason: str | None  # gone | failing | tenant
    disabled_at: str | None
    created_at: str | None


class EndpointWithSecret(EndpointView, kw_only=True):
    """The answer of a create and of a rotation: the only ones that show the secret."""

    secret: str


class EndpointDeleted(msgspec.Struct):
    id: str
    deleted: bool = True


class Attempt(msgspec.Struct, kw_only=True):
    event_id: str
    event_type: str
    attempt: int
    status: int | None
    error: str | None
    latency_ms: int
    response: str | None
    attempted_at: str | None


class ResendPlan(msgspec.Struct, kw_only=True):
    event_id: str
    entry_id: str
    event_type: str
    session_id: str  # '' for an event that is not a session's
    endpoint_ids: list[str]


class AttemptPage(msgspec.Struct):
    data: list[Attempt]
    next_cursor: str | None


def _valid_entry_id(value: str) -> bool:
    """``<ms>-<seq>``, both within a stream id's 64 bits (Redis refuses larger ones)."""
    if not _ENTRY_ID.fullmatch(value):
        return False
    ms, seq = value.split("-")
    return int(ms) < 2**64 and int(seq) < 2**64


def new_endpoint_id() -> str:
    return "we_" + os.urandom(12).hex()


def is_endpoint_id(value: str) -> bool:
    return bool(_ID.fullmatch(value))


def disabled_error(endpoint_id: str) -> Conflict:
    return Conflict(f"The webhook endpoint {endpoint_id} is disabled; enable it first (PATCH with "
                    '"disabled": false).', code="webhook_endpoint_disabled")


def not_found() -> NotFound:
    return NotFound("No webhook endpoint with this id.", code="webhook_endpoint_not_found")


def check_events(events: list[str] | None) -> str:
    """The stored filter: '' for every type (``None``), else the types comma-separated."""
    if events is None:
        return ""
    if not events:
        raise InvalidInput("events must name at least one event type, or be null (or left out) for every type",
                           code="invalid_event_type", field="events")
    unknown = [e for e in events if e not in EVENT_TYPES]
    if unknown:
        raise InvalidInput(f"events: unknown event type {unknown[0][:64]!r}; the types are {', '.join(EVENT_TYPES)}",
                           code="invalid_event_type", field="events")
    return ",".join(dict.fromkeys(events))  # in the tenant's order, each once


def check_description(description: str | None) -> str:
    if description is None:
        return ""
    if len(description) > MAX_DESCRIPTION or _CONTROL.search(description):
        raise InvalidInput(f"description must be at most {MAX_DESCRIPTION} characters, without control characters",
                           code="invalid_description", field="description")
    return description


def view(endpoint_id: str, fields: dict[str, str], secret: str | None = None) -> EndpointView:
    events = fields.get("events", "")
    common: dict[str, Any] = {
        "id": endpoint_id,
        "url": fields.get("url", ""),
        "description": fields.get("description", ""),
        "events": events.split(",") if events else None,
        "disabled": fields.get("disabled") == "1",
        "disabled_reason": fields.get("disabled_reason") or None,
        "disabled_at": iso(int(fields["disabled_at"])) if fields.get("disabled_at") else None,
        "created_at": iso(int(fields["created_at"])) if fields.get("created_at") else None,
    }
    if secret is not None:
        return EndpointWithSecret(**common, secret=secret)
    return EndpointView(**common)


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def _int_or_none(value: str) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def attempt(raw: dict[bytes, bytes]) -> Attempt:
    f = _decode(raw)
    latency = f.get("latency_ms", "")
    try:
        latency_ms = max(0, round(float(latency))) if latency else 0
    except ValueError:
        latency_ms = 0
    at = _int_or_none(f.get("at", ""))
    return Attempt(
        event_id=f.get("event_id", ""), event_type=f.get("event_type", ""),
        attempt=_int_or_none(f.get("attempt", "")) or 0, status=_int_or_none(f.get("status", "")),
        error=f.get("error") or None, latency_ms=latency_ms, response=f.get("response") or None,
        attempted_at=iso(at) if at else None,
    )


class WebhookEndpoints:
    """One tenant's endpoints (tenant-scoped by construction: every key comes from its TenantScope)."""

    def __init__(self, redis: aioredis.Redis, cipher: CredentialCipher | None, allow_private: bool) -> None:
        self.redis = redis
        self.cipher = cipher
        self.allow_private = allow_private
        self._create = redis.register_script(_CREATE)
        self._update = redis.register_script(_UPDATE)
        self._rotate = redis.register_script(_ROTATE)
        self._delete = redis.register_script(_DELETE)
        self._ping = redis.register_script(_PING)

    def _encrypt(self, secret: str) -> str:
        if self.cipher is None:
            raise InvalidInput(
                "webhook secrets cannot be stored: BROKER_SECRET_KEY is not set, and secrets are only stored "
                "encrypted (generate a key with `session-broker secrets generate`)",
                code="secret_key_missing",
            )
        return self.cipher.encrypt(secret)

    async def create(self, tenant_id: str, req: EndpointCreate) -> EndpointWithSecret:
        if req.url is None:
            raise InvalidInput("url is required: the https URL to deliver the events to", code="invalid_field",
                               field="url")
        events = check_events(req.events)
        description = check_description(req.description)
        url = await validate_url(req.url, self.allow_private)
        secret = new_secret()
        scope = TenantScope(tenant_id)
        endpoint_id = new_endpoint_id()
        fields = {"url": url, "description": description, "events": events, "secret_enc": self._encrypt(secret),
                  "prev_secret_enc": "", "prev_secret_until": "", "disabled": "0", "disabled_reason": "",
                  "disabled_at": "", "failing_since": ""}
        created, count = await self._create(
            keys=[scope.webhook_endpoints(), scope.webhook_endpoint(endpoint_id), WEBHOOK_TENANTS, scope.events()],
            args=[MAX_ENDPOINTS, tenant_id, *[x for pair in fields.items() for x in pair]],
        )
        if not created:
            raise Conflict(
                f"A tenant has at most {MAX_ENDPOINTS} webhook endpoints; delete one first.",
                code="webhook_endpoint_limit", extra={"limit": MAX_ENDPOINTS, "current": int(count)},
            )
        out = await self._fields(tenant_id, endpoint_id)
        if out is None:  # deleted by a parallel request right after the create
            raise not_found()
        return view(endpoint_id, out, secret)  # type: ignore[return-value]

    async def _fields(self, tenant_id: str, endpoint_id: str) -> dict[str, str] | None:
        if not is_endpoint_id(endpoint_id):
            return None
        fields = _decode(await self.redis.hgetall(TenantScope(tenant_id).webhook_endpoint(endpoint_id)))
        return fields if fields.get("url") else None

    async def fields(self, tenant_id: str, endpoint_id: str) -> dict[str, str]:
        """The stored fields of an endpoint (its secrets encrypted), or 404."""
        fields = await self._fields(tenant_id, endpoint_id)
        if fields is None:
            raise not_found()
        return fields

    async def get(self, tenant_id: str, endpoint_id: str) -> EndpointView:
        return view(endpoint_id, await self.fields(tenant_id, endpoint_id))

    async def list(self, tenant_id: str) -> list[EndpointView]:
        """Oldest first."""
        scope = TenantScope(tenant_id)
        ids = sorted(m.decode() for m in await self.redis.smembers(scope.webhook_endpoints()))
        async with self.redis.pipeline(transaction=False) as pipe:
            for endpoint_id in ids:
                pipe.hgetall(scope.webhook_endpoint(endpoint_id))
            rows = await pipe.execute()
        views = [view(i, _decode(raw)) for i, raw in zip(ids, rows, strict=True) if raw.get(b"url")]
        return sorted(views, key=lambda v: (v.created_at or "", v.id))

    async def update(self, tenant_id: str, endpoint_id: str, req: EndpointPatch) -> EndpointView:
        if not is_endpoint_id(endpoint_id):
            raise not_found()
        changes: dict[str, str] = {}
        if not isinstance(req.events, msgspec.UnsetType):
            changes["events"] = check_events(req.events)
        if not isinstance(req.description, msgspec.UnsetType):
            changes["description"] = check_description(req.description)
        if not isinstance(req.url, msgspec.UnsetType):
            changes["url"] = await validate_url(req.url, self.allow_private)
        action = "" if isinstance(req.disabled, msgspec.UnsetType) else "disable" if req.disabled else "enable"
        scope = TenantScope(tenant_id)
        done = await self._update(keys=[scope.webhook_endpoint(endpoint_id), scope.events()],
                                  args=[action, *[x for pair in changes.items() for x in pair]])
        if not done:
            raise not_found()
        return await self.get(tenant_id, endpoint_id)

    async def rotate_secret(self, tenant_id: str, endpoint_id: str) -> EndpointWithSecret:
        if not is_endpoint_id(endpoint_id):
            raise not_found()
        secret = new_secret()
        done = await self._rotate(keys=[TenantScope(tenant_id).webhook_endpoint(endpoint_id)],
                                  args=[self._encrypt(secret), ROTATION_OVERLAP_MS])
        if not done:
            raise not_found()
        return view(endpoint_id, await self.fields(tenant_id, endpoint_id), secret)  # type: ignore[return-value]

    async def delete(self, tenant_id: str, endpoint_id: str) -> EndpointDeleted:
        if not is_endpoint_id(endpoint_id):
            raise not_found()
        scope = TenantScope(tenant_id)
        done = await self._delete(
            keys=[scope.webhook_endpoints(), scope.webhook_endpoint(endpoint_id), scope.webhook_attempts(endpoint_id),
                  WEBHOOK_TENANTS, scope.webhook_cursor()],
            args=[endpoint_id, tenant_id],
        )
        if not done:
            raise not_found()
        return EndpointDeleted(id=endpoint_id)

    async def attempts(self, tenant_id: str, endpoint_id: str, *, limit: int, cursor: str | None) -> AttemptPage:
        """The attempt log, newest first; ``cursor``: an entry id, exclusive (the previous page's
        ``next_cursor``)."""
        await self.fields(tenant_id, endpoint_id)  # 404 for an unknown or another tenant's endpoint
        if cursor is not None and not _valid_entry_id(cursor):
            raise InvalidInput("cursor must be the next_cursor of a previous page", code="invalid_cursor",
                               field="cursor")
        if cursor is not None:
            ms, seq = (int(part) for part in cursor.split("-"))
            if ms == seq == 0:
                return AttemptPage([], None)  # nothing is older than the first possible entry
            cursor = f"{ms}-{seq}"
        rows = await self.redis.xrevrange(TenantScope(tenant_id).webhook_attempts(endpoint_id),
                                          max=f"({cursor}" if cursor else "+", min="-", count=limit + 1)
        page = rows[:limit]
        more = len(rows) > limit
        return AttemptPage([attempt(raw) for _, raw in page], page[-1][0].decode() if more else None)

    async def ping(self, tenant_id: str, endpoint_id: str) -> Event:
        """Appends a ``test.ping`` event that the delivery sends to this endpoint only."""
        if not is_endpoint_id(endpoint_id):
            raise not_found()
        scope = TenantScope(tenant_id)
        data = {"endpoint_id": endpoint_id}
        outcome, eid = await self._ping(keys=[scope.webhook_endpoint(endpoint_id)],
                                        args=[scope.base(), msgspec.json.encode(data), endpoint_id])
        if outcome == 0:
            raise not_found()
        if outcome == 1:
            raise disabled_error(endpoint_id)
        eid = eid.decode()
        return Event(id=event_id(eid), type="test.ping", created_at=iso(int(eid.split("-", 1)[0])), data=data)

    async def resend_targets(self, tenant_id: str, evt_id: str, endpoint_id: str | None) -> ResendPlan:
        """The event's entry and the endpoints a resend delivers it to: ``endpoint_id`` (404 when
        unknown, 409 when disabled), or by default every enabled endpoint whose filter matches the
        event's type (a test.ping: only its own endpoint). 404 for an unknown or expired event."""
        eid = entry_id(evt_id)
        scope = TenantScope(tenant_id)
        rows = await self.redis.xrange(scope.events(), min=eid, max=eid, count=1) if eid else []
        if not rows:
            raise NotFound("No event with this id (events are kept 7 days).", code="event_not_found")
        raw = _decode(rows[0][1])
        etype, session_id, only = raw.get("type", ""), raw.get("session_id", ""), raw.get("endpoint_id", "")
        if endpoint_id is not None:
            fields = await self.fields(tenant_id, endpoint_id)
            if fields.get("disabled") == "1":
                raise disabled_error(endpoint_id)
            targets = [endpoint_id]
        else:
            targets = [
                v.id for v in await self.list(tenant_id)
                if not v.disabled and (v.id == only if only else v.events is None or etype in v.events)
            ]
        return ResendPlan(event_id=event_id(rows[0][0]), entry_id=rows[0][0].decode(), event_type=etype,
                          session_id=session_id, endpoint_ids=targets)
