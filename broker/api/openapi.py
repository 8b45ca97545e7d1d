"""The OpenAPI document of what the handlers read by hand.

The handlers decode raw bodies, query strings and headers themselves (so every error has the
contract's shape and names its field), which leaves Litestar's generated schema without request
bodies, query parameters or error responses. :func:`document_openapi` fills them in on the app's
OpenAPI object before it is first served: request bodies with the limits the server enforces,
``wait`` / ``limit`` / ``cursor`` / ``status`` / ``end_user``, ``Idempotency-Key``, the error body
of every 4xx/5xx, the bearer security schemes, and response bodies generated from the msgspec
models (closed with ``additionalProperties: false``, so a field that should not be there, a
secret for instance, breaks the schema). Schemathesis fuzzes against exactly this document.

Every limit stated here is enforced by the server (the fuzzer's negative mode checks that each
violation is refused); the server may be stricter (a tenant's own ``max_session_seconds``, the
override policy, the full GA session validation).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar

from broker.sessions.models import SessionList, SessionView
from broker.sessions.outbox import EVENT_TYPES
from broker.webhooks.endpoints import (
    MAX_DESCRIPTION, MAX_ENDPOINTS, AttemptPage, EndpointDeleted, EndpointView, EndpointWithSecret,
)
from broker.webhooks.urls import MAX_URL_LENGTH
from tenants.apikeys import MAX_ROTATION_OVERLAP_SECONDS
from tenants.models import (
    MAX_SESSION_SECONDS_CAP, ApiKeyCreated, ApiKeyMeta, ApiKeyRevoked, TenantDisabled, TenantView,
)
from tenants.budgets import BudgetUsage
from tenants.quotas import END_USER_POLICIES, INT_RANGES, NULLABLE_INT_RANGES
from tenants.session_config import GA_FIELDS, MAX_SCHEMA_BYTES
from tenants.session_secrets import REDACTED, SEALED_PREFIX
from tenants.usage import UsageSnapshot
from tenants.usage_history import TenantWindow, Window

J = dict[str, Any]
REF = "#/components/schemas/"
STATUSES = ["queued", "provisioning", "ready", "terminating", "terminated", "failed"]
REASONS = ["expired", "requested", "replaced", "tenant_disabled", "upstream_failed", "reaped"]
_RENAMED = {"broker.sessions.models.AvaturnView": "SessionAvaturn", "tenants.models.AvaturnView": "TenantAvaturn"}


def ref(name: str) -> J:
    return {"$ref": REF + name}


def nullable(schema: J) -> J:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(properties: J, required: tuple[str, ...] = (), **extra: Any) -> J:
    out: J = {"type": "object", "properties": properties, "additionalProperties": False, **extra}
    if required:
        out["required"] = list(required)
    return out


def text(lo: int = 0, hi: int | None = None, **extra: Any) -> J:
    out: J = {"type": "string", "minLength": lo, **extra}
    if hi is not None:
        out["maxLength"] = hi
    return out


def integer(lo: int, hi: int) -> J:
    return {"type": "integer", "minimum": lo, "maximum": hi}


# ---- request bodies ------------------------------------------------------------------------

_PROMPT = obj({"id": text(1, 256), "version": nullable(text(1, 64)),
               "variables": nullable({"type": "object", "maxProperties": 256,
                                      "additionalProperties": {"type": ["string", "object"]}})}, ("id",))
_CREDENTIAL_NOTE = (f"An MCP credential: stored encrypted, shown in every view as \"{REDACTED}\". In an admin "
                    f"update, \"{REDACTED}\" keeps the value stored for the same field of the mcp tool with the "
                    "same server_label and server (server_url / connector_id / tunnel_id), and is refused where "
                    f"none is stored; values starting with \"{SEALED_PREFIX}\" are refused.")


def _tool(credential: J) -> J:
    """A function or mcp tool; ``credential``: the schema of ``authorization`` and each header value."""
    return {"type": "object", "required": ["type"], "properties": {
        "type": {"enum": ["function", "mcp"]},
        "name": text(1, 64, pattern="^[A-Za-z0-9_-]+$"),
        "description": text(0, 8192),
        "parameters": {"type": "object", "description": f"JSON Schema, at most {MAX_SCHEMA_BYTES} bytes serialized"},
        "server_label": text(1, 256),
        "authorization": credential,
        "headers": nullable({"type": "object", "maxProperties": 64, "additionalProperties": credential}),
    }}


def _realtime_session(tool: J, description: str) -> J:
    return obj({
        "type": {"enum": ["realtime"]},
        "model": text(1, 64, pattern=r"^\S+$"),
        "instructions": text(0, 32_768),
        "audio": {"type": "object", "description": "GA audio config: input {format, transcription, noise_reduction, "
                                                   "turn_detection}, output {format, voice, speed}"},
        "output_modalities": {"type": "array", "maxItems": 1, "items": {"enum": ["audio", "text"]}},
        "tools": {"type": "array", "maxItems": 128, "items": tool},
        "tool_choice": {"type": ["string", "object"]},
        "prompt": nullable(_PROMPT),
        "max_output_tokens": {"anyOf": [integer(1, 4096), {"enum": ["inf"]}]},
        "truncation": {"type": ["string", "object"]},
        "tracing": {"type": ["string", "object", "null"]},
        "include": {"type": "array", "maxItems": 1, "items": {"enum": ["item.input_audio_transcription.logprobs"]}},
        "reasoning": {"type": "object"},
        "parallel_tool_calls": {"type": "boolean"},
    }, description=description)


REALTIME_SESSION = _realtime_session(
    _tool(text(0, 8192, description=_CREDENTIAL_NOTE)),
    "OpenAI Realtime (GA) session fields; a tenant may override only the top-level fields its policy allows "
    "(default: instructions, audio, prompt). A tenant's own MCP credentials must be sent in full, never as "
    f"\"{REDACTED}\".")
REALTIME_SESSION_VIEW = _realtime_session(
    _tool({"enum": [REDACTED, ""], "description": f"\"{REDACTED}\" when set (the value is never shown)."}),
    f"The tenant's default session; every MCP credential (authorization, header values) is shown as \"{REDACTED}\": "
    "send the view back unchanged in a PATCH and the stored credentials are kept.")
SESSION_CREATE = obj({
    "session": nullable(ref("RealtimeSession")),
    "ttl_seconds": nullable(integer(10, MAX_SESSION_SECONDS_CAP)),
    "end_user": nullable(text(1, 128)),
    "metadata": nullable({"type": "object", "maxProperties": 16, "propertyNames": text(1, 64),
                          "additionalProperties": text(0, 512)}),
})
_QUOTAS_INPUT = obj({**{name: integer(lo, hi) for name, (lo, hi) in INT_RANGES.items()},
                     "end_user_policy": {"enum": list(END_USER_POLICIES)},
                     **{name: nullable(integer(lo, hi)) for name, (lo, hi) in NULLABLE_INT_RANGES.items()}})
_API_KEY = nullable(text(0, 1024, description='the credential (stored encrypted, never shown); "" clears it'))
_OPENAI_INPUT = obj({"api_key": _API_KEY, "session": nullable(ref("RealtimeSession")),
                     "allowed_overrides": nullable({"type": "array", "items": {"enum": sorted(GA_FIELDS)}})})
_AVATURN_INPUT = obj({"api_key": _API_KEY, "avatar_id": nullable(text(1, 128)),
                      "background": nullable({"enum": ["default", "transparent"]}),
                      "user_absent_timeout": nullable(integer(10, 86_400))})
_TENANT_FIELDS: J = {"quotas": nullable(_QUOTAS_INPUT), "openai": nullable(_OPENAI_INPUT),
                     "avaturn": nullable(_AVATURN_INPUT)}
_NAME = text(1, description="1..128 printable characters once trimmed")
TENANT_CREATE = obj({"name": _NAME, **_TENANT_FIELDS}, ("name",))
TENANT_PATCH = obj({"name": nullable(_NAME), "status": nullable({"enum": ["active", "disabled"]}), **_TENANT_FIELDS})
KEY_CREATE = obj({"not_after": nullable({"type": "string", "format": "date-time"})})
KEY_ROTATE = obj({"overlap_seconds": integer(0, MAX_ROTATION_OVERLAP_SECONDS)})
_WEBHOOK_URL = text(1, MAX_URL_LENGTH, description="https URL whose host resolves to public addresses only (http and "
                                                   "private addresses with BROKER_WEBHOOK_ALLOW_PRIVATE=true)")
_WEBHOOK_EVENTS = nullable({"type": "array", "minItems": 1, "items": {"enum": list(EVENT_TYPES)},
                            "description": "The event types delivered to the endpoint; null or left out: every type."})
_WEBHOOK_DESCRIPTION = nullable(text(0, MAX_DESCRIPTION, description="free text without control characters"))
WEBHOOK_CREATE = obj({"url": _WEBHOOK_URL, "events": _WEBHOOK_EVENTS, "description": _WEBHOOK_DESCRIPTION}, ("url",))
WEBHOOK_PATCH = obj({"url": _WEBHOOK_URL, "events": _WEBHOOK_EVENTS, "description": _WEBHOOK_DESCRIPTION,
                     "disabled": {"type": "boolean", "description": "false re-enables a disabled endpoint; true "
                                                                    "disables it (disabled_reason: tenant)"}})
EVENT_RESEND = obj({"endpoint_id": nullable(text(1, description="An endpoint id (we_...); default: every enabled "
                                                                   "endpoint whose events filter matches."))})

# ---- response bodies -----------------------------------------------------------------------

ERROR = obj({"error": {
    "type": "object", "required": ["code", "message"], "additionalProperties": True,
    "properties": {"code": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"}, "message": text(1),
                   "field": {"type": "string"}, "limit": {"type": "integer"}, "current": {"type": "integer"},
                   "retry_after": {"type": "number"},
                   "backlog": {"type": "integer", "minimum": 0,
                               "description": "provisioning_backlog: the tenant's sessions waiting for a mint slot"},
                   "budget": {"type": "string"}, "used": {"type": "integer"}, "reserved": {"type": "integer"},
                   "period_end": {"type": "string", "format": "date-time"}},
}}, ("error",))


def _model_components() -> J:
    """Response schemas generated from the msgspec models, closed and with readable names."""
    _, components = msgspec.json.schema_components(
        [SessionView, SessionList, TenantView, TenantDisabled, ApiKeyMeta, ApiKeyRevoked, ApiKeyCreated, UsageSnapshot,
         BudgetUsage, Window, TenantWindow, EndpointView, EndpointWithSecret, EndpointDeleted, AttemptPage],
        ref_template=REF + "{name}",
    )
    raw = msgspec.json.encode(components).decode()
    for old, new in _RENAMED.items():
        raw = raw.replace(f'"{old}"', f'"{new}"').replace(f'"{REF}{old}"', f'"{REF}{new}"')
    out: J = msgspec.json.decode(raw)
    for schema in out.values():
        if "properties" in schema:
            schema["additionalProperties"] = False
    out["OpenAIView"]["properties"]["session"] = ref("RealtimeSessionView")
    session = out["SessionView"]["properties"]
    session["status"] = {"enum": STATUSES}
    session["termination_reason"] = nullable({"enum": REASONS})
    for name in ("EndpointView", "EndpointWithSecret"):
        endpoint = out[name]["properties"]
        endpoint["disabled_reason"] = nullable({"enum": ["gone", "failing", "tenant"]})
        endpoint["events"] = nullable({"type": "array", "items": {"enum": list(EVENT_TYPES)}})
    out["EndpointWithSecret"]["properties"]["secret"] = text(7, pattern="^whsec_[A-Za-z0-9+/=]+$",
                                                             description="Shown in this answer only.")
    return out


_COUNT = {"type": "integer", "minimum": 0}


def components() -> J:
    models = _model_components()
    return {
        **models,
        "Error": ERROR,
        "RealtimeSession": REALTIME_SESSION,
        "RealtimeSessionView": REALTIME_SESSION_VIEW,
        "SessionCreate": SESSION_CREATE,
        "TenantCreate": TENANT_CREATE,
        "TenantPatch": TENANT_PATCH,
        "ApiKeyCreate": KEY_CREATE,
        "ApiKeyRotate": KEY_ROTATE,
        "Usage": obj({"tenant_id": {"type": "string"}, "quotas": ref("Quotas"),
                      "active_sessions": _COUNT, "sessions_today": _COUNT,
                      "rate_limit": obj({"limit": _COUNT, "remaining": _COUNT, "reset_seconds": _COUNT},
                                        ("limit", "remaining", "reset_seconds")),
                      "usage": ref("UsageSnapshot"),
                      "budgets": {"type": "object", "additionalProperties": ref("BudgetUsage"),
                                  "description": "session_seconds_per_month (and, with end_user, "
                                                 "session_seconds_per_end_user_per_month) of this UTC month"}},
                     ("tenant_id", "quotas", "active_sessions", "sessions_today", "rate_limit", "usage", "budgets")),
        "UsageHistory": obj({"data": {"type": "array", "items": ref("Window")}}, ("data",)),
        "AdminUsage": obj({"data": {"type": "array", "items": ref("TenantWindow")}}, ("data",)),
        "TenantList": obj({"data": {"type": "array", "items": ref("TenantView")}, "next_cursor": nullable(text())},
                          ("data", "next_cursor")),
        "ApiKeyList": obj({"data": {"type": "array", "items": ref("ApiKeyMeta")}}, ("data",)),
        "Event": obj({"id": text(), "type": {"enum": list(EVENT_TYPES)}, "created_at": text(),
                      "data": {"type": "object", "description": "Session events: sequence (1, 2, 3... per session) "
                                                                "and session (the session object as of the event)."}},
                     ("id", "type", "created_at", "data")),
        "WebhookEndpointCreate": WEBHOOK_CREATE,
        "WebhookEndpointPatch": WEBHOOK_PATCH,
        "EventResend": EVENT_RESEND,
        "EndpointList": obj({"data": {"type": "array", "maxItems": MAX_ENDPOINTS, "items": ref("EndpointView")}},
                            ("data",)),
        "EventResent": obj({"event_id": text(), "endpoint_ids": {"type": "array", "items": text()}},
                           ("event_id", "endpoint_ids")),
        "EventList": obj({"data": {"type": "array", "items": ref("Event")}, "next_cursor": nullable(text())},
                         ("data", "next_cursor")),
    }


SECURITY_SCHEMES = {
    "tenantApiKey": {"type": "http", "scheme": "bearer",
                     "description": "A tenant API key (sbk_...), created with POST /admin/v1/tenants/{id}/keys."},
    "adminToken": {"type": "http", "scheme": "bearer", "description": "BROKER_ADMIN_TOKEN."},
}

# ---- operations ----------------------------------------------------------------------------

_HEADER = {"schema": {"type": "string"}}
_RATELIMIT = {"RateLimit-Policy": _HEADER, "RateLimit": _HEADER}
_REASONS_BY_STATUS = {
    400: "Invalid input; `error.field` names the field.", 401: "Missing, unknown, revoked or expired credential.",
    402: "A session-second budget of this month is used up (`budget_exhausted`); the body names the budget, "
         "its limit, used and reserved seconds and period_end; retry after Retry-After (the period's end).",
    403: "The tenant is disabled.", 404: "Not found (another tenant's id answers exactly like an unknown one).",
    409: "A request with this Idempotency-Key is still being admitted (`idempotency_key_in_flight`); on the "
         "admin API: another tenant has this name (`tenant_name_taken`); webhooks: the tenant has "
         f"{MAX_ENDPOINTS} endpoints already (`webhook_endpoint_limit`, with `limit` and `current`), or the "
         "endpoint is disabled (`webhook_endpoint_disabled`).", 413: "The body is larger than 64 KiB.",
    415: "The body is not JSON, or its Content-Type names a charset other than UTF-8.",
    422: "The Idempotency-Key was used with another body.",
    429: ("A quota is exhausted (`rate_limited`, `concurrency_limit`, `daily_quota_exhausted`, `end_user_limit`), "
          "or the tenant's mint pacing cannot provision one more session before its deadline "
          "(`provisioning_backlog`: `limit` is openai_requests_per_minute, `current` and `backlog` the sessions "
          "already waiting for a mint slot); the body states the limit and the current usage, Retry-After when "
          "to retry, RateLimit the state of each policy (the mint pacing as \"mint\")."),
    503: "Redis is unreachable; retry after Retry-After.",
}


def _error(status: int) -> J:
    out: J = {"description": _REASONS_BY_STATUS[status], "content": {"application/json": {"schema": ref("Error")}}}
    if status == 429:
        out["headers"] = {"Retry-After": {**_HEADER, "required": True},
                          **{k: {**v, "required": True} for k, v in _RATELIMIT.items()}}
    elif status in (402, 503):
        out["headers"] = {"Retry-After": {**_HEADER, "required": True}}
    return out


def _ok(schema: str, description: str, headers: J | None = None) -> J:
    out: J = {"description": description, "content": {"application/json": {"schema": ref(schema)}}}
    if headers:
        out["headers"] = headers
    return out


def _path(name: str, description: str) -> J:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": text(1)}


def _query(name: str, schema: J, description: str) -> J:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def _body(schema: str) -> J:
    return {"required": False, "content": {"application/json": {"schema": ref(schema)}}}


_SID = _path("session_id", "A session id (ses_...).")
_TID = _path("tenant_id", "A tenant id (ten_...).")
_KID = _path("key_id", "An API key id (key_...).")
_WEID = _path("endpoint_id", "A webhook endpoint id (we_...).")
_EID = _path("event_id", "An event id (evt_...).")
_LIMIT = _query("limit", integer(1, 100), "Page size, 1..100 (default 20).")
_CURSOR = _query("cursor", {"type": "string"}, "The next_cursor of the previous page.")
_LAST_EVENT_ID = {"name": "Last-Event-ID", "in": "header", "required": False, "schema": text(1),
                  "description": "An event id (evt_...): resume after it."}


def _SSE_OK(description: str) -> J:  # noqa: N802
    return {"description": description + " One `event:`/`id:`/`data:` block per event (data: the event JSON).",
            "content": {"text/event-stream": {"schema": {"type": "string"}}}}


_TOO_MANY_STREAMS = {"description": "`too_many_streams`: the tenant has as many event streams open on this API "
                                    "process as it may (10); close one.",
                     "headers": {"Retry-After": {**_HEADER, "required": True}},
                     "content": {"application/json": {"schema": ref("Error")}}}
_CREATED = {"Location": {**_HEADER, "required": True}, **_RATELIMIT}
_TENANT_ERRORS = (401, 403, 503)
_ADMIN_ERRORS = (401, 503)
_WEBHOOK_BODY = (400, *_TENANT_ERRORS, 413, 415)

# (method, path) -> parameters, body schema, success responses, error statuses
OPERATIONS: dict[tuple[str, str], tuple[list[J], str | None, dict[int, J], tuple[int, ...]]] = {
    ("post", "/v1/sessions"): (
        [_query("wait", {"type": "number", "minimum": 0, "maximum": 30},
                "Seconds (0..30) to hold the answer until the session is ready or failed."),
         {"name": "Idempotency-Key", "in": "header", "required": False, "schema": text(1, 255),
          "description": "1..255 characters, scoped to the tenant; a replay returns the same session."}],
        "SessionCreate",
        {201: _ok("SessionView", "Ready (with wait).", _CREATED), 202: _ok("SessionView", "Accepted.", _CREATED),
         502: _ok("SessionView", "Failed upstream (with wait); the session's error says why.", _CREATED)},
        (400, 402, *_TENANT_ERRORS, 409, 413, 415, 422, 429),
    ),
    ("get", "/v1/sessions"): (
        [_query("status", {"enum": STATUSES}, "Only sessions in this status."), _LIMIT, _CURSOR],
        None, {200: _ok("SessionList", "Sessions, newest first.")}, (400, *_TENANT_ERRORS),
    ),
    ("get", "/v1/sessions/{session_id}"): ([_SID], None, {200: _ok("SessionView", "The session.")},
                                           (*_TENANT_ERRORS, 404)),
    ("delete", "/v1/sessions/{session_id}"): (
        [_SID], None,
        {200: _ok("SessionView", "Already terminated or failed."), 202: _ok("SessionView", "Terminating.")},
        (*_TENANT_ERRORS, 404),
    ),
    ("get", "/v1/usage"): (
        [_query("end_user", text(1, 128), "Also report this end user's live sessions.")],
        None, {200: _ok("Usage", "Quotas and live usage.", _RATELIMIT)}, (400, *_TENANT_ERRORS),
    ),
    ("get", "/v1/usage/history"): (
        [{**_query("from", {"type": "string", "format": "date"}, "First UTC day, YYYY-MM-DD."), "required": True},
         {**_query("to", {"type": "string", "format": "date"}, "Last UTC day (inclusive)."), "required": True},
         _query("granularity", {"enum": ["day", "hour"]}, "day (<= 400 days, the default) or hour (<= 31 days)."),
         _query("end_user", text(1, 128), "Only this end user's sessions.")],
        None, {200: _ok("UsageHistory", "Sessions admitted and billable seconds per window, oldest first.")},
        (400, *_TENANT_ERRORS),
    ),
    ("get", "/admin/v1/usage"): (
        [{**_query("from", {"type": "string", "format": "date"}, "First UTC day, YYYY-MM-DD."), "required": True},
         {**_query("to", {"type": "string", "format": "date"}, "Last UTC day (inclusive)."), "required": True},
         _query("granularity", {"enum": ["day", "hour"]}, "day (<= 400 days, the default) or hour (<= 31 days)."),
         _query("tenant_id", text(1), "Only this tenant (404 if unknown).")],
        None, {200: _ok("AdminUsage", "Per tenant and window, oldest first.")}, (400, *_ADMIN_ERRORS, 404),
    ),
    ("get", "/v1/events"): (
        [_query("type", text(1), "Only events of this type (or these, comma-separated)."),
         _query("session_id", text(1, 68), "Only this session's events."),
         _query("after", text(1), "An event id: the events after it (the next_cursor of the previous page)."),
         _query("limit", integer(1, 100), "Page size, 1..100 (default 20).")],
        None, {200: _ok("EventList", "Events, oldest first, kept 7 days.")}, (400, *_TENANT_ERRORS),
    ),
    ("get", "/v1/events/stream"): (
        [_LAST_EVENT_ID], None, {200: _SSE_OK("The tenant's events from now on (after Last-Event-ID when sent)."),
                                 429: _TOO_MANY_STREAMS},
        (400, *_TENANT_ERRORS),
    ),
    ("get", "/v1/sessions/{session_id}/events"): (
        [_SID, _LAST_EVENT_ID], None,
        {200: _SSE_OK("The session's events from its first (after Last-Event-ID when sent); "
                      "ends after session.failed or session.terminated."), 429: _TOO_MANY_STREAMS},
        (400, *_TENANT_ERRORS, 404),
    ),
    ("post", "/v1/webhook_endpoints"): (
        [], "WebhookEndpointCreate",
        {201: _ok("EndpointWithSecret", "Created; the signing secret is shown this once.")}, (*_WEBHOOK_BODY, 409),
    ),
    ("get", "/v1/webhook_endpoints"): ([], None, {200: _ok("EndpointList", "The endpoints, oldest first.")},
                                       _TENANT_ERRORS),
    ("get", "/v1/webhook_endpoints/{endpoint_id}"): ([_WEID], None, {200: _ok("EndpointView", "The endpoint.")},
                                                     (*_TENANT_ERRORS, 404)),
    ("patch", "/v1/webhook_endpoints/{endpoint_id}"): (
        [_WEID], "WebhookEndpointPatch", {200: _ok("EndpointView", "Updated.")}, (*_WEBHOOK_BODY, 404),
    ),
    ("delete", "/v1/webhook_endpoints/{endpoint_id}"): (
        [_WEID], None, {200: _ok("EndpointDeleted", "Deleted, with its attempt log.")}, (*_TENANT_ERRORS, 404),
    ),
    ("post", "/v1/webhook_endpoints/{endpoint_id}/rotate_secret"): (
        [_WEID], None,
        {200: _ok("EndpointWithSecret", "The new secret, shown this once; the old one also signs for 24 h.")},
        (*_TENANT_ERRORS, 404),
    ),
    ("post", "/v1/webhook_endpoints/{endpoint_id}/test"): (
        [_WEID], None, {202: _ok("Event", "A test.ping event, delivered to this endpoint only.")},
        (*_TENANT_ERRORS, 404, 409),
    ),
    ("get", "/v1/webhook_endpoints/{endpoint_id}/attempts"): (
        [_WEID, _LIMIT, _query("cursor", {"type": "string", "pattern": r"^[0-9]{1,20}-[0-9]{1,20}$"},
                               "The next_cursor of the previous page.")],
        None, {200: _ok("AttemptPage", "Delivery attempts, newest first.")}, (400, *_TENANT_ERRORS, 404),
    ),
    ("post", "/v1/events/{event_id}/resend"): (
        [_EID], "EventResend", {202: _ok("EventResent", "Queued for delivery to these endpoints.")},
        (*_WEBHOOK_BODY, 404, 409),
    ),
    ("post", "/admin/v1/tenants"): ([], "TenantCreate", {201: _ok("TenantView", "Created.")},
                                    (400, *_ADMIN_ERRORS, 409, 413, 415)),
    ("get", "/admin/v1/tenants"): ([_LIMIT, _CURSOR], None, {200: _ok("TenantList", "Tenants, oldest first.")},
                                   (400, *_ADMIN_ERRORS)),
    ("get", "/admin/v1/tenants/{tenant_id}"): ([_TID], None, {200: _ok("TenantView", "The tenant.")},
                                              (*_ADMIN_ERRORS, 404)),
    ("patch", "/admin/v1/tenants/{tenant_id}"): ([_TID], "TenantPatch", {200: _ok("TenantView", "Updated.")},
                                                (400, *_ADMIN_ERRORS, 404, 409, 413, 415)),
    ("post", "/admin/v1/tenants/{tenant_id}/disable"): (
        [_TID], None, {200: _ok("TenantDisabled", "Disabled; its live sessions are terminating.")}, (*_ADMIN_ERRORS, 404)),
    ("post", "/admin/v1/tenants/{tenant_id}/enable"): ([_TID], None, {200: _ok("TenantView", "Enabled.")},
                                                       (*_ADMIN_ERRORS, 404)),
    ("post", "/admin/v1/tenants/{tenant_id}/keys"): (
        [_TID], "ApiKeyCreate", {201: _ok("ApiKeyCreated", "The new key: its plaintext is shown this once.")},
        (400, *_ADMIN_ERRORS, 404, 413, 415),
    ),
    ("get", "/admin/v1/tenants/{tenant_id}/keys"): ([_TID], None, {200: _ok("ApiKeyList", "Key metadata.")},
                                                    (*_ADMIN_ERRORS, 404)),
    ("delete", "/admin/v1/tenants/{tenant_id}/keys/{key_id}"): (
        [_TID, _KID], None, {200: _ok("ApiKeyRevoked", "Revoked (every API process within 1 s).")},
        (*_ADMIN_ERRORS, 404),
    ),
    ("post", "/admin/v1/tenants/{tenant_id}/keys/{key_id}/rotate"): (
        [_TID, _KID], "ApiKeyRotate",
        {201: _ok("ApiKeyCreated", "The new key; the old one stays valid for overlap_seconds.")},
        (400, *_ADMIN_ERRORS, 404, 413, 415),
    ),
}


def _responses(success: dict[int, J], errors: tuple[int, ...]) -> J:
    out: J = {str(status): response for status, response in success.items()}
    out.update({str(status): _error(status) for status in sorted(set(errors))})
    return out


def document_openapi(app: Litestar) -> None:
    """Complete the app's OpenAPI object in place (call once, after the app is built).

    Litestar serialises its spec objects with ``to_schema()``, which passes plain dicts through,
    so the documented parts are plain JSON Schema / OpenAPI dicts."""
    spec = app.openapi_schema
    spec.components.schemas.update(components())
    spec.components.security_schemes = dict(SECURITY_SCHEMES)  # type: ignore[arg-type]
    for path, item in (spec.paths or {}).items():
        for method in ("get", "post", "patch", "delete"):
            operation = getattr(item, method, None)
            known = OPERATIONS.get((method, path))
            if operation is None or known is None:
                continue
            parameters, body, success, errors = known
            scheme = "adminToken" if path.startswith("/admin/") else "tenantApiKey"
            operation.parameters = list(parameters)
            operation.request_body = _body(body) if body else None
            operation.responses = _responses(success, errors)
            operation.security = [{scheme: []}]
