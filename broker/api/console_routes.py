"""The web console (contract section 12): its page and files, and its sign-in.

``GET /console`` and ``GET /console/assets/{name}`` serve the files shipped in
``broker/api/static/`` (plain HTML, CSS and JavaScript: no build step, nothing loaded from
elsewhere, the Content-Security-Policy allows only this origin). They are public: the page
holds no data until its user signs in.

``/console/session`` exchanges a tenant API key for the console's cookie (POST), tells the
page who is signed in and its CSRF token (GET), and signs out (DELETE). It runs the tenant
API's own authentication hook, so a key is refused here exactly as on ``/v1``, and the
console's data calls are the tenant API itself (``/v1/...`` with the cookie): one owner for
every rule (:mod:`.console_session` has the cookie's).
"""

from __future__ import annotations

import functools
import time
from importlib import resources
from typing import Any

from litestar import Request, Response, Router, delete, get, post
from litestar.params import FromPath

from broker.core.errors import NotFound, Unauthorized
from broker.sessions.models import iso
from tenants.models import Tenant

from .console_session import (
    CONSOLE_SCOPE_KEY,
    COOKIE,
    MAX_AGE_SECONDS,
    ConsoleSession,
    close_session,
    cleared_cookie,
    is_https,
    load_session,
    open_session,
    session_cookie,
)
from .deps import TENANT_SCOPE_KEY, authenticate_tenant, bearer

_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8"}
ASSETS = ("console.css", "console.js", "timeline.js", "webhooks.js")
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
NO_STORE = {"Cache-Control": "no-store"}


@functools.cache
def _file(name: str) -> bytes:
    return resources.files("broker.api").joinpath("static", name).read_bytes()


def _served(name: str) -> Response[bytes]:
    media_type = _TYPES[name[name.rindex("."):]]
    return Response(content=_file(name), media_type=media_type, headers=PAGE_HEADERS)


@get("/", sync_to_thread=False)
def console_page() -> Response[bytes]:
    return _served("index.html")


@get("/assets/{name:str}", sync_to_thread=False)
def console_asset(name: FromPath[str]) -> Response[bytes]:
    if name not in ASSETS:
        raise NotFound("No such console file.", code="not_found")
    return _served(name)


def _view(tenant: Tenant, session: ConsoleSession) -> dict[str, Any]:
    return {
        "tenant": {"id": tenant.id, "name": tenant.name},
        "key_id": session.key_id,
        "csrf_token": session.csrf,
        "expires_at": iso(int(session.expires_at * 1000)),
    }


def _console_session(request: Request) -> ConsoleSession:
    session: ConsoleSession | None = request.scope.get(CONSOLE_SCOPE_KEY)  # type: ignore[call-overload]
    if session is None:
        raise Unauthorized(
            "This request carries an API key, not a console session: sign in with POST /console/session.",
            code="console_session_required",
        )
    return session


@post("/", status_code=201)
async def sign_in(request: Request) -> Response[dict[str, Any]]:
    """Exchange the API key of ``Authorization: Bearer`` (already checked by the hook) for the
    console cookie. A console session the browser already had is ended first."""
    key = bearer(request)
    if key is None:
        raise Unauthorized("Sign in with your tenant API key, sent as 'Authorization: Bearer <key>'.",
                           code="missing_api_key")
    state = request.app.state
    identity = await state.auth.identify(key)
    now = time.time()
    previous = await load_session(state.redis, request.cookies.get(COOKIE), now)
    if previous is not None:
        await close_session(state.redis, previous.digest)
    token, session = await open_session(state.redis, identity, now)
    max_age = max(1, min(MAX_AGE_SECONDS, int(session.expires_at - now)))
    return Response(
        content=_view(identity.tenant, session), status_code=201, headers=NO_STORE,
        cookies=[session_cookie(token, max_age, is_https(request))],
    )


@get("/")
async def current_session(request: Request) -> Response[dict[str, Any]]:
    """Who is signed in, and the CSRF token the page sends back (the page keeps it in memory only)."""
    tenant: Tenant = request.scope[TENANT_SCOPE_KEY]  # type: ignore[literal-required]
    return Response(content=_view(tenant, _console_session(request)), status_code=200, headers=NO_STORE)


@delete("/", status_code=200)
async def sign_out(request: Request) -> Response[dict[str, Any]]:
    session = _console_session(request)
    await close_session(request.app.state.redis, session.digest)
    return Response(content={"signed_out": True}, status_code=200, headers=NO_STORE,
                    cookies=[cleared_cookie(is_https(request))])


console_page_router = Router(
    path="/console", route_handlers=[console_page, console_asset], include_in_schema=False, tags=["console"]
)
console_session_router = Router(
    path="/console/session",
    route_handlers=[sign_in, current_session, sign_out],
    before_request=authenticate_tenant,  # the tenant API's hook: key or cookie (+ CSRF), every method
    include_in_schema=False,
    tags=["console"],
)
console_routers = [console_page_router, console_session_router]
