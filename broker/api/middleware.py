"""Outermost ASGI wrapper: RED metrics for every answer the app gives (401s and 404s
included, labelled by route template, or 'unmatched'), a request id (``X-Request-Id``
header, bound to the log context of everything the request logs) and one structured
access log line per request (ops routes at DEBUG)."""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from broker.logs import bind_log_context, reset_log_context
from broker.metrics import ApiMetrics

access_log = logging.getLogger("broker.access")

OPS_ROUTES = frozenset({"/metrics", "/healthz", "/readyz"})


def metrics_middleware(app: ASGIApp, metrics: ApiMetrics) -> ASGIApp:
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        request_id = secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id  # type: ignore[typeddict-item]
        token = bind_log_context(request_id=request_id)
        metrics.http_in_progress.inc()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers: list[Any] = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers  # type: ignore[typeddict-unknown-key]
            await send(message)

        try:
            await app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("path_template") or "unmatched"  # type: ignore[misc]
            method = scope.get("method", "GET")
            metrics.http_in_progress.dec()
            metrics.http_requests.labels(route, method, str(status)).inc()
            metrics.http_duration.labels(route, method).observe(elapsed)
            access_log.log(
                logging.DEBUG if route in OPS_ROUTES else logging.INFO,
                "%s %s %d", method, route, status,
                extra={"fields": {"method": method, "route": route, "status": status,
                                  "duration_ms": round(elapsed * 1000, 2)}},
            )
            reset_log_context(token)

    return wrapped
