"""Events (contract section 11, issue 20): ``GET /v1/events``, the tenant's events oldest first
after a cursor, for reconciliation (``broker/sessions/outbox.py`` reads the outbox stream)."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar import Request, Response, Router, get
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide

from broker.errors import InvalidInput
from broker.sessions.outbox import EVENT_TYPES, EventLog, entry_id
from tenants.models import Tenant

from .deps import authenticate_tenant, provide_tenant

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


@get("/")
async def list_events(request: Request, state: State, tenant: NamedDependency[Tenant]) -> Response[Any]:
    q = request.query_params
    page = await EventLog(state.redis).page(
        tenant.id, after=parse_after(q.get("after")), types=parse_types(q.get("type")),
        session_id=parse_session_id(q.get("session_id")), limit=parse_limit(q.get("limit")),
    )
    return Response(content=msgspec.to_builtins(page), status_code=200)


event_router = Router(
    path="/v1/events",
    route_handlers=[list_events],
    dependencies={"tenant": Provide(provide_tenant)},
    before_request=authenticate_tenant,
    tags=["events"],
)
