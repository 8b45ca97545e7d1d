"""The HTTP side of webhook delivery (contract section 11): one signed POST per attempt.

One shared ``httpx.AsyncClient`` per worker on ``httpx_aiohttp``'s transport over an aiohttp pool
(as the upstream clients: ``workers/upstreams/http.py``), bounded (``max_connections``), no
cookies, no proxy from the environment (a proxy would resolve and connect for us), redirects
never followed (a 3xx is a failed attempt), 15 s for the whole attempt (connect, send, the
answer's first 4 KiB).

Where it may connect: ``https`` URLs only, and only to public addresses, checked on the
addresses the connection is actually made to: the pool's resolver (:class:`PublicResolver`)
hands aiohttp only the public addresses of a name (none: the attempt fails with
``address_not_public`` before any connection), and a URL naming an IP literal (which aiohttp
does not resolve) is checked here. ``allow_private`` (``BROKER_WEBHOOK_ALLOW_PRIVATE``:
development, tests) lifts both rules.

What is kept of the answer: the status, the ``Retry-After`` (seconds or an HTTP date) and at
most 4 KiB of the body, redacted (:func:`redact`) before it reaches the attempt log. The body
is read raw (``accept-encoding: identity`` is asked; a gzip/deflate answer all the same is
inflated to at most 4 KiB, another coding not shown), at most 4 KiB + 128 bytes of it (the
margin: a secret echoed across the cut is redacted whole), the rest never read.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import re
import socket
import ssl
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult
from httpx_aiohttp import AiohttpTransport

from broker.core import tracing
from broker.webhooks.addresses import is_public
from broker.webhooks.signing import headers as signed_headers

from .upstreams.http import KEEPALIVE_S, no_cookie_jar

TIMEOUT_S = 15.0
RESPONSE_LIMIT = 4096           # bytes of the answer's body kept (the attempt log)
RETRY_AFTER_CAP_S = 86400       # a Retry-After further than this is taken as this
# read beyond RESPONSE_LIMIT before redacting, so that a secret echoed across the cut is
# redacted whole, not kept in part (an echo is at most ~3x the 38 characters of a secret)
REDACT_MARGIN = 128
MAX_CONNECTIONS = 256
USER_AGENT = "session-broker-webhooks/1"


class AddressNotPublic(OSError):
    """The name resolved to no public address (or the URL names a private one)."""


class PublicResolver(AbstractResolver):
    """aiohttp's default resolver, keeping only the public addresses of a name: the connection
    can only be made to an address that passed the check (no second lookup to race with)."""

    def __init__(self) -> None:
        self._inner = aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        infos = await self._inner.resolve(host, port, family)
        public = [info for info in infos if is_public(info["host"])]
        if not public:
            raise AddressNotPublic(f"{host} resolves to no public address")
        return public

    async def close(self) -> None:
        await self._inner.close()


@dataclass
class Attempt:
    """What one POST got: ``status`` (None when no answer), ``error`` ('' or a short reason)."""

    status: int | None
    error: str
    latency_ms: int
    response: str
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


_SECRETISH = re.compile(r"(whsec_|sk-|sk_live_|sk_test_|rk_live_)[A-Za-z0-9+/=_\-.]*"
                        r"|(?i:bearer)\s+[A-Za-z0-9+/=_\-.~]+")
# how a receiver may echo a base64 character that is not a letter or digit: as is, JSON-escaped
# (PHP writes / as \/), percent-encoded (a query string, a form)
_B64_FORMS = {"/": r"(?:/|\\/|%2[fF])", "+": r"(?:\+|%2[bB]| )", "=": r"(?:=|%3[dD])"}


def _echo_pattern(value: str) -> str:
    """A regex matching ``value`` as is, JSON-escaped or percent-encoded."""
    return "".join(_B64_FORMS.get(c, re.escape(c)) for c in value)


def redact(text: str, secrets: Sequence[str] = (), signatures: Sequence[str] = ()) -> str:
    """``text`` without the endpoint's secrets (whole, or their base64 key part; as is,
    JSON-escaped or percent-encoded), nor this attempt's ``signatures`` (``v1,<base64>``), nor
    anything that looks like a secret (what follows ``whsec_``, ``sk-``, a bearer token)."""
    for secret in secrets:
        if not secret:
            continue
        key = secret.removeprefix("whsec_")
        if len(key) >= 8:
            text = re.sub(f"(?:whsec_)?{_echo_pattern(key)}", "[redacted]", text)
        text = text.replace(secret, "[redacted]")
    for sig in signatures:
        mac = sig.partition(",")[2]
        if len(mac) >= 8:
            text = re.sub(f"(?:v1,)?{_echo_pattern(mac)}", "[redacted]", text)
    return _SECRETISH.sub(lambda m: (m.group(1) or "bearer ") + "[redacted]", text)


_DELTA_SECONDS = re.compile(r"[0-9]+")


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now (delta seconds or an HTTP date), capped; None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):  # ASCII digits only: '²'.isdigit() is True, int('²') raises
        # (int() of more than 4300 digits raises too: a number that long is past the cap anyway)
        return float(min(int(value), RETRY_AFTER_CAP_S)) if len(value) <= 32 else float(RETRY_AFTER_CAP_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, min(when.timestamp() - now, RETRY_AFTER_CAP_S))


async def _read_raw(resp: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of the body as sent (``aiter_raw``: no content decoding, so a
    compressed answer cannot inflate in memory; the rest of the body is never read)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.aiter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def _body_text(raw: bytes, encoding: str, limit: int) -> str:
    """The start of the body as text: gzip or deflate inflated to at most ``limit`` bytes (a
    receiver may compress although asked not to), any other content coding not shown."""
    coding = encoding.strip().lower()
    if coding in ("", "identity"):
        data = raw
    elif coding in ("gzip", "x-gzip", "deflate"):
        try:
            data = zlib.decompressobj(zlib.MAX_WBITS | 32).decompress(raw, limit)  # gzip or zlib header
        except zlib.error:
            try:
                data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw, limit)  # raw deflate
            except zlib.error:
                return f"[{coding} body not readable]"
    else:
        return f"[{coding[:32]}-encoded body not shown]"
    return data[:limit].decode("utf-8", errors="replace")


def _ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kind):
            return True
        seen.add(id(cur))
        os_error = getattr(cur, "os_error", None)  # aiohttp's ClientConnectorError keeps the cause here
        if isinstance(os_error, kind):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


class WebhookSender:
    def __init__(self, *, allow_private: bool, timeout_s: float = TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS, ssl_context: ssl.SSLContext | None = None) -> None:
        self.allow_private = allow_private
        self.timeout_s = timeout_s
        context = ssl_context or httpx.create_ssl_context()

        def make() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=KEEPALIVE_S, ssl=context,
                                             resolver=None if allow_private else PublicResolver())
            return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                         trace_configs=tracing.aiohttp_trace_configs("webhook", tracing.origin_only) or None)

        self._http = httpx.AsyncClient(transport=AiohttpTransport(client=make), timeout=httpx.Timeout(timeout_s),
                                       follow_redirects=False, cookies=no_cookie_jar(), trust_env=False)

    def refuse(self, url: str) -> str | None:
        """Why ``url`` may not be delivered to before any connection ('' reasons), or None."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError):
            return "invalid_url"
        if self.allow_private:
            return None if parsed.scheme in ("https", "http") else "scheme_not_https"
        if parsed.scheme != "https":
            return "scheme_not_https"
        literal = _ip_literal(parsed.host)
        if literal is not None and not is_public(literal):
            return "address_not_public"
        return None

    async def post(self, url: str, secrets: Sequence[str], msg_id: str, body: bytes) -> Attempt:
        """One signed POST of ``body``; never raises for what the receiver or the network did."""
        started = time.perf_counter()

        def took() -> int:
            return int((time.perf_counter() - started) * 1000)

        refused = self.refuse(url)
        if refused:
            return Attempt(None, refused, 0, "")
        h = signed_headers(secrets, msg_id, int(time.time()), body)
        h["user-agent"] = USER_AGENT
        h["accept-encoding"] = "identity"  # and the raw body is read (_read_raw): nothing is inflated unbounded
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._http.stream("POST", url, content=body, headers=h) as resp:
                    raw = await _read_raw(resp, RESPONSE_LIMIT + REDACT_MARGIN)
                    text = _body_text(raw, resp.headers.get("content-encoding", ""), RESPONSE_LIMIT + REDACT_MARGIN)
                    status = resp.status_code
                    retry_after = retry_after_seconds(resp.headers.get("retry-after"))
        except TimeoutError:
            return Attempt(None, "timeout", took(), "")
        except (httpx.HTTPError, aiohttp.ClientError, OSError) as exc:
            if _caused_by(exc, AddressNotPublic):
                return Attempt(None, "address_not_public", took(), "")
            if isinstance(exc, httpx.UnsupportedProtocol):  # a URL aiohttp refuses (a non-canonical IPv4)
                return Attempt(None, "invalid_url", took(), "")
            # by the cause: httpx_aiohttp maps every aiohttp connection error to ConnectTimeout
            if _caused_by(exc, aiohttp.ClientConnectorError) or _caused_by(exc, ConnectionError):
                return Attempt(None, "connect_error", took(), "")
            if isinstance(exc, httpx.TimeoutException) or _caused_by(exc, TimeoutError):
                return Attempt(None, "timeout", took(), "")
            return Attempt(None, "http_error", took(), "")
        error = "redirect_not_followed" if 300 <= status < 400 else ""
        shown = redact(text, secrets, h["webhook-signature"].split(" "))[:RESPONSE_LIMIT]
        return Attempt(status, error, took(), shown, retry_after)

    async def aclose(self) -> None:
        await self._http.aclose()
