"""Tenant API (/v1): sessions and usage. Every handler receives the caller's tenant and
passes its id down: a session of another tenant is simply not found."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar import Request, Response, Router, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath
from litestar.types import ASGIApp

from broker.core.errors import InvalidInput
from broker.core.logs import bind_log_context
from broker.sessions.models import CreateSessionRequest, SessionRecord, SessionView, now_ms
from tenants.admission import Admitted
from tenants.budgets import read_budgets
from tenants.models import Tenant
from tenants.usage import usage as read_usage

from .body import read_json
from .answer import json_answer
from .deps import TENANT_SCOPE_KEY, authenticate_tenant, provide_tenant, raw_header
from .middleware import CLIENT_GONE
from .ratelimit import ratelimit_header_items, ratelimit_headers

MAX_WAIT = 30.0
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0 controls, DEL, C1 controls
# what a query number may look like (JSON's grammar): no "1_0", " 1", "nan", "inf" (Python's float/int accept them)
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _session_response(rec: SessionRecord, status: int, headers: dict[str, str] | None = None) -> Response[Any]:
    return Response(content=SessionView.of(rec), status_code=status, headers=headers or {})


def _wait_param(request: Request) -> float | None:
    query = request.scope["query_string"]
    if b"wait" not in query and b"%" not in query:  # the common case: nothing to parse (a %-escaped name is)
        return None
    raw = request.query_params.get("wait")
    if raw is None:
        return None
    value = float(raw) if _NUMBER.fullmatch(raw) else -1.0
    if not 0 <= value <= MAX_WAIT or value != value:
        raise InvalidInput("wait must be a number of seconds between 0 and 30", code="invalid_wait", field="wait")
    return value


def _check_characters(req: CreateSessionRequest) -> None:
    """No control characters (C0, DEL, C1) in end_user or metadata: they come back in answers,
    events and the console, and end up in logs and CSV exports of a tenant's own tools."""
    if req.end_user is not None and _CONTROL.search(req.end_user):
        raise InvalidInput("end_user must not contain control characters", code="invalid_end_user",
                           field="end_user")
    for key, value in (req.metadata or {}).items():
        if _CONTROL.search(key):
            raise InvalidInput("metadata keys must not contain control characters", code="invalid_metadata",
                               field="metadata")
        if _CONTROL.search(value):
            raise InvalidInput("metadata values must not contain control characters", code="invalid_metadata",
                               field=f"metadata.{key[:64]}")


def _idempotency_key(request: Request) -> str | None:
    key = raw_header(request, b"idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255:
        raise InvalidInput(
            "Idempotency-Key must be 1 to 255 characters", code="invalid_idempotency_key", field="Idempotency-Key"
        )
    return key


@post("/sessions", status_code=202)
async def create_session(request: Request) -> ASGIApp:
    """The hot path (issue 8): no dependency injection, no signature model, no ``Response``
    object. The router's authentication hook has put the caller's tenant in the scope; the
    body is read and decoded here (same errors as every other route, raised through the one
    error handler) and the answer is encoded once, with its headers already bytes."""
    scope = request.scope
    tenant: Tenant = scope[TENANT_SCOPE_KEY]  # type: ignore[literal-required]
    state = request.app.state
    metrics = state.metrics
    try:
        wait = _wait_param(request)
        idem = _idempotency_key(request)
        req, body = await read_json(request, CreateSessionRequest, empty_ok=True)
        _check_characters(req)
        rec, outcome = await state.sessions.create(tenant, req, body=body, idempotency_key=idem)
    except Exception as exc:
        if scope.get(CLIENT_GONE):  # type: ignore[misc] # left mid-body: not an error of the broker
            metrics.count_admission(tenant.id, "abandoned", "client_disconnected")
        else:
            metrics.admission_failed(tenant.id, exc)  # refused / rejected / error, by reason
        raise
    admitted = isinstance(outcome, Admitted)
    metrics.admission_result(tenant.id, replayed=not admitted)
    if admitted and outcome.budget is not None and outcome.budget.thresholds:  # type: ignore[union-attr]
        metrics.usage_thresholds.inc(outcome.budget.thresholds)  # type: ignore[union-attr]
    bind_log_context(session_id=rec.id)
    headers = [(b"location", b"/v1/sessions/" + rec.id.encode())]
    if admitted:
        headers.extend(ratelimit_header_items(outcome.usage, outcome.mint))  # type: ignore[union-attr]
    if wait:
        async def settled() -> bool:
            nonlocal rec
            fresh = await state.sessions.get(tenant.id, rec.id)
            rec = fresh
            return fresh.status not in ("queued", "provisioning")

        await state.events.wait_for(rec.id, settled, wait)
        if rec.status == "ready":
            return json_answer(201, SessionView.of(rec), headers)
        if rec.status == "failed":
            return json_answer(502, SessionView.of(rec), headers)
    return json_answer(202, SessionView.of(rec), headers)


@get("/sessions/{session_id:str}")
async def get_session(state: State, tenant: NamedDependency[Tenant], session_id: FromPath[str]) -> Response[Any]:
    return _session_response(await state.sessions.get(tenant.id, session_id), 200)


@get("/sessions")
async def list_sessions(request: Request, state: State, tenant: NamedDependency[Tenant]) -> Response[Any]:
    q = request.query_params
    raw_limit = q.get("limit", "20")
    if not (raw_limit.isascii() and raw_limit.isdigit()):  # int() would take " 5", "1_0", "+5"
        raise InvalidInput("limit must be an integer between 1 and 100", code="invalid_limit", field="limit")
    limit = int(raw_limit)
    result = await state.sessions.list(tenant.id, status=q.get("status"), limit=limit, cursor=q.get("cursor"))
    return Response(content=result, status_code=200)


@delete("/sessions/{session_id:str}", status_code=202)
async def delete_session(state: State, tenant: NamedDependency[Tenant], session_id: FromPath[str]) -> Response[Any]:
    rec = await state.sessions.stop(tenant.id, session_id)
    return _session_response(rec, 200 if rec.status in ("terminated", "failed") else 202)


@get("/usage")
async def get_usage(request: Request, state: State, tenant: NamedDependency[Tenant]) -> Response[Any]:
    end_user = request.query_params.get("end_user")
    if end_user is not None and (not 1 <= len(end_user) <= 128 or _CONTROL.search(end_user)):
        raise InvalidInput("end_user must be 1 to 128 characters, without control characters",
                           code="invalid_end_user", field="end_user")
    snap = await read_usage(state.redis, tenant.id, tenant.quotas, now_ms(), end_user=end_user)
    body = {
        "tenant_id": tenant.id,
        "quotas": msgspec.to_builtins(tenant.quotas),
        "active_sessions": snap.concurrency.used,
        "sessions_today": snap.day.used,
        "rate_limit": {
            "limit": snap.minute.limit,
            "remaining": snap.minute.remaining,
            "reset_seconds": snap.minute.reset_s,
        },
        "usage": msgspec.to_builtins(snap),
        # session-second budgets of the current UTC month (issue 21; tenants/budgets.py)
        "budgets": msgspec.to_builtins(await read_budgets(state.redis, tenant.id, tenant.quotas, now_ms(), end_user)),
    }
    return Response(content=body, status_code=200, headers=ratelimit_headers(snap))


tenant_router = Router(
    path="/v1",
    route_handlers=[create_session, get_session, list_sessions, delete_session, get_usage],
    dependencies={"tenant": Provide(provide_tenant)},
    before_request=authenticate_tenant,  # every route of this router, before handler and dependencies
    tags=["sessions"],
)
