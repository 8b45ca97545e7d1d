"""Console sessions: a tenant API key exchanged for a cookie (contract section 12).

``POST /console/session`` (``console_routes``) authenticates the key and stores a console
session in Redis (:func:`tenants.scope.console_session`, named by the SHA-256 of the cookie's
token): the tenant id, the key's id and hash (never the key), a CSRF token and the expiry (12 h
at most, never past the key's ``not_after``). The browser holds only the random token, in an
``HttpOnly``, ``SameSite=Strict`` cookie, ``Secure`` when the request came over https
(``scope["scheme"]``: uvicorn sets it from ``X-Forwarded-Proto`` only for the proxies its
``FORWARDED_ALLOW_IPS`` trusts, 127.0.0.1 by default).

:func:`authenticate_console` is the cookie half of the tenant authentication hook
(``deps.authenticate_tenant`` calls it when a request has no ``Authorization`` key). Every
request re-checks the key and its tenant through the :class:`~tenants.auth.KeyAuthenticator`
(its caches and their 1 s revocation), so a revoked or expired key, or a disabled tenant, ends
the console session there and then. A request that may change state (any method but GET, HEAD
and OPTIONS) must also carry the session's CSRF token in ``X-CSRF-Token`` (compared in constant
time); ``SameSite=Strict`` already keeps the cookie off cross-site requests.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any

import msgspec
import redis.asyncio as aioredis
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie

from broker.core.errors import BrokerError, Forbidden, Unauthorized
from tenants.auth import KeyIdentity
from tenants.models import Tenant
from tenants.scope import console_session

COOKIE = "sb_console"
CSRF_HEADER = "X-CSRF-Token"
MAX_AGE_SECONDS = 12 * 3600
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CONSOLE_SCOPE_KEY = "broker.console"  # where the hook leaves the request's ConsoleSession
_TOKEN_LEN = 43  # secrets.token_urlsafe(32)
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class ConsoleSession(msgspec.Struct, frozen=True, kw_only=True):
    """What Redis holds about one console sign-in (``digest`` names it; it is not stored)."""

    tenant_id: str
    key_id: str
    key_hash: str
    csrf: str
    expires_at: float  # unix seconds
    digest: str = ""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def _plausible(token: str | None) -> bool:
    return token is not None and len(token) == _TOKEN_LEN and _TOKEN_CHARS.issuperset(token)


async def open_session(redis: aioredis.Redis, identity: KeyIdentity, now: float) -> tuple[str, ConsoleSession]:
    """A new console session for ``identity``: ``(cookie token, session)``."""
    expires_at = now + MAX_AGE_SECONDS
    if identity.not_after is not None:
        expires_at = min(expires_at, identity.not_after)
    token = secrets.token_urlsafe(32)
    session = ConsoleSession(
        tenant_id=identity.tenant.id, key_id=identity.key_id, key_hash=identity.key_hash,
        csrf=secrets.token_urlsafe(32), expires_at=expires_at, digest=_digest(token),
    )
    key = console_session(session.digest)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping={
            "tenant_id": session.tenant_id, "key_id": session.key_id, "key_hash": session.key_hash,
            "csrf": session.csrf, "expires_at": repr(session.expires_at),
        })
        pipe.pexpireat(key, int(expires_at * 1000))
        await pipe.execute()
    return token, session


async def load_session(redis: aioredis.Redis, token: str | None, now: float) -> ConsoleSession | None:
    """The live console session of a cookie token, or None (unknown, malformed or expired)."""
    if not _plausible(token):
        return None
    digest = _digest(token)  # type: ignore[arg-type]
    raw = await redis.hgetall(console_session(digest))
    if not raw:
        return None
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    try:
        session = msgspec.convert({**fields, "digest": digest}, ConsoleSession, strict=False)
    except msgspec.ValidationError:
        return None
    return session if session.expires_at > now else None


async def close_session(redis: aioredis.Redis, digest: str) -> None:
    await redis.delete(console_session(digest))


def session_cookie(token: str, max_age: int, secure: bool) -> Cookie:
    return Cookie(key=COOKIE, value=token, path="/", max_age=max_age, httponly=True, samesite="strict",
                  secure=secure or None)


def cleared_cookie(secure: bool) -> Cookie:
    return session_cookie("", 0, secure)


def set_cookie_value(cookie: Cookie) -> str:
    """The ``Set-Cookie`` header value of ``cookie`` (for an error answer, which has no cookie list)."""
    return cookie.to_encoded_header()[1].decode("latin-1")


def is_https(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    return connection.scope.get("scheme") == "https"


def session_ended(error: BrokerError, connection: ASGIConnection[Any, Any, Any, Any]) -> BrokerError:
    """``error`` with the header that removes the console cookie from the browser."""
    error.headers = {**error.headers, "Set-Cookie": set_cookie_value(cleared_cookie(is_https(connection)))}
    return error


async def authenticate_console(connection: ASGIConnection[Any, Any, Any, Any]) -> Tenant | None:
    """The tenant of the request's console cookie; None when it has no cookie. Raises 401 when
    the console session is unknown or over, 403 ``csrf_token_invalid`` when a state-changing
    request lacks the session's CSRF token, and the authenticator's 401/403 when the key was
    revoked or expired or the tenant disabled (the console session is deleted then)."""
    token = connection.cookies.get(COOKIE)
    if token is None:
        return None
    state = connection.app.state
    session = await load_session(state.redis, token, time.time())
    if session is None:
        raise session_ended(Unauthorized(
            "Your console session has ended (signed out, expired, or its API key was revoked); "
            "sign in again with your API key.",
            code="console_session_expired",
        ), connection)
    if connection.scope.get("method", "GET") not in SAFE_METHODS:
        sent = connection.headers.get(CSRF_HEADER)
        if sent is None or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            raise Forbidden(
                f"This console request lacks its CSRF token: send the token of GET /console/session "
                f"in the {CSRF_HEADER} header.",
                code="csrf_token_invalid",
            )
    try:
        tenant: Tenant = await state.auth.authenticate_hash(session.key_hash, session.key_id)
    except (Unauthorized, Forbidden) as exc:
        await close_session(state.redis, session.digest)
        raise session_ended(exc, connection) from None
    connection.scope[CONSOLE_SCOPE_KEY] = session  # type: ignore[literal-required]
    return tenant
