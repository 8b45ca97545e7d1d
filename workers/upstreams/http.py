"""The HTTP stack under both upstream clients: httpx's API (the openai SDK's ``httpx2`` fork for
the mint) on aiohttp's pool, which is far faster than httpx's own under concurrency, and no
cookies at either layer.

Each client is shared by every tenant, so anything it keeps between requests crosses tenants.
httpx and aiohttp both keep cookies by default: a cookie set in one tenant's answer (OpenAI's edge
sets Cloudflare's ``__cf_bm`` and ``_cfuvid`` on API answers) went out with the next tenant's
requests, which also made the edge see every tenant as one visitor."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from http.cookiejar import CookieJar, DefaultCookiePolicy

import aiohttp

from broker.core import tracing

KEEPALIVE_S = 5.0  # httpx's default keep-alive expiry, which the transports used before


def no_cookie_jar() -> CookieJar:
    """A jar for httpx's ``cookies=``: its policy allows no domain, so nothing is stored or sent."""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def aiohttp_session_factory(max_connections: int, ssl_context: ssl.SSLContext,
                            upstream: str = "upstream") -> Callable[[], aiohttp.ClientSession]:
    """The ``client=`` of an httpx-aiohttp transport: the pool the transport would build itself
    (same limit, keep-alive and TLS context), with aiohttp's jar replaced by one that keeps
    nothing. Called by the transport on its first request, inside the running loop.

    With tracing on, every request is a client span of the contrib aiohttp instrumentation
    (``<METHOD> <upstream>``): the openai SDK (httpx2) and httpx both send through this pool,
    so this one place traces the mint, the create and the delete."""

    def make() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=KEEPALIVE_S, ssl=ssl_context)
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                     trace_configs=tracing.aiohttp_trace_configs(upstream) or None)

    return make
