"""The one place where exceptions become the contract's error body.

``BrokerError`` → its status and body; Litestar's own HTTP exceptions (unknown route, wrong
method, body too large) → the same shape; Redis down → 503 with Retry-After; anything
else → 500 ``internal_error`` (a bug: logged with its traceback, never shown).

One answer does not go through an exception: Litestar's OpenAPI router serves unknown
``/schema/<name>`` paths with a handler that *returns* an HTML 404 page.
:func:`docs_error_hook` (an ``after_request`` hook on that router) gives it the same shape.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.core import tracing
from broker.core.errors import BrokerError, ServiceUnavailable
from broker.sessions.service import AdmissionRefused

from .ratelimit import refusal_headers

log = logging.getLogger("broker.api")

_HTTP_CODES = {
    400: ("invalid_request", "The request is malformed."),
    401: ("unauthorized", "A valid API key is required."),
    403: ("forbidden", "This action is not allowed."),
    404: ("not_found", "No such resource."),
    405: ("method_not_allowed", "This method is not allowed on this path."),
    413: ("payload_too_large", "The request body is larger than 64 KiB."),
    415: ("unsupported_media_type", "Send the body as application/json."),
    429: ("rate_limited", "Too many requests."),
    503: ("service_unavailable", "The service is temporarily unavailable."),
}


def error_response(exc: BrokerError) -> Response[dict[str, object]]:
    tracing.set_error_code(exc.code)  # on the request's span (tracing on)
    headers = exc.headers
    if isinstance(exc, AdmissionRefused):  # the domain gives the numbers, the headers are HTTP's
        headers = {**refusal_headers(exc.refused), **headers}
    return Response(content=exc.body(), status_code=exc.status, headers=headers)


def handle_broker_error(_: Request, exc: BrokerError) -> Response[dict[str, object]]:
    return error_response(exc)


def http_error_response(status: int, headers: dict[str, str] | None = None) -> Response[dict[str, object]]:
    """The contract's body for an HTTP-level error (no domain code of ours to tell)."""
    code, message = _HTTP_CODES.get(status, ("http_error", "The request could not be processed."))
    error = {"code": code, "message": message}
    tracing.set_error_code(code)
    if status == 413:  # every input violation names its field
        error["field"] = "body"
    # JSON said explicitly: a Response without a media type takes its handler's (HTML for the
    # OpenAPI router's not-found handler, see docs_error_hook)
    return Response(content={"error": error}, status_code=status, headers=headers or {}, media_type=MediaType.JSON)


def handle_http_exception(_: Request, exc: HTTPException) -> Response[dict[str, object]]:
    return http_error_response(exc.status_code, dict(exc.headers or {}))


def docs_error_hook(response: Response[Any]) -> Response[Any]:
    """``after_request`` of the OpenAPI router: an error its handlers return themselves (the
    HTML "Error 404" page of an unknown ``/schema/<name>``) becomes the contract's error body.

    The served documents (JSON, YAML, the HTML viewers) are 200s and pass through untouched;
    404s raised as exceptions (``/schema/x.json``) and 405s never reach this hook, they take
    the exception handlers like every other route."""
    if response.status_code >= 400:
        return http_error_response(response.status_code)
    return response


def handle_redis_down(request: Request, exc: Exception) -> Response[dict[str, object]]:
    log.warning("redis unavailable: %s", type(exc).__name__)
    request.app.state.metrics.redis_errors.labels("request").inc()
    return error_response(
        ServiceUnavailable(
            "The broker's datastore is unreachable; retry shortly.",
            code="redis_unavailable",
            headers={"Retry-After": "1"},
        )
    )


def handle_unexpected(request: Request, exc: Exception) -> Response[dict[str, object]]:
    log.exception("unhandled error on %s %s", request.method, request.scope.get("path"))
    return Response(
        content={"error": {"code": "internal_error", "message": "An internal error occurred."}},
        status_code=500,
    )


EXCEPTION_HANDLERS = {
    BrokerError: handle_broker_error,
    HTTPException: handle_http_exception,
    RedisConnectionError: handle_redis_down,
    RedisTimeoutError: handle_redis_down,
    ConnectionError: handle_redis_down,
    Exception: handle_unexpected,
}
