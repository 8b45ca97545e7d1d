"""What the rest of the code sees when an upstream call fails: never SDK exceptions or raw bodies.

::

    UpstreamError                     upstream, operation, status, code, message[, param]
     +-- UpstreamRejected             permanent: 400, 401, 403, 404, 410, 422, insufficient_quota,
     |                                other 4xx: fail the session now with ``code``
     +-- UpstreamUnavailable          transient: 408, 409, 429 rate limit, 5xx, timeouts, connection
                                      errors, unusable 2xx bodies: retry with backoff, honouring
                                      ``retry_after``; ``maybe_applied`` says whether the call may
                                      have taken effect upstream (a blind retry of a create could
                                      then make a second session)

``message`` is a fixed sentence written for tenants, so neither ``str()`` nor ``repr()`` can
carry an API key or a client secret (OpenAI's 401 text echoes part of the key; FastAPI's 422
can echo the input). The only upstream text passed on is an OpenAI 400's ``param`` and its
message after :func:`sanitize`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import httpx
import httpx2

# Anything that looks like a credential: OpenAI keys/secrets, bearer tokens, long opaque runs.
_SECRETISH = re.compile(r"(?i)\b(?:sk|ek|rk|pk|sess)[-_][\w\-*.]*|bearer\s+\S+|[\w\-*.~+/=]{24,}")
_MAX_MESSAGE = 200


def sanitize(text: str | None) -> str | None:
    """An upstream message made safe to show a tenant, or None when it may mention a key."""
    if not text or "api key" in text.lower() or "api_key" in text.lower():
        return None
    cleaned = _SECRETISH.sub("[redacted]", text).strip()
    if len(cleaned) > _MAX_MESSAGE:
        cleaned = cleaned[: _MAX_MESSAGE - 1] + "…"
    return cleaned or None


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (preferred) or ``retry-after`` (seconds or HTTP date)."""
    if not headers:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms) / 1000.0
        except ValueError:
            value = -1.0
        if value >= 0 and value == value:  # not NaN
            return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        return max(0.0, when - (time.time() if now is None else now))
    return value if value >= 0 and value == value else None


class UpstreamError(Exception):
    retryable = False

    def __init__(
        self,
        *,
        upstream: str,
        operation: str,
        status: int | None,
        code: str,
        message: str,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.upstream = upstream
        self.operation = operation
        self.status = status
        self.code = code
        self.message = message
        self.param = param

    def _fields(self) -> dict[str, Any]:
        return {
            "upstream": self.upstream,
            "operation": self.operation,
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "param": self.param,
        }

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self._fields().items() if v is not None)
        return f"{type(self).__name__}({shown})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self._fields()))


class UpstreamRejected(UpstreamError):
    """Permanent: retrying the same request cannot succeed."""


class UpstreamUnavailable(UpstreamError):
    """Transient: worth retrying after ``retry_after`` (if given) or a backoff."""

    retryable = True

    def __init__(
        self,
        *,
        upstream: str,
        operation: str,
        status: int | None,
        code: str,
        message: str,
        param: str | None = None,
        retry_after: float | None = None,
        maybe_applied: bool = False,
    ) -> None:
        super().__init__(upstream=upstream, operation=operation, status=status, code=code, message=message,
                         param=param)
        self.retry_after = retry_after
        self.maybe_applied = maybe_applied

    def _fields(self) -> dict[str, Any]:
        fields = super()._fields()
        fields.update(retry_after=self.retry_after, maybe_applied=self.maybe_applied)
        return fields


def _rebuild(cls: type[UpstreamError], fields: dict[str, Any]) -> UpstreamError:
    return cls(**fields)


# -- translation helpers shared by the upstream modules --------------------------------------

_NAMES = {"openai": "OpenAI", "avaturn": "Avaturn"}
TRANSIENT_STATUSES = frozenset({408, 409, 429})
GATEWAY_STATUSES = frozenset({502, 504})  # a proxy answered: the origin may have acted


def is_transient_status(status: int) -> bool:
    return status in TRANSIENT_STATUSES or status >= 500


def transient_status_error(upstream: str, operation: str, status: int,
                           headers: Mapping[str, str] | None) -> UpstreamUnavailable:
    name = _NAMES[upstream]
    if status == 429:
        code, message = "upstream_rate_limited", f"{name} is rate limiting requests; retrying later."
    else:
        code, message = "upstream_unavailable", f"{name} is temporarily unavailable (HTTP {status})."
    return UpstreamUnavailable(upstream=upstream, operation=operation, status=status, code=code, message=message,
                               retry_after=parse_retry_after(headers), maybe_applied=status in GATEWAY_STATUSES)


def bad_response(upstream: str, operation: str, status: int | None) -> UpstreamUnavailable:
    """A 2xx whose body is unusable: the call did take effect upstream."""
    return UpstreamUnavailable(upstream=upstream, operation=operation, status=status,
                               code="upstream_bad_response",
                               message=f"{_NAMES[upstream]} answered with an unusable response.",
                               maybe_applied=True)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < 16 and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def transport_phase(exc: BaseException) -> tuple[bool, bool]:
    """``(is_timeout, maybe_applied)`` of a failure without an HTTP answer.

    The aiohttp transports (ours and the one vendored in the openai SDK) map every
    ``aiohttp.ClientConnectionError`` (a dropped connection included) to ``ConnectTimeout``, so
    the aiohttp exception at the root of the chain is trusted before the httpx one on top.
    Connect-phase failures cannot have reached the upstream; anything later may have.
    """
    chain = _chain(exc)
    for err in chain:
        if isinstance(err, aiohttp.ConnectionTimeoutError):
            return True, False
        if isinstance(err, aiohttp.ClientConnectorError):
            return False, False
        if isinstance(err, aiohttp.ServerTimeoutError):
            return True, True
        if isinstance(err, aiohttp.ClientError):
            return False, True
    for err in chain:
        if isinstance(err, (httpx.ConnectTimeout, httpx.PoolTimeout, httpx2.ConnectTimeout, httpx2.PoolTimeout)):
            return True, False
        if isinstance(err, (httpx.ConnectError, httpx2.ConnectError)):
            return False, False
        if isinstance(err, (httpx.TimeoutException, httpx2.TimeoutException, TimeoutError)):
            return True, True
        if isinstance(err, ConnectionRefusedError):
            return False, False
    return False, True


def transport_error(upstream: str, operation: str, exc: BaseException) -> UpstreamUnavailable:
    name = _NAMES[upstream]
    is_timeout, maybe_applied = transport_phase(exc)
    if is_timeout:
        code, message = "upstream_timeout", f"{name} did not answer in time."
    elif maybe_applied:
        code, message = "upstream_unavailable", f"The connection to {name} was lost before it answered."
    else:
        code, message = "upstream_unavailable", f"Could not connect to {name}."
    return UpstreamUnavailable(upstream=upstream, operation=operation, status=None, code=code, message=message,
                               maybe_applied=maybe_applied)
