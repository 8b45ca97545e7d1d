"""OpenAI: mint a Realtime ephemeral client secret with the official SDK.

One ``AsyncOpenAI`` per distinct API key (bounded LRU keyed by the key's sha256), all of them
sharing ONE ``DefaultAioHttpClient`` connection pool, so a new tenant costs an object and not
a pool; evicting a client is then just dropping it (the shared pool is closed by ``aclose``).
``max_retries=0`` and an explicit timeout: retries live in the job queue, which knows the
provisioning deadline. Every SDK exception is translated here (see
:mod:`workers.upstreams.errors`), and the SDK's own exception is not chained, since its
message can echo part of the key.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from typing import Any, cast

import aiohttp
import httpx
import msgspec
import openai.resources.realtime.realtime  # noqa: F401 - the SDK imports it lazily: at startup, not in the first job
from openai import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncOpenAI,
    DefaultAioHttpClient,
    OpenAIError,
)
from httpx_aiohttp.httpx2 import AiohttpTransport  # the transport the SDK vendors for DefaultAioHttpClient (same release)

from workers.upstreams.errors import (
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
    bad_response,
    is_transient_status,
    sanitize,
    transient_status_error,
    transport_error,
)
from workers.upstreams.http import aiohttp_session_factory, no_cookie_jar

UPSTREAM = "openai"
MAX_CONNECTIONS = 1000  # the SDK's default for its aiohttp client
_PARAM = re.compile(r"^[A-Za-z0-9_.\[\]]{1,120}$")
_REJECTED = {
    401: ("openai_invalid_api_key", "OpenAI rejected the API key configured for this tenant."),
    403: ("openai_permission_denied", "OpenAI refused this request for the API key configured for this tenant."),
    404: ("openai_not_found", "OpenAI did not find the requested resource (check the model name)."),
}


class MintedSecret(msgspec.Struct, frozen=True):
    value: str
    expires_at: int

    def __repr__(self) -> str:  # the value is a credential
        return f"MintedSecret(value='ek_***', expires_at={self.expires_at})"


def _key_id(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def _status_error(exc: APIStatusError) -> UpstreamError:
    status = exc.status_code
    if status == 429 and exc.code == "insufficient_quota":
        return UpstreamRejected(upstream=UPSTREAM, operation="mint", status=status, code="openai_insufficient_quota",
                                message="The OpenAI account of this tenant has run out of quota.")
    if is_transient_status(status):
        return transient_status_error(UPSTREAM, "mint", status, exc.response.headers)
    if status == 400:
        body = exc.body if isinstance(exc.body, dict) else {}
        param = exc.param if isinstance(exc.param, str) and _PARAM.match(exc.param) else None
        detail = sanitize(body.get("message") if isinstance(body.get("message"), str) else None)
        message = "OpenAI rejected the session configuration"
        message += f" (parameter '{param}')" if param else ""
        message += f": {detail}" if detail else "."
        return UpstreamRejected(upstream=UPSTREAM, operation="mint", status=status, code="openai_bad_request",
                                message=message, param=param)
    code, message = _REJECTED.get(status, ("openai_rejected", f"OpenAI rejected the request (HTTP {status})."))
    return UpstreamRejected(upstream=UPSTREAM, operation="mint", status=status, code=code, message=message)


def _parse(result: object) -> MintedSecret:
    value = getattr(result, "value", None)
    expires_at = getattr(result, "expires_at", None)
    if isinstance(expires_at, float) and expires_at.is_integer():
        expires_at = int(expires_at)
    if not isinstance(value, str) or not value or isinstance(expires_at, bool) or not isinstance(expires_at, int):
        raise bad_response(UPSTREAM, "mint", 200)
    return MintedSecret(value=value, expires_at=expires_at)


class OpenAIMinter:
    def __init__(self, base_url: str, timeout: float, max_clients: int = 256) -> None:
        if max_clients < 1:
            raise ValueError("max_clients must be >= 1")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_clients = max_clients
        self.clients_created = 0
        # the SDK's aiohttp client and transport, with the pool they would build (1,000
        # connections) but no cookies (see workers.upstreams.http)
        self._http = DefaultAioHttpClient(
            timeout=timeout, cookies=no_cookie_jar(),
            transport=AiohttpTransport(
                client=aiohttp_session_factory(MAX_CONNECTIONS, httpx.create_ssl_context(), UPSTREAM)),
        )
        self._clients: OrderedDict[str, AsyncOpenAI] = OrderedDict()

    def __repr__(self) -> str:
        return f"OpenAIMinter(base_url={self.base_url!r}, clients={len(self._clients)})"

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def client_for(self, api_key: str) -> AsyncOpenAI:
        """The cached SDK client of ``api_key`` (built on first use, least recently used evicted)."""
        key_id = _key_id(api_key)
        client = self._clients.get(key_id)
        if client is not None:
            self._clients.move_to_end(key_id)
            return client
        client = AsyncOpenAI(api_key=api_key, base_url=self.base_url, timeout=self.timeout, max_retries=0,
                             http_client=self._http)
        self.clients_created += 1
        self._clients[key_id] = client
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)  # shares the pool: nothing to close
        return client

    async def mint(self, api_key: str, session: dict[str, Any], expires_seconds: int) -> MintedSecret:
        """Mint a client secret for ``session`` valid ``expires_seconds`` from its creation.

        Raises :class:`UpstreamRejected` or :class:`UpstreamUnavailable`, never an SDK error.
        """
        client = self.client_for(api_key)
        try:
            result = await client.realtime.client_secrets.create(
                expires_after={"anchor": "created_at", "seconds": expires_seconds},
                session=cast(Any, session),
            )
        except APITimeoutError as exc:  # before APIConnectionError, its base class
            error: UpstreamError = transport_error(UPSTREAM, "mint", exc)
        except APIConnectionError as exc:
            error = transport_error(UPSTREAM, "mint", exc)
        except APIStatusError as exc:
            error = _status_error(exc)
        except (aiohttp.ClientError, TimeoutError) as exc:  # raised by aiohttp, not mapped by the SDK
            error = transport_error(UPSTREAM, "mint", exc)
        except (OpenAIError, json.JSONDecodeError, UnicodeDecodeError):  # the SDK does not validate answers
            error = bad_response(UPSTREAM, "mint", 200)
        else:
            return _parse(result)
        raise error from None

    async def aclose(self) -> None:
        self._clients.clear()
        await self._http.aclose()


__all__ = ["MintedSecret", "OpenAIMinter", "UpstreamRejected", "UpstreamUnavailable"]
