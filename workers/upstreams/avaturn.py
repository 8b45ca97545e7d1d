"""Avaturn: create and end live avatar sessions (``POST``/``DELETE {base}/sessions``).

One shared ``httpx.AsyncClient`` on ``httpx_aiohttp.AiohttpTransport`` with no cookies (see
:mod:`workers.upstreams.http`), explicit timeouts, the project API key per request.
Create has no idempotency upstream: a timeout or dropped connection after the request was sent
surfaces as ``UpstreamUnavailable(maybe_applied=True)`` so the caller can avoid a blind second
billed session. Error bodies are never passed on (FastAPI's 422 can echo the input, secret
included); only the 422 field location is.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import aiohttp
import httpx
import msgspec
from httpx_aiohttp import AiohttpTransport

from workers.upstreams.errors import (
    UpstreamError,
    UpstreamRejected,
    bad_response,
    is_transient_status,
    transient_status_error,
    transport_error,
)
from workers.upstreams.http import aiohttp_session_factory, no_cookie_jar

UPSTREAM = "avaturn"
_LOC_PART = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


class AvaturnSession(msgspec.Struct, frozen=True):
    session_id: str
    token: str

    def __repr__(self) -> str:  # the token lets a browser join the session
        return f"AvaturnSession(session_id={self.session_id!r}, token='***')"


class _Created(msgspec.Struct):
    session_id: str
    token: str


class _Detail(msgspec.Struct):
    detail: list[dict[str, Any]] | str | None = None


def _field_of_422(content: bytes) -> str | None:
    """The first ``loc`` of a FastAPI 422 as ``a.b.c`` (without ``body``), if it is plain names."""
    try:
        detail = msgspec.json.decode(content, type=_Detail).detail
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not isinstance(detail, list) or not detail or not isinstance(detail[0].get("loc"), list):
        return None
    parts = [str(p) for p in detail[0]["loc"] if p != "body"]
    if not parts or not all(isinstance(p, str) and _LOC_PART.match(p) for p in parts):
        return None
    return ".".join(parts)


def _status_error(operation: str, response: httpx.Response) -> UpstreamError:
    status = response.status_code
    if is_transient_status(status):
        return transient_status_error(UPSTREAM, operation, status, response.headers)
    param = None
    if status in (401, 403):
        code, message = "avaturn_invalid_api_key", "Avaturn rejected the API key configured for this tenant."
    elif status == 410:
        code, message = "avaturn_avatar_gone", "Avaturn says this avatar no longer exists."
    elif status == 422:
        param = _field_of_422(response.content)
        code = "avaturn_rejected"
        message = "Avaturn rejected the session request" + (f" (field '{param}')." if param else ".")
    elif operation == "delete":
        code, message = "avaturn_rejected", f"Avaturn refused to end the session (HTTP {status})."
    else:
        code = "avaturn_rejected"
        message = f"Avaturn rejected the session request (HTTP {status}); check avatar_id and background."
    return UpstreamRejected(upstream=UPSTREAM, operation=operation, status=status, code=code, message=message,
                            param=param)


class AvaturnClient:
    def __init__(self, base_url: str, timeout: float, max_connections: int = 1000) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._http = httpx.AsyncClient(
            transport=AiohttpTransport(
                client=aiohttp_session_factory(max_connections, httpx.create_ssl_context(), UPSTREAM)),
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            cookies=no_cookie_jar(),
        )

    def __repr__(self) -> str:
        return f"AvaturnClient(base_url={self.base_url!r})"

    async def _send(self, operation: str, method: str, url: str, api_key: str,
                    body: dict[str, Any] | None = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {api_key}"}
        content = None
        if body is not None:
            content = msgspec.json.encode(body)
            headers["content-type"] = "application/json"
        try:
            return await self._http.request(method, url, content=content, headers=headers)
        except (httpx.HTTPError, aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
            error = transport_error(UPSTREAM, operation, exc)
        raise error from None

    async def create_session(
        self,
        api_key: str,
        client_secret: str,
        *,
        avatar_id: str,
        background: str,
        user_absent_timeout: int,
        max_duration: int,
    ) -> AvaturnSession:
        """Create a session driven by the OpenAI Realtime ``client_secret``.

        Raises :class:`UpstreamRejected` or :class:`UpstreamUnavailable`.
        """
        body = {
            "avatar_id": avatar_id,
            "background": background,
            "user_absent_timeout": user_absent_timeout,
            "max_duration": max_duration,
            "conversation_engine": {"type": "openai-realtime", "client_secret": client_secret},
        }
        response = await self._send("create", "POST", f"{self.base_url}/sessions", api_key, body)
        if not response.is_success:
            raise _status_error("create", response)
        try:
            created = msgspec.json.decode(response.content, type=_Created)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise bad_response(UPSTREAM, "create", response.status_code) from None
        if not created.session_id or not created.token:
            raise bad_response(UPSTREAM, "create", response.status_code)
        return AvaturnSession(session_id=created.session_id, token=created.token)

    async def delete_session(self, api_key: str, session_id: str) -> bool:
        """End a session now: True if it was live, False if already gone (404 or 410)."""
        url = f"{self.base_url}/sessions/{quote(session_id, safe='')}"
        response = await self._send("delete", "DELETE", url, api_key)
        if response.is_success:
            return True
        if response.status_code in (404, 410):
            return False
        raise _status_error("delete", response)

    async def aclose(self) -> None:
        await self._http.aclose()
