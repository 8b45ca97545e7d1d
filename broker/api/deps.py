"""Dependencies: who is calling (tenant or admin), and the services from the app state.

A tenant authenticates with its API key (``Authorization: Bearer``) or, in the web console,
with the console's session cookie (:mod:`.console_session`); the key wins when both are sent.

Authentication is declared on each protected router, not in a path-excluding middleware,
so no route is public by accident (tests walk every route without a key): the tenant router
runs :func:`authenticate_tenant` as its ``before_request`` hook (before any handler or
dependency; unlike a guard, Litestar does not copy the route handler for it on every
request, which cost ~25 us of the hot ``POST /v1/sessions``), the admin router a guard."""

from __future__ import annotations

import hmac
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from broker.core.errors import NotFound, Unauthorized
from broker.core.logs import bind_log_context
from tenants.models import Tenant

from .console_session import authenticate_console

TENANT_SCOPE_KEY = "broker.tenant"  # where the guard leaves the authenticated tenant (in the ASGI scope)


def raw_header(connection: ASGIConnection[Any, Any, Any, Any], name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), read from the scope's raw list: the
    hot route does not build a ``Headers`` object for two or three look-ups."""
    for key, value in connection.scope["headers"]:
        if key == name:
            return value.decode("latin-1")  # type: ignore[no-any-return]
    return None


def bearer(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = raw_header(connection, b"authorization")
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def authenticate_tenant(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    """``before_request`` hook of the tenant router: authenticates before any handler or
    dependency runs, and leaves the tenant in the scope (returns None: the handler runs)."""
    key = bearer(connection)
    tenant: Tenant | None
    if key is None:  # no key: the console's cookie, if any (console_session.py: CSRF, revocation)
        tenant = await authenticate_console(connection)
        if tenant is None:
            raise Unauthorized("Send your API key as 'Authorization: Bearer <key>'", code="missing_api_key")
    else:
        tenant = await connection.app.state.auth.authenticate(key)
    connection.scope[TENANT_SCOPE_KEY] = tenant  # type: ignore[literal-required]
    connection.scope["tenant_id"] = tenant.id  # type: ignore[typeddict-unknown-key]
    sid = connection.path_params.get("session_id")
    # Log context of the rest of the request (reset by the middleware when it ends).
    bind_log_context(tenant_id=tenant.id, session_id=sid if isinstance(sid, str) and sid.startswith("ses_") else None)


async def provide_tenant(request: Request) -> Tenant:
    tenant: Tenant = request.scope[TENANT_SCOPE_KEY]  # type: ignore[literal-required]
    return tenant


async def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard of every admin route (guards run even when a handler takes no parameter)."""
    token: str | None = connection.app.state.settings.admin_token
    if token is None:  # the admin API is off: it does not exist
        raise NotFound("No such resource.", code="not_found")
    given = bearer(connection)
    if given is None or not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("A valid admin token is required.", code="invalid_admin_token")
