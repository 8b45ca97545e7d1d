"""Dependencies: who is calling (tenant or admin), and the services from the app state.

Authentication is a guard on each protected router, not a path-excluding middleware,
so no route is public by accident (tests walk every route without a key)."""

from __future__ import annotations

import hmac
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from broker.errors import NotFound, Unauthorized
from broker.logs import bind_log_context
from tenants.models import Tenant


def bearer(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def tenant_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard of every tenant route: authenticates before any handler or dependency runs."""
    key = bearer(connection)
    if key is None:
        raise Unauthorized("Send your API key as 'Authorization: Bearer <key>'", code="missing_api_key")
    tenant: Tenant = await connection.app.state.auth.authenticate(key)
    connection.state.tenant = tenant
    connection.scope["tenant_id"] = tenant.id  # type: ignore[typeddict-unknown-key]
    sid = connection.path_params.get("session_id")
    # Log context of the rest of the request (reset by the middleware when it ends).
    bind_log_context(tenant_id=tenant.id, session_id=sid if isinstance(sid, str) and sid.startswith("ses_") else None)


async def provide_tenant(request: Request) -> Tenant:
    tenant: Tenant = request.state.tenant
    return tenant


async def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard of every admin route (guards run even when a handler takes no parameter)."""
    token: str | None = connection.app.state.settings.admin_token
    if token is None:  # the admin API is off: it does not exist
        raise NotFound("No such resource.", code="not_found")
    given = bearer(connection)
    if given is None or not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("A valid admin token is required.", code="invalid_admin_token")
