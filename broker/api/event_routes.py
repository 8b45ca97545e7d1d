"""Events (contract section 11, issue 20): ``GET /v1/events``, the tenant's events oldest first
after a cursor, for reconciliation (``broker/sessions/outbox.py`` reads the outbox stream), and
the live SSE streams ``GET /v1/events/stream`` and ``GET /v1/sessions/{id}/events``
(``event_stream.py``)."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar import Request, Response, Router, get
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath
from litestar.response import Stream

from broker.core.errors import InvalidInput
from broker.sessions.outbox import EVENT_TYPES, EventLog, entry_id
from tenants.models import Tenant

from .deps import authenticate_tenant, provide_tenant
from .event_stream import MEDIA_TYPE, StreamSlots, blocks

DEFAULT_LIMIT = 20
_SESSION_ID = re.compile(r"ses_[A-Za-z0-9]{1,64}")


def parse_types(raw: str | None) -> frozenset[str] | None:
    """``type``: one event type, or several comma-separated."""
    if raw is None:
        return None
    types = frozenset(t.strip() for t in raw.split(","))
    unknown = sorted(types - set(EVENT_TYPES))
    if unknown:
        raise InvalidInput(f"type must be among {', '.join(EVENT_TYPES)} (comma-separated), not {unknown[0]!r}"[:300],
                           code="invalid_event_type", field="type")
    return types


def parse_after(raw: str | None, field: str = "after") -> str | None:
    if raw is None or raw == "":
        return None
    eid = entry_id(raw)
    if eid is None:
        raise InvalidInput(f"{field} must be an event id (evt_...)", code="invalid_cursor", field=field)
    return eid


def parse_session_id(raw: str | None) -> str | None:
    if raw is None:
        return None
    if not _SESSION_ID.fullmatch(raw):
        raise InvalidInput("session_id must be a session id (ses_...)", code="invalid_session_id", field="session_id")
    return raw


def parse_limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise InvalidInput("limit must be an integer from 1 to 100", code="invalid_limit", field="limit")
    return int(raw)


@get("/events")
async def list_events(request: Request, state: State, tenant: NamedDependency[Tenant]) -> Response[Any]:
    q = request.query_params
    page = await EventLog(state.redis).page(
        tenant.id, after=parse_after(q.get("after")), types=parse_types(q.get("type")),
        session_id=parse_session_id(q.get("session_id")), limit=parse_limit(q.get("limit")),
    )
    return Response(content=msgspec.to_builtins(page), status_code=200)


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _slots(state: State) -> StreamSlots:
    slots: StreamSlots = state.event_streams  # one per API process (app.py's lifespan)
    return slots


@get("/events/stream")
async def event_stream(request: Request, state: State, tenant: NamedDependency[Tenant]) -> Stream:
    after = parse_after(request.headers.get("last-event-id"), field="Last-Event-ID")
    slot = _slots(state).take(tenant.id)
    return Stream(blocks(state.redis, state.events, slot, tenant.id, after, from_latest=True),
                  media_type=MEDIA_TYPE, headers=_SSE_HEADERS)


@get("/sessions/{session_id:str}/events")
async def session_event_stream(request: Request, state: State, tenant: NamedDependency[Tenant],
                               session_id: FromPath[str]) -> Stream:
    after = parse_after(request.headers.get("last-event-id"), field="Last-Event-ID")
    rec = await state.sessions.get(tenant.id, session_id)  # 404 for an unknown or another tenant's id
    slot = _slots(state).take(tenant.id)
    return Stream(blocks(state.redis, state.events, slot, tenant.id, after, session_id=rec.id),
                  media_type=MEDIA_TYPE, headers=_SSE_HEADERS)


event_router = Router(
    path="/v1",
    route_handlers=[list_events, event_stream, session_event_stream],
    dependencies={"tenant": Provide(provide_tenant)},
    before_request=authenticate_tenant,
    tags=["events"],
)
